"""Applying a tuned pipeline to every image of a folder, on Ray, through the same data path as a sweep:
Ray tasks read their own files (a local folder or an object-store URL), run the pipeline and write
each output whole, in its input's format and bit depth. Plain module (no Dagster).

A ledger in the output folder (``.imgtune-applied.json``, written whole) records, per output, the
input's content key, the pipeline's key and the output's SHA-256: a re-run skips an image whose input
and pipeline did not change and whose output is still there. An input that cannot be read or decoded
is skipped with its reason; the others are written.

A re-run reads neither file of an unchanged pair when it can tell without reading (``unchanged_unread``):
a local file whose size, mtime, inode and ctime are those recorded when it was last read (recorded
only when they can be trusted, the manifest's rule: not for a file modified less than 2 s before;
a file replaced by a copy that kept its size and mtime has another inode or ctime), an object whose
listing's tag is the one recorded. An output is recorded so once a later run has read it back intact
(a file just written is never trusted by its stat: git's racy rule), so the third run of an unchanged
folder reads nothing but the listings — and needs no Ray: ``plan_apply`` settles such pairs, and only
the files left to read go to Ray tasks.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from imgtune_assets.core import storage
from imgtune_assets.core.imageio import (
    IMAGE_SUFFIXES,
    ImageReadError,
    decode_oriented,
    format_suffix,
    jpeg_metadata,
    unorient,
    webp_is_lossless,
    with_jpeg_metadata,
)
from imgtune_assets.core.files import remove_temporaries
from imgtune_assets.core.storage import Location

LEDGER_NAME = ".imgtune-applied.json"
# JPEG (and lossy WebP) outputs: high quality (the input was lossy already; a second lossy step should lose little).
JPEG_QUALITY = 95
# Files per task: up to this many, to amortise a task over small images; fewer as the folder's end
# nears (guided self-scheduling: a task takes about 1/(TAIL_TASKS_PER_CPU × CPUs) of what is left),
# so that the last tasks are single files and no CPU idles long while another finishes a batch.
MAX_FILES_PER_TASK = 8
TAIL_TASKS_PER_CPU = 4
# A temporary output file older than this is a killed writer's (a write takes a second at most): the
# next run removes it. (An interrupted command removes its own at once, once its Ray has stopped.)
STALE_TEMPORARY_SECONDS = 600

Stages = Sequence[tuple[str, dict[str, Any]]]


class ApplyError(ValueError):
    """The folder as a whole cannot be used (missing, not a folder, unreachable); the message names it."""


def pipeline_key(stages: Stages) -> str:
    """Identifies a pipeline: its ops and parameter values, in order."""
    payload = json.dumps([[op, params] for op, params in stages], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def fixed_stages(sweep) -> list[tuple[str, dict[str, Any]]]:
    """The stages of a sweep whose every parameter is fixed (a ``best_pipeline.yaml``)."""
    stages = []
    for index, stage in enumerate(sweep.pipeline):
        if stage.searched:
            raise ApplyError(f"{sweep.path}: pipeline[{index}] ({stage.op}) still searches "
                             f"{', '.join(sorted(stage.searched))}: apply needs a pipeline with fixed values, "
                             "such as the best_pipeline.yaml a sweep report writes")
        stages.append((stage.op, dict(stage.fixed)))
    return stages


def to_depth(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The pipeline's output in the input's bit depth: 8-bit results of a 16-bit input are scaled
    (255 → 65535), 16-bit results of an 8-bit input scaled down, anything else rounded and clipped."""
    dtype = np.dtype(dtype)
    if dtype not in (np.uint8, np.uint16):
        raise ValueError(f"to_depth: an image file holds 8-bit or 16-bit pixels, not {dtype}")
    if not isinstance(image, np.ndarray) or not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise ValueError(f"to_depth: needs a numeric image array, got {getattr(image, 'dtype', type(image).__name__)}")
    if image.dtype == dtype:
        return image
    if image.dtype == np.uint8 and dtype == np.uint16:
        return image.astype(np.uint16) * 257
    if image.dtype == np.uint16 and dtype == np.uint8:
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)  # rounded, as ops' 8-bit conversion
    info = np.iinfo(dtype)
    return np.clip(np.rint(image), info.min, info.max).astype(dtype)


