"""File helpers for tests."""

from __future__ import annotations

import os
from pathlib import Path


def age(path: Path, seconds: float = 60) -> None:
    """Move ``path``'s modification time ``seconds`` back: older than the racy window (manifest.RACY_NS),
    its stat is trusted when it is next read."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))
