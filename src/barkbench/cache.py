"""The cache of what barkbench builds once and reuses (synthetic checkpoints, the 2023 stack's environment): its
folder, and building a folder into it atomically."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("BARKBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "barkbench")
    return Path(root)


def build_dir(target: Path, build: Callable[[Path], None], complete: str) -> bool:
    """Build the folder `target` once: `build(staged)` creates and fills a folder beside it, renamed into place
    when `build` returned, so a half-built folder is never used. The file `complete` inside it says the folder
    is whole: when it is there, nothing is built. Returns whether this call built it (False: it was there, or
    another process finished first)."""
    if (target / complete).exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        staged = Path(tmp) / target.name
        build(staged)
        try:
            os.replace(staged, target)
            return True
        except OSError:  # another process finished first
            if not (target / complete).exists():
                raise
            return False
