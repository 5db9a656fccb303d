"""Stopping a run on Ctrl-C (SIGINT) or SIGTERM.

The command line installs :func:`install`'s handlers; each raises in the main thread at whatever
Python line is running, so every clean-up (``finally``, temporary folders, locks) runs. When that
line happens to be a ``__del__`` method or a weakref / garbage-collector callback, Python prints
"Exception ignored in ..." and goes on: the stop request would be lost and the run would finish
as if never asked to stop. The handlers therefore also record the request, and the training loop
calls :func:`check` at every outer step, which raises it again.

Used from Python without the command line, nothing is installed and :func:`check` does nothing
(Python's own Ctrl-C handling applies).
"""
from __future__ import annotations

import signal
import threading
from typing import Callable


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every clean-up runs."""


_PENDING: list[int] = []  # the signals received since install(), in order


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum, frame):  # noqa: ARG001 - signal handler signature
    _PENDING.append(signum)
    raise _exception(signum)


def install() -> Callable[[], None]:
    """Handle SIGTERM and SIGINT as described above where they still have Python's default
    handling (a handler set by the caller is left alone), outside the main thread nothing.
    Returns the function that restores the previous handlers and forgets pending requests."""
    _PENDING.clear()
    if threading.current_thread() is not threading.main_thread():
        return _PENDING.clear
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    replaced = {}
    for sig, default in defaults.items():
        if signal.getsignal(sig) == default:
            signal.signal(sig, _handler)
            replaced[sig] = default

    def restore() -> None:
        for sig, previous in replaced.items():
            if signal.getsignal(sig) is _handler:
                signal.signal(sig, previous)
        _PENDING.clear()

    return restore


def check() -> None:
    """Raise the first stop request received since :func:`install` again (it was swallowed
    where it was first raised); nothing when there is none."""
    if _PENDING:
        raise _exception(_PENDING[0])
