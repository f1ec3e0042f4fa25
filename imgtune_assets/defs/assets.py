"""The sweep as assets: image_manifest → run_settings → experiment_results[trial] → sweep_report."""


import base64
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import Field
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    BackfillPolicy,
    Config,
    DagsterType,
    DataVersion,
    Failure,
    MetadataValue,
    Output,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)

from imgtune_assets.core.clock import process_age_seconds
from imgtune_assets.core.demo_data import ensure_demo_data
from imgtune_assets.core.evaluate import NAN_SCORE, evaluate_chunk
from imgtune_assets.core.files import atomic_write_json
from imgtune_assets.core.imageio import ImageReadError, decode_count, read_image
from imgtune_assets.core.manifest import (
    ManifestError,
    ManifestRow,
    image_folders,
    load_images,
    manifest_digest,
    require_usable,
    rows_to_records,
    scan_folder,
)
from imgtune_assets.core.ops import apply_pipeline
from imgtune_assets.core.report import leaderboard, write_report
from imgtune_assets.core.sampling import search_space, trial_keys, trial_settings
from imgtune_assets.defs.partitions import trial_partitions
from imgtune_assets.defs.resources import RayResource, SweepResource

GROUP = "imgtune"


def _is_manifest_frame(_context, value) -> bool:
    # Checked by name: pandas is imported where a manifest is built or read, not when the code loads
    # (0.4 s for every process that loads the definitions, the trial runs included).
    return type(value).__name__ == "DataFrame" and {"id", "image_path", "status"} <= set(getattr(value, "columns", ()))


ImageManifestFrame = DagsterType(
    name="ImageManifest", type_check_fn=_is_manifest_frame,
    description="A pandas DataFrame with one row per file of the data folder: id, image_path, target_path, "
                "image_sha256, target_sha256, width, height, channels, dtype, status (ok | skipped), reason.")


def _rows(manifest) -> list[ManifestRow]:
    """The manifest DataFrame as rows (pandas writes NaN where a value is missing)."""
    return [ManifestRow(**{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()})
            for rec in manifest.to_dict("records")]


def _settings_rows(settings: dict) -> list[ManifestRow]:
    """The manifest rows run_settings pinned for this sweep's runs."""
    return [ManifestRow(**rec) for rec in settings["images"]]


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


@asset(group_name=GROUP, kinds={"opencv", "pandas"}, dagster_type=ImageManifestFrame)
def image_manifest(context: AssetExecutionContext, imgtune: SweepResource) -> Output:
    """One row per file in the sweep's data folder: id, paths, content hashes, size, channels, status.

    Unusable files are rows with a reason, not crashes. The data version is a hash of the
    (id, content hash) pairs, so new or changed images make everything downstream stale.
    """
    import pandas as pd

    sweep = imgtune.load()
    if sweep.demo_data and not (sweep.data_dir / "images").is_dir():
        context.log.info(f"Generating the {sweep.demo_data} demo data set in {sweep.data_dir}")
        ensure_demo_data(sweep.data_dir, sweep.demo_data)
    try:
        rows = scan_folder(sweep.data_dir, needs_target=sweep.needs_target)
        if sweep.needs_target and not any(r.target_path for r in rows):
            _, target_dir = image_folders(sweep.data_dir)
            raise ManifestError(f"{sweep.path}: objective.metric: {sweep.metric} needs ground-truth targets, "
                                f"but {target_dir} holds none (expected targets/<image stem>.png)")
        usable = require_usable(rows, sweep.data_dir)
    except ManifestError as exc:
        raise Failure(description=str(exc)) from None
    skipped = [r for r in rows if r.status != "ok"]
    for row in skipped:
        context.log.warning(f"skipped {row.image_path}: {row.reason}")
    digest = manifest_digest(rows)
    frame = pd.DataFrame(rows_to_records(rows))
    metadata: dict[str, Any] = {
        "data_dir": MetadataValue.path(str(sweep.data_dir)),
        "files": len(rows),
        "usable_images": len(usable),
        "skipped_files": len(skipped),
        "with_targets": sum(1 for r in usable if r.target_path),
        "content_hash": digest,
    }
    if skipped:
        metadata["skipped"] = _table(frame[frame["status"] != "ok"][["image_path", "reason"]], limit=50)
    return Output(frame, metadata=metadata, data_version=DataVersion(digest))


