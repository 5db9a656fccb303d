"""``ap-erase``: the command line.

    ap-erase train --erase "garbage truck" --steps 20          # the built-in tiny model
    ap-erase train --model /path/to/stable-diffusion-v1-4 --erase "garbage truck" --output out/
    ap-erase env                                               # versions and devices
"""
from __future__ import annotations

import argparse
import os
import sys

from . import interrupts
from ._version import __version__
from .errors import UserError
from .runtime import OneLineParser as _Parser
from .runtime import quiet_libraries


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help only where the help does not already say its
    default and there is one to say (not None, not a plain flag's False)."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if ("default" in help_text.lower() or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)


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
        formatter_class=_HelpFormatter)
    add_arguments(train)
    ev = sub.add_parser(
        "eval", help="measure erasure and preservation of a trained run (or the base model)",
        description="Measure how much a run erased and what else it changed: epsilon-space "
                    "measures on any model, image-level detectors from local weight files.",
        formatter_class=_HelpFormatter)
    from .eval.cli import add_arguments as add_eval_arguments

    add_eval_arguments(ev)
    at = sub.add_parser(
        "attack", help="attack the erased model of a trained run: does the erasure hold?",
        description="Attack a run's erased model (a white-box adversarial prompt, concept "
                    "inversion, rephrasings on ShapesWorld 2) and judge whether the concept "
                    "comes back.",
        formatter_class=_HelpFormatter)
    from .attack.cli import add_arguments as add_attack_arguments

    add_attack_arguments(at)
    bench = sub.add_parser(
        "bench", help="benchmarks: 'ap-erase bench step --help', 'ap-erase bench quality --help'",
        description="Benchmarks. Results go to a new folder under the current one unless --out "
                    "names one; 'ap-erase bench step --help' and 'ap-erase bench quality --help' "
                    "list their options.")
    bench.add_argument("what", choices=("step", "quality", "ablations"),
                       help="step: outer steps/s and peak memory; quality: erasure and "
                            "preservation on ShapesWorld; ablations: one table over the "
                            "finished ablation tags of 'bench quality'")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    sub.add_parser("env", help="print versions, devices and optional backends")
    return parser


def _train(args: argparse.Namespace) -> int:
    from .config import config_from_args
    from .outdir import default_output_dir

    cfg = config_from_args(args)
    cfg.output = cfg.output or default_output_dir(cfg)
    _RUN["output"] = cfg.output
    _error_log_beside(cfg.output)
    quiet_libraries(quiet=cfg.quiet)
    threads = _apply_threads(getattr(args, "threads", None))
    if not cfg.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(threads, flush=True)
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


def _apply_threads(threads: int | None) -> str:
    """Set torch's intra-op thread count (``--threads``; None: keep torch's) and return the
    line that says what it is and where it came from."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        source = "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        source = "OMP_NUM_THREADS"
    else:
        source = "torch's default: one per core"
    n = torch.get_num_threads()
    return (f"threads: {n} CPU thread{'s' if n != 1 else ''} ({source}); --threads N or "
            f"OMP_NUM_THREADS=N sets it (on a busy machine fewer can be much faster), and results "
            f"are bit-identical only at the same count")


# Where the traceback of an unexpected error goes: beside the command's output folder once it is
# known, else the current folder (else the temporary folder).
_ERROR_LOG: dict[str, str | None] = {"path": None}
# The output folder of the train command (its checkpoints are named when a signal stops it).
_RUN: dict[str, str | None] = {"output": None}


def _stopped(what: str, detail: str = "") -> str:
    """The one line of a run stopped by a signal: no output, and the checkpoints that
    ``--resume auto`` continues from, when there are some."""
    line = f"error: {what}; no output was written{detail}"
    if _RUN["output"]:
        from pathlib import Path

        from .checkpoint import step_folders
        from .export import checkpoint_root_for

        steps = step_folders(Path(checkpoint_root_for(_RUN["output"])))
        if steps:
            line += (f", but its checkpoints are kept (the newest is {steps[-1]}): rerun with "
                     f"--resume auto to continue from there")
    return line


def _error_log_beside(output: str | os.PathLike) -> None:
    """Send a traceback of an unexpected error to ``<output>.error.log``, beside the output
    folder (which a failed run does not create)."""
    from pathlib import Path

    out = Path(os.path.abspath(output))
    rank = os.environ.get("RANK", "0")
    _ERROR_LOG["path"] = str(out.parent / f"{out.name}.error{'' if rank == '0' else '-rank' + rank}.log")


def _write_traceback(exc: BaseException) -> str | None:
    import tempfile
    import time
    import traceback

    from pathlib import Path

    text = (f"ap-erase {__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            f"command: {' '.join(sys.argv)}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    candidates = [_ERROR_LOG["path"], os.path.join(os.getcwd(), "ap-erase-error.log"),
                  os.path.join(tempfile.gettempdir(), f"ap-erase-error-{os.getpid()}.log")]
    for path in filter(None, candidates):
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
            return path
        except OSError:
            continue
    return None


def _lost_a_peer(exc: BaseException) -> bool:
    """A collective failed because another rank died (gloo/NCCL report it as RuntimeError)."""
    text = str(exc)
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 and isinstance(exc, RuntimeError)
            and any(s in text for s in ("Connection reset by peer", "Connection closed by peer",
                                        "NCCL", "gloo", "ProcessGroup")))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad command line (already reported)
        return int(exc.code or 0)
    _ERROR_LOG["path"] = None
    _RUN["output"] = None
    restore_signals = interrupts.install()
    try:
        return _run(parser, args)
    except UserError as exc:
        msg = " ".join(str(exc).split())
        if exc.exit_code == 0:  # nothing to do (--resume auto on a finished run): not a failure
            print(msg)
            return 0
        print(f"error: {msg}", file=sys.stderr)
        return exc.exit_code
    except interrupts.Terminated:
        print(_stopped("terminated", " (temporary files removed)"), file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(_stopped("interrupted"), file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one-line promise holds for bugs too
        log = _write_traceback(exc)
        first = " ".join(str(exc).split())[:300]
        where = f"the traceback is in {log}" if log else "no traceback could be written"
        if _lost_a_peer(exc):
            print(f"error: another process of this distributed run stopped, so this one (rank "
                  f"{os.environ.get('RANK', '?')}) cannot go on; the other's output says why "
                  f"({type(exc).__name__}: {first[:160]}; {where})", file=sys.stderr)
            return 1
        print(f"error: unexpected {type(exc).__name__}: {first} ({where}; if it looks like a bug, "
              f"please report it with that file and the output of 'ap-erase env')",
              file=sys.stderr)
        return 1
    finally:
        restore_signals()


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        output = args.output or (os.path.join(args.run, "eval-base" if args.base_only else "eval")
                                 if args.run else None)
        if output:
            _error_log_beside(output)
        quiet_libraries(quiet=args.quiet)
        from .eval.cli import run as run_eval

        return run_eval(args)
    if args.command == "attack":
        if args.output or args.run:
            _error_log_beside(args.output or os.path.join(args.run, "attack"))
        quiet_libraries(quiet=args.quiet)
        from .attack.cli import run as run_attack

        return run_attack(args)
    if args.command == "bench":
        if args.what == "quality":
            quiet_libraries()
            from .quality.cli import main as bench_main
        elif args.what == "ablations":
            from .quality.ablations import main as bench_main
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


if __name__ == "__main__":
    sys.exit(main())