def encode_like(image: np.ndarray, suffix: str, file: Location, lossless: bool = True) -> bytes:
    """``image`` encoded in the format of ``suffix``: JPEG at ``JPEG_QUALITY``; WebP lossless when
    ``lossless`` (the input was), else lossy at ``JPEG_QUALITY``; the other formats are lossless."""
    import cv2

    params = []
    if suffix.lower() in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    elif suffix.lower() == ".webp":  # OpenCV: a quality above 100 selects lossless
        params = [cv2.IMWRITE_WEBP_QUALITY, 101 if lossless else JPEG_QUALITY]
    ok, buffer = cv2.imencode(suffix.lower(), image, params)
    if not ok:
        raise ImageReadError(f"{file}: OpenCV could not encode {image.shape} {image.dtype} as {suffix}")
    return buffer.tobytes()


def unchanged_unread(previous: dict[str, Any] | None, key_of_pipeline: str, source: Location, target: Location,
                     source_tag: str | None = None, target_tag: str | None = None) -> bool:
    """Whether ``previous``'s entry stands with neither file read: the same pipeline, the input's and
    the output's stat (local) or listing tag (``source_tag``/``target_tag``, objects) as recorded. An
    input skipped because of its content (``unusable``: it did not decode, the pipeline refused it)
    stays skipped, unread, while it is unchanged; one skipped for a failed read or write is tried again."""
    from imgtune_assets.core.manifest import local_stat

    standing = previous and (previous.get("status") in ("written", "unchanged")
                             or (previous.get("status") == "skipped" and previous.get("unusable") is True))
    if (not standing or previous.get("pipeline") != key_of_pipeline
            or previous.get("input") != str(source)):  # another input folder's file of the same name: read
        return False

    def same(path: Location, tag: str | None, recorded: str | None) -> bool:
        return recorded is not None and (tag if storage.is_remote(path) else local_stat(path)) == recorded

    if not same(source, source_tag, previous.get("input_key") if storage.is_remote(source) else previous.get("input_stat")):
        return False
    return previous["status"] == "skipped" or same(
        target, target_tag, previous.get("output_tag") if storage.is_remote(target) else previous.get("output_stat"))


def prepare_output(stages: Stages, source: Location, target: Location, previous: dict[str, Any] | None,
                   key_of_pipeline: str, target_tag: str | None = None) -> tuple[dict[str, Any], bytes | None]:
    """One file's ledger entry and its encoded output, still to be written (``write_output``); the entry
    is final (``unchanged`` or ``skipped``, with its reason) when there is nothing to write. Never raises
    for a bad input. The file is read: pairs that stand unread were settled by ``plan_apply`` already.
    ``target_tag``: the output object's tag from its folder's listing."""
    from imgtune_assets.core.manifest import read_with_stat, refuse_unknown_format
    from imgtune_assets.core.ops import apply_pipeline

    entry: dict[str, Any] = {"input": str(source), "output": str(target), "pipeline": key_of_pipeline}
    if not storage.is_remote(source):
        try:  # not read whole when its first bytes are no image's
            refuse_unknown_format(source)
        except ImageReadError as exc:
            entry.update(status="skipped", reason=str(exc), output_sha256=None, unusable=True)
            return entry, None
    try:
        data, entry["input_key"], entry["input_stat"] = read_with_stat(source)
        if (previous and previous.get("status") in ("written", "unchanged")
                and previous.get("input_key") == entry["input_key"] and previous.get("pipeline") == key_of_pipeline):
            intact, output_stat = _output_intact(target, previous)
            if intact:  # recorded now, so that the next run need not read either file
                return {**previous, "status": "unchanged", "input": str(source), "input_stat": entry["input_stat"],
                        "output_stat": output_stat, "output_tag": target_tag}, None
        import cv2

        try:
            image, alpha, orientation = decode_oriented(data, source)
            output = to_depth(apply_pipeline(image, stages), image.dtype)
        except (ValueError, cv2.error) as exc:  # the input does not decode, or the pipeline refuses it
            # (ImageReadError and OpParamError are ValueErrors.) Anything else — this machine's state,
            # a defect in imgtune — is not the content's fault: skipped below and tried again next run.
            reason = str(exc) if isinstance(exc, ImageReadError) else f"{source}: {type(exc).__name__}: {exc}"
            # the content's fault: skipped again, unread, while the input is unchanged
            entry.update(status="skipped", reason=reason, output_sha256=None, unusable=True)
            return entry, None
        if alpha is not None:  # the input's transparency goes back on unchanged
            colour = output if output.ndim == 3 else cv2.cvtColor(output, cv2.COLOR_GRAY2BGR)
            output = np.dstack([colour[:, :, :3], alpha])
        # Written in the input's format, which its content says (a PNG named .jpg stays a PNG: encoding
        # it as its name says would lose its 16 bits, or its alpha), under the input's name.
        suffix = format_suffix(data) or Path(source.name).suffix
        jpeg = suffix.lower() in (".jpg", ".jpeg")
        if orientation != 1 and jpeg:
            # processed upright (as scored), stored back as the input stores it: the output keeps the
            # input's Exif, orientation included (a PNG's or WebP's is not kept: it is written upright)
            output = unorient(output, orientation)
        lossless = suffix.lower() != ".webp" or webp_is_lossless(data)
        encoded = encode_like(output, suffix, source, lossless)
        if jpeg:  # a photo keeps its Exif (orientation...) and colour profile
            encoded = with_jpeg_metadata(encoded, jpeg_metadata(data, 1 if output.ndim == 2 else output.shape[2]))
        return entry, encoded
    except (storage.StorageError, ImageReadError) as exc:  # a failed read or encoding: tried again next run
        entry.update(status="skipped", reason=str(exc), output_sha256=None)
        if storage.is_broken_link(source):  # not a passing failure: skipped as an unusable input is
            entry["unusable"] = True
    except Exception as exc:  # noqa: BLE001 - reported with the image, not raised; tried again next run
        entry.update(status="skipped", reason=f"{source}: {type(exc).__name__}: {exc}", output_sha256=None)
    return entry, None


