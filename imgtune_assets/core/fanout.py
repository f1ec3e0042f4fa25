"""Fanning trials out over Ray: images decoded by Ray tasks on the nodes that use them, then
(trial × image-chunk) tasks over the decoded chunks, a bounded number of chunks at a time.

Plain module (no Dagster). ``ray`` is imported where it is used so that loading the Dagster
definitions never pays for it. The caller owns the Ray connection (``ray.init``); this module only
submits tasks.

The data path (file names in, scores out; the caller's process never holds pixels):

- The usable images are cut into chunks (``plan_chunks``: enough chunks to keep every CPU busy, and
  no chunk larger than a share of the object store).
- A chunk is decoded by one Ray task (``_decode_task``), which reads its files itself (a local path
  or an object-store URL), checks each against the manifest's content key and returns the decoded
  arrays as a Ray object — created in the object store of the node that decoded it. Each file is
  decoded once per run.
- The trial tasks of that chunk take the object as an argument. Ray's default scheduling prefers the
  node that holds a task's (large) arguments, so they run where the pixels already are and read them
  as zero-copy views. (A chunk under ``INLINE_BYTES`` is passed inline by Ray, through the caller;
  such tiny chunks have no node to stay on, so their tasks are spread.)
- Chunks are admitted while their estimated decoded size fits in ``memory_budget`` (by default half
  the cluster's object store); a chunk's object is released as soon as its last trial task is back,
  which admits the next. A data set larger than the object store streams through it instead of
  spilling. With few images everything is admitted at once and trials complete one after another.
- When the images stream (they do not fit the budget at once) in at least two chunks per CPU, each
  chunk is instead decoded and scored by all its trials in one task (``_decode_evaluate_task``): the
  trials finish near the end either way, and the pixels then never enter the object store — no copy
  into it, no page faults on its memory, nothing to schedule by locality. Progress is still handed
  over chunk by chunk.

Whose failure an error from a task is (``ray_infrastructure_error``):

- **the trial's**: a pipeline raising inside a task is caught per image (``evaluate_image``) and is
  data, recorded on the trial. So is a ``RayTaskError`` (an exception raised by the task's own code)
  and a worker lost beyond Ray's retries (``WorkerCrashedError``, ``OutOfMemoryError``): Ray ran the
  task ``max_retries + 1`` times on a live node (a dead node reports ``NodeDiedError`` /
  ``LocalRayletDiedError`` instead), so the crash most likely comes from the trial itself (OpenCV
  crashing, or its memory, on some parameters); failing the run for it would leave a sweep that
  holds such a trial unable ever to finish. The trial is recorded failed, as before.
- **the images'**: ``ImageDataError`` from a decode task (also as the trial tasks of its chunk see it)
  stops the run, naming the file.
- **Ray's**: an error of Ray's own machinery — its node (raylet) died (``LocalRayletDiedError``,
  ``NodeDiedError``), an object was lost with its node or owner (``ObjectLostError`` and its
  subclasses, e.g. ``OwnerDiedError``), ``RaySystemError`` (and subclasses), an actor died
  (``RayActorError``), Ray's RPC, authentication, runtime environment, scheduling or disk failing, or
  the task cancelled (the list: ``RAY_INFRASTRUCTURE_ERRORS``; a ``RayTaskError`` counts only when its
  cause is one of them) — is no trial's and no image's: nothing is recorded for it. ``run_trials``
  raises ``RayInfrastructureError`` naming it, after handing over every result already back (trials
  and chunks finished before are saved by the callbacks), so that a run resumed with
  ``skip_finished`` computes only the unfinished trials (the scores of a chunk not yet finished are
  computed again). Other errors in the same batch of results (a worker lost with its node,
  ``WorkerCrashedError``) are taken as Ray's too. Left as it is: a worker's crash that comes back
  one batch before its node's death fails its trial.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from imgtune_assets.core.evaluate import IDENTITY_STAGES, TrialOutcome, evaluate_chunk
from imgtune_assets.core.manifest import ManifestRow, decoded_bytes, load_images, usable
from imgtune_assets.core.metrics import Objective
from imgtune_assets.core.paths import imgtune_command
from imgtune_assets.core.storage import Location

DEFAULT_MAX_RETRIES = 3
# Share of the cluster's object store the decoded chunks of one run may hold at once.
OBJECT_STORE_SHARE = 0.5
# No chunk larger than this (bytes decoded): tasks stay short enough to balance and to retry cheaply.
MAX_CHUNK_BYTES = 512 * 1024 * 1024

# Ray passes objects below this size inline (its max_direct_call_object_size), not through a node's store.
INLINE_BYTES = 100 * 1024

# Ray's errors (``ray.exceptions``, ray 2.60) that say Ray's own machinery failed under a run, not the
# trial or its image: every subclass is named too, so that a record's error text can be recognised by
# its class name without importing Ray (``results.lost_to_ray``);
# imgtune_assets_tests/core/test_fanout.py checks the list against the installed Ray's hierarchy.
NODE_DIED_ERRORS = ("LocalRayletDiedError", "NodeDiedError")
RAY_INFRASTRUCTURE_ERRORS = (
    *NODE_DIED_ERRORS,
    "ObjectLostError", "ObjectFetchTimedOutError", "ObjectFreedError", "ObjectReconstructionFailedError",
    "OwnerDiedError", "ReferenceCountingAssertionError",
    "RaySystemError", "RayCgraphCapacityExceeded", "RayChannelError", "RayChannelTimeoutError",
    "RayDirectTransportError", "StreamingGeneratorReplayInconsistentError",
    "RayActorError", "ActorDiedError", "ActorUnavailableError",
    "RpcError", "AuthenticationError", "RuntimeEnvSetupError", "TaskUnschedulableError", "TaskCancelledError",
    "OutOfDiskError", "ObjectStoreFullError",
)


class ImageDataError(ValueError):
    """An image (or target) could not be used by the run: changed, vanished or undecodable. The
    message names the file or URL; ``undecodable`` (``{path, key}``) is set when the file does not
    decode although the manifest took it (``manifest.record_undecodable`` remembers it for the next
    manifest)."""

    undecodable: dict | None = None


class RayInfrastructureError(RuntimeError):
    """Ray itself failed under the run (its node died, an object was lost with it, ...): no trial and
    no image is to blame, and none is recorded as failed. ``what`` says what happened (``"the Ray node
    died during the sweep: LocalRayletDiedError: ..."``); the message adds that finished work is saved
    and how to resume (the experiment step says it with the sweep's name and counts). ``ray_error`` is
    Ray's exception."""

    def __init__(self, what: str, ray_error: BaseException | None = None):
        self.what = what
        self.ray_error = ray_error
        super().__init__(f"{what}; no trial is recorded as failed because of it, and the trials finished before "
                         f"are saved: run again with skip_finished (`{imgtune_command()} sweep NAME "
                         "--resume`) to compute the rest")


# How long the cluster's GCS may refuse connections before the waiting loops give up on it: Ray's own
# client waits 60 s (``gcs_rpc_server_reconnect_timeout_s``) and then ends the whole process from C++,
# leaving no message, no ledger written and a Dagster run shown as started for ever.
CLUSTER_GRACE_SECONDS = 10.0
CLUSTER_CHECK_SECONDS = 2.0


class ClusterWatch:
    """Whether the Ray cluster this process is connected to still answers, checked from the loops that
    wait for its tasks (``check``, at most every ``CLUSTER_CHECK_SECONDS``): its GCS's port takes a
    TCP connection. Refused (or timing out) for ``grace`` seconds in a row, the cluster is taken as gone
    (the head node stopped, or the machine) and ``check`` raises ``RayInfrastructureError`` — while
    there is still time to say so, save what finished and end the run cleanly.

    ``address``: the GCS's ``host:port``, by default the connected Ray's
    (``ray.get_runtime_context().gcs_address``; imports Ray); none (nothing checked) through Ray Client."""

    def __init__(self, address: str | None = None, *, grace: float = CLUSTER_GRACE_SECONDS,
                 every: float = CLUSTER_CHECK_SECONDS, clock: Callable[[], float] = time.monotonic):
        if address is None:
            import ray
            from ray.util.client import ray as ray_client

            # Through Ray Client (ray://) the GCS address is the one the head knows itself by, often not
            # reachable from the client's machine: nothing is watched.
            address = None if ray_client.is_connected() else ray.get_runtime_context().gcs_address
        self.address = address
        host, _, port = str(address or ":0").rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.grace, self.every, self._clock = grace, every, clock
        self._checked_at: float | None = None
        self._failing_since: float | None = None

    def answers(self) -> bool:
        import socket

        try:
            with socket.create_connection((self.host, self.port), timeout=min(1.0, self.every)):
                return True
        except OSError:
            return False

    def check(self) -> None:
        if self.address is None:
            return
        now = self._clock()
        if self._checked_at is not None and now - self._checked_at < self.every:
            return
        self._checked_at = now
        if self.answers():
            self._failing_since = None
            return
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= self.grace:
            raise RayInfrastructureError(
                f"the Ray cluster stopped answering: its GCS at {self.address} has refused connections "
                f"for {now - self._failing_since:.0f} s (its head node stopped?)")


def error_line(exc: BaseException) -> str:
    """``<exception class>: <first line of its message>``, as a one-line report of an error."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".strip()


def ray_infrastructure_error(exc: BaseException, during: str = "the sweep") -> RayInfrastructureError | None:
    """``exc`` (from ``ray.get`` of a task) as a ``RayInfrastructureError`` when it is Ray's machinery
    failing (a class of ``RAY_INFRASTRUCTURE_ERRORS``; a ``RayTaskError`` only when its cause is one),
    else None: a failure of the task's own code, or a worker lost beyond Ray's retries (see the
    module's docstring). Imports Ray."""
    import ray.exceptions

    seen = 0  # (a bound on a chain of causes)
    while isinstance(exc, ray.exceptions.RayTaskError) and seen < 20:  # what the task's code raised
        cause = getattr(exc, "cause", None)
        if cause is None or cause is exc:
            return None
        exc, seen = cause, seen + 1
    classes = tuple(c for c in (getattr(ray.exceptions, n, None) for n in RAY_INFRASTRUCTURE_ERRORS)
                    if isinstance(c, type))
    if not isinstance(exc, classes):
        return None
    died = tuple(getattr(ray.exceptions, n) for n in NODE_DIED_ERRORS)
    if isinstance(exc, died):
        what = f"the Ray node died during {during}"
    elif isinstance(exc, ray.exceptions.ObjectLostError):
        what = f"Ray lost an object of {during} (its node or its owner died)"
    else:
        what = f"Ray failed during {during}"
    return RayInfrastructureError(f"{what}: {error_line(exc)}".rstrip("."), exc)  # (the message goes on after it)


_REMOTE_FUNCTIONS: dict[Callable, Any] = {}


def _remote(function: Callable) -> Any:
    """``ray.remote(function)``, made once per process: each new remote function is exported through the
    cluster's GCS at its first call, which blocks for Ray's whole reconnect timeout (and then ends the
    process) when the GCS is gone — every round of a staged search, every chunk, would risk it. (Ray
    exports a kept one again by itself when the process connects to another cluster.)"""
    remote = _REMOTE_FUNCTIONS.get(function)
    if remote is None:
        import ray

        remote = _REMOTE_FUNCTIONS[function] = ray.remote(function)
    return remote


def data_error_message(exc: ImageDataError, sweep_dir) -> str:
    """What a run stopped by ``exc`` tells the user. A file that does not decode is recorded first
    (``manifest.record_undecodable``), so that the next manifest skips it instead of the run failing
    on it again."""
    if exc.undecodable is None:
        return str(exc)
    from imgtune_assets.core.manifest import ManifestError, record_undecodable

    try:
        return record_undecodable(sweep_dir, exc.undecodable["path"], exc.undecodable["key"], str(exc))
    except (ManifestError, OSError) as failed:  # the run's own error still comes first
        return f"{exc}: it does not decode; replace or remove the file (could not record it: {failed})"


def _evaluate_task(stages, chunk, objective):
    """Ray task body: the chunk arrives as zero-copy read-only views from the object store."""
    import os

    import cv2
    import ray

    # Ray gives each task one CPU: OpenCV's own thread pool would only oversubscribe it.
    cv2.setNumThreads(1)
    start = time.perf_counter()
    images, targets = chunk
    results = evaluate_chunk(stages, images, targets, objective)
    ctx = ray.get_runtime_context()
    return {
        "results": results,
        "node_id": ctx.get_node_id(),
        "pid": os.getpid(),
        "seconds": time.perf_counter() - start,
    }


def _decode_task(data_dir, rows, verify, identity):
    """Ray task body: decode a chunk's files (read here, on this node) and, when asked, score the
    identity pipeline on them. Returns (arrays for the object store, a small report for the caller)."""
    import os

    import cv2
    import ray

    cv2.setNumThreads(1)
    start = time.perf_counter()
    from imgtune_assets.core.imageio import ImageReadError, decode_count
    from imgtune_assets.core.manifest import ManifestError, UndecodableFile

    before = decode_count()
    try:
        ids, images, targets = load_images(data_dir, rows, verify=verify)
    except UndecodableFile as exc:
        error = ImageDataError(str(exc))
        error.undecodable = {"path": exc.path, "key": exc.key}
        raise error from None
    except (ManifestError, ImageReadError) as exc:
        # A plain error type crosses the task boundary; the message names the file.
        raise ImageDataError(str(exc)) from None
    report = {
        "ids": ids,
        "decodes": decode_count() - before,
        "bytes": int(sum(a.nbytes for a in images) + sum(t.nbytes for t in targets if t is not None)),
        "identity": evaluate_chunk(IDENTITY_STAGES, images, targets, identity) if identity is not None else None,
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "seconds": time.perf_counter() - start,
    }
    return (images, targets), report


def _decode_evaluate_task(data_dir, rows, verify, identity, trials, objective):
    """Ray task body: decode a chunk and score every given trial (``[(index, stages)]``) on it in the
    same task, so the pixels never leave the worker. One image (and its target) at a time, every trial
    on it before the next is decoded: the worker holds one image's pixels, not the chunk's. Returns
    the decode report and, per trial, what ``_evaluate_task`` returns."""
    import os

    import ray

    report: dict[str, Any] = {"ids": [], "decodes": 0, "bytes": 0, "seconds": 0.0,
                              "identity": [] if identity is not None else None}
    results: dict[int, list] = {t: [] for t, _ in trials}
    seconds = dict.fromkeys(results, 0.0)
    for row in rows:
        (images, targets), part = _decode_task(data_dir, [row], verify, identity)
        for key in ("ids", "decodes", "bytes", "seconds"):
            report[key] += part[key]
        if identity is not None:
            report["identity"] += part["identity"]
        for t, stages in trials:
            start = time.perf_counter()
            results[t] += evaluate_chunk(stages, images, targets, objective)
            seconds[t] += time.perf_counter() - start
        del images, targets
    node_id = ray.get_runtime_context().get_node_id()
    report.update(node_id=node_id, pid=os.getpid())
    return {"report": report, "trials": {t: {"results": results[t], "node_id": node_id, "pid": os.getpid(),
                                             "seconds": seconds[t]} for t in results}}


@dataclass
class ImageFiles:
    """Images as files (local or object store), decoded by Ray tasks: what a run uses."""

    data_dir: Location
    rows: Sequence[ManifestRow]
    verify: bool = True

    def __post_init__(self) -> None:
        self.rows = usable(list(self.rows))

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.rows]

    def sizes(self) -> list[int]:
        return [decoded_bytes(r) for r in self.rows]

    def submit(self, a: int, b: int, identity: Objective | None, max_retries: int):
        import ray

        # SPREAD: on a cluster, decoding (and so the trial tasks that follow the decoded chunks) is
        # shared between nodes from the start; on one node it changes nothing.
        task = _remote(_decode_task).options(
            name="imgtune:decode", num_returns=2, max_retries=max_retries, retry_exceptions=False,
            num_cpus=1, scheduling_strategy="SPREAD")
        return task.remote(self.data_dir, list(self.rows[a:b]), self.verify, identity)

    def submit_fused(self, a: int, b: int, identity: Objective | None, trials: list[tuple[int, Any]],
                     objective: Objective, max_retries: int):
        """One task that decodes images ``a:b`` and scores ``trials`` on them (one object ref back)."""
        import ray

        task = _remote(_decode_evaluate_task).options(
            name="imgtune:decode+trials", max_retries=max_retries, retry_exceptions=False, num_cpus=1,
            scheduling_strategy="SPREAD")
        return task.remote(self.data_dir, list(self.rows[a:b]), self.verify, identity, trials, objective)


@dataclass
class InMemoryImages:
    """Images already decoded in the calling process (a library user's arrays; the tests): each chunk
    is put in the object store once."""

    ids: list[str]
    images: Sequence[np.ndarray]
    targets: Sequence[np.ndarray | None]

    def sizes(self) -> list[int]:
        return [int(i.nbytes + (t.nbytes if t is not None else 0)) for i, t in zip(self.images, self.targets)]

    def submit(self, a: int, b: int, identity: Objective | None, max_retries: int):
        import ray

        images, targets = list(self.images[a:b]), list(self.targets[a:b])
        report = {"ids": self.ids[a:b], "decodes": 0, "bytes": sum(self.sizes()[a:b]), "seconds": 0.0,
                  "identity": evaluate_chunk(IDENTITY_STAGES, images, targets, identity) if identity else None}
        return ray.put((images, targets)), ray.put(report)


@dataclass
class DecodedChunks:
    """Decoded chunks kept in the object store between calls of ``run_trials`` on the same images (the
    rounds of a staged search), up to ``capacity`` bytes; the caller releases them with ``clear()``.
    A chunk is known by its image ids; each was checked against the manifest when it was decoded."""

    capacity: int
    refs: dict[tuple[str, ...], tuple[Any, int]] = field(default_factory=dict)  # ids -> (object ref, bytes)

    @property
    def held(self) -> int:
        return sum(size for _, size in self.refs.values())

    def get(self, ids: tuple[str, ...]):
        entry = self.refs.get(ids)
        return entry[0] if entry else None

    def offer(self, ids: tuple[str, ...], ref, size: int) -> bool:
        """Keep ``ref`` if it fits; True when kept."""
        if ids in self.refs or self.held + size > self.capacity:
            return ids in self.refs
        self.refs[ids] = (ref, size)
        return True

    def clear(self) -> None:
        self.refs.clear()  # dropping the references frees the objects


@dataclass
class FanoutResult:
    outcomes: list[TrialOutcome]
    identity: dict[str, dict[str, Any]] = field(default_factory=dict)  # image id -> identity result
    decodes: int = 0        # files decoded by this run's tasks (images and targets)
    chunks: int = 0         # chunks of images
    chunks_decoded: int = 0  # chunks decoded (the others were known from earlier progress)
    chunk_size: int = 0
    window: int = 0         # most chunks held in the object store at once (0: fused)
    fused: bool = False     # each chunk decoded and scored by one task (see run_trials)
    decode_seconds: float = 0.0
    decode_nodes: dict[int, str] = field(default_factory=dict)  # chunk -> node that decoded (and holds) it


def _raise_data_error(exc: BaseException) -> None:
    """Re-raise a decode task's ``ImageDataError`` (also as it reaches the trial tasks of its chunk)."""
    cause = getattr(exc, "cause", None)
    while cause is not None and not isinstance(cause, ImageDataError):
        cause = getattr(cause, "cause", None)
    if cause is not None:
        error = ImageDataError(str(cause))
        error.undecodable = cause.undecodable
        raise error from None


class SpillWatch:
    """What the connected cluster's object stores spill to disk from now until ``spilled()``: the
    cluster's total, so other work on a shared cluster counts too (None: Ray could not be asked)."""

    def __init__(self) -> None:
        import ray

        from imgtune_assets.core.embedded_ray import spilled_bytes_total

        self._total = spilled_bytes_total
        try:
            self.address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
        except Exception:  # noqa: BLE001 - (a Ray client's context may not know it): not measured, said as None
            self.address = None
        self.before = spilled_bytes_total(self.address) if self.address else None

    def spilled(self) -> int | None:
        after = self._total(self.address) if self.before is not None else None
        return None if after is None else max(0, after - self.before)

    def report(self, log) -> int | None:
        """``spilled()``, with a warning on ``log`` when it is not 0."""
        spilled = self.spilled()
        if spilled:
            log.warning(f"Ray spilled {spilled / 2**20:.0f} MiB of objects to disk while the trials ran (a node's "
                        "object store was full: slower, and it takes disk): lower ray_cluster.object_store_budget_mb "
                        "or the sweep's chunk_size, or give the nodes larger object stores")
        return spilled


def cluster_capacity() -> dict[str, float]:
    """The connected cluster's CPUs, and the object store a run's decoded chunks may fill: that of its
    smallest live node that runs tasks, not the cluster's total — a chunk is decoded on whichever node
    has a CPU free, and a budget of the total would fill, and spill, a node with a small store."""
    import ray

    return capacity_of(ray.nodes()) or dict(ray.cluster_resources())


def capacity_of(nodes: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """``cluster_capacity`` from Ray's node table (``ray.nodes()``); None when no live node runs tasks."""
    working = [n["Resources"] for n in nodes if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if not working:
        return None
    return {"CPU": sum(n["CPU"] for n in working),
            "object_store_memory": min(n.get("object_store_memory", 0) for n in working)}


def plan_chunks(n_images: int, n_trials: int, total_cpus: int, chunk_size: int | None = None,
                image_bytes: int = 0, memory_budget: int | None = None) -> int:
    """Images per chunk: whole image sets when there are enough trials to fill every CPU, smaller
    chunks when few trials must still spread over the cluster, and never more than a share of the
    memory budget (so that several chunks are in flight on every CPU) or ``MAX_CHUNK_BYTES``. A
    sweep's own ``chunk_size`` is kept within the memory budget too (a larger chunk would spill)."""
    if chunk_size:
        size = max(1, min(chunk_size, n_images))
        if image_bytes > 0 and memory_budget:
            size = min(size, max(1, memory_budget // image_bytes))
        return size
    chunks_per_trial = max(1, math.ceil(2 * max(1, total_cpus) / max(1, n_trials)))
    size = max(1, math.ceil(n_images / min(chunks_per_trial, max(1, n_images))))
    if image_bytes > 0:
        cap = MAX_CHUNK_BYTES if memory_budget is None else min(MAX_CHUNK_BYTES, memory_budget // (4 * max(1, total_cpus)))
        size = min(size, max(1, cap // image_bytes))
    return size


def run_trials(
    trials: Sequence[dict[str, Any]],
    images: ImageFiles | InMemoryImages,
    objective: Objective,
    *,
    chunk_size: int | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    on_trial_done: Callable[[TrialOutcome], None] | None = None,
    on_tick: Callable[[], None] | None = None,
    tick_seconds: float = 1.0,
    memory_budget: int | None = None,
    identity: bool = False,
    known: dict[str, dict[str, dict[str, Any]]] | None = None,
    known_identity: dict[str, dict[str, Any]] | None = None,
    on_chunk_done: Callable[[list[str], dict[str, list[dict[str, Any]]], list | None], None] | None = None,
    resources: dict[str, float] | None = None,
    keep: DecodedChunks | None = None,
    fuse: bool | None = None,
    on_tail: Callable[[], None] | None = None,
    watch: ClusterWatch | None = None,
) -> FanoutResult:
    """Evaluate each trial (``{"trial", "params", "stages", "error"?}``) on every image.

    An exception in a trial (OpenCV refusing its parameters, or a worker lost beyond Ray's retries)
    fails that trial only; the others complete. Ray's own machinery failing (its node dying, an object
    lost with it: ``ray_infrastructure_error``) fails no trial: every result already back is handed to
    the callbacks, nothing more is submitted, and ``RayInfrastructureError`` is raised.
    ``on_trial_done`` is called as soon as each trial's last chunk is back, so its result can be saved
    before the rest of the sweep finishes.
    ``on_chunk_done(ids, results by trial, identity results)`` is called when a chunk's last task is
    back, so that progress within trials can be saved too; ``known`` (trial -> image id -> result,
    such saved progress) and ``known_identity`` are not computed again, and a chunk known for every
    trial is not decoded. With ``identity``, the identity pipeline's result per image comes back in
    ``FanoutResult.identity`` (scored by the decode tasks).

    An image that cannot be used (changed since the manifest, vanished, undecodable) raises
    ``ImageDataError`` naming it; what completed before was already handed to the callbacks.

    ``keep``: decoded chunks found there are used without decoding, and chunks decoded here are left
    there (while they fit) instead of being released, for the next call on the same images.
    ``resources`` (``ray.cluster_resources()``) and ``watch``: the caller's, for calls made one after
    another (a staged search's rounds): asked once, watched over all of them.

    ``fuse``: decode a chunk and score all its trials in one task, so that its pixels never enter the
    object store. By default (None) chunks are fused when they stream through the object store anyway
    (the images do not fit in ``memory_budget`` at once, so every trial finishes near the end whatever
    the order of tasks) and there are at least two chunks per CPU to spread; otherwise each chunk is
    decoded once into the object store and every trial of it is a task of its own, so that trials
    complete one after another. Only for ``ImageFiles``, and not with ``keep``.

    ``on_tick`` is called at least every ``tick_seconds`` while results are awaited — also when no
    trial completes for a long time — and once more at the end, so the caller can report progress
    on time. An exception from a callback propagates (the submitted tasks are left to Ray).

    ``on_tail`` is called once, as soon as every task has been submitted and fewer are left than the
    cluster has CPUs — from then on a CPU is idle — for the caller to begin what it does next (or at
    the end, if the last results came back together).

    ``watch``: the cluster is checked while results are awaited (``ClusterWatch``; by default one on
    the connected Ray's GCS): a cluster gone raises ``RayInfrastructureError`` as a dead node does.
    """
    if tick_seconds <= 0:
        raise ValueError(f"tick_seconds must be > 0, got {tick_seconds}")
    import ray

    known = known or {}
    known_identity = known_identity or {}
    ids = list(images.ids)
    n = len(ids)
    sizes = images.sizes()
    if resources is None:  # (a staged search asks once: with its GCS gone the question would block)
        resources = cluster_capacity()
    total_cpus = int(resources.get("CPU", 1))
    if memory_budget is None:
        memory_budget = int(resources.get("object_store_memory", 2 * MAX_CHUNK_BYTES) * OBJECT_STORE_SHARE)
    size = plan_chunks(n, len(trials), total_cpus, chunk_size, image_bytes=max(sizes, default=0),
                       memory_budget=memory_budget)
    spans = [(s, min(s + size, n)) for s in range(0, n, size)]
    remote = _remote(_evaluate_task)
    result = FanoutResult(outcomes=[], chunks=len(spans), chunk_size=size)

    outcomes = result.outcomes
    images_left: dict[int, int] = {}
    for t, trial in enumerate(trials):
        outcome = TrialOutcome(trial=trial["trial"], params=trial["params"], stages=trial["stages"],
                               image_ids=ids, per_image=[None] * n)
        outcomes.append(outcome)
        if trial.get("error"):
            outcome.error = trial["error"]
            outcome.per_image = []
            continue
        done_before = known.get(trial["trial"], {})
        for i, image_id in enumerate(ids):
            if image_id in done_before:
                outcome.per_image[i] = done_before[image_id]
        images_left[t] = sum(1 for r in outcome.per_image if r is None)
    for image_id, res in known_identity.items():
        result.identity[image_id] = res

    def finish(t: int) -> None:
        outcome = outcomes[t]
        outcome.workers.sort(key=lambda w: w["chunk"])
        if on_trial_done:
            on_trial_done(outcome)

    # Trials already complete (errors, or every image known from earlier progress).
    for t, outcome in enumerate(outcomes):
        if t not in images_left or images_left[t] == 0:
            finish(t)

    # Per chunk: the trials still missing some of its images. A chunk that no trial (and not the
    # identity baseline) needs is not decoded.
    chunk_trials = [[t for t in images_left if any(outcomes[t].per_image[i] is None for i in range(a, b))]
                    for a, b in spans]
    to_decode = [c for c, (a, b) in enumerate(spans)
                 if chunk_trials[c] or (identity and any(ids[i] not in result.identity for i in range(a, b)))]
    chunk_bytes = {c: sum(sizes[a:b]) for c, (a, b) in enumerate(spans)}
    if fuse is None:
        fuse = (keep is None and isinstance(images, ImageFiles) and len(to_decode) >= 2 * total_cpus
                and sum(chunk_bytes[c] for c in to_decode) > memory_budget)
    elif fuse and (keep is not None or not isinstance(images, ImageFiles)):
        raise ValueError("fuse=True needs ImageFiles and no keep")
    result.fused = bool(fuse)

    pending: dict[Any, tuple[str, int, int]] = {}  # ref -> (kind, chunk, trial)
    tasks_left: dict[int, int] = {}
    chunk_results: dict[int, dict[str, list]] = {}
    chunk_identity: dict[int, list | None] = {}
    data_refs: dict[int, Any] = {}  # chunk -> its decoded object (None: fused, held by its task only)
    in_flight = 0
    queue = list(to_decode)

    broken: list[RayInfrastructureError] = []  # Ray failed under the run: raised once the batch is taken

    def admit() -> None:
        nonlocal in_flight
        if broken:  # nothing more for a Ray that failed
            return
        admitted = []
        while queue and (not data_refs or (
                # A fused chunk's pixels live in its task's worker only: enough queued to keep every CPU busy.
                len(data_refs) < 2 * total_cpus if fuse else in_flight + chunk_bytes[queue[0]] <= memory_budget)):
            c = queue.pop(0)
            a, b = spans[c]
            kept = keep.get(tuple(ids[a:b])) if keep is not None else None
            if kept is not None and (not identity or all(ids[i] in result.identity for i in range(a, b))):
                data_refs[c] = kept  # decoded by an earlier call: already in the object store
                tasks_left[c] = len(chunk_trials[c])  # (>= 1: a chunk no trial needs is not queued)
            elif fuse:
                fused = [(t, [(op, params) for op, params in trials[t]["stages"]]) for t in chunk_trials[c]]
                ref = images.submit_fused(a, b, objective if identity else None, fused, objective, max_retries)
                data_refs[c] = None
                in_flight += chunk_bytes[c]
                pending[ref] = ("fused", c, -1)
                tasks_left[c] = 1
                result.chunks_decoded += 1
                chunk_results[c] = {}
                continue
            else:
                data_ref, report_ref = images.submit(a, b, objective if identity else None, max_retries)
                data_refs[c] = data_ref
                in_flight += chunk_bytes[c]
                pending[report_ref] = ("decode", c, -1)
                tasks_left[c] = 1 + len(chunk_trials[c])
                result.chunks_decoded += 1
            chunk_results[c] = {}
            admitted.append(c)
        result.window = max(result.window, sum(1 for ref in data_refs.values() if ref is not None))
        # Trial-major over the admitted chunks: with everything admitted, trials complete one by one.
        for t in sorted({t for c in admitted for t in chunk_trials[c]}):
            stages = [(op, params) for op, params in trials[t]["stages"]]
            for c in admitted:
                if t in chunk_trials[c]:
                    # A chunk in the object store draws its tasks to its node (Ray's default, locality-
                    # aware); a chunk small enough for Ray to pass inline has no node, so its tasks SPREAD.
                    strategy = "SPREAD" if chunk_bytes[c] < INLINE_BYTES else "DEFAULT"
                    task = remote.options(name=f"imgtune:{trials[t]['trial']}", max_retries=max_retries,
                                          retry_exceptions=False, num_cpus=1, scheduling_strategy=strategy)
                    pending[task.remote(stages, data_refs[c], objective)] = ("trial", c, t)

    def retire(c: int) -> None:
        nonlocal in_flight
        a, b = spans[c]
        ref = data_refs.pop(c)  # the chunk's pixels leave the object store once no task holds them,
        if keep is None or keep.get(tuple(ids[a:b])) is not ref:  # (a chunk kept earlier stays)
            in_flight -= chunk_bytes[c]
            if keep is not None:
                keep.offer(tuple(ids[a:b]), ref, chunk_bytes[c])  # unless kept for the next call
        if on_chunk_done:
            on_chunk_done(ids[a:b], chunk_results.pop(c), chunk_identity.pop(c, None))
        admit()

    def take_report(c: int, report: dict[str, Any]) -> None:
        result.decodes += report["decodes"]
        result.decode_seconds += report["seconds"]
        if report.get("node_id"):
            result.decode_nodes[c] = report["node_id"]
        if report["identity"] is not None:
            chunk_identity[c] = report["identity"]
            result.identity.update(zip(report["ids"], report["identity"]))

    def take_trial(c: int, t: int, payload: dict[str, Any] | None, exc: BaseException | None) -> None:
        a, b = spans[c]
        outcome = outcomes[t]
        if payload is None:
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            chunk_out = [{"score": float("nan"), "seconds": 0.0, "error": message}] * (b - a)
        else:
            chunk_out = payload["results"]
            outcome.seconds += payload["seconds"]
            outcome.workers.append({"chunk": c, "node_id": payload["node_id"], "pid": payload["pid"]})
            # Saved as progress only when computed: a lost task is not remembered as the trial's result.
            chunk_results[c][outcome.trial] = list(chunk_out)
        filled = 0
        for i, res in zip(range(a, b), chunk_out):
            if outcome.per_image[i] is None:
                outcome.per_image[i] = res
                filled += 1
        images_left[t] -= filled
        if images_left[t] == 0:
            finish(t)

    admit()
    remaining = list(pending)
    last_tick = time.monotonic()
    watch = watch if watch is not None else ClusterWatch()
    while remaining:
        if on_tail is not None and not queue and len(remaining) < total_cpus:
            on_tail()
            on_tail = None
        # Block for one result, then take whatever else is ready: trials are saved as they finish.
        # Block no longer than until the next tick is due, or the cluster's next check.
        wait = watch.every if on_tick is None else \
            min(watch.every, max(0.0, last_tick + tick_seconds - time.monotonic()))
        done, remaining = ray.wait(remaining, num_returns=1, timeout=wait)
        if done and remaining:
            more, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=0)
            done += more
        before = set(pending)
        # The whole batch is fetched first: when Ray failed under any of it, the other errors in it are
        # Ray's too (workers die with their raylet, as WorkerCrashedError), not their trials'.
        batch = []
        for ref in done:
            kind, c, t = pending.pop(ref)
            try:
                batch.append((kind, c, t, ray.get(ref), None, None))
            except Exception as exc:  # noqa: BLE001 - sorted out below: Ray's, the images' or the trial's
                lost = ray_infrastructure_error(exc)
                if lost is not None:
                    broken.append(lost)
                batch.append((kind, c, t, None, exc, lost))
        for kind, c, t, got, exc, lost in batch:
            if exc is not None:
                _raise_data_error(exc)  # the chunk's images, not the trial, failed: nothing is recorded
                if lost is not None or broken:  # no trial's fault: nothing is recorded; the rest is taken
                    continue
                if kind == "decode" or (kind == "fused" and identity):
                    raise exc  # (fused: the chunk's baseline is lost with it, as with a failed decode)
                # recorded on the trial(s): a lost chunk fails its trial (fused: every trial it scored)
                for t in (chunk_trials[c] if kind == "fused" else [t]):
                    take_trial(c, t, None, exc)
            else:
                if kind == "decode":
                    take_report(c, got)
                elif kind == "fused":
                    take_report(c, got["report"])
                    for t, trial_payload in got["trials"].items():
                        take_trial(c, t, trial_payload, None)
                else:
                    take_trial(c, t, got, None)
            tasks_left[c] -= 1
            if tasks_left[c] == 0:
                retire(c)
        if broken:
            raise broken[0]
        # After the batch is handed over; at most every ``every`` seconds (results may still come from a
        # raylet whose GCS is gone).
        watch.check()
        remaining += [ref for ref in pending if ref not in before]  # tasks of newly admitted chunks
        if on_tick is not None and time.monotonic() - last_tick >= tick_seconds:
            last_tick = time.monotonic()
            on_tick()
    if on_tail is not None:  # (the last results came back together)
        on_tail()
    if on_tick is not None:
        on_tick()
    for outcome in outcomes:
        if outcome.per_image and any(r is None for r in outcome.per_image):
            raise RuntimeError(f"{outcome.trial}: internal error, some images were never evaluated")
    return result
