"""Named fault-injection points for the fault tests (``tests/test_faults.py``).

``AP_ERASE_FAULT=NAME`` kills the process (SIGKILL, as ``kill -9`` does) the first time it
reaches the point NAME; ``NAME:N`` at the N-th time; ``AP_ERASE_FAULT_RANK=R`` restricts it to
the process of rank R (``RANK`` of the launcher). Unset, every point costs one dictionary look-up.

Points: ``checkpoint-write`` (a checkpoint half written: some of its files exist),
``checkpoint-publish`` (a checkpoint complete, not yet renamed into place), ``outputs-write``
(the final outputs half written), ``commit`` (the finished output complete beside its place, the
previous folder not yet moved aside) and ``commit-swap`` (the previous folder moved aside, the new
one not yet renamed into place).
"""
from __future__ import annotations

import os
import signal
import sys
import time

POINTS = ("checkpoint-write", "checkpoint-publish", "outputs-write", "commit", "commit-swap")
_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("AP_ERASE_FAULT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    rank = os.environ.get("AP_ERASE_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1):
        print(f"fault point {name}: SIGKILL at {time.time():.3f}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