def settled_unread(previous: dict[str, Any]) -> dict[str, Any]:
    """A pair that ``unchanged_unread`` lets stand: unchanged, or skipped again for the same reason."""
    return {**previous, "status": "skipped" if previous["status"] == "skipped" else "unchanged"}


def write_output(entry: dict[str, Any], target: Location, encoded: bytes) -> dict[str, Any]:
    """Write one output whole and durably (``storage.write_bytes_atomic``) and complete its entry:
    ``written`` with the output's SHA-256, or ``skipped`` with the reason it could not be written."""
    try:
        storage.write_bytes_atomic(target, encoded)
        entry.update(status="written", output_sha256=hashlib.sha256(encoded).hexdigest(), reason=None)
    except storage.StorageError as exc:
        entry.update(status="skipped", reason=str(exc), output_sha256=None)
    except Exception as exc:  # noqa: BLE001 - reported with the file, as a bad input is
        entry.update(status="skipped", reason=f"{target}: {type(exc).__name__}: {exc}", output_sha256=None)
    return entry


def _output_intact(target: Location, previous: dict[str, Any]) -> tuple[bool, str | None]:
    """Whether the output a previous run wrote is still there, unchanged (an edited or damaged one is
    rewritten), read whole; and, if so, its stat to record (``manifest.read_with_stat``)."""
    from imgtune_assets.core.manifest import read_with_stat

    try:
        if not storage.exists(target):
            return False, None
        data, _, stat = read_with_stat(target)
    except storage.StorageError:
        return False, None
    return hashlib.sha256(data).hexdigest() == previous.get("output_sha256"), stat


