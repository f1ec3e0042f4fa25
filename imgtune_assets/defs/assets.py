"""A sweep's assets: ``<name>/image_manifest → <name>/run_settings → <name>/experiment_results[trial]
→ <name>/sweep_report``, built for one sweep object by ``build_sweep_assets``.

Only the Dagster concerns live here (keys, partitions, metadata, failures); the work itself is in
``imgtune_assets.core`` (manifest scanning, the fan-out, the trial store, the report).
"""


import base64
import hashlib
import json
import math
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    BackfillPolicy,
    BetaWarning,
    Config,
    DagsterError,
    DagsterType,
    DataVersion,
    Failure,
    MetadataValue,
    Output,
    PartitionsDefinition,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)
from pydantic import Field

from imgtune_assets.core import storage
from imgtune_assets.core.catalog import group_name
from imgtune_assets.core.clock import process_age_seconds
from imgtune_assets.core.demo_data import ensure_demo_data
from imgtune_assets.core.evaluate import NAN_SCORE
from imgtune_assets.core.files import atomic_write_json, json_bytes
from imgtune_assets.core.imageio import ImageReadError, read_image
from imgtune_assets.core.launcher import PARENT_RUN_ID_TAG, RUN_PROCESS_TAG, process_tag
from imgtune_assets.core.manifest import (
    PROBE_CACHE_FILE,
    ManifestError,
    ManifestRow,
    cached_scan,
    image_folders,
    manifest_digest,
    require_usable,
    sweep_rows,
)
from imgtune_assets.core.manifest import usable as usable_rows
from imgtune_assets.core.metrics import improvement
from imgtune_assets.core.paths import sweep_command
from imgtune_assets.core.progress import partial_reuse_message, reuse_message
from imgtune_assets.core.report import (
    STAGED_COLUMNS,
    before_after_panels,
    best_record,
    evaluations,
    fixed_pipeline,
    leaderboard,
    top_params,
    write_report,
)
from imgtune_assets.core.results import IdentityBaseline, TrialStore
from imgtune_assets.core.sampling import search_space, space_digest, trial_index, trial_keys, trial_settings
from imgtune_assets.core.search import early_stopping_notes, is_staged, repeated_trials_note, staged_trials
from imgtune_assets.core.sweepfile import Sweep
from imgtune_assets.defs.executor import steps_share_the_run_process
from imgtune_assets.defs.jobs import (ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG, PARTITION_TAG,
                                      runs_in_the_way)
from imgtune_assets.defs.keys import asset_key
from imgtune_assets.defs.resources import RayResource, SweepResource
from imgtune_assets.defs.search_run import report_imports_on_tail, run_staged_search

MANIFEST_COLUMNS = {"id", "image_path", "status"}
MAX_SKIPPED_LISTED = 100  # skipped apply inputs kept in tuned_images' value (all are in its outputs file)


def _is_manifest_frame(_context, value) -> bool:
    # Checked by name: pandas is imported where a manifest is built or read, not when the code loads.
    return type(value).__name__ == "DataFrame" and MANIFEST_COLUMNS <= set(getattr(value, "columns", ()))


ImageManifestFrame = DagsterType(
    name="ImageManifest", type_check_fn=_is_manifest_frame,
    description="A pandas DataFrame with one row per file of the data folder: id, image_path, target_path, "
                "image_sha256, target_sha256, width, height, channels, dtype, status (ok | skipped), reason.")


def manifest_rows(records: list[dict]) -> list[ManifestRow]:
    return [ManifestRow.from_record(rec) for rec in records]


def _notes_metadata(notes: list[str]) -> dict[str, MetadataValue]:
    return {"notes": MetadataValue.md("\n".join(f"- {n}" for n in notes))} if notes else {}


def _table(frame, limit: int | None = None) -> MetadataValue:
    import pandas as pd

    frame = frame if limit is None else frame.head(limit)
    columns = []
    for name, dtype in frame.dtypes.items():
        kind = "float" if pd.api.types.is_float_dtype(dtype) else "int" if pd.api.types.is_integer_dtype(dtype) else "string"
        columns.append(TableColumn(str(name), kind))
    records = []
    for rec in frame.to_dict("records"):
        clean = {}
        for key, value in rec.items():
            if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
                clean[str(key)] = None
            elif isinstance(value, float):
                clean[str(key)] = round(value, 6)
            elif isinstance(value, (int, bool)):
                clean[str(key)] = value
            else:
                clean[str(key)] = str(value)
        records.append(TableRecord(clean))
    return MetadataValue.table(records, schema=TableSchema(columns))


class ExperimentConfig(Config):
    skip_finished: bool = Field(
        default=False,
        description="Reuse a trial's saved result when it was computed from the same settings and the same "
        "images (same sweep fingerprint and manifest hash) instead of computing it again. For resuming "
        "a sweep whose run was killed: finished trials are saved as they complete.",
    )


