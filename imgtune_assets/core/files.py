"""Atomic file writes: every file imgtune writes appears whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is not safe beside other threads.
_UMASK = _umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    The rename is atomic on POSIX, so a reader (or a crash) never sees half a file; the data is flushed
    to disk (``fsync``) before the rename, so a power cut cannot leave the new name on an empty file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(target.name), suffix=TEMPORARY_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file private (0600); give it the mode an ordinary write would.
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, target)
    except BaseException:
        # Leave no temporary file behind; the original (if any) is untouched.
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


TEMPORARY_SUFFIX = ".tmp"


def _temporary_prefix(name: str) -> str:
    return f".{name}."


def remove_temporaries(folder: str | os.PathLike, names: set[str], older_than_seconds: float = 0.0) -> list[Path]:
    """Remove the temporary files that ``atomic_write_bytes`` left in ``folder`` for the files ``names``
    when its process was killed between creating one and renaming it (a SIGKILL runs no clean-up), if
    last modified at least ``older_than_seconds`` ago (a live writer's is seconds old). Returns those
    removed; a folder that cannot be listed, or a file already gone, is no error."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)):
            continue
        # .<name>.<8 random characters>.tmp, as mkstemp makes them
        stem = name[1:-len(TEMPORARY_SUFFIX)].rsplit(".", 1)[0]
        if stem not in names:
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime >= older_than_seconds:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            pass
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, allow_nan=True) + "\n")
