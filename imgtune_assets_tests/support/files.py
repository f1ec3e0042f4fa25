"""File helpers for tests."""

from __future__ import annotations

import os
from pathlib import Path


def age(path: Path, seconds: float = 60) -> None:
    """Move ``path``'s modification time ``seconds`` back: older than the racy window (manifest.RACY_NS),
    its stat is trusted when it is next read."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


# A pipeline slow enough (about 0.1 s a file of 800×600 on one CPU) that a folder of 40 keeps Ray's
# tasks busy for seconds: time to interrupt a command in the middle of its work.
SLOW_STAGES = [("bilateral_filter", {"d": 9, "sigma_color": 50.0, "sigma_space": 50.0})]


def slow_folder(folder: Path, count: int = 40) -> list[str]:
    """``count`` random colour PNGs of 800×600 in a new ``folder``; their names."""
    import cv2
    import numpy as np

    folder.mkdir()
    rng = np.random.default_rng(5)
    names = [f"img-{i:02d}.png" for i in range(count)]
    for name in names:
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (600, 800, 3), dtype=np.uint8))
    return names


def wait_for_outputs(proc, folder: Path, count: int = 12, timeout: float = 180, pattern: str = "img-*.png") -> None:
    """Wait until ``folder`` holds ``count`` files of ``pattern`` (a command under way, time to interrupt
    it) while ``proc`` runs; fails if it never does."""
    import time

    deadline = time.monotonic() + timeout
    while (not (folder.is_dir() and len(list(folder.glob(pattern))) >= count) and time.monotonic() < deadline
           and proc.poll() is None):
        time.sleep(0.02)
    assert len(list(folder.glob(pattern))) >= count, "the command never got its tasks going"