def _partition_metadata(record: dict, result_file, reused: bool) -> dict[str, Any]:
    # The status first, then the score: a pruned or failed trial has none (a pruned one's partial mean
    # and rung follow), and the UI's plot of scores across partitions leaves it out, not as a gap.
    return {
        "status": record["status"],
        **({"score": MetadataValue.float(float(record["score"]))} if record["score"] is not None else {}),
        # Staged searches: the round that proposed the trial, by what, and the rung it reached.
        **({} if record.get("round") is None else {
            "partial_score": MetadataValue.float(float("nan") if record["partial_score"] is None
                                                 else float(record["partial_score"])),
            "rung": record["rung"], "round": record["round"], "source": record["source"],
            # what ranked a pruned trial at its last rung: its expected mean over every image
            **({} if record.get("estimated_score") is None else {
                "estimated_score": MetadataValue.float(float(record["estimated_score"]))})}),
        "params": MetadataValue.json(record["params"]),
        "images_scored": record["images_scored"],
        "images_failed": record["images_failed"],
        "seconds": MetadataValue.float(round(record["seconds"], 4)),
        "nodes": MetadataValue.json(sorted({w["node_id"] for w in record["workers"]})),
        "tasks": MetadataValue.json([{"chunk": w["chunk"], "node_id": w["node_id"], "pid": w["pid"]}
                                     for w in record["workers"]]),
        "error": record["error"] or "",
        "reused": reused,
        "result_file": MetadataValue.path(str(result_file)),
    }


# Photographs (the before/after picture) go into the UI's metadata as JPEG: a PNG of them is most of a
# report's weight, and the instance keeps every report's metadata twice (the run's and the index's).
PHOTO_PLOTS = {"best_trial_images"}
EMBEDDED_JPEG_QUALITY = 85


def _embed_png(png: bytes, alt: str) -> str:
    """A markdown image of ``png`` (a plot's file), inline; ``PHOTO_PLOTS`` re-encoded as JPEG when smaller."""
    kind, data = "png", png
    if alt in PHOTO_PLOTS:
        import cv2
        import numpy as np

        image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, EMBEDDED_JPEG_QUALITY]) \
            if image is not None else (False, None)
        if ok and len(jpeg) < len(png):
            kind, data = "jpeg", jpeg.tobytes()
    return f"![{alt}](data:image/{kind};base64,{base64.b64encode(data).decode('ascii')})"


@dataclass(frozen=True)
class SweepAssets:
    image_manifest: AssetsDefinition
    run_settings: AssetsDefinition
    experiment_results: AssetsDefinition
    sweep_report: AssetsDefinition
    tuned_images: AssetsDefinition | None = None  # only for sweep files with ``apply:``

    def all(self) -> list[AssetsDefinition]:
        return [a for a in (self.image_manifest, self.run_settings, self.experiment_results, self.sweep_report,
                            self.tuned_images) if a is not None]


def reversed_range(tags: Mapping[str, str]) -> None:
    """Raise a ``Failure`` for a run whose partition range ends before it starts (``trial-010...trial-003``):
    Dagster takes it as no partition at all, and the run would succeed having computed nothing."""
    first, last = tags.get(ASSET_PARTITION_RANGE_START_TAG), tags.get(ASSET_PARTITION_RANGE_END_TAG)
    if not (first and last):
        return
    try:
        backwards = trial_index(first) > trial_index(last)
    except ValueError:  # not trial keys: the trials step names them
        return
    if backwards:
        raise Failure(description=f"this run's partition range {first}...{last} ends before it starts: name the "
                                  f"first trial first ({last}...{first})")


