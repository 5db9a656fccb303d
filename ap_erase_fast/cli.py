"""``ap-erase``: the command line.

    ap-erase train --erase "garbage truck" --steps 20          # the built-in tiny model
    ap-erase train --model /path/to/stable-diffusion-v1-4 --erase "garbage truck" --output out/
    ap-erase env                                               # versions and devices
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as one line and exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from .config import add_arguments

    parser = _Parser(
        prog="ap-erase",
        description="Erase concepts from Stable Diffusion with Adversarial Preservation.")
    parser.add_argument("--version", action="version", version=f"ap_erase_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    train = sub.add_parser(
        "train", help="erase concepts from a model (fine-tunes its UNet)",
        description="Erase concepts from a Stable Diffusion UNet with Adversarial Preservation. "
                    "Every option can also be given as a key of --config FILE.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(train)
    ev = sub.add_parser(
        "eval", help="measure erasure and preservation of a trained run (or the base model)",
        description="Measure how much a run erased and what else it changed: epsilon-space "
                    "measures on any model, image-level detectors from local weight files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from .eval.cli import add_arguments as add_eval_arguments

    add_eval_arguments(ev)
    bench = sub.add_parser("bench", help="benchmarks: 'ap-erase bench step --help', "
                                         "'ap-erase bench quality --help'", add_help=False)
    bench.add_argument("what", choices=("step", "quality"),
                       help="step: outer steps/s and peak memory; quality: erasure and "
                            "preservation on ShapesWorld")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser("env", help="print versions, devices and optional backends")
    return parser


def quiet_libraries() -> None:
    """Keep third-party log chatter (dtype notes, optional-kernel probes) off the terminal, so
    the user sees the progress bar, the summary and, on failure, one error line."""
    import logging
    import os
    import warnings

    if os.environ.get("AP_ERASE_VERBOSE") == "1":
        return
    for name in ("bitsandbytes", "DeepSpeed", "deepspeed", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _train(args: argparse.Namespace) -> int:
    from .config import config_from_args

    cfg = config_from_args(args)
    quiet_libraries()
    from .api import erase

    result = erase(cfg)
    if not cfg.quiet and int(os.environ.get("RANK", "0")) == 0:
        info = result.run_info
        calls = info["unet_calls_per_outer_step"]
        print(f"erased {', '.join(repr(c) for c in cfg.erase)} from {info['model']['id']} in "
              f"{info['outer_steps']} outer steps ({info['timings']['train_s']:.1f} s, "
              f"{sum(calls.values()):.0f} UNet evaluations per step)")
        if info["model"]["random_weights"]:
            print("note: " + info["notice"])
        print(f"output: {result.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad command line (already reported)
        return int(exc.code or 0)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            quiet_libraries()
            from .eval.cli import run as run_eval

            return run_eval(args)
        if args.command == "bench":
            if args.what == "quality":
                quiet_libraries()
                from .shapes.quality import main as bench_main
            else:
                from .bench import main as bench_main

            try:
                return bench_main(args.rest)
            except SystemExit as exc:  # its own --help or a bad flag (already reported)
                return int(exc.code or 0)
        if args.command == "env":
            from .env_report import main as env_main

            env_main()
            return 0
        parser.print_help()
        return 2
    except UserError as exc:
        msg = " ".join(str(exc).split())
        print(f"error: {msg}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
