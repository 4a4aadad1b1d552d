"""A fake cgroupfs in tmp_path: plain directories and files stand in for the kernel's."""

from __future__ import annotations

import shutil
from pathlib import Path


def remove_dir(path: Path) -> bool:
    """rmdir as cgroupfs does it: a group goes with its control files, but not while groups remain beneath it."""
    if path.exists() and any(p.is_dir() for p in path.iterdir()):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True