def one_run_asset(**kwargs):
    """``@asset`` with ``BackfillPolicy.single_run()``: a range of trials (and the unpartitioned steps
    beside it) is one run, also through ``dg launch --job <group>_sweep --partition-range A...B``, which
    asks every selected asset for that policy. Dagster 1.13 calls the parameter beta and would say so on
    every command that loads the definitions: not here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)
        return asset(backfill_policy=BackfillPolicy.single_run(), **kwargs)


def build_sweep_assets(sweep: Sweep, partitions: PartitionsDefinition) -> SweepAssets:
    """The four assets of ``sweep``, under the key prefix ``sweep.name`` in the group ``group_name(sweep.name)``."""
    group = group_name(sweep.name)
    prefix = [sweep.name]
    objective = sweep.objective
    # What decides the settings, the trials' scores and the report: a sweep file edited (another seed,
    # space or objective) shows them as changed code in the UI, out of date until they are made again.
    code_version = sweep.fingerprint()
    manifest_key, settings_key, results_key = (asset_key(sweep, n) for n in
                                               ("image_manifest", "run_settings", "experiment_results"))

    def check_settings(settings: dict, step: str) -> None:
        """``run_settings`` as ``step`` (what the step does: "running trials") needs it: of this version of
        the sweep file."""
        if settings["fingerprint"] != sweep.fingerprint():
            raise Failure(description=f"{settings_key.to_user_string()} was made from another version of "
                                      f"{sweep.path} (its search, objective, seed or sampler changed since): "
                                      f"materialize image_manifest and run_settings again, then the trials, "
                                      f"before {step}")
        if "images" not in settings:
            raise Failure(description=f"{settings_key.to_user_string()} was made by an older imgtune that did not "
                                      "pin the images: materialize image_manifest and run_settings again")
        listed = len(settings.get("trials", ()))
        if listed != sweep.trials:  # ``trials`` raised or lowered since
            raise Failure(description=f"{settings_key.to_user_string()} lists {listed} trials and {sweep.path} now "
                                      f"asks for {sweep.trials}: materialize it again (saved trials are kept)")

    def refuse_overlap(context: AssetExecutionContext) -> None:
        """Stop this run before it changes the sweep's files if an earlier run of the sweep is in
        progress (``jobs.runs_in_the_way``: the two would mix their manifests, trials and reports)."""
        try:
            run, instance = context.run, context.instance
        except DagsterError:  # invoked directly (build_asset_context): no run
            return
        if run is None or instance is None:
            return
        if steps_share_the_run_process(context.job_def.executor_def) and RUN_PROCESS_TAG not in run.tags \
                and PARENT_RUN_ID_TAG not in run.tags:
            # This process is the run's (a command's, the daemon's run worker, `dagster asset materialize`):
            # if it is killed, the sweep's next run finds the run gone and marks it failed, instead of
            # waiting for a run that shows as in progress for ever.
            instance.add_run_tags(run.run_id, {RUN_PROCESS_TAG: process_tag()})
        in_the_way = runs_in_the_way(instance, sweep.name, run.run_id, marked_by=f"run {run.run_id}", log=context.log)
        if in_the_way:
            other = in_the_way[0]
            raise Failure(description=(
                f"another run of the sweep {sweep.name!r} is in progress (run {other.run_id}, job {other.job_name}, "
                f"{other.status.value.lower()}): this run stopped before changing the sweep's files, which the two "
                "would mix; launch it again when that run has ended (or terminate that run)"))

    def no_trials_named() -> Failure:
        all_keys = trial_keys(sweep)
        return Failure(description=(
            f"{results_key.to_user_string()} is partitioned by trial and this run names none: run the whole "
            f"sweep with `{sweep_command(sweep.name)}`, or launch the job with the trials' "
            f"range, e.g. `dg launch --job {group}_sweep --partition-range '{all_keys[0]}...{all_keys[-1]}'` "
            f"or `dagster job execute -m imgtune_assets.definitions -j {group}_sweep --tags "
            f"'{{\"dagster/asset_partition_range_start\": \"{all_keys[0]}\", "
            f"\"dagster/asset_partition_range_end\": \"{all_keys[-1]}\"}}'`"))

    @one_run_asset(name="image_manifest", key_prefix=prefix, group_name=group, kinds={"opencv", "pandas"},
                   dagster_type=ImageManifestFrame)
    def image_manifest(context: AssetExecutionContext, imgtune: SweepResource) -> Output:
        """One row per file in the sweep's data folder: id, paths, content hashes, size, channels, status.

        Unusable files are rows with a reason, not crashes. The data version is a hash of the
        (id, content hash) pairs, so new or changed images make everything downstream stale.
        """
        import pandas as pd

        refuse_overlap(context)
        # The sweep's whole job launched without its trials (`dg launch --job NAME_sweep`, the UI's
        # launchpad): refused at its first step, before the folder is read, not at the trials.
        try:
            job, tags = context.job_name, context.run.tags
        except DagsterError:  # invoked directly (build_asset_context): no run, no job
            job, tags = None, {}
        if job == f"{group}_sweep" and not (ASSET_PARTITION_RANGE_START_TAG in tags or PARTITION_TAG in tags):
            raise no_trials_named()
        named = [tags[t] for t in (ASSET_PARTITION_RANGE_START_TAG, ASSET_PARTITION_RANGE_END_TAG, PARTITION_TAG)
                 if t in tags]
        unknown = [key for key in named if key not in set(trial_keys(sweep))]
        if unknown:
            # Requested from code loaded before the sweep file changed (a schedule, the sensor, the UI):
            # stopped here, before the manifest and settings are made for a file the request was not.
            raise Failure(description=(
                f"this run asks for {', '.join(unknown)}, which {sweep.path} no longer has (trials: {sweep.trials}): "
                "the file changed after the code location that requested the run was loaded; reload the code "
                "location (the UI's Deployment → Reload, or restart `dagster dev`) and launch again"))
        reversed_range(tags)

        if sweep.demo_data and not storage.is_remote(sweep.data_dir) and not (sweep.data_dir / "images").is_dir():
            context.log.info(f"Generating the {sweep.demo_data} demo data set in {sweep.data_dir}")
            ensure_demo_data(sweep.data_dir, sweep.demo_data)
        try:
            # (waits while `python -m imgtune_assets.cli sweep` probes the folder ahead: manifest.ProbeAhead)
            def waiting() -> None:
                context.log.info(f"waiting for the scan of {sweep.data_dir} that another process (the sweep "
                                 "command reading the images ahead, or another run's manifest) is making")

            scanned, cache = cached_scan(sweep.data_dir, sweep.needs_target,
                                         imgtune.sweep_dir(sweep.name) / PROBE_CACHE_FILE, context.log, on_wait=waiting)
            rows = sweep_rows(scanned, imgtune.sweep_dir(sweep.name), objective.metric, objective.spec.min_side)
            if sweep.needs_target and not any(r.target_path for r in rows):
                _, target_dir = image_folders(sweep.data_dir)
                raise ManifestError(f"{sweep.path}: objective.metric: {objective.metric} needs ground-truth "
                                    f"targets, but {target_dir} holds none (expected targets/<image stem>.png)")
            usable = require_usable(rows, sweep.data_dir)
        except (ManifestError, storage.StorageError) as exc:
            raise Failure(description=str(exc)) from None
        skipped = [r for r in rows if r.status != "ok"]
        for row in skipped:
            context.log.warning(f"skipped {row.image_path}: {row.reason}")
        digest = manifest_digest(rows)
        frame = pd.DataFrame([r.to_record() for r in rows])
        metadata: dict[str, Any] = {
            "data_dir": MetadataValue.path(str(sweep.data_dir)),
            "files": len(rows),
            "usable_images": len(usable),
            "skipped_files": len(skipped),
            # Images and targets read and hashed by this scan (a file found unreadable is read by every
            # scan); the others were unchanged since the last scan (their stat, or an object's tag) and
            # were not read (ProbeCache).
            "files_read": cache.read,
            "files_unchanged": cache.reused,
            "with_targets": sum(1 for r in usable if r.target_path),
            "content_hash": digest,
            # What identifies each file's content (see core/storage.py).
            "content_key": "object store tag (ETag) and size" if storage.is_remote(sweep.data_dir)
            else "SHA-256 of the file",
        }
        if skipped:
            metadata["skipped"] = _table(frame[frame["status"] != "ok"][["image_path", "reason"]], limit=50)
        return Output(frame, metadata=metadata, data_version=DataVersion(digest))

    @one_run_asset(name="run_settings", key_prefix=prefix, group_name=group, code_version=code_version,
                   ins={"image_manifest": AssetIn(key=manifest_key)})
    def run_settings(context: AssetExecutionContext, imgtune: SweepResource, image_manifest) -> Output[dict]:
        """What the sweep's runs evaluate: one entry per trial (its partition key and parameters, drawn from
        seed, search space and trial index) and the manifest's rows with its content hash.

        The trials and the report read the images from here, so a run evaluates exactly the images the
        settings were made for, and loading them needs no pandas: materialize ``image_manifest`` and
        ``run_settings`` together when the images change.
        """
        import pandas as pd

        refuse_overlap(context)
        rows = manifest_rows(image_manifest.to_dict("records"))
        trials = staged_trials(sweep, imgtune.sweep_dir(sweep.name), manifest_digest(rows)) if is_staged(sweep) \
            else [trial_settings(sweep, k) for k in range(sweep.trials)]
        settings = {"sweep": sweep.name, "fingerprint": sweep.fingerprint(), "objective": objective.to_dict(),
                    "trials": trials, "manifest_digest": manifest_digest(rows), "images": [r.to_record() for r in rows]}
        atomic_write_json(imgtune.sweep_dir(sweep.name) / "run_settings.json", settings)
        preview = pd.DataFrame([{"trial": t["trial"], **(t["params"] or {})} for t in trials])
        notes = early_stopping_notes(sweep, sum(1 for r in rows if r.status == "ok"))
        if repeated := repeated_trials_note(sweep, trials):
            notes.append(repeated)
        for note in notes:
            context.log.warning(f"{sweep.path}: {note}")
        # The same trials over the same images (by content, not by the stats a rescan records anew) are
        # the same data version: made again unchanged, they leave the trials and the report up to date.
        decisive = {key: settings[key] for key in ("fingerprint", "objective", "trials", "manifest_digest")}
        version = hashlib.sha256(json_bytes(decisive)).hexdigest()[:16]
        return Output(settings, data_version=DataVersion(version), metadata={
            **_notes_metadata(notes),
            "trials": sweep.trials,
            "sampler": sweep.sampler,
            "early_stopping": MetadataValue.json(sweep.early_stopping.to_dict() if sweep.early_stopping else {}),
            "seed": sweep.seed,
            "metric": objective.metric,
            "fingerprint": settings["fingerprint"],
            "usable_images": sum(1 for r in rows if r.status == "ok"),
            "search_space": MetadataValue.json({d.name: d.range.to_dict() for d in search_space(sweep)}),
            "preview": _table(preview, limit=20),
        })

    @one_run_asset(name="experiment_results", key_prefix=prefix, group_name=group, code_version=code_version,
                   partitions_def=partitions, ins={"run_settings": AssetIn(key=settings_key)}, kinds={"ray", "opencv"})
    def experiment_results(context: AssetExecutionContext, config: ExperimentConfig, imgtune: SweepResource,
                           ray_cluster: RayResource, run_settings: dict) -> None:
        """One partition per trial: its pipeline's parameters, scored on the usable images, its score
        the mean (per-image scores in its result file). With early stopping, a trial stopped after a
        few images is `pruned`: no score, its partial mean and rung instead. A trial whose pipeline
        fails is `failed`, with its error; the others go on. Results are saved as each trial
        completes: a run that is stopped resumes with `skip_finished` (the CLI's `--resume`)."""
        # Ray tasks read and decode the images (core/fanout.py): this process holds file names and
        # scores, never pixels; each trial's result is written atomically (trials/<key>.json). Ray
        # failing under the run (fanout's RayInfrastructureError) fails the run, saying so, with no
        # trial recorded as failed for it. Progress: the run log (at least every 5 s or 10 % of the
        # trials) and progress.json in the sweep's output folder.
        from imgtune_assets.core.fanout import (ImageDataError, ImageFiles, RayInfrastructureError, SpillWatch,
                                                data_error_message, run_trials)
        from imgtune_assets.core.progress import SweepProgress, counted

        refuse_overlap(context)
        check_settings(run_settings, "running trials")
        if not (context.has_partition_key or context.has_partition_key_range):
            raise no_trials_named()
        reversed_range(context.run.tags)
        keys = list(context.partition_keys)
        if not keys:
            raise Failure(description="this run names no trial: its partition range is empty")
        by_key = {t["trial"]: t for t in run_settings["trials"]}
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise Failure(description=f"partitions {missing[:5]} are not trials of sweep {sweep.name!r} "
                                      f"({counted(sweep.trials, 'trial')}); was the sweep file changed?")
        rows = manifest_rows(run_settings["images"])
        digest = run_settings["manifest_digest"]
        sweep_dir = imgtune.sweep_dir(sweep.name)
        store = TrialStore.of_sweep(sweep_dir, sweep, digest)
        for left in store.remove_killed_writes():
            context.log.info(f"removed {left.name}: an unfinished write of a killed run (its result was never saved)")
        n_images = sum(1 for r in rows if r.status == "ok")
        progress = SweepProgress(len(keys), n_images, objective, sweep_trials=sweep.trials)
        failed: list[str] = []
        settled: set[str] = set()  # trials saved (or reused) by this run

        def ray_failed(exc: RayInfrastructureError) -> Failure:
            # (chunks streamed through fused tasks save their image evaluations before any trial is whole)
            partial = progress.partial_evaluations
            also = f", and {counted(partial, 'image evaluation')} of the others" if partial else ""
            return Failure(description=(
                f"{exc.what}; no trial is recorded as failed because of it. {len(settled)} of the run's {len(keys)} "
                f"trials are finished and saved{also}: run again with skip_finished "
                f"(`{sweep_command(sweep.name, '--resume')}`) to compute the other {len(keys) - len(settled)}"))

        def report_progress() -> None:
            snapshot = progress.report_if_due()
            if snapshot is not None:
                context.log.info(f"{sweep.name}: {progress.line()}")
                atomic_write_json(sweep_dir / "progress.json",
                                  {**snapshot, "sweep": sweep.name, "run_id": context.run.run_id})

        def save(record: dict, reused: bool) -> None:
            result_file = store.path(record["trial"]) if reused else store.save(record)
            settled.add(record["trial"])
            if record["status"] == "failed":
                failed.append(record["trial"])
                context.log.warning(f"{record['trial']} failed: {record['error']}")
            context.add_asset_metadata(_partition_metadata(record, result_file, reused), partition_key=record["trial"])
            progress.trial_done(record, reused=reused)
            report_progress()

        if is_staged(sweep):
            progress.start_computing()
            try:
                stats = run_staged_search(context, sweep, sweep_dir, store, rows, keys, config.skip_finished,
                                          ray_cluster, save, on_tick=report_progress,
                                          on_plan=progress.expect_images_per_trial)
            except RayInfrastructureError as exc:  # what settled is saved
                raise ray_failed(exc) from None
            stats["failed"] = len(failed)
            atomic_write_json(sweep_dir / "last_experiment_run.json", stats)
            context.log.info(f"{len(keys) - len(failed)} trial(s) settled, {len(failed)} failed ({json.dumps(stats)})")
            return

        reused, todo = store.split_finished(keys, config.skip_finished)
        for message in store.damaged_messages():
            context.log.warning(message)
        for record in reused:
            save(record, reused=True)
        if config.skip_finished:
            context.log.info(reuse_message(len(reused), len(keys)))

        started = time.perf_counter()
        stats: dict[str, Any] = {"run_id": context.run.run_id, "trials": len(keys), "computed": len(todo),
                                 "ray_start_seconds": round(ray_cluster.connect_seconds, 3)}
        baseline = IdentityBaseline(sweep_dir, objective, digest)
        need_identity = baseline.cached() is None
        if todo or need_identity:
            ray_cluster.connect(context.log)
            stats["ray_start_seconds"] = round(ray_cluster.connect_seconds, 3)
            images = ImageFiles(sweep.data_dir, rows)
            # Progress within trials from a killed run (chunks of images it had finished), when resuming.
            known, known_identity = store.load_chunks() if config.skip_finished else ({}, {})
            if config.skip_finished and (line := partial_reuse_message(known, todo)):
                context.log.info(line)
            finished: set[str] = set()

            def trial_done(outcome) -> None:
                finished.add(outcome.trial)
                save(outcome.to_record(sweep_name=sweep.name, fingerprint=store.fingerprint,
                                       metric=objective.metric, manifest_digest=digest), reused=False)

            def chunk_done(ids, results, identity) -> None:
                unfinished = {t: r for t, r in results.items() if t not in finished}
                store.save_chunk(ids, unfinished, identity if need_identity else None)
                progress.chunk_done({t: len(r) for t, r in unfinished.items()})
                report_progress()

            fanout_started = time.perf_counter()
            spill = SpillWatch()
            stats["startup_seconds"] = round(process_age_seconds(), 3)
            stats["fanout_started_at"] = time.time()
            progress.start_computing()  # rate and time left from here, not from Ray's start-up
            try:
                fan = run_trials(
                    [by_key[k] for k in todo], images, objective,
                    chunk_size=sweep.chunk_size, max_retries=ray_cluster.max_retries,
                    memory_budget=ray_cluster.memory_budget_bytes(),
                    on_trial_done=trial_done, on_tick=report_progress, on_chunk_done=chunk_done,
                    identity=need_identity, known={k: known[k] for k in todo if k in known},
                    known_identity=known_identity if need_identity else None,
                    on_tail=report_imports_on_tail(context),
                )
            except ImageDataError as exc:  # a pinned image changed, vanished or does not decode
                raise Failure(description=data_error_message(exc, sweep_dir)) from None
            except RayInfrastructureError as exc:  # Ray's node died under the run: what finished is saved
                raise ray_failed(exc) from None
            if need_identity:
                baseline.save(fan.identity[i] for i in images.ids if i in fan.identity)
            store.clear_chunks()  # every trial of this run is saved whole now
            files = len(images.rows) + sum(1 for r in images.rows if r.target_path)
            stats.update({
                "fanout_seconds": round(time.perf_counter() - fanout_started, 3),
                "spilled_bytes": spill.report(context.log),
                # image evaluations computed by this run (progress saved by an interrupted run is not redone)
                "evaluations": sum(1 for k in todo for i in images.ids if i not in known.get(k, {})),
                "chunks": fan.chunks, "chunk_size": fan.chunk_size, "chunks_decoded": fan.chunks_decoded,
                "chunks_in_object_store_at_most": fan.window, "fused": fan.fused,
                "decode_task_seconds": round(fan.decode_seconds, 3),
                # image and target files decoded by this run's tasks, per file (1.0: each file once), as
                # the tasks that returned report them: a task lost with its worker and retried by Ray decoded
                # its files once more, uncounted
                "decodes_per_image": round(fan.decodes / max(1, files), 4) if fan.chunks_decoded else 0.0,
            })
            context.log.info(f"{len(todo)} trial(s) × {len(images.rows)} image(s) in {fan.chunks} chunk(s) of "
                             f"{fan.chunk_size} decoded on Ray ({fan.chunks_decoded} decoded, at most "
                             f"{fan.window} held at once); Ray ready in {stats['ray_start_seconds']:.2f}s")
        stats["failed"] = len(failed)
        atomic_write_json(sweep_dir / "last_experiment_run.json", stats)
        context.log.info(f"{len(keys) - len(failed)} trial(s) completed, {len(failed)} failed "
                         f"in {time.perf_counter() - started:.2f}s ({json.dumps(stats)})")

    @one_run_asset(name="sweep_report", key_prefix=prefix, group_name=group, code_version=code_version,
                   ins={"run_settings": AssetIn(key=settings_key)},
                   deps=[AssetDep(results_key, partition_mapping=AllPartitionMapping())], kinds={"pandas"})
    def sweep_report(context: AssetExecutionContext, imgtune: SweepResource, run_settings: dict) -> Output[dict]:
        """Leaderboard, the best pipeline as a reusable sweep file, plots, and the best score (with
        ``improvement``: how much better than the identity pipeline, positive when better whichever way
        the metric goes).

        Reads every trial result present for the current settings and images; missing trials are
        reported as missing, not fatal.
        """
        refuse_overlap(context)
        check_settings(run_settings, "reporting")
        out_dir = imgtune.sweep_dir(sweep.name)
        rows = manifest_rows(run_settings["images"])
        digest = run_settings["manifest_digest"]
        keys = trial_keys(sweep)
        store = TrialStore.of_sweep(out_dir, sweep, digest)
        records, stale = store.load_all(keys)
        for message in store.damaged_messages():
            context.log.warning(message)
        if not records:
            earlier = (f" ({stale} result file(s) there are of another version of the sweep file or of other "
                       "images)") if stale else ""
            raise Failure(description=f"no trial results for sweep {sweep.name!r} of its current version and "
                                      f"images in {out_dir / 'trials'}{earlier}: materialize "
                                      f"{results_key.to_user_string()} first")

        def image_pairs():
            # Only when the run did not leave the baseline (e.g. its cache was deleted): one image at a time.
            for row in usable_rows(rows):
                yield (read_image(sweep.data_dir / row.image_path),
                       read_image(sweep.data_dir / row.target_path) if row.target_path else None)

        try:
            identity_score = IdentityBaseline(out_dir, objective, digest).score(image_pairs)
        except ImageReadError as exc:
            raise Failure(description=str(exc)) from None
        best = best_record(records, sweep.higher_is_better)
        completed = [r for r in records if r["status"] == "ok"]
        failed = [r for r in records if r["status"] == "failed"]
        pruned = [r for r in records if r["status"] == "pruned"]
        recorded = {r["trial"] for r in records}
        n_images = len(usable_rows(rows))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgtune-before-after") as pool:
            # Decoding the two pictured photos (OpenCV, outside the GIL) overlaps drawing the other plots.
            panels = (pool.submit(before_after_panels, best, rows, sweep.data_dir, sweep.higher_is_better)
                      if best else None)
            board = leaderboard(sweep, records)
            top = board[board["status"].eq("ok")].head(10).drop(
                columns=["error", "status", *(c for c in STAGED_COLUMNS if c in board.columns and c != "source")])
            best_score = float(best["score"]) if best else float("nan")
            summary = {
                "sweep": sweep.name,
                "metric": objective.metric,
                "higher_is_better": sweep.higher_is_better,
                "total_trials": sweep.trials,
                "sampler": sweep.sampler,
                "completed_trials": len(completed),
                "pruned_trials": len(pruned),
                "failed_trials": [r["trial"] for r in failed],
                "missing_trials": [k for k in keys if k not in recorded],
                "stale_trials": stale,
                "best_trial": best["trial"] if best else None,
                "best_score": best_score,
                "best_params": best["params"] if best else None,
                # A sweep with nothing to search: its stages, which the summary shows instead of best_params.
                "fixed_pipeline": fixed_pipeline(sweep),
                "identity_score": identity_score,
                # Images whose metric came out NaN (such a trial is failed, not ranked): the scores_are_numbers check.
                "nan_scores": sum(1 for r in records for p in r["per_image"] if p["error"] == NAN_SCORE),
                # Image evaluations done (successive halving scores pruned trials on some images only),
                # and what scoring every recorded trial on every image would have cost.
                "evaluations": evaluations(records),
                "evaluations_full": len(records) * n_images,
                # What the user should know about how the sweep ran (early stopping that stopped nothing).
                "notes": [*early_stopping_notes(sweep, n_images, records),
                          *filter(None, [repeated_trials_note(sweep, records)])],
                # For the next sweep after the images change: warm starts (core/search.py).
                "manifest_digest": digest,
                "space_digest": space_digest(search_space(sweep)),
                "top_params": top_params(records, sweep.higher_is_better, k=max(10, sweep.search.warm_start)),
                "output_dir": str(out_dir),
                "leaderboard": str(out_dir / "leaderboard.csv"),
                "best_pipeline": str(out_dir / "best_pipeline.yaml") if best else None,
            }
            try:  # the report's files and report.json as one set (a full disk leaves the last report whole)
                board, files = write_report(sweep, records, out_dir, best=best, before_after=panels, board=board,
                                            also={out_dir / "report.json": json_bytes(summary)})
            except ImageReadError as exc:  # a pictured photo changed or vanished since the run
                raise Failure(description=str(exc)) from None
        plots_md = "\n\n".join(f"### {name.replace('_', ' ')}\n\n{_embed_png(png, name)}"
                               for name, png in files.plot_png.items())
        failed_md = "".join(f"\n- `{r['trial']}`: {r['error']}" for r in failed)
        context.log.info(f"best {objective.metric} {best_score:.4f} ({summary['best_trial']}); identity "
                         f"{identity_score:.4f}; report in {out_dir}")
        return Output(summary, metadata={
            "metric": f"{objective.metric} ({'higher' if sweep.higher_is_better else 'lower'} is better)",
            "sampler": sweep.sampler + (", successive halving" if sweep.early_stopping else ""),
            "best_score": MetadataValue.float(best_score),
            "best_trial": summary["best_trial"] or "",
            "best_params": MetadataValue.json(summary["best_params"] or {}),
            "identity_score": MetadataValue.float(identity_score),
            "improvement": MetadataValue.float(improvement(best_score, identity_score, sweep.higher_is_better)
                                               if best else float("nan")),
            "completed_trials": len(completed),
            "pruned_trials": len(pruned),
            "failed_trials": len(failed),
            "evaluations": summary["evaluations"],
            "evaluations_full": summary["evaluations_full"],
            # The images it covers (image_manifest's content hash): the new-images sensor requests no
            # sweep of images that a report covers already.
            "content_hash": digest,
            **_notes_metadata(summary["notes"]),
            "missing_trials": len(summary["missing_trials"]),
            "total_trials": sweep.trials,
            "top_10": _table(top),
            "plots": MetadataValue.md(plots_md),
            "failed": MetadataValue.md(f"**Failed trials:**{failed_md}" if failed else "No failed trials."),
            "leaderboard": MetadataValue.path(str(files.leaderboard)),
            "best_pipeline": MetadataValue.path(str(files.best_pipeline or "")),
            "output_dir": MetadataValue.path(str(out_dir)),
        })

    if sweep.apply_input is None:
        return SweepAssets(image_manifest, run_settings, experiment_results, sweep_report)

    @one_run_asset(name="tuned_images", key_prefix=prefix, group_name=group, kinds={"ray", "opencv"},
                   ins={"sweep_report": AssetIn(key=asset_key(sweep, "sweep_report"))})
    def tuned_images(context: AssetExecutionContext, imgtune: SweepResource, ray_cluster: RayResource,
                     sweep_report: dict) -> Output[dict]:
        """The winning pipeline applied to every image of ``apply.input_dir``, written to ``apply.output_dir``
        (local folders or object-store URLs) on Ray, each output in its input's format and bit depth.

        A re-run skips images whose input and pipeline did not change; unreadable inputs are skipped with
        their reason. The metadata lists every output (input key, output path, output SHA-256).
        """
        from imgtune_assets.core.apply import ApplyError, apply_to_folder, fixed_stages
        from imgtune_assets.core.sweepfile import SweepFileError, load_sweep

        refuse_overlap(context)
        if not sweep_report.get("best_pipeline"):
            raise Failure(description=f"sweep {sweep.name!r} has no winning trial to apply (no completed trial): "
                                      f"see {asset_key(sweep, 'sweep_report').to_user_string()}")
        try:
            stages = fixed_stages(load_sweep(sweep_report["best_pipeline"]))
        except (SweepFileError, ApplyError) as exc:
            raise Failure(description=str(exc)) from None
        started = time.perf_counter()

        from imgtune_assets.core.progress import passes_a_tenth

        logged = [0]

        def progress(done: int, total: int) -> None:
            if passes_a_tenth(logged[0], done, total):
                logged[0] = done
                context.log.info(f"applied {done}/{total}")

        try:
            # Ray only when a file must be read: an unchanged folder's re-run decides from stats and listings.
            result = apply_to_folder(stages, sweep.apply_input, sweep.apply_output,
                                     max_retries=ray_cluster.max_retries, on_progress=progress,
                                     connect=lambda: ray_cluster.connect(context.log))
        except (ApplyError, storage.StorageError) as exc:
            raise Failure(description=str(exc)) from None
        for entry in result.entries:
            if entry["status"] == "skipped":
                context.log.warning(f"skipped: {entry['reason']}")
        summary = {"best_trial": sweep_report.get("best_trial"), "stages": [[op, p] for op, p in stages],
                   "input_dir": str(sweep.apply_input), "output_dir": str(sweep.apply_output),
                   "ledger": str(result.ledger), "written": result.count("written"),
                   "unchanged": result.count("unchanged"), "skipped": result.count("skipped"),
                   # the first skipped inputs, for the asset check (all are in ``outputs``)
                   "skipped_inputs": [[e["input"], e["reason"]] for e in result.entries
                                      if e["status"] == "skipped"][:MAX_SKIPPED_LISTED],
                   "outputs": result.entries}
        atomic_write_json(imgtune.sweep_dir(sweep.name) / "tuned_images.json", summary)
        import pandas as pd

        listing = pd.DataFrame([{"input": e["input"], "input_key": e.get("input_key"), "output": e["output"],
                                 "output_sha256": e.get("output_sha256"), "status": e["status"],
                                 "reason": e.get("reason")} for e in result.entries],
                               columns=["input", "input_key", "output", "output_sha256", "status", "reason"])
        return Output({k: v for k, v in summary.items() if k != "outputs"}, metadata={
            "best_trial": summary["best_trial"] or "",
            "written": summary["written"], "unchanged": summary["unchanged"], "skipped": summary["skipped"],
            "seconds": MetadataValue.float(round(time.perf_counter() - started, 3)),
            "input_dir": MetadataValue.path(summary["input_dir"]),
            "output_dir": MetadataValue.path(summary["output_dir"]),
            "outputs": _table(listing, limit=1000),  # the whole list is in outputs_file
            "outputs_file": MetadataValue.path(str(imgtune.sweep_dir(sweep.name) / "tuned_images.json")),
        })

    return SweepAssets(image_manifest, run_settings, experiment_results, sweep_report, tuned_images)
