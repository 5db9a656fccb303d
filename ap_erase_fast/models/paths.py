"""Where the library keeps its on-disk caches."""
from __future__ import annotations

import os


def cache_root() -> str:
    """``$AP_ERASE_CACHE``, else ``$XDG_CACHE_HOME/ap_erase_fast``, else ``~/.cache/ap_erase_fast``."""
    explicit = os.environ.get("AP_ERASE_CACHE")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = os.path.expanduser(xdg) if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "ap_erase_fast"))
