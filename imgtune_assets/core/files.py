"""Atomic file writes: every file imgtune writes appears whole or not at all."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from collections.abc import Iterable, Mapping
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
    tmp_name = _write_temporary(target, data)
    try:
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)  # the original (if any) is untouched
        raise
    return target


def atomic_write_all(files: Mapping[str | os.PathLike, bytes], remove: Iterable[str | os.PathLike] = ()) -> None:
    """Write several files as one set (a report's): every file first to a temporary beside it, flushed
    to disk, then every rename, then ``remove`` goes. A write that fails (a full disk) leaves every file
    of the set as it was; the renames that follow need no space."""
    written: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            written.append((_write_temporary(Path(path), data), Path(path)))
    except BaseException:
        for tmp_name, _ in written:
            Path(tmp_name).unlink(missing_ok=True)
        raise
    for tmp_name, target in written:
        os.replace(tmp_name, target)
    for path in remove:
        Path(path).unlink(missing_ok=True)


def _write_temporary(target: Path, data: bytes) -> str:
    """``data`` in a new temporary file beside ``target`` (``.<name>.XXXXXXXX.tmp``), flushed to disk,
    with the mode an ordinary write would give; its name. Nothing is left behind when it fails, and the
    error names ``target`` (a full disk's names no file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(target.name), suffix=TEMPORARY_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file private (0600); give it the mode an ordinary write would.
        os.chmod(tmp_name, 0o666 & ~_UMASK)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(target)) from exc
        raise
    return tmp_name


TEMPORARY_SUFFIX = ".tmp"
# .<name>.<mkstemp's 8 characters>.tmp
_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX))


def _temporary_prefix(name: str) -> str:
    return f".{name}."


def remove_temporaries(folder: str | os.PathLike, names: set[str] | None, older_than_seconds: float = 0.0,
                       made_since: float | None = None) -> list[Path]:
    """Remove the temporary files that ``atomic_write_bytes`` left in ``folder`` for the files ``names``
    when its process was killed between creating one and renaming it (a SIGKILL runs no clean-up), or,
    with ``names`` None, for any file: regular files named as ``mkstemp`` names them, last modified at least ``older_than_seconds`` ago (a live
    writer's is seconds old) and, with ``made_since`` (a time.time()), not before then (one run's own).
    Returns those removed; what cannot be listed or removed is left as it is."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or (names is not None and match.group(1) not in names):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            modified = entry.stat(follow_symlinks=False).st_mtime
            if now - modified >= older_than_seconds and (made_since is None or modified >= made_since):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone already, or not ours to remove (permissions, a read-only mount)
            continue
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(payload: Any) -> bytes:
    """``payload`` as the JSON files imgtune writes hold it (indented, keys sorted, NaN kept)."""
    return (json.dumps(payload, indent=2, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    return atomic_write_bytes(path, json_bytes(payload))
