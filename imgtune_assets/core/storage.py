"""Where images live: a local folder, or an fsspec URL (``s3://bucket/prefix``, ``gs://...``) through
universal-pathlib. Plain module (no Dagster).

Credentials never pass through imgtune: fsspec's back-ends take them from the environment and the
standard credential chains (for S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
instance roles). The only option a sweep file may give is ``endpoint_url``, for S3-compatible stores.
On a Ray cluster each node reads with its own environment's credentials.

Content keys: a local file's key is the SHA-256 of its bytes (read once, by the same read that is
decoded). An object's key is its store's own content tag (S3's ``ETag``, GCS's ``md5Hash``/``crc32c``)
with its size — reading every object just to hash it would double what a sweep downloads, and the store
changes the tag whenever the object is rewritten.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Union

from imgtune_assets.core.files import atomic_write_bytes

if TYPE_CHECKING:  # universal-pathlib (and fsspec under it) is imported when a URL is opened, not for a
    from upath import UPath  # local folder: a Ray task reading local files does without their import

Location = Union[Path, "UPath"]
# ``prefetch`` asks for at most this share of the memory available: the page cache keeps it without
# pushing out what the run itself needs.
PREFETCH_MEMORY_FRACTION = 0.25
PREFETCH_MAX_BYTES = 2 * 1024**3  # and at most this (psutil sees the host's memory, not a container's limit)
PREFETCH_CHUNK_BYTES = 1024**2  # one advice per MiB: Linux reads at most its read-ahead window per call


class StorageError(ValueError):
    """A file or object that cannot be read or written; the message names its path or URL. ``kind``:
    ``missing`` (not there), ``denied`` (access refused) or ``other`` (unreachable, I/O error...)."""

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # kept through pickling (Ray passes a task's exceptions on)
        return type(self), (str(self), self.kind)


def is_url(text: str | os.PathLike) -> bool:
    return "://" in str(text)


def location(spec: str | os.PathLike, *, base_dir: Path | None = None, endpoint_url: str | None = None) -> Location:
    """A local folder (relative to ``base_dir``) as a ``Path``, or a URL as a universal-pathlib ``UPath``.
    A URL that carries credentials (``s3://KEY:SECRET@bucket/...``) is refused, named without them: they
    would be shown wherever the URL is (logs, the UI, the event log); credentials come from the
    environment and the standard credential chains only."""
    if isinstance(spec, Path) and not is_url(spec):
        return spec
    if not is_url(spec):
        path = Path(spec).expanduser()
        return (base_dir / path).resolve() if base_dir is not None and not path.is_absolute() else path.resolve()
    if has_credentials(str(spec)):
        raise StorageError(f"{without_credentials(str(spec))}: credentials in a URL are refused (they would show "
                           "in logs and the UI); set them in the environment (AWS_ACCESS_KEY_ID / "
                           "AWS_SECRET_ACCESS_KEY, AWS_PROFILE) or the standard credential chain")
    from upath import UPath

    options: dict[str, Any] = {}
    if endpoint_url and str(spec).startswith(("s3://", "s3a://")):
        options["endpoint_url"] = endpoint_url
    try:
        return UPath(str(spec), **options)
    except (ValueError, ImportError) as exc:  # an unknown scheme, or its fsspec package not installed
        raise StorageError(f"{spec}: {exc}") from None


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*@)")


def has_credentials(url: str) -> bool:
    """Whether a URL carries a user (and password) before its host or bucket: ``scheme://user:pass@...``."""
    return bool(_USERINFO.match(url))


def without_credentials(url: str) -> str:
    """``url`` with its ``user:pass@`` part shown as ``***@``."""
    return _USERINFO.sub(r"\1***@", url)


def is_remote(path: Location | str) -> bool:
    return is_url(str(path))


def describe(path: Location) -> str:
    """How a path is named in messages: the local path or the URL (never the storage options)."""
    return str(path)


def is_broken_link(path: Location) -> bool:
    """Whether a local path is a symbolic link to nothing (listed as a file, never readable)."""
    return not is_remote(path) and os.path.islink(path) and not os.path.exists(path)


def _explain(exc: BaseException, path: Location, doing: str) -> StorageError:
    name = describe(path)
    if isinstance(exc, FileNotFoundError):
        text = str(exc)
        if "bucket" in text.lower():
            return StorageError(f"{name}: {text.rstrip('.')} (cannot {doing})", "missing")
        if is_broken_link(path):  # listed, as any file is: said what it is
            return StorageError(f"{name}: a broken symbolic link (to {os.readlink(path)}; cannot {doing})", "missing")
        return StorageError(f"{name}: not found (cannot {doing})", "missing")
    if isinstance(exc, PermissionError):
        hint = (" - credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE) or the standard credential chain") if is_remote(path) else ""
        return StorageError(f"{name}: access denied (cannot {doing}){hint}", "denied")
    if isinstance(exc, OSError) and not is_remote(path):
        return StorageError(f"{name}: cannot {doing} ({exc.strerror or exc})")
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return StorageError(f"{name}: cannot {doing} ({type(exc).__name__}: {first})")


def _remote_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a remote store raises beyond OSError (botocore's, for S3), when installed."""
    kinds: list[type[BaseException]] = [OSError, ValueError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        kinds += [BotoCoreError, ClientError]
    except ImportError:
        pass
    return tuple(kinds)


# What an S3 API answers, as a PermissionError through s3fs, when it does not know the credentials
# themselves (not: they may not do this). (Other credential errors are not PermissionErrors: _explain.)
CREDENTIAL_ERROR_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken")


def credentials_refused(folder: Location, bucket: str | None) -> str | None:
    """The store's error code when it refuses the credentials as such, asked by a one-key listing (a
    HEAD's refusal carries no code), else None: a denied look-up with credentials it knows may still
    allow uploads. Only S3 (s3fs) says which: for other stores, None."""
    call = getattr(folder.fs, "call_s3", None)
    if call is None or not bucket:
        return None
    try:
        call("list_objects_v2", Bucket=bucket, MaxKeys=1)
    except PermissionError as exc:
        code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code")
        return code if code in CREDENTIAL_ERROR_CODES else None
    except Exception:  # noqa: BLE001 - any other answer says nothing of the credentials
        return None
    return None


def content_key_of_info(info: dict[str, Any]) -> str:
    """An object's content key from its listing entry: the store's content tag and its size."""
    for field in ("ETag", "etag", "md5Hash", "crc32c", "checksum"):
        if info.get(field):
            return f"{field.lower()}:{str(info[field]).strip(chr(34))}:{info.get('size')}"
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated")
    return f"size-mtime:{info.get('size')}:{mtime}"


def read_bytes(path: Location) -> bytes:
    """All of a file's bytes, with a clear error naming it."""
    try:
        return (path if is_remote(path) else Path(path)).read_bytes()
    except _remote_errors() as exc:
        raise _explain(exc, path, "read it") from None


def read_with_key(path: Location) -> tuple[bytes, str]:
    """A file's bytes and its content key, from one read (an object's tag comes with the same request)."""
    if not is_remote(path):
        data = read_bytes(path)
        return data, hashlib.sha256(data).hexdigest()
    try:
        path.fs.invalidate_cache(path.path)  # the tag must be the object's now, not a cached listing's
        with path.fs.open(path.path, "rb") as handle:
            details = dict(getattr(handle, "details", None) or path.fs.info(path.path))
            data = handle.read()
    except _remote_errors() as exc:
        raise _explain(exc, path, "read it") from None
    details.setdefault("size", len(data))
    return data, content_key_of_info(details)


def read_head(path: Location, size: int) -> bytes:
    """The first ``size`` bytes (a ranged request on an object store)."""
    return read_range(path, 0, size)


def read_range(path: Location, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (fewer at the file's end; one ranged request on an object store)."""
    try:
        if is_remote(path):
            return path.fs.cat_file(path.path, start=start, end=end)
        with open(path, "rb") as handle:
            handle.seek(start)
            return handle.read(max(0, end - start))
    except _remote_errors() as exc:
        raise _explain(exc, path, "read it") from None


def list_files(folder: Location) -> list[tuple[Location, dict[str, Any]]]:
    """The visible files directly in ``folder``, sorted by name, each with its listing entry (for an
    object store: size and content tag from the one listing request)."""
    return list_entries(folder)[0]


def list_entries(folder: Location) -> tuple[list[tuple[Location, dict[str, Any]]], list[Location]]:
    """(``list_files(folder)``, the visible sub-folders directly in it), from one listing, sorted by
    name (for an object store the sub-folders are the listing's common prefixes)."""
    try:
        if not is_remote(folder):
            paths = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
            # (a broken symbolic link is listed as a file: the manifest skips it, saying so, not silently)
            return [(p, {}) for p in paths if p.is_file() or (p.is_symlink() and not p.exists())], \
                [p for p in paths if p.is_dir()]
        # fsspec file systems are cached per process with their listings: a long-lived process (the
        # sensor's code server) must see objects added since, so every listing asks the store.
        folder.fs.invalidate_cache(folder.path)
        entries = folder.fs.ls(folder.path, detail=True)
    except _remote_errors() as exc:
        raise _explain(exc, folder, "list it") from None
    files, folders = [], []
    own = str(folder.path).rstrip("/")
    for entry in entries:
        key = str(entry["name"])
        # A key ending in "/" is a folder marker (the S3 console's "Create folder", sync tools), the
        # folder's own or a sub-folder's: no file.
        if key.endswith("/") or key.rstrip("/") == own:
            continue
        name = key.rsplit("/", 1)[-1]
        if not name or name.startswith("."):
            continue
        if entry.get("type") == "file":
            files.append((folder / name, entry))
        elif entry.get("type") == "directory":
            folders.append(folder / name)
    return sorted(files, key=lambda item: item[0].name), sorted(folders, key=lambda p: p.name)


def prefetch(files: Iterable[Location], budget_bytes: int | None = None) -> int:
    """Ask the kernel to start reading local ``files`` into its page cache, in order, until the next
    would pass ``budget_bytes`` (default: ``PREFETCH_MEMORY_FRACTION`` of the memory available now, at
    most ``PREFETCH_MAX_BYTES``); returns the bytes asked for. A hint (``posix_fadvise`` WILLNEED, in
    ``PREFETCH_CHUNK_BYTES`` pieces: Linux reads at most its read-ahead window per call; each call
    queues the reads and returns, waiting only when the disk's queue is full): nothing is held by this
    process, a file that cannot be opened or advised is passed over (its reader reports it), objects
    (URLs) are left to their readers, and where the system has no such call nothing is done. Run it in
    a thread beside a start-up that leaves the disk idle (Dagster's, Ray's)."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    if budget_bytes is None:
        import psutil

        budget_bytes = min(PREFETCH_MAX_BYTES, int(psutil.virtual_memory().available * PREFETCH_MEMORY_FRACTION))
    asked = 0
    for file in files:
        if is_remote(file):
            continue
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue  # gone or unreadable: its reader reports it, with its name
        try:
            size = os.fstat(fd).st_size
            if asked + size > budget_bytes:
                break
            for offset in range(0, size, PREFETCH_CHUNK_BYTES):
                os.posix_fadvise(fd, offset, min(PREFETCH_CHUNK_BYTES, size - offset), os.POSIX_FADV_WILLNEED)
            asked += size
        except OSError:
            continue  # a file system that refuses the advice: its reader reads it as usual
        finally:
            os.close(fd)
    return asked


def is_folder(path: Location) -> bool:
    """Whether a folder (or prefix) is there; as ``exists``, a store that refuses or has no such bucket
    raises ``StorageError`` rather than answering False."""
    try:
        if is_remote(path):
            path.fs.invalidate_cache(path.path)  # see list_files
        if path.is_dir():
            return True
    except _remote_errors() as exc:
        raise _explain(exc, path, "look it up") from None
    if is_remote(path):
        exists(path)  # (s3fs's is_dir answers False for a missing bucket: said, not hidden)
    return False


def exists(path: Location) -> bool:
    """Whether a file or folder is there; a store that refuses (access denied, no such bucket) raises
    ``StorageError`` rather than answering False (s3fs's own ``exists`` hides a missing bucket)."""
    try:
        if not is_remote(path):
            return path.exists()
        try:
            path.fs.invalidate_cache(path.path)
            path.fs.info(path.path)
            return True
        except FileNotFoundError as exc:
            if "bucket" in str(exc).lower():
                raise
            return False
    except _remote_errors() as exc:
        raise _explain(exc, path, "look it up") from None


def _bucket_of(folder: Location) -> str | None:
    """The bucket (container) a URL names, for a store that has buckets (s3fs, gcsfs and adlfs split
    paths into bucket and key); None for a store without them (fsspec's in-memory one)."""
    split = getattr(folder.fs, "split_path", None)
    if split is None:
        return None
    return split(folder.path)[0] or None


def require_output_folder(folder: Location) -> None:
    """Raise ``StorageError`` naming ``folder`` unless outputs can go into it, before any work is done:
    a local folder must be a folder, or not there yet under a writable folder (the first write makes
    it); an object-store folder's bucket must exist (a prefix that is not there yet is made by the first
    upload). Nothing is created — imgtune never creates a bucket. A store that denies the look-up is let
    through (credentials may allow uploads only): each write reports its own refusal — unless the store
    says that it does not know the credentials at all (``credentials_refused``)."""
    name = describe(folder)
    if not is_remote(folder):
        path = Path(folder)
        existing = path
        while not os.path.lexists(existing) and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            where = "" if existing == path else f" ({existing} is not a folder)"
            raise StorageError(f"{name}: not a folder{where} (cannot write into it)")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"{name}: access denied (cannot write into {existing})", "denied")
        return
    bucket = _bucket_of(folder)
    found = None
    try:
        folder.fs.invalidate_cache(folder.path)
        try:
            found = folder.fs.info(folder.path)
        except FileNotFoundError:
            if bucket is None:
                return  # a store without buckets: the first write makes the folder
        if found is None:  # not there yet: its bucket must be
            if bucket == folder.path.strip("/"):
                raise FileNotFoundError(bucket)  # the folder is the bucket itself, and it is not there
            folder.fs.info(bucket)
    except FileNotFoundError:
        raise StorageError(f"{name}: the bucket {bucket!r} does not exist (cannot write into it; imgtune "
                           "creates no bucket: create it, or name another)", "missing") from None
    except PermissionError:
        refused = credentials_refused(folder, bucket)
        if refused is not None:
            raise StorageError(f"{name}: the store refused the credentials ({refused}; cannot write into it) - "
                               "credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                               "AWS_PROFILE) or the standard credential chain", "denied") from None
        return
    except _remote_errors() as exc:
        raise _explain(exc, folder, "write into it") from None
    if found is not None and found.get("type") == "file":  # the name is an object's, not a folder's
        raise StorageError(f"{name}: not a folder (an object of that name is there; cannot write into it)")


def write_bytes_atomic(path: Location, data: bytes) -> Location:
    """Write a whole file: locally through a temporary file and a rename; to an object store with one
    PUT (an object appears whole or not at all)."""
    if not is_remote(path):
        try:
            return atomic_write_bytes(path, data)
        except OSError as exc:
            raise _explain(exc, path, "write it") from None
    try:
        path.write_bytes(data)
    except _remote_errors() as exc:
        raise _explain(exc, path, "write it") from None
    return path
