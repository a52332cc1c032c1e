"""Where dapo keeps what it builds or measures once per machine: the built-in tiny model
(`dapo.models.tiny`) and the kernel choices (`dapo.models.kernels`). No dapo imports, so any module
can ask."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$DAPO_CACHE``, else ``$XDG_CACHE_HOME/dapo``, else ``~/.cache/dapo``."""
    if os.environ.get("DAPO_CACHE"):
        return Path(os.environ["DAPO_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dapo"
