"""The README's quickstart is exactly two commands, and CI runs the second one verbatim."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_is_two_commands_and_ci_runs_the_test_command():
    install_and_run, test = quickstart_commands()
    assert "ap-erase train" in install_and_run and "pip install" in install_and_run
    assert "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci


def test_config_reference_is_up_to_date():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_config_doc.py"), "--check"])
    assert proc.returncode == 0, "docs/CONFIG.md is stale: run python tools/gen_config_doc.py"


def _section(title):
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_outputs_table_lists_what_a_run_writes_and_when():
    """The Outputs table listed unet/ as always there (a LoRA run without --merge has none)
    and left out README.md, lora/, lora_kohya.safetensors, eval/ and the checkpoints."""
    from ap_erase_fast.outdir import TRAIN_OUTPUT_NAMES

    rows = {}
    for line in _section("Outputs").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            rows[cells[0]] = cells[1]
    names = {n.strip("`").split("`")[0].rstrip("/") for n in rows}
    expected = set(TRAIN_OUTPUT_NAMES) - {"README.md.tmp"}
    assert expected <= names, expected - names
    assert "eval" in names and any("checkpoints" in n for n in rows)
    unet = rows["`unet/`"]
    assert "always" not in unet and "--merge" in unet and "--lora-rank" in unet


def test_models_doc_does_not_deny_eval_on_sdxl():
    """docs/models.md said 'ap-erase eval' was not covered on SDXL; tests/test_sdxl.py runs it."""
    import re

    text = " ".join((ROOT / "docs" / "models.md").read_text().split())
    for sentence in re.split(r"(?<=[.:;])\s", text):
        if "ap-erase eval" in sentence:
            assert not re.search(r"not (covered|implemented|supported)", sentence), sentence
    assert "StableDiffusionXLPipeline" in text


def test_benchmarks_doc_says_what_a_user_needs_not_one_machines_tooling():
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    for machine_detail in (".whl", "gpu_wheels", "device tool", "image has Python",
                           "Wheels to carry"):
        assert machine_detail not in text, machine_detail
    need = text.split("**What you need.**", 1)[1].split("\n\n", 1)[0]
    assert 'pip install ".[test]"' in need and "CUDA" in need


def _results_rows(name):
    """The rows of a committed step benchmark CSV by config name (its first line is the
    machine header)."""
    import csv

    lines = (ROOT / "benchmarks" / "results" / name).read_text().splitlines()
    return {r["config"]: r for r in csv.DictReader(lines[1:])}


def test_real_model_section_says_where_weights_go_and_what_memory_each_preset_needs():
    """A user with an SD1.5 or SDXL checkpoint can follow the README: where the weights go,
    the memory of each preset (numbers from the committed results only; GPU: not measured
    yet), and a command for a 24 GB card that the program accepts."""
    import shlex

    section = _section("A real model")
    for form in ("sd15", ".safetensors", "sdxl-base", "sd_xl_base_1.0.safetensors"):
        assert form in section, form
    files = {"SD1.x": "step_sd14_cpu_memory.csv", "SDXL": "step_sdxl_cpu_memory.csv"}
    columns = ("params_gib", "theta_copy_gib", "grads_gib", "optimizer_state_gib", "peak_gib")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith(("| SD1.x |", "| SDXL |"))]
    assert len(rows) >= 8
    for model, config, *numbers, vram in rows:
        assert files[model].replace(".csv", ".md") in section
        measured = _results_rows(files[model])[config.strip("`")]
        for column, shown in zip(columns, numbers):
            assert float(shown) == round(float(measured[column]), 2), (model, config, column)
        assert vram == "not measured on GPU yet"
    card = section.split("**A 24 GB card.**", 1)[1]
    command = " ".join(card.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ").split())
    for option in ("--lora-rank", "--gradient-checkpointing", "--optimizer adamw8bit"):
        assert option in command
    from ap_erase_fast.cli import build_parser
    from ap_erase_fast.config import config_from_args

    argv = shlex.split(command)
    assert argv[:2] == ["ap-erase", "train"]
    cfg = config_from_args(build_parser().parse_args(argv[1:]))
    assert cfg.lora_rank and cfg.gradient_checkpointing and cfg.optimizer == "adamw8bit"
