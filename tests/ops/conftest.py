"""Set-up for the ops tests.

* Explicitly requested backends must really run (``AP_ERASE_STRICT_BACKEND=1``): a silent
  fallback to the reference would make every backend test pass trivially.
* Freshly allocated outputs are poisoned with NaN (``torch.empty`` here, ``AP_ERASE_POISON`` in
  the C++ kernels) so an element a kernel forgets to write fails loudly.
* The ``cpp`` backend is JIT-built from csrc/ on first use when no prebuilt extension exists
  (cached by torch under $TORCH_EXTENSIONS_DIR); it is skipped only when no C++ compiler exists.
* Lanes: ``pytest tests/ops -m "not triton"`` (reference + native) and
  ``pytest tests/ops -m triton`` (Triton interpreter on CPU, real Triton on CUDA).
"""
import os

import pytest
import torch

os.environ["AP_ERASE_STRICT_BACKEND"] = "1"
os.environ["AP_ERASE_POISON"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: Triton backend tests (interpreter lane on CPU)")
    # triton 3.6's interpreter with numpy 2.x warns on every scalar loop bound
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:triton.runtime.interpreter")


_real_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    t = _real_empty(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype in (torch.int64, torch.int32):
        t.fill_(-1)
    return t


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    yield
