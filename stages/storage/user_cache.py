"""gptpipe's per-user cache: ``$XDG_CACHE_HOME/gptpipe``, or ``~/.cache/gptpipe`` when that is unset or empty."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache(*parts: str) -> Path:
    """A directory under gptpipe's per-user cache (not created here)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return base.joinpath("gptpipe", *parts)