@asset(group_name=GROUP)
def run_settings(context: AssetExecutionContext, imgtune: SweepResource, image_manifest) -> Output[dict]:
    """What the sweep's runs evaluate: one entry per trial (its partition key and parameters, drawn from
    seed, search space and trial index) and the manifest's rows with its content hash.

    The trials and the report read the images from here, so a run evaluates exactly the images the
    settings were made for, and loading them needs no pandas: materialize ``image_manifest`` and
    ``run_settings`` together (as every command in the README does) when the images change.
    """
    import pandas as pd

    sweep = imgtune.load()
    rows = _rows(image_manifest)
    trials = [trial_settings(sweep, k) for k in range(sweep.trials)]
    settings = {"sweep": sweep.name, "fingerprint": sweep.fingerprint(), "metric": sweep.metric,
                "metric_options": sweep.metric_options, "trials": trials,
                "manifest_digest": manifest_digest(rows), "images": rows_to_records(rows)}
    atomic_write_json(imgtune.sweep_dir(sweep) / "run_settings.json", settings)
    dims = search_space(sweep)
    preview = pd.DataFrame([{"trial": t["trial"], **t["params"]} for t in trials])
    return Output(settings, metadata={
        "trials": sweep.trials,
        "sampler": sweep.sampler,
        "seed": sweep.seed,
        "metric": sweep.metric,
        "fingerprint": settings["fingerprint"],
        "usable_images": sum(1 for r in rows if r.status == "ok"),
        "search_space": MetadataValue.json({d.name: d.range.to_dict() for d in dims}),
        "preview": _table(preview, limit=20),
    })


def _check_settings(settings: dict, sweep, sweep_path: str) -> None:
    if settings["fingerprint"] != sweep.fingerprint():
        raise Failure(description=f"run_settings was made from another version of {sweep_path}: "
                                  "materialize run_settings again before running trials")
    if "images" not in settings:
        raise Failure(description="run_settings was made by an older imgtune that did not pin the images: "
                                  "materialize image_manifest,run_settings again before running trials")


class ExperimentConfig(Config):
    skip_finished: bool = Field(
        default=False,
        description="Reuse a trial's saved result when it was computed from the same settings and the same "
        "images (same sweep fingerprint and manifest hash) instead of computing it again. For resuming "
        "a sweep whose run was killed: finished trials are saved as they complete.",
    )


def _load_record(file: Path, fingerprint: str, digest: str) -> dict | None:
    if not file.exists():
        return None
    record = json.loads(file.read_text())
    if record.get("fingerprint") != fingerprint or record.get("manifest_digest") != digest:
        return None
    return record


