"""Scanning a data folder into an image manifest.

Layout: ``DATA/images/<stem>.<ext>`` with optional ground truth in ``DATA/targets/<stem>.<ext>``;
``DATA`` is a local folder or an fsspec URL (``s3://bucket/prefix``).
A folder without an ``images/`` sub-folder is read as a flat folder of images (targets, if any, in
``DATA/targets/``). Unusable files become rows with ``status: skipped`` and a ``reason``; the sweep
goes on with the rest. A folder with nothing usable is an error.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from imgtune_assets.core import storage
from imgtune_assets.core.imageio import IMAGE_SUFFIXES, ImageReadError, decode_image, format_suffix, probe_image
from imgtune_assets.core.storage import Location


class ManifestError(ValueError):
    """The data folder as a whole cannot be used (missing, empty, nothing usable)."""


class UndecodableFile(ImageReadError):
    """A file the manifest took (its header and structure check out) that does not decode: damage
    inside its compressed pixels. ``path`` names it, ``key`` is its content key (as the manifest's)."""

    def __init__(self, message: str, path: str, key: str | None):
        super().__init__(message)
        self.path, self.key = path, key


# Files found undecodable by a run, by content key, in the sweep's output folder: the next manifest
# skips them with the reason, so a nightly sweep does not fail on the same file night after night; a
# replaced file has another key and is read again.
UNDECODABLE_FILE = "undecodable.json"


def read_undecodable(sweep_dir: str | os.PathLike) -> dict[str, dict]:
    """The files earlier runs found undecodable, by content key (empty when none)."""
    import json

    file = Path(sweep_dir) / UNDECODABLE_FILE
    try:
        known = json.loads(file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{file}: unreadable ({exc}); delete it to read every image again") from None
    if not isinstance(known, dict) or not all(isinstance(v, dict) for v in known.values()):
        raise ManifestError(f"{file}: not a mapping of content keys to findings; delete it to read every image again")
    return known


def record_undecodable(sweep_dir: str | os.PathLike, path: str, key: str | None, reason: str) -> str:
    """Record a file a run could not decode (atomic update) and return what to tell the user."""
    import fcntl

    from imgtune_assets.core.files import atomic_write_json

    file = Path(sweep_dir) / UNDECODABLE_FILE
    if key is None:  # no content key to recognise it by: nothing to record
        return f"{reason}: it passed the manifest's checks but does not decode; replace or remove the file"
    file.parent.mkdir(parents=True, exist_ok=True)
    # Two runs failing at once must not lose one's finding: read, add and write under a lock.
    with open(file.with_name(UNDECODABLE_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = read_undecodable(sweep_dir)
        known[key] = {"path": path, "reason": reason,
                      "found_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_json(file, known)
    return (f"{reason}: it passed the manifest's checks (header and structure) but does not decode. Recorded in "
            f"{file}: the next image_manifest skips it with this reason (a replaced file is read again), and the "
            f"next run of the sweep scores the other images (a new set of images: its trials are run again)")


def skip_undecodable(rows: list[ManifestRow], known: dict[str, dict]) -> list[ManifestRow]:
    """``rows`` with every usable row whose image or target an earlier run found undecodable skipped,
    with that reason."""
    out = []
    for row in rows:
        found = known.get(row.image_sha256 or "") or known.get(row.target_sha256 or "")
        if row.status == "ok" and found:
            row = replace(row, status="skipped",
                          reason=f"does not decode (found by a run at {found['found_at']}: {found['reason']}); "
                                 f"replace the file to use it again")
        out.append(row)
    return out


def skip_too_small(rows: list[ManifestRow], metric: str, min_side: int) -> list[ManifestRow]:
    """``rows`` with every usable image narrower or lower than ``min_side`` pixels skipped, with the
    reason: ``metric`` cannot score it, and would fail every trial on it."""
    out = []
    for row in rows:
        if row.status == "ok" and row.width is not None and row.height is not None \
                and min(row.width, row.height) < min_side:
            row = replace(row, status="skipped",
                          reason=f"{row.width}x{row.height} pixels: {metric} needs images of at least "
                                 f"{min_side}x{min_side}")
        out.append(row)
    return out


def sweep_rows(scanned: list[ManifestRow], sweep_dir: str | os.PathLike, metric: str, min_side: int
               ) -> list[ManifestRow]:
    """A sweep's manifest rows from a scan of its folder, as ``image_manifest`` and the new-images sensor
    both compute them: the files earlier runs found undecodable skipped (``read_undecodable``), and the
    images too small for the metric (``skip_too_small``)."""
    return skip_too_small(skip_undecodable(scanned, read_undecodable(sweep_dir)), metric, min_side)


@dataclass
class ManifestRow:
    id: str
    image_path: str
    target_path: str | None
    image_sha256: str | None
    target_sha256: str | None
    width: int | None
    height: int | None
    channels: int | None
    dtype: str | None
    status: str  # "ok" | "skipped"
    reason: str | None = None
    # A local file's stat (``local_stat``) when it was hashed: a run re-hashes only a file whose stat changed.
    image_stat: str | None = None
    target_stat: str | None = None
    # The image file's size in bytes (its listing's, for an object): with its pixel count, how much detail
    # it holds (bits per pixel), which successive halving spreads its first rungs over (core/search.py).
    image_bytes: int | None = None

    @classmethod
    def from_record(cls, record: dict) -> "ManifestRow":
        """A row from a plain record: run_settings' pinned images, or a manifest DataFrame's row (where
        pandas writes NaN for a missing value, and so a whole number of such a column as a float)."""
        def plain(key: str, value: Any) -> Any:
            if isinstance(value, float):
                if value != value:
                    return None
                if key in _INT_FIELDS and value.is_integer():
                    return int(value)
            return value

        return cls(**{k: plain(k, v) for k, v in record.items()})

    def to_record(self) -> dict:
        return dict(vars(self))


_INT_FIELDS = {f.name for f in fields(ManifestRow) if str(f.type).startswith("int")}


# An object store's header probe reads this much of each object (a JPEG's size can follow its EXIF block).
HEAD_BYTES = 256 * 1024
# ... and, of a larger PNG or JPEG, this much of its end, where a whole one has its end chunk or marker.
TAIL_BYTES = 64 * 1024


# A data folder's ground truth: targets/<image stem>.<image suffix>.
TARGETS_FOLDER = "targets"


def image_folders(data_dir: Location) -> tuple[Location, Location]:
    images = data_dir / "images"
    return (images if storage.is_folder(images) else data_dir), data_dir / TARGETS_FOLDER


def unread_sub_folders(data_dir: Location, image_dir: Location, folders: Iterable[Location]) -> list[Location]:
    """The sub-folders of ``image_dir`` (``image_folders(data_dir)[0]``) that hold no images of the data
    folder and are worth saying so: all of them, except a flat data folder's ``targets/``, which is its
    targets."""
    return [f for f in folders if image_dir != data_dir or f.name != TARGETS_FOLDER]


def targets_by_stem(target_files: Iterable[tuple[Location, dict]]) -> dict[str, list[tuple[Location, dict]]]:
    """The image-typed target files of each image stem, in listing order: one is that image's target;
    more than one (``p6.png`` and ``p6.jpg``) is ambiguous, and ``listed_files`` skips the image."""
    targets: dict[str, list[tuple[Location, dict]]] = {}
    for file, info in target_files:
        if file.suffix.lower() in IMAGE_SUFFIXES:
            targets.setdefault(Path(file.name).stem, []).append((file, info))
    return targets


def listed_files(files: Iterable[tuple[Location, dict]], targets: dict[str, list[tuple[Location, dict]]]
                 ) -> Iterator[tuple[tuple[Location, dict], tuple[Location, dict] | None, str | None]]:
    """``((file, info), target, reason)`` for every listed file, in listing order. The manifest reads a
    file whose ``reason`` is None (image-typed, the first of its stem; ``target`` its target or None);
    any other file is skipped, and ``reason`` says why — also an image with two or more targets: which
    one is the ground truth is the user's to say, not the listing order's."""
    seen: dict[str, str] = {}  # stem -> the file of that stem that came first
    for file, info in files:
        stem = Path(file.name).stem
        candidates = targets.get(stem, [])
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            yield (file, info), None, (f"not an image file type ({file.suffix or 'no suffix'}; "
                                       f"expected one of {', '.join(IMAGE_SUFFIXES)})")
        elif stem in seen:
            yield (file, info), None, f"duplicate id {stem!r}: {seen[stem]} has the same stem and comes first"
        elif len(candidates) > 1:
            seen[stem] = file.name
            names = ", ".join(sorted(target.name for target, _ in candidates))
            yield (file, info), None, f"{len(candidates)} targets of the same stem ({names}): keep one"
        else:
            seen[stem] = file.name
            yield (file, info), candidates[0] if candidates else None, None


def _relative(file: Location, data_dir: Location) -> str:
    return str(file)[len(str(data_dir)):].lstrip("/")


# A file modified this recently when it is hashed may be modified again within the same tick of the
# file system's clock (coarse on many: a few ms, 1-2 s on some), keeping its size and mtime: its stat
# is not trusted later and the run hashes it again (git's "racy" index entries, the same rule).
RACY_NS = 2_000_000_000


def local_stat(file: Location) -> str | None:
    """``size:mtime_ns:inode:ctime_ns`` of a local file (None for an object, or a file that cannot be
    stat'ed): by which a file is taken as unchanged without reading it. The inode and ctime, as git's
    index keeps them, because no copy that keeps the mtime (``cp -p``, ``tar x``, ``rsync -t``, an
    unzip) keeps them: a replaced file of the same size and time is read again."""
    if storage.is_remote(file):
        return None
    try:
        st = os.stat(file)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def stat_digest(data_dir: Location) -> str:
    """The new-images sensor's quick test for a changed data folder: a hash of (folder, name, stat) of every file the manifest lists in the images and targets folders,
    from one listing per folder, no file read: a local file's stat as the manifest takes it
    (``local_stat``: size, mtime, inode, ctime — a file replaced by a copy that kept its size and mtime
    counts as changed; none for a broken symbolic link), an object's content tag and size."""
    image_dir, target_dir = image_folders(data_dir)
    digest = hashlib.sha256()
    for folder in (image_dir, target_dir):
        if not storage.is_folder(folder):
            continue
        for file, info in storage.list_files(folder):
            stat = storage.content_key_of_info(info) if storage.is_remote(file) else local_stat(file)
            digest.update(f"{folder.name}/{file.name}\0{stat}\n".encode())
    return digest.hexdigest()[:16]


def _trusted_stat(before: str | None, after: str | None, read_at_ns: int) -> str | None:
    """The stat to record for a file hashed between ``before`` and ``after``: none if it changed while
    it was read, or was modified less than ``RACY_NS`` before it was read."""
    if before is None or before != after:
        return None
    mtime_ns = int(before.split(":")[1])
    return before if read_at_ns - mtime_ns >= RACY_NS else None


def _probe(file: Location, info: dict) -> tuple[str, str | None, int | None, tuple[int, int, int, str]]:
    """A file's content key, its stat, its size and its header: a local file is read once, hashed and
    checked whole; an object is keyed by its listing's tag and only its head is read (see ``storage``)."""
    if storage.is_remote(file):
        key = storage.content_key_of_info(info)
        size = info.get("size")
        head = storage.read_head(file, HEAD_BYTES)
        try:
            header = probe_image(head, file, whole=len(head) < HEAD_BYTES)
            if len(head) < HEAD_BYTES or _ends_whole(file, head, size):
                return key, None, size, header
        except ImageReadError:
            if len(head) < HEAD_BYTES:
                raise  # that was the whole object
        # A header beyond the head, or an end that does not look whole: read it all, once more at most.
        data = storage.read_bytes(file)
        return key, None, len(data), probe_image(data, file)
    refuse_unknown_format(file)
    data, key, stat = read_with_stat(file)
    return key, stat, len(data), probe_image(data, file)


def refuse_unknown_format(file: Location) -> None:
    """Raise ``ImageReadError`` for a local file whose first bytes are those of no image format imgtune
    reads, before the file is read whole (a multi-GB file named ``.png`` would be read, and held, all of
    it, on every scan)."""
    try:
        with open(file, "rb") as opened:
            head = opened.read(16)
    except OSError:
        return  # the whole read says what is wrong with it
    if head and format_suffix(head) is None and not (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        raise ImageReadError(f"{file}: not a decodable image (corrupt, truncated or not an image: no known image "
                             "format)")


def _ends_whole(file: Location, head: bytes, size: int | None) -> bool:
    """Whether an object larger than its ``head`` looks whole at its end, as ``probe_image`` checks a
    whole file: a BMP or WebP as long as its header says, a PNG ending with its end chunk, a JPEG with
    its end-of-image marker in its last ``TAIL_BYTES`` (one ranged read). False sends the object to a
    whole read: a truncated one is then skipped by the manifest, not found by the run; one that is whole
    after all (a JPEG with a video appended, as some phones write) passes. A TIFF larger than its head
    is read whole: its pages and strips may be anywhere in it (``imageio.check_tiff_structure``)."""
    kind = format_suffix(head)
    if kind == ".tiff":
        return False
    if size is None or kind not in (".bmp", ".webp", ".png", ".jpg"):
        return True
    if kind == ".bmp":
        return size >= int.from_bytes(head[2:6], "little")
    if kind == ".webp":
        return size >= 8 + int.from_bytes(head[4:8], "little")
    tail = storage.read_range(file, max(0, size - TAIL_BYTES), size)
    if kind == ".png":
        return tail.endswith(b"IEND\xaeB`\x82")
    return tail.rfind(b"\xff\xd9") >= 0


def read_with_stat(file: Location) -> tuple[bytes, str, str | None]:
    """A file's bytes, its content key (``storage.read_with_key``) and the stat to record for it: a
    local file's ``local_stat`` when it can be trusted later (``_trusted_stat``), else None (always
    None for an object, whose key is its tag)."""
    read_at_ns, before = time.time_ns(), local_stat(file)
    data, key = storage.read_with_key(file)
    return data, key, _trusted_stat(before, local_stat(file), read_at_ns)


class ProbeCache:
    """What earlier scans learnt of each file, so that a scan reads only the files that changed since.

    A file's probe (content key, stat, size, header) is reused when the file is as it was then: a local
    file's stat (``local_stat``: size, mtime, inode, ctime) equals the one recorded when it was hashed
    (recorded only when trusted, see ``_trusted_stat``: the same test by which a run skips re-hashing
    the files it reads; a copy that keeps the mtime is read again); an object's
    listing gives the same content key (tag and size). A nightly sweep over an unchanged
    folder, or the new-images sensor after a few files were added, reads the new and changed files
    only; ``touch`` makes a file be read again. Kept as JSON in the sweep's output folder
    (``PROBE_CACHE_FILE``), by the file's full location; a missing or damaged file is an empty cache
    (it is only a cache: every entry can be computed again). ``save`` writes the entries of the files
    this scan met (vanished files drop out), whole (a scan of the same folder in another process,
    the sensor's, may write it too: either is right). Thread-safe for ``scan_folder``'s pool.
    """

    def __init__(self, file: str | os.PathLike | None = None, entries: dict[str, dict] | None = None):
        self.file = Path(file) if file is not None else None
        self.known: dict[str, dict] = entries or {}
        self.seen: dict[str, dict] = {}
        self.reused = 0
        self.read = 0
        self._count = threading.Lock()  # scan_folder's pool probes from several threads
        self.problem: str | None = None  # why it could not be used, if it could not (locked_probe_cache)

    @classmethod
    def load(cls, file: str | os.PathLike) -> "ProbeCache":
        """The cache at ``file``; empty when missing, damaged or written by another version of the probe
        (``PROBE_CACHE_VERSION``)."""
        import json

        try:
            saved = json.loads(Path(file).read_text())
            entries = saved.get("files", {}) if saved.get("version") == PROBE_CACHE_VERSION else {}
        except (OSError, ValueError, AttributeError):
            entries = {}
        return cls(file, entries if isinstance(entries, dict) else {})

    def probe(self, file: Location, info: dict) -> tuple[str, str | None, int | None, tuple[int, int, int, str]]:
        """``_probe(file, info)``, or the earlier probe of the same unchanged file."""
        name, remote = str(file), storage.is_remote(file)
        now = storage.content_key_of_info(info) if remote else local_stat(file)
        entry = self.known.get(name)
        if now is not None and _well_formed(entry) and entry["identity"] == now:
            with self._count:
                self.seen[name] = entry
                self.reused += 1
            return entry["key"], entry["stat"], entry["size"], tuple(entry["header"])
        try:
            key, stat, size, header = _probe(file, info)
        finally:  # a file found unreadable was read too (and will be again: its failure is not kept)
            with self._count:
                self.read += 1
        # Kept under the identity seen before the read, when the read's trusted stat (None if racy or
        # changed while read) agrees with it.
        identity = key if remote else (now if stat is not None and now == stat else None)
        if identity is not None:
            self.seen[name] = {"identity": identity, "key": key, "stat": stat, "size": size, "header": list(header)}
        return key, stat, size, header

    def save(self) -> None:
        from imgtune_assets.core.files import atomic_write_json

        if self.file is not None:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.file, {"version": PROBE_CACHE_VERSION, "files": self.seen})


def _well_formed(entry: object) -> bool:
    """A probe cache entry as ``ProbeCache.probe`` writes them (anything else is probed again)."""
    return (isinstance(entry, dict) and {"identity", "key", "stat", "size", "header"} <= entry.keys()
            and isinstance(entry["header"], list) and len(entry["header"]) == 4)


# The probe cache's file name in a sweep's output folder (``ProbeCache``), and the version of what it
# holds: raise it whenever a probe's checks or content keys change, so that no earlier verdict is served.
PROBE_CACHE_FILE = "probe_cache.json"
PROBE_CACHE_VERSION = 4  # 3: sizes after EXIF orientation; 4: stats with inode and ctime, late PNG eXIf


@contextmanager
def locked_probe_cache(file: str | os.PathLike, *, wait: bool = True,
                       on_wait: Callable[[], None] | None = None) -> Iterator[ProbeCache]:
    """The probe cache at ``file``, loaded under an exclusive lock held until the block ends (the caller
    scans and saves inside it): a scan of the same folder in another process (``ProbeAhead``, the
    sensor's) is waited for — ``on_wait`` is called first, when it has to — and this one then reads
    only what that one did not. ``wait=False`` (the sensor, whose tick must not stall behind a long
    scan): when the lock is taken, the cache as it is, unlocked, and not saved."""
    import fcntl

    file = Path(file)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        lock = open(file.with_name(file.name + ".lock"), "a")
    except OSError as exc:  # a folder this process may not write: a scan without the cache, said so
        cache = ProbeCache()
        cache.problem = f"{file}: the probe cache cannot be used ({exc}); every file is read"
        yield cache
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                cache = ProbeCache.load(file)
                cache.file = None  # another scan holds it: used, not saved
                yield cache
                return
            if on_wait is not None:
                on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield ProbeCache.load(file)


class ProbeAhead:
    """A local data folder scanned into its sweep's probe cache in a background thread, under the
    cache's lock (taken at once, in the caller's thread; if another process holds it, nothing is done:
    that scan serves the run as well): for a command that launches a run, so that
    the files are read and hashed while Dagster and Ray start, and the run's ``image_manifest``, which
    waits for the lock, finds every file probed. Nothing for an object store (objects are keyed by
    their listing; their heads are read by the manifest). Errors are the manifest's to report: a folder
    that cannot be scanned leaves the cache as it was."""

    def __init__(self, data_dir: Location, needs_target: bool, cache_file: str | os.PathLike):
        self.thread: threading.Thread | None = None
        self.error: Exception | None = None
        self._stop = threading.Event()
        if storage.is_remote(data_dir):
            return
        self._held = ExitStack()  # the lock, handed from this thread to the scan's, which releases it
        cache = self._held.enter_context(locked_probe_cache(cache_file, wait=False))
        if cache.file is None:  # another process is scanning the folder: its scan serves the run too
            self._held.close()
            return
        self.thread = threading.Thread(target=self._scan, args=(data_dir, needs_target, cache),
                                       name="imgtune-probe-ahead", daemon=True)
        self.thread.start()

    def _scan(self, data_dir: Location, needs_target: bool, cache: ProbeCache) -> None:
        try:
            scan_folder(data_dir, needs_target=needs_target, cache=cache, stop=self._stop)
            if not self._stop.is_set():  # a stopped scan's cache would lose the entries it did not reach
                cache.save()
        except (ManifestError, OSError) as exc:
            self.error = exc  # kept, not raised: the manifest meets the same folder and says what is wrong
        finally:
            self._held.close()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def cancel(self) -> None:
        """Stop reading (the files being read are finished), e.g. when the run ended before its manifest:
        the command can then exit at once instead of after the whole folder."""
        self._stop.set()


def cached_scan(data_dir: Location, needs_target: bool, cache_file: str | os.PathLike, log, *, wait: bool = True,
                on_wait: Callable[[], None] | None = None) -> tuple[list[ManifestRow], ProbeCache]:
    """``scan_folder`` with the probe cache at ``cache_file``, under its lock (``locked_probe_cache``;
    ``wait``, ``on_wait`` as there), the cache saved after (``save_probe_cache``, warnings on ``log``)."""
    with locked_probe_cache(cache_file, wait=wait, on_wait=on_wait) as cache:
        rows = scan_folder(data_dir, needs_target=needs_target, cache=cache)
        save_probe_cache(cache, log)
    return rows, cache


def save_probe_cache(cache: ProbeCache, log) -> None:
    """``cache.save()``; a cache that cannot be written (or used) is a warning on ``log`` (the next scan
    reads every file again), not a failure of the scan it served."""
    if cache.problem:
        log.warning(cache.problem)
        return
    try:
        cache.save()
    except OSError as exc:
        log.warning(f"{cache.file}: could not save the probe cache ({exc}); the next scan reads every file again")


def _probe_row(row: ManifestRow, files: tuple, needs_target: bool, target_dir_name: str,
               cache: ProbeCache, stop: threading.Event | None = None, near_target: str | None = None) -> ManifestRow:
    if stop is not None and stop.is_set():
        row.reason = "not scanned (the scan was stopped)"
        return row
    (image, image_info), target = files
    try:
        row.image_sha256, row.image_stat, row.image_bytes, (row.width, row.height, row.channels, row.dtype) = \
            cache.probe(image, image_info)
    except (ImageReadError, storage.StorageError) as exc:
        row.reason = str(exc)
        return row
    if target is not None:
        target_file, target_info = target
        try:
            row.target_sha256, row.target_stat, _, (width, height, _, _) = cache.probe(target_file, target_info)
        except (ImageReadError, storage.StorageError) as exc:
            row.reason = f"target unusable: {exc}"
            return row
        if (width, height) != (row.width, row.height):
            row.reason = f"target {target_file.name} is {width}x{height}, image is {row.width}x{row.height}"
            if (width, height) == (row.height, row.width):
                row.reason += (" (sizes as read upright: a file's EXIF orientation tag turns it when it is read, "
                               "as cv2.imread does; the two are turned a quarter from each other, so store the "
                               "target as the image appears upright)")
            return row
    elif needs_target:
        kinds = "|".join(suffix[1:] for suffix in IMAGE_SUFFIXES if suffix not in (".jpeg", ".tiff"))
        row.reason = f"no target: expected {target_dir_name}/{row.id}.<{kinds}>"
        if near_target is not None:  # names are matched exactly, as on the file systems that tell case apart
            row.reason += f" ({target_dir_name}/{near_target} differs in case only: rename one to match)"
        return row
    row.status = "ok"
    return row


def scan_folder(data_dir: str | Location, *, needs_target: bool, threads: int | None = None,
                cache: ProbeCache | None = None, stop: threading.Event | None = None) -> list[ManifestRow]:
    """One row per file in the images folder (a local folder or an fsspec URL).

    Files are probed on a pool of ``threads`` (default: this machine's CPUs), streaming through the
    listing: each local file is read once — its SHA-256 and its header and structure check come from
    that read (see ``imageio.probe_image``); pixels are not decoded here but by the run's Ray tasks.
    Threads suffice because the work is reading and hashing, which release the GIL. With a ``cache``
    (``ProbeCache``; the caller saves it), files unchanged since an earlier scan are not read at all.
    Once ``stop`` is set, the files not yet probed are not read (their rows say so): for a scan whose
    result is no longer wanted (``ProbeAhead.cancel``).
    """
    cache = cache if cache is not None else ProbeCache()
    try:
        data_dir = storage.location(data_dir) if isinstance(data_dir, str) else data_dir
        if not storage.exists(data_dir):
            raise ManifestError(f"{data_dir}: data folder does not exist")
        if not storage.is_folder(data_dir):
            raise ManifestError(f"{data_dir}: data_dir is not a folder")
        image_dir, target_dir = image_folders(data_dir)
        files, folders = storage.list_entries(image_dir)
        # Images are read from the folder itself, not from its sub-folders: each of those is a skipped row
        # that says so.
        folders = unread_sub_folders(data_dir, image_dir, folders)
        target_files = storage.list_files(target_dir) if storage.is_folder(target_dir) else []
    except storage.StorageError as exc:
        raise ManifestError(str(exc)) from None
    if not files:
        unread = f" ({len(folders)} sub-folder(s) not read: put the images directly in it)" if folders else ""
        raise ManifestError(f"{image_dir}: no image files in the data folder{unread}")
    targets = targets_by_stem(target_files)
    folded = {stem.casefold(): found[0][0].name for stem, found in targets.items()}
    rows: list[ManifestRow] = []
    work: list[tuple[ManifestRow, tuple, str | None]] = []
    for (file, info), target, reason in listed_files(files, targets):
        row = ManifestRow(id=Path(file.name).stem, image_path=_relative(file, data_dir), target_path=None,
                          image_sha256=None, target_sha256=None, width=None, height=None, channels=None,
                          dtype=None, status="skipped", reason=reason)
        rows.append(row)
        if reason is not None:
            continue
        if target is not None:
            row.target_path = _relative(target[0], data_dir)
        work.append((row, ((file, info), target), None if target else folded.get(row.id.casefold())))
    for folder in folders:  # id and path end with "/": no file's stem or path can be the same
        rows.append(ManifestRow(
            id=f"{folder.name}/", image_path=_relative(folder, data_dir) + "/", target_path=None, image_sha256=None,
            target_sha256=None, width=None, height=None, channels=None, dtype=None, status="skipped",
            reason=f"{folder}: a sub-folder; its files are not read (the manifest reads the image files directly "
                   f"in {image_dir.name}/: move them there to use them)"))
    workers = max(1, min(threads or os.cpu_count() or 1, len(work) or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgtune-manifest") as pool:
        # map keeps at most the pool's files in flight: memory stays a few files however many there are.
        for _ in pool.map(lambda item: _probe_row(item[0], item[1], needs_target, target_dir.name, cache, stop,
                                                  item[2]), work):
            pass
    return rows


def usable(rows: list[ManifestRow]) -> list[ManifestRow]:
    return [r for r in rows if r.status == "ok"]


def require_usable(rows: list[ManifestRow], data_dir: str | Path) -> list[ManifestRow]:
    ok = usable(rows)
    if not ok:
        reasons = "; ".join(f"{r.image_path}: {r.reason}" for r in rows[:5])
        more = f" (and {len(rows) - 5} more)" if len(rows) > 5 else ""
        raise ManifestError(f"{data_dir}: no usable images among {len(rows)} file(s): {reasons}{more}")
    return ok


def is_folder_row(row: ManifestRow) -> bool:
    """A row for a sub-folder of the images folder (its id ends with "/"; see ``scan_folder``)."""
    return row.id.endswith("/")


def manifest_digest(rows: list[ManifestRow]) -> str:
    """Hash of the (id, content hash) pairs: changes when an image or target is added or changed. The
    rows of sub-folders are left out: a folder appearing (a NAS's thumbnail folder, a sub-folder of
    rejects) changes no image, and must not make every trial run again."""
    digest = hashlib.sha256()
    for row in sorted((r for r in rows if not is_folder_row(r)), key=lambda r: r.image_path):
        digest.update(f"{row.id}\0{row.image_path}\0{row.image_sha256}\0{row.target_sha256}\0{row.status}\n".encode())
    return digest.hexdigest()[:16]


def unreadable_advice(kind: str, remote: bool) -> str:
    """What a run that cannot read a file of its manifest says, by ``StorageError.kind``: only a file
    gone since is mended by a new manifest (unless the node that read it does not see the folder the
    manifest saw); access refused is the reader's credentials (an object) or permissions (a file); any
    other error may pass."""
    if kind == "missing":
        return ("it was in the image manifest: deleted or moved since (then materialize image_manifest,run_settings "
                "again), or the node that read it does not see the " + ("store" if remote else "folder")
                + " the manifest saw (a cluster's node needs the same path or endpoint)")
    if kind == "denied":
        if remote:
            return ("it was in the image manifest, read then with the credentials of the process that made it; the "
                    "process that read it now has other credentials (a cluster's nodes have their own: environment, "
                    "profile or instance role)")
        return ("it was in the image manifest; the process that read it now may not (the file's permissions or "
                "owner changed since, or a cluster's node runs as another user)")
    return ("it was in the image manifest; once it can be read again, run the trials again (with skip_finished "
            "the finished ones are kept)")


def load_images(data_dir: str | Location, rows: list[ManifestRow], *, verify: bool = False
                ) -> tuple[list[str], list[np.ndarray], list[np.ndarray | None]]:
    """Decode usable images (and targets) once; returns ids, images, targets (None when absent).

    With ``verify``, each file's content must still have the key the manifest recorded (from the same
    read that is decoded): results are saved under the manifest's content hash, so images changed
    since must not be scored as the old ones. A local file whose size and modification time (to the
    nanosecond) are still those it had when the manifest hashed it is not hashed again — rsync's
    quick check; any other file is, and so is one modified less than ``RACY_NS`` before the manifest
    read it (its stat was not recorded). A changed or vanished file raises ``ManifestError`` naming
    it. This is what each Ray decode task runs on its chunk of rows.
    """
    data_dir = storage.location(data_dir) if isinstance(data_dir, str) else data_dir

    def load(relative: str, expected: str | None, stat: str | None) -> np.ndarray:
        file = data_dir / relative
        try:
            if verify and stat is not None and local_stat(file) == stat:
                data, key = storage.read_bytes(file), expected
            else:
                data, key = storage.read_with_key(file)
        except storage.StorageError as exc:
            raise ManifestError(f"{exc}: {unreadable_advice(exc.kind, storage.is_remote(file))}") from None
        if verify and key != expected:
            raise ManifestError(f"{file}: changed since the image manifest was made (content key {key[:16]}, "
                                f"manifest {str(expected)[:16]}): materialize image_manifest,run_settings again")
        try:
            return decode_image(data, file)
        except ImageReadError as exc:
            raise UndecodableFile(str(exc), str(file), key) from None

    ids, images, targets = [], [], []
    for row in usable(rows):
        ids.append(row.id)
        images.append(load(row.image_path, row.image_sha256, row.image_stat))
        targets.append(load(row.target_path, row.target_sha256, row.target_stat) if row.target_path else None)
    return ids, images, targets


def decoded_bytes(row: ManifestRow) -> int:
    """The decoded size of a row's image and target (the target assumed the image's size)."""
    if row.status != "ok" or not row.width:
        return 0
    each = int(row.width) * int(row.height) * int(row.channels or 1) * (2 if row.dtype == "uint16" else 1)
    return each * (2 if row.target_path else 1)
