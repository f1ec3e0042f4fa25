"""Fanning trials out over Ray: (trial × image-chunk) tasks over images put in the object store once.

Plain module (no Dagster). ``ray`` is imported where it is used so that loading the Dagster
definitions never pays for it. The caller owns the Ray connection (``ray.init``); this module only
submits tasks.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from imgtune_assets.core.evaluate import TrialOutcome, evaluate_chunk
from imgtune_assets.core.metrics import Objective

DEFAULT_MAX_RETRIES = 3


def _evaluate_task(stages, chunk, objective):
    """Ray task body: the chunk arrives as zero-copy read-only views from the object store."""
    import cv2
    import os

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


def plan_chunks(n_images: int, n_trials: int, total_cpus: int, chunk_size: int | None = None) -> int:
    """Images per task: whole image sets when there are enough trials to fill every CPU,
    smaller chunks when few trials must still spread over the cluster."""
    if chunk_size:
        return max(1, min(chunk_size, n_images))
    chunks_per_trial = max(1, math.ceil(2 * max(1, total_cpus) / max(1, n_trials)))
    return max(1, math.ceil(n_images / min(chunks_per_trial, n_images)))


def run_trials(
    trials: Sequence[dict[str, Any]],
    image_ids: Sequence[str],
    images: Sequence[np.ndarray],
    targets: Sequence[np.ndarray | None],
    objective: Objective,
    *,
    chunk_size: int | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    on_trial_done: Callable[[TrialOutcome], None] | None = None,
    on_tick: Callable[[], None] | None = None,
    tick_seconds: float = 1.0,
) -> list[TrialOutcome]:
    """Evaluate each trial (``{"trial", "params", "stages", "error"?}``) on every image.

    An exception in a trial (OpenCV refusing its parameters, or a worker lost beyond Ray's retries)
    fails that trial only; the others complete. ``on_trial_done`` is called as soon as each trial's
    last chunk is back, so its result can be saved before the rest of the sweep finishes.

    ``on_tick`` is called at least every ``tick_seconds`` while results are awaited — also when no
    trial completes for a long time — and once more at the end, so the caller can report progress
    on time. Results are still taken as soon as they are ready. An exception from a callback
    propagates (the submitted tasks are left to Ray).
    """
    if tick_seconds <= 0:
        raise ValueError(f"tick_seconds must be > 0, got {tick_seconds}")
    import ray

    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    size = plan_chunks(len(images), len(trials), total_cpus, chunk_size)
    spans = [(s, min(s + size, len(images))) for s in range(0, len(images), size)]
    # Each decoded image enters the object store once per run; tasks receive references.
    chunk_refs = [ray.put((list(images[a:b]), list(targets[a:b]))) for a, b in spans]
    remote = ray.remote(_evaluate_task)

    outcomes: list[TrialOutcome] = []
    pending: dict[Any, tuple[int, int]] = {}
    chunks_left: dict[int, int] = {}
    for t, trial in enumerate(trials):
        outcome = TrialOutcome(trial=trial["trial"], params=trial["params"], stages=trial["stages"],
                               image_ids=list(image_ids), per_image=[None] * len(images))
        outcomes.append(outcome)
        if trial.get("error"):
            outcome.error = trial["error"]
            outcome.per_image = []
            if on_trial_done:
                on_trial_done(outcome)
            continue
        chunks_left[t] = len(chunk_refs)
        stages = [(op, params) for op, params in trial["stages"]]
        for c, ref in enumerate(chunk_refs):
            # SPREAD: on a cluster, nodes get work from the start instead of the driver's node filling up
            # first (a preference: tasks of a few milliseconds may all finish on the first workers
            # Ray starts); on one node it changes nothing.
            task = remote.options(name=f"imgtune:{trial['trial']}", max_retries=max_retries,
                                  retry_exceptions=False, num_cpus=1, scheduling_strategy="SPREAD")
            pending[task.remote(stages, ref, objective)] = (t, c)

    remaining = list(pending)
    last_tick = time.monotonic()
    while remaining:
        # Block for one result, then take whatever else is ready: trials are saved as they finish.
        # With a tick, block no longer than until the next tick is due.
        if on_tick is None:
            done, remaining = ray.wait(remaining, num_returns=1)
        else:
            wait = max(0.0, last_tick + tick_seconds - time.monotonic())
            done, remaining = ray.wait(remaining, num_returns=1, timeout=wait)
        if done and remaining:
            more, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=0)
            done += more
        for ref in done:
            t, c = pending[ref]
            outcome = outcomes[t]
            a, b = spans[c]
            try:
                payload = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - recorded on the trial: a lost chunk fails its trial
                message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                outcome.per_image[a:b] = [{"score": float("nan"), "seconds": 0.0, "error": message}] * (b - a)
            else:
                outcome.per_image[a:b] = payload["results"]
                outcome.seconds += payload["seconds"]
                outcome.workers.append({"chunk": c, "node_id": payload["node_id"], "pid": payload["pid"]})
            chunks_left[t] -= 1
            if chunks_left[t] == 0:
                outcome.workers.sort(key=lambda w: w["chunk"])
                if on_trial_done:
                    on_trial_done(outcome)
        if on_tick is not None and time.monotonic() - last_tick >= tick_seconds:
            last_tick = time.monotonic()
            on_tick()
    if on_tick is not None:
        on_tick()
    for outcome in outcomes:
        if outcome.per_image and any(r is None for r in outcome.per_image):
            raise RuntimeError(f"{outcome.trial}: internal error, some images were never evaluated")
    return outcomes
