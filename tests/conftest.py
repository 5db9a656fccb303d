"""Test-wide set-up.

Triton kernels run on CPU tensors through Triton's interpreter, which must be switched on
before anything imports triton. On a machine with an NVIDIA device the real compiler is used.
"""
import os


def _has_nvidia_device() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


if "TRITON_INTERPRET" not in os.environ and not _has_nvidia_device():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
