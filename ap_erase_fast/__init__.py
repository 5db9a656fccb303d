"""ap_erase_fast: concept erasure for Stable Diffusion with Adversarial Preservation.

    from ap_erase_fast import erase, EraseConfig
    result = erase(EraseConfig(model="tiny", erase=["garbage truck"], steps=20))

Nothing heavy is imported until it is used.
"""
from ._version import __version__

__all__ = ["__version__", "erase", "EraseConfig", "EraseResult", "UserError"]


def __getattr__(name):  # lazy: keep `import ap_erase_fast` cheap
    if name == "erase":
        from .api import erase
        return erase
    if name == "EraseConfig":
        from .config import EraseConfig
        return EraseConfig
    if name == "EraseResult":
        from .engine import EraseResult
        return EraseResult
    if name == "UserError":
        from .errors import UserError
        return UserError
    raise AttributeError(f"module 'ap_erase_fast' has no attribute {name!r}")
