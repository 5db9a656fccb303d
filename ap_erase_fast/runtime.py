"""What every command shares, one floor below the commands (:mod:`.cli`, :mod:`.bench`, the
quality instrument) so that none of them imports another for it: the one-line command-line
parser, the third-party log silencer, a benchmark's default results folder and the
description of the machine a benchmark ran on."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path


class OneLineParser(argparse.ArgumentParser):
    """Reports a bad command line as one line and exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _errors_only(record) -> bool:
    """A logging filter: errors pass, lower levels do not."""
    import logging

    return record.levelno >= logging.ERROR


def _one_line_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
    """Python warnings as one 'warning:' line, without the source line that raised them."""
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


def quiet_libraries(quiet: bool = False) -> None:
    """Keep third-party log chatter (dtype notes, optional-kernel probes) off the terminal, so
    the user sees the progress bar, the summary and, on failure, one error line. Python
    warnings become one 'warning:' line each; ``quiet`` (--quiet: only errors) drops them."""
    import logging
    import os
    import warnings

    if os.environ.get("AP_ERASE_VERBOSE") == "1":
        return
    # (kernels: bitsandbytes' optional-kernel download, e.g. its offline-mode note)
    for name in ("bitsandbytes", "kernels", "DeepSpeed", "deepspeed", "accelerate",
                 "torch.distributed"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        # DeepSpeed sets its logger's level again when it is imported later (by a model load,
        # once it is installed): the filter stays
        logger.addFilter(_errors_only)
    warnings.showwarning = _one_line_warning
    if quiet:
        warnings.simplefilter("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    # their "Loading weights" / "Writing model shards" bars: our own bars say what is going on
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def new_results_dir(kind: str) -> Path:
    """The default results folder of a benchmark: a new ``bench-<kind>-<date-time>`` folder
    under the current one (never the package, never the committed reports)."""
    base = Path.cwd() / f"bench-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        path, k = base.with_name(f"{base.name}-{k}"), k + 1
    return path


def environment(device: str) -> dict:
    """The machine a benchmark ran on, for its report: versions, commit, CPU, date, device."""
    from .env_report import collect

    info = collect()
    commit = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).resolve().parents[1],
                                check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not a checkout
        pass
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    keep = ("ap_erase_fast", "python", "torch", "diffusers", "transformers", "bitsandbytes",
            "cuda devices", "cuda (torch build)")
    env = {k: v for k, v in info.items() if k in keep}
    env.update({"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "commit": commit, "cpu": cpu, "cpu cores": str(os.cpu_count()),
                "device": device})
    return env
