"""``<group>_new_images``: a new, changed or removed image (or target) in a sweep's data folder requests
that sweep.

The request is the schedule's: one ranged run of ``<group>_sweep`` over every trial.

How a change is detected, cheaply on most ticks:

1. A *stat digest* of the images and targets folders (names, sizes, mtimes, inodes, ctimes; no file is
   read). Same as the cursor's → skip at once.
2. Otherwise the *content hash*: exactly ``image_manifest``'s ``content_hash`` metadata
   (``scan_folder`` + ``manifest_digest``: file hashes and usability, files an earlier run found
   undecodable skipped), reading only the files changed since the last scan (the sweep's
   ``ProbeCache``, shared with ``image_manifest``). Same as the last one seen (a
   file touched or rewritten with the same bytes) → skip, remembering the new stat digest.
   On the very first tick (no cursor) the baseline is the latest ``image_manifest``
   materialization's ``content_hash``, so starting the sensor over already-swept images requests
   nothing. Nor does a change that a sweep has reported on since the last tick (the latest
   ``sweep_report``'s ``content_hash``: the schedule's run, the command's, or one the sensor waited for).
3. A different content hash requests a sweep (run key ``images:<old>-><new>``) — unless a sweep run
   is already queued or running: then the sensor waits (cursor unchanged) and looks again on the next
   tick, so copying many images in over a minute gives one or two sweeps, not one per file.

Cursor: JSON ``{"stat": <stat digest>, "content": <content hash>}``. Interval:
``$IMGTUNE_SENSOR_INTERVAL_SECONDS`` (default 30). Sensors are STOPPED until started:
``dagster sensor start <group>_new_images`` (or the UI toggle), with ``dagster-daemon run`` running.
"""


import json
import os

from dagster import (
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from imgtune_assets.core import storage
from imgtune_assets.core.catalog import group_name
from imgtune_assets.core.manifest import (
    PROBE_CACHE_FILE,
    ManifestError,
    cached_scan,
    manifest_digest,
    scan_folder,
    stat_digest,
    sweep_rows,
)
from imgtune_assets.core.sampling import trial_keys
from imgtune_assets.core.sweepfile import Sweep
from imgtune_assets.defs.jobs import SweepJobs, reuse_finished_config, runs_in_the_way, sweep_run_request
from imgtune_assets.defs.keys import asset_key
from imgtune_assets.defs.resources import SweepResource

INTERVAL_ENV = "IMGTUNE_SENSOR_INTERVAL_SECONDS"


def _interval() -> int:
    value = os.environ.get(INTERVAL_ENV, "").strip()
    if not value:
        return 30
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{INTERVAL_ENV}: expected a whole number of seconds >= 1, got {value!r}")
    return int(value)


def _parse_cursor(cursor: str | None) -> dict[str, str]:
    if not cursor:
        return {}
    try:
        value = json.loads(cursor)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def sensor_name(sweep: Sweep) -> str:
    return f"{group_name(sweep.name)}_new_images"


def _last_content_hash(context: SensorEvaluationContext, sweep: Sweep, asset: str) -> str | None:
    """The ``content_hash`` of the sweep's latest materialization of ``asset`` (the images it was made of)."""
    if context.instance is None:
        return None
    event = context.instance.get_latest_materialization_event(asset_key(sweep, asset))
    materialization = event.asset_materialization if event else None
    entry = materialization.metadata.get("content_hash") if materialization else None
    return str(entry.value) if entry is not None else None


def _sweep_in_progress(context: SensorEvaluationContext, sweep: Sweep, sensor: str) -> bool:
    """Whether a run of the sweep is queued or running (``jobs.runs_in_the_way``; a run left running by a
    sweep command that is gone is marked failed instead)."""
    if context.instance is None:
        return False
    return bool(runs_in_the_way(context.instance, sweep.name, None, marked_by=f"the {sensor} sensor", log=context.log))


def build_new_images_sensor(sweep: Sweep, jobs: SweepJobs) -> SensorDefinition:
    job_name = jobs.sweep.name
    keys = trial_keys(sweep)

    @sensor(
        name=sensor_name(sweep),
        job=jobs.sweep,
        minimum_interval_seconds=_interval(),
        description=f"Requests the whole sweep {sweep.name!r} (one ranged run) when an image or target in "
        f"{sweep.data_dir} is added, changed or removed.",
    )
    def new_images(context: SensorEvaluationContext, imgtune: SweepResource) -> SensorResult | SkipReason:
        data_dir = sweep.data_dir
        try:
            # (for a URL: a missing bucket, refused credentials raise here, said as the manifest says them)
            if not storage.is_folder(data_dir):
                return SkipReason(f"{data_dir}: data folder does not exist yet"
                                  + (" (the first sweep generates the demo set)" if sweep.demo_data else ""))
            stat = stat_digest(data_dir)
        except storage.StorageError as exc:  # an unreachable store, missing bucket or refused credentials
            return SkipReason(str(exc))
        cursor = _parse_cursor(context.cursor)
        if cursor.get("stat") == stat:
            return SkipReason(f"no change in {data_dir} (content hash {cursor.get('content')})")
        try:
            # as image_manifest computes it: files an earlier run found undecodable count as skipped
            sweep_dir = imgtune.sweep_dir(sweep.name)
            if sweep_dir.is_dir():  # the sweep's first run makes its folder; a tick does not
                # Never waits: while a run's manifest scans, the cache as it is, not saved.
                scanned, _ = cached_scan(data_dir, sweep.needs_target, sweep_dir / PROBE_CACHE_FILE, context.log,
                                         wait=False)
            else:
                scanned = scan_folder(data_dir, needs_target=sweep.needs_target)
            content = manifest_digest(sweep_rows(scanned, sweep_dir, sweep.objective.metric,
                                                 sweep.objective.spec.min_side))
        except ManifestError as exc:
            return SkipReason(str(exc))
        baseline = cursor.get("content") if cursor else _last_content_hash(context, sweep, "image_manifest")
        if content == baseline:
            # No cursor yet: the sensor's first look, at the images the last sweep already read.
            why = (f"files in {data_dir} were touched but their content is unchanged" if cursor else
                   f"the images in {data_dir} are those the last sweep read (the sensor's first look)")
            return SensorResult(skip_reason=f"{why} (content hash {content})",
                                cursor=json.dumps({"stat": stat, "content": content}))
        if content == _last_content_hash(context, sweep, "sweep_report"):
            # Another run (the schedule's, the command's, one this sensor waited for) swept these images.
            return SensorResult(skip_reason=f"the images in {data_dir} changed since this sensor's last look, but a "
                                            f"sweep since has reported on them (content hash {content})",
                                cursor=json.dumps({"stat": stat, "content": content}))
        if _sweep_in_progress(context, sweep, sensor_name(sweep)):
            return SkipReason(f"images changed (content hash {baseline} -> {content}) but a run of the sweep "
                              f"{sweep.name!r} is queued or running; will look again on the next tick")
        request = sweep_run_request(job_name, keys, trigger="new_images", run_key=f"images:{baseline}->{content}@{stat}",
                                    run_config=reuse_finished_config(sweep),
                                    tags={"imgtune/images_content_hash": content})
        context.log.info(f"images in {data_dir} changed (content hash {baseline} -> {content}): requesting a sweep")
        return SensorResult(run_requests=[request], cursor=json.dumps({"stat": stat, "content": content}))

    return new_images
