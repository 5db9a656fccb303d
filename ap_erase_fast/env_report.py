"""``python -m ap_erase_fast.env_report``: versions and devices, for bug reports."""
from __future__ import annotations

import platform
from importlib import metadata


def collect() -> dict[str, str]:
    import torch

    from ._version import __version__

    info = {
        "ap_erase_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        info["cuda devices"] = ", ".join(torch.cuda.get_device_name(i)
                                         for i in range(torch.cuda.device_count()))
        info["cuda (torch build)"] = str(torch.version.cuda)
    # versions from package metadata: importing deepspeed or bitsandbytes just to read a
    # version string would print their start-up chatter
    for pkg in ("diffusers", "transformers", "safetensors", "accelerate", "triton",
                "bitsandbytes", "deepspeed", "xformers", "numpy", "scikit-learn", "nudenet"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    try:
        from .ops import available_backends

        info["gumbel_mix backends"] = ", ".join(available_backends())
    except Exception as exc:  # noqa: BLE001
        info["gumbel_mix backends"] = f"unavailable ({exc})"
    return info


def main() -> None:
    for key, value in collect().items():
        print(f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