def _partition_metadata(record: dict, result_file: Path, reused: bool) -> dict[str, Any]:
    score = float(record["score"]) if record["score"] is not None else float("nan")
    return {
        "score": MetadataValue.float(score),
        "status": record["status"],
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


@asset(
    group_name=GROUP,
    partitions_def=trial_partitions,
    backfill_policy=BackfillPolicy.single_run(),
    ins={"run_settings": AssetIn()},
    kinds={"ray", "opencv"},
)
def experiment_results(
    context: AssetExecutionContext,
    config: ExperimentConfig,
    imgtune: SweepResource,
    ray_cluster: RayResource,
    run_settings: dict,
) -> None:
    """Each trial evaluated on every usable image, on Ray; one partition per trial.

    Each trial's result is written (``trials/<key>.json``, atomically) as soon as it is complete, so a
    killed run loses only unfinished trials. A trial whose pipeline raises is recorded as failed with
    its error; the other trials complete.
    """
    from imgtune_assets.core.fanout import run_trials

    sweep = imgtune.load()
    _check_settings(run_settings, sweep, imgtune.sweep_path)
    keys = list(context.partition_keys)
    by_key = {t["trial"]: t for t in run_settings["trials"]}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise Failure(description=f"partitions {missing[:5]} are not trials of sweep {sweep.name!r} "
                                  f"({sweep.trials} trials); was the sweep file changed?")
    rows = _settings_rows(run_settings)
    digest = run_settings["manifest_digest"]
    fingerprint = sweep.fingerprint()
    trial_dir = imgtune.sweep_dir(sweep) / "trials"
    failed: list[str] = []

    def save(record: dict, reused: bool) -> None:
        result_file = trial_dir / f"{record['trial']}.json"
        if not reused:
            atomic_write_json(result_file, record)
        if record["status"] != "ok":
            failed.append(record["trial"])
            context.log.warning(f"{record['trial']} failed: {record['error']}")
        context.add_asset_metadata(_partition_metadata(record, result_file, reused), partition_key=record["trial"])

    todo = []
    for key in keys:
        previous = _load_record(trial_dir / f"{key}.json", fingerprint, digest) if config.skip_finished else None
        if previous is not None:
            save(previous, reused=True)
        else:
            todo.append(key)
    if len(todo) < len(keys):
        context.log.info(f"reusing {len(keys) - len(todo)} finished trial(s) (skip_finished)")

    started = time.perf_counter()
    stats: dict[str, Any] = {"run_id": context.run_id, "trials": len(keys), "computed": len(todo),
                             "ray_start_seconds": round(ray_cluster.connect_seconds, 3)}
    if todo:
        decodes_before = decode_count()
        # Decode in a thread (OpenCV releases the GIL) while Ray connects or starts: the two overlap.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgtune-decode") as pool:
            decoded = pool.submit(_timed, partial(load_images, verify=True), sweep.data_dir, rows)
            ray_cluster.connect(context.log)
            try:
                (ids, images, targets), stats["decode_seconds"] = decoded.result()
            except (ManifestError, ImageReadError) as exc:  # a pinned image changed or vanished since
                raise Failure(description=str(exc)) from None
        stats["ray_start_seconds"] = round(ray_cluster.connect_seconds, 3)
        files = len(ids) + sum(t is not None for t in targets)
        stats["decodes_per_image"] = (decode_count() - decodes_before) / max(1, files)  # image and target files
        context.log.info(f"{len(todo)} trial(s) × {len(ids)} image(s); decoded in {stats['decode_seconds']:.2f}s, "
                         f"Ray ready in {stats['ray_start_seconds']:.2f}s (overlapping)")
        _save_identity(imgtune.sweep_dir(sweep), sweep, digest, images, targets)
        fanout_started = time.perf_counter()
        stats["startup_seconds"] = round(process_age_seconds(), 3)
        stats["fanout_started_at"] = time.time()
        run_trials(
            [by_key[k] for k in todo], ids, images, targets, sweep.metric, sweep.metric_options,
            chunk_size=sweep.chunk_size, max_retries=ray_cluster.max_retries,
            on_trial_done=lambda outcome: save(outcome.to_record(
                sweep_name=sweep.name, fingerprint=fingerprint, metric=sweep.metric, manifest_digest=digest),
                reused=False),
        )
        stats["fanout_seconds"] = round(time.perf_counter() - fanout_started, 3)
        stats["evaluations"] = len(todo) * len(ids)
    stats["failed"] = len(failed)
    atomic_write_json(imgtune.sweep_dir(sweep) / "last_experiment_run.json", stats)
    context.log.info(f"{len(keys) - len(failed)} trial(s) completed, {len(failed)} failed "
                     f"in {time.perf_counter() - started:.2f}s ({json.dumps(stats)})")


def _timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, round(time.perf_counter() - started, 3)


def _save_identity(out_dir: Path, sweep, digest: str, images, targets) -> None:
    """The identity pipeline's score (no processing): the baseline the report compares against.
    Computed here, where the images are already decoded, so the report need not decode them all."""
    results = evaluate_chunk([("identity", {})], images, targets, sweep.metric, sweep.metric_options)
    scores = [r["score"] for r in results if not r["error"]]
    atomic_write_json(out_dir / "identity.json", {
        "manifest_digest": digest, "metric": sweep.metric, "metric_options": sweep.metric_options,
        "score": float(sum(scores) / len(scores)) if scores else None})


def _identity_score(out_dir: Path, sweep, digest: str, rows: list[ManifestRow]) -> float:
    file = out_dir / "identity.json"
    if file.exists():
        saved = json.loads(file.read_text())
        if (saved.get("manifest_digest"), saved.get("metric"), saved.get("metric_options")) == (
                digest, sweep.metric, sweep.metric_options) and saved.get("score") is not None:
            return float(saved["score"])
    _, images, targets = load_images(sweep.data_dir, rows)
    _save_identity(out_dir, sweep, digest, images, targets)
    score = json.loads(file.read_text())["score"]
    return float("nan") if score is None else float(score)


def _load_records(folder: Path, keys: list[str], fingerprint: str, digest: str) -> tuple[list[dict], int]:
    """Trial results for the current settings and images; results from older ones count as stale."""
    records, stale = [], 0
    for key in keys:
        file = folder / f"{key}.json"
        record = _load_record(file, fingerprint, digest)
        if record is not None:
            records.append(record)
        elif file.exists():
            stale += 1
    return records, stale


def _embed_png(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


@asset(
    group_name=GROUP,
    ins={"run_settings": AssetIn()},
    deps=[AssetDep("experiment_results", partition_mapping=AllPartitionMapping())],
    kinds={"pandas"},
)
def sweep_report(
    context: AssetExecutionContext,
    imgtune: SweepResource,
    run_settings: dict,
) -> Output[dict]:
    """Leaderboard, the best pipeline as a reusable sweep file, plots, and the best score.

    Reads every trial result present for the current settings and images; missing trials are
    reported as missing, not fatal.
    """
    sweep = imgtune.load()
    _check_settings(run_settings, sweep, imgtune.sweep_path)
    out_dir = imgtune.sweep_dir(sweep)
    rows = _settings_rows(run_settings)
    digest = run_settings["manifest_digest"]
    keys = trial_keys(sweep)
    records, stale = _load_records(out_dir / "trials", keys, sweep.fingerprint(), digest)
    if not records:
        raise Failure(description=f"no trial results for sweep {sweep.name!r} in {out_dir / 'trials'}: "
                                  "materialize experiment_results first")

    identity_score = _identity_score(out_dir, sweep, digest, rows)

    completed = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    before_after = None
    best = None
    board = leaderboard(sweep, records)
    if completed:
        best_key = board[board["status"].eq("ok")].iloc[0]["trial"]
        best = next(r for r in completed if r["trial"] == best_key)
        scored = [p for p in best["per_image"] if p["score"] is not None]
        ordered = sorted(scored, key=lambda p: p["score"], reverse=sweep.higher_is_better)
        picks = [("best image " + ordered[0]["id"], ordered[0]["id"])]
        if len(ordered) > 1:
            picks.append(("worst image " + ordered[-1]["id"], ordered[-1]["id"]))
        stages = [(op, params) for op, params in best["stages"]]
        before_after = []
        by_id = {r.id: r for r in rows}
        for label, image_id in picks:
            row = by_id[image_id]
            image = read_image(sweep.data_dir / row.image_path)
            target = read_image(sweep.data_dir / row.target_path) if row.target_path else None
            before_after.append((label, image, apply_pipeline(image, stages), target))

    board, files = write_report(sweep, records, out_dir, before_after=before_after, board=board)
    top = board[board["status"].eq("ok")].head(10).drop(columns=["error", "status"])
    best_score = float(best["score"]) if best else float("nan")
    summary = {
        "sweep": sweep.name,
        "metric": sweep.metric,
        "higher_is_better": sweep.higher_is_better,
        "total_trials": sweep.trials,
        "completed_trials": len(completed),
        "failed_trials": [r["trial"] for r in failed],
        "missing_trials": sorted(set(keys) - {r["trial"] for r in records}),
        "stale_trials": stale,
        "best_trial": best["trial"] if best else None,
        "best_score": best_score,
        "best_params": best["params"] if best else None,
        "identity_score": identity_score,
        # Images whose metric came out NaN (such a trial is failed, not ranked): the scores_are_numbers check.
        "nan_scores": sum(1 for r in records for p in r["per_image"] if p["error"] == NAN_SCORE),
        "output_dir": str(out_dir),
        "leaderboard": str(files.leaderboard),
        "best_pipeline": str(files.best_pipeline) if files.best_pipeline else None,
    }
    atomic_write_json(out_dir / "report.json", summary)
    plots_md = "\n\n".join(f"### {name.replace('_', ' ')}\n\n{_embed_png(png, name)}" for name, png in files.plot_png.items())
    failed_md = "".join(f"\n- `{r['trial']}`: {r['error']}" for r in failed)
    context.log.info(f"best {sweep.metric} {best_score:.4f} ({summary['best_trial']}); identity {identity_score:.4f}; "
                     f"report in {out_dir}")
    return Output(summary, metadata={
        "best_score": MetadataValue.float(best_score),
        "best_trial": summary["best_trial"] or "",
        "best_params": MetadataValue.json(summary["best_params"] or {}),
        "identity_score": MetadataValue.float(identity_score),
        "improvement": MetadataValue.float(best_score - identity_score if best else float("nan")),
        "completed_trials": len(completed),
        "failed_trials": len(failed),
        "missing_trials": len(summary["missing_trials"]),
        "total_trials": sweep.trials,
        "top_10": _table(top),
        "plots": MetadataValue.md(plots_md),
        "failed": MetadataValue.md(f"**Failed trials:**{failed_md}" if failed else "No failed trials."),
        "leaderboard": MetadataValue.path(str(files.leaderboard)),
        "best_pipeline": MetadataValue.path(str(files.best_pipeline or "")),
        "output_dir": MetadataValue.path(str(out_dir)),
    })
