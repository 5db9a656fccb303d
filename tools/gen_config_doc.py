#!/usr/bin/env python
"""Regenerate docs/CONFIG.md from the EraseConfig dataclass (the single source of every option).

    python tools/gen_config_doc.py            # rewrite docs/CONFIG.md
    python tools/gen_config_doc.py --check    # exit 1 if it is out of date (used by the tests)
"""
import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENVIRONMENT = [
    ("AP_ERASE_CACHE", "Cache folder (tiny model, vocabulary embeddings, JIT builds). Default "
     "`$XDG_CACHE_HOME/ap_erase_fast` or `~/.cache/ap_erase_fast`."),
    ("HF_HUB_OFFLINE", "`1`: never contact the Hugging Face hub; a hub id that is not cached fails "
     "at once with a clear message."),
    ("TRITON_INTERPRET", "`1`: run Triton kernels on CPU tensors through Triton's interpreter "
     "(tests only; must be set before triton is imported)."),
    ("AP_ERASE_BUILD_EXT", "`0`: skip building the optional `csrc/` extension at install time."),
    ("AP_ERASE_STRICT_BACKEND", "`1`: an explicitly requested `gumbel_mix` backend that cannot "
     "run raises instead of warning and falling back to the PyTorch reference."),
    ("AP_ERASE_JIT", "`1`: allow `available_backends()` to JIT-build the C++ extension."),
    ("AP_ERASE_VERBOSE", "`1`: keep third-party log lines and progress bars (hidden by default)."),
    ("AP_ERASE_FAULT", "Tests only: `NAME` or `NAME:N` kills the process (SIGKILL) the N-th time "
     "it reaches the fault point NAME (`checkpoint-write`, `checkpoint-publish`, "
     "`outputs-write`, `commit`, `commit-swap`; see `ap_erase_fast/faults.py`)."),
    ("AP_ERASE_FAULT_RANK", "Tests only: restrict `AP_ERASE_FAULT` to the process of this rank."),
]


def render() -> str:
    from ap_erase_fast.config import _GROUP_TITLES, EraseConfig

    lines = ["# Configuration reference", "",
             "Every option is a flag of `ap-erase train` (`--train-method`) and a key of a "
             "`--config` YAML/JSON file (`train_method` or `train-method`). Flags override the "
             "file; unknown keys are errors. Generated from `ap_erase_fast/config.py` by "
             "`tools/gen_config_doc.py`.", ""]
    for group, title in _GROUP_TITLES.items():
        lines += [f"## {title[0].upper() + title[1:]}", "", "| key / flag | default | meaning |",
                  "|---|---|---|"]
        for f in dataclasses.fields(EraseConfig):
            if f.metadata["group"] != group:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            meaning = f.metadata["help"] + (f" Choices: {', '.join(choices)}." if choices else "")
            lines.append(f"| `{f.name}` / `--{f.name.replace('_', '-')}` | `{default!r}` | "
                         f"{meaning} |")
        lines.append("")
    lines += ["## Environment variables", "", "| variable | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in ENVIRONMENT]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    target = ROOT / "docs" / "CONFIG.md"
    text = render()
    if ap.parse_args().check:
        sys.exit(0 if target.exists() and target.read_text() == text else 1)
    target.write_text(text)
    print(f"wrote {target}")