def task_sizes(n_files: int, cpus: int) -> list[int]:
    """How many files each task takes, in submission order (guided self-scheduling): at most
    ``MAX_FILES_PER_TASK``, about 1/(``TAIL_TASKS_PER_CPU`` × ``cpus``) of the files still left, at
    least one — large tasks first, single files last. Sums to ``n_files``."""
    sizes, left = [], n_files
    while left > 0:
        size = max(1, min(MAX_FILES_PER_TASK, left // (TAIL_TASKS_PER_CPU * max(1, cpus))))
        sizes.append(size)
        left -= size
    return sizes


def _apply_task(stages, items, key_of_pipeline):
    """A Ray task's files, one after another; each output is written (flushed to disk and renamed, or
    uploaded) by a writer thread while the task reads, decodes and processes its next file, so that
    waiting for the disk or the store overlaps the work. At most two outputs are in memory (one being
    written, the next waiting for it), and every write has finished when the task returns: the ledger,
    written after the tasks, lists only outputs already on disk."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    cv2.setNumThreads(1)  # one CPU per Ray task
    entries, writes = [], []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgtune-apply-write") as writer:
        for source, target, previous, _, target_tag in items:
            start = time.perf_counter()
            entry, encoded = prepare_output(stages, source, target, previous, key_of_pipeline, target_tag)
            entry["seconds"] = time.perf_counter() - start  # the file's read, pipeline and encoding
            entries.append(entry)
            if encoded is not None:
                if writes:
                    writes[-1].result()  # the previous output is written before this one queues behind it
                writes.append(writer.submit(write_output, entry, target, encoded))
        for write in writes:
            write.result()  # write_output reports its failures in the entry; anything else is a bug: raised
    return entries


@dataclass
class ApplyResult:
    entries: list[dict[str, Any]] = field(default_factory=list)  # one per file of the input folder
    ledger: Location | None = None
    input_dir: Location | None = None  # the folder read (a data folder's images/, see input_images)

    def count(self, status: str) -> int:
        return sum(1 for e in self.entries if e["status"] == status)


class LedgerNotWritten(storage.StorageError):
    """The ledger could not be written after the tasks ran (the store lost, write access refused): the
    outputs written stand, and ``result`` says which; the next run, without a ledger, redoes them."""

    def __init__(self, message: str, kind: str = "other", result: ApplyResult | None = None):
        super().__init__(message, kind)
        self.result = result

    def __reduce__(self):
        return type(self), (str(self), self.kind, self.result)


def read_ledger(output_dir: Location) -> dict[str, dict[str, Any]]:
    """The previous run's entries by output path; a missing or damaged ledger means none (a cache)."""
    file = output_dir / LEDGER_NAME
    try:
        if not storage.exists(file):
            return {}
        saved = json.loads(storage.read_bytes(file))
    except (storage.StorageError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    entries = saved.get("entries") if isinstance(saved, dict) else None  # a foreign or hand-edited file: none
    if not isinstance(entries, list):
        return {}
    return {e["output"]: e for e in entries if isinstance(e, dict) and isinstance(e.get("output"), str)}


def _listing_tags(folder: Location) -> dict[str, str]:
    """The content tags of an object-store folder's files by name, from one listing (empty for a local
    folder, whose files are stat'ed where they are read, or a folder that cannot be listed now)."""
    if not storage.is_remote(folder):
        return {}
    try:
        return {file.name: storage.content_key_of_info(info) for file, info in storage.list_files(folder)}
    except storage.StorageError:
        return {}  # each output is then read back, and its error, if any, reported with it


def _folder_parts(x: Location) -> tuple[str, ...]:
    if storage.is_remote(x):
        head, _, tail = str(x).partition("://")
        return (head + "://", *(part for part in tail.split("/") if part and part != "."))
    return Path(x).resolve().parts


def same_folder(a: Location, b: Location) -> bool:
    return _folder_parts(a) == _folder_parts(b)


def within(inner: Location, outer: Location) -> bool:
    """Whether ``inner`` is ``outer`` or a folder inside it (local paths resolved; URLs by their parts)."""
    a, b = _folder_parts(inner), _folder_parts(outer)
    return a[: len(b)] == b


def require_input_folder(input_dir: Location) -> None:
    """``ApplyError`` naming ``input_dir`` unless it is an existing folder (or prefix)."""
    if not storage.exists(input_dir) or not storage.is_folder(input_dir):
        raise ApplyError(f"{input_dir}: input folder does not exist or is not a folder")


def input_images(input_dir: Location) -> Location:
    """The folder whose files are applied to: ``input_dir/images`` when there is one — a sweep's data
    folder, read as the manifest reads it (``manifest.image_folders``) — else ``input_dir`` itself."""
    from imgtune_assets.core.manifest import image_folders

    require_input_folder(input_dir)
    return image_folders(input_dir)[0]


@dataclass
class ApplyPlan:
    """What applying ``stages`` to a folder needs done, decided without Ray (``plan_apply``): the
    entries already settled — files that are not images, pairs that stand unread — and the items
    (source, target, previous entry, source tag, target tag) that Ray tasks must read."""
    stages: Stages
    key: str
    input_dir: Location
    output_dir: Location
    settled: list[dict[str, Any]] = field(default_factory=list)
    items: list[tuple] = field(default_factory=list)

    def sources(self) -> list[Location]:
        return [item[0] for item in self.items]


def plan_apply(stages: Stages, input_dir: Location, output_dir: Location) -> ApplyPlan:
    """List ``input_dir`` (or its ``images/``, see ``input_images``) and read the output folder's
    ledger: an image whose pair stands unread (``unchanged_unread``: stats or listing tags) is settled
    here, so a re-run over an unchanged folder needs no Ray at all. A folder that cannot be used — the
    input missing, the output's bucket missing or its place taken by a file
    (``storage.require_output_folder``) — is refused here, with ``ApplyError`` naming it, before any work."""
    from imgtune_assets.core.manifest import TARGETS_FOLDER, unread_sub_folders

    data_dir, input_dir = input_dir, input_images(input_dir)
    if same_folder(input_dir, output_dir):
        raise ApplyError(f"{output_dir}: the output folder must differ from the input folder")
    # A data folder's targets/ (beside images/, or inside a flat data folder) are what sweeps score
    # against: outputs of the same names would replace them, stand beside them as second targets, or
    # (no targets/ yet) become the targets of the next sweep. Given the images/ itself, its sibling too.
    targets = [data_dir / TARGETS_FOLDER, *([data_dir.parent / TARGETS_FOLDER] if data_dir.name == "images" else [])]
    for folder in targets:
        if within(output_dir, folder):
            raise ApplyError(f"{output_dir}: the output folder must not be a data folder's targets/ or inside "
                             f"it ({folder}): the outputs would overwrite or become the targets that sweeps "
                             "score against; choose another folder")
    try:
        # before any file is read: a bucket that is not there fails the run now, not after the work
        storage.require_output_folder(output_dir)
        files, folders = storage.list_entries(input_dir)
    except storage.StorageError as exc:
        raise ApplyError(str(exc)) from None
    plan = ApplyPlan(list(stages), pipeline_key(stages), input_dir, output_dir)
    # Sub-folders are said, as the manifest says them (an output folder inside the input is no input).
    for folder in unread_sub_folders(data_dir, input_dir, folders):
        if not same_folder(folder, output_dir):
            plan.settled.append({"input": f"{folder}/", "output": None, "status": "skipped", "input_key": None,
                                 "output_sha256": None, "pipeline": plan.key,
                                 "reason": f"{folder}: a sub-folder; its files are not read (apply reads the "
                                           f"image files directly in {input_dir})"})
    previous = read_ledger(output_dir)
    output_tags = _listing_tags(output_dir) if previous else {}
    if not storage.is_remote(output_dir):  # (an object is uploaded whole: no temporary files)
        remove_temporaries(output_dir, {file.name for file, _ in files
                                        if Path(file.name).suffix.lower() in IMAGE_SUFFIXES}, STALE_TEMPORARY_SECONDS)
    for file, info in files:
        target = output_dir / file.name
        if Path(file.name).suffix.lower() not in IMAGE_SUFFIXES:
            plan.settled.append({"input": str(file), "output": None, "status": "skipped", "input_key": None,
                                 "output_sha256": None, "pipeline": plan.key,
                                 "reason": f"{file}: not an image file type (expected one of {', '.join(IMAGE_SUFFIXES)})"})
            continue
        item = (file, target, previous.get(str(target)),
                storage.content_key_of_info(info) if storage.is_remote(file) else None, output_tags.get(file.name))
        try:
            unread = unchanged_unread(item[2], plan.key, *item[:2], *item[3:])
        except storage.StorageError:
            unread = False  # the task reads it and reports why, with the file
        if unread:
            plan.settled.append(settled_unread(item[2]))
        else:
            plan.items.append(item)
    return plan


def apply_to_folder(stages: Stages, input_dir: Location, output_dir: Location, *, max_retries: int = 3,
                    on_progress: Callable[[int, int], None] | None = None,
                    connect: Callable[[], None] | None = None) -> ApplyResult:
    """Apply ``stages`` to every file directly in ``input_dir`` (or in its ``images/``, see
    ``input_images``), writing ``output_dir/<same name>``, on Ray. Files that are not images are skipped
    with a reason. ``connect`` is called before the first Ray task, and only when a file must be read
    (else the caller has connected)."""
    return run_plan(plan_apply(stages, input_dir, output_dir), max_retries=max_retries, on_progress=on_progress,
                    connect=connect)


def run_plan(plan: ApplyPlan, *, max_retries: int = 3, on_progress: Callable[[int, int], None] | None = None,
             connect: Callable[[], None] | None = None) -> ApplyResult:
    """``plan``'s items through Ray tasks, then the ledger, written whole. While the tasks run, the
    ledger is also written every ``LEDGER_CHECKPOINT_SECONDS`` with the outputs back so far, so that a
    command killed outright (SIGKILL, the OOM killer: no clean-up runs) loses only the last seconds'."""
    result = ApplyResult(entries=list(plan.settled), input_dir=plan.input_dir)
    finished: list[dict[str, Any]] = []

    def write_ledger() -> Location:
        # The outputs written so far, and the earlier runs' entries of the files not reached, for the next run.
        done = {e["input"] for e in finished}
        kept = [item[2] for item in plan.items if str(item[0]) not in done and item[2] is not None]
        entries = [*result.entries, *finished]
        ledger = {"pipeline": plan.key, "stages": [[op, params] for op, params in plan.stages],
                  "entries": sorted([*(e for e in entries if e["output"]), *kept], key=lambda e: e["input"])}
        payload = (json.dumps(ledger, indent=2, sort_keys=True, default=str) + "\n").encode()
        return storage.write_bytes_atomic(plan.output_dir / LEDGER_NAME, payload)

    try:
        if plan.items:
            if connect is not None:
                connect()
            _run_tasks(plan, max_retries, on_progress, finished, checkpoint=write_ledger)
    finally:
        # Written whatever happened: a task lost beyond its retries (or an interruption) keeps the outputs
        # written so far.
        try:
            result.ledger = write_ledger()
        except KeyboardInterrupt:
            # Ctrl-C landed in the write (which removed its temporary file): the ledger is written whole
            # all the same (the command holds further signals while it cleans up), then it goes on.
            result.ledger = write_ledger()
            raise
        except storage.StorageError as exc:
            result.entries = sorted([*result.entries, *finished], key=lambda e: e["input"])
            raise LedgerNotWritten(str(exc), exc.kind, result) from None
    result.entries = sorted([*result.entries, *finished], key=lambda e: e["input"])
    return result


# A ledger of a few hundred entries is written in milliseconds; a killed command loses at most this
# long's outputs (they are written again by the next run). A ledger that takes long to write (tens of
# thousands of entries, a slow store) is written at most once per this many times its last write's time.
LEDGER_CHECKPOINT_SECONDS = 2.0
LEDGER_CHECKPOINT_SHARE = 20


def _run_tasks(plan: ApplyPlan, max_retries: int, on_progress: Callable[[int, int], None] | None,
               entries: list[dict[str, Any]], checkpoint: Callable[[], object] | None = None) -> None:
    """``plan``'s items through Ray tasks; each task's entries are appended to ``entries`` as it ends,
    and ``checkpoint`` is called when new entries came back, at most every ``LEDGER_CHECKPOINT_SECONDS``
    (and ``LEDGER_CHECKPOINT_SHARE`` times its own last duration). A checkpoint that fails (a store's
    passing error, a full disk) is tried again later: only the ledger written at the end must succeed."""
    import ray

    total_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    remote = ray.remote(_apply_task).options(name="imgtune:apply", num_cpus=1, max_retries=max_retries,
                                              retry_exceptions=False, scheduling_strategy="SPREAD")
    pending, start = [], 0
    for size in task_sizes(len(plan.items), total_cpus):
        pending.append(remote.remote(list(plan.stages), plan.items[start:start + size], plan.key))
        start += size
    from imgtune_assets.core.fanout import ClusterWatch, ray_infrastructure_error

    watch = ClusterWatch()  # a cluster gone: RayInfrastructureError, while the ledger can still be written
    saved, saved_at, interval = 0, time.monotonic(), LEDGER_CHECKPOINT_SECONDS
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=watch.every)
        for ref in ready:
            try:
                entries.extend(ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - Ray's machinery failing is said as such; the rest raised
                lost = ray_infrastructure_error(exc, during="the apply command")
                if lost is None:
                    raise
                raise lost from None  # (the ledger lists what the tasks back before it wrote)
        if on_progress:
            on_progress(len(entries), len(plan.items))
        if checkpoint is not None and len(entries) > saved and pending and time.monotonic() - saved_at >= interval:
            began = time.monotonic()
            try:
                checkpoint()
                saved = len(entries)
            except (storage.StorageError, OSError):
                pass  # the outputs stand; the next checkpoint, or the final ledger, records them
            saved_at = time.monotonic()
            interval = max(LEDGER_CHECKPOINT_SECONDS, LEDGER_CHECKPOINT_SHARE * (saved_at - began))
        watch.check()  # after the entries back are taken (at most every ``every`` seconds)
