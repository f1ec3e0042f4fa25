"""Staged sweeps (adaptive sampler, successive halving) through the asset group with `materialize` on a
real instance on disk (the ``instance`` fixture) and a real embedded Ray: rounds in one ranged run, pruned trials in the metadata and
the leaderboard, the ledger, re-running a trial, warm starts after the images change."""

import csv
import json
import logging
import math
import shutil

import pytest
from dagster import materialize

from imgtune_assets.core.manifest import ManifestRow
from imgtune_assets.core.search import image_detail, image_order
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.checks import build_sweep_checks
from imgtune_assets.defs.keys import asset_key
from imgtune_assets_tests.conftest import write_sweep
from imgtune_assets_tests.support.asset_groups import built, independent_denoise_psnr, node, resources
from imgtune_assets_tests.support.sweeps import range_tags

STAGED = {"sampler": "tpe", "search": {"batch_size": 4, "n_startup": 4},
          "early_stopping": {"method": "successive_halving", "eta": 2, "min_images": 2}}


def run_sweep(sweep_file, out_dir, instance, tags=None, report=True):
    sweep, assets = built(sweep_file)
    res = resources(out_dir)
    assert materialize([assets.image_manifest, assets.run_settings], instance=instance, resources=res).success
    ranged = materialize(assets.all(), selection=[assets.experiment_results], instance=instance, resources=res,
                         tags=tags or range_tags(sweep), raise_on_error=False)
    if not report or not ranged.success:
        return sweep, assets, instance, ranged, None
    result = materialize([*assets.all(), *build_sweep_checks(assets)], selection=[assets.sweep_report],
                         instance=instance, resources=res)
    return sweep, assets, instance, ranged, result


def ledger_of(out_dir, name="tiny"):
    (file,) = (out_dir / name / "search").glob("ledger-*.json")
    return json.loads(file.read_text())


def test_an_adaptive_sweep_with_successive_halving(tmp_path, denoise_data, local_ray, instance):
    sweep_file = write_sweep(tmp_path / "tiny.yaml", denoise_data, trials=12, **STAGED)
    out = tmp_path / "outputs"
    sweep, assets, instance, ranged, report = run_sweep(sweep_file, out, instance)
    assert ranged.success
    summary = report.output_for_node(node(assets.sweep_report))

    # three rounds of four (rungs of 2, 4 and 6 images): one finalist per round, the rest pruned
    ledger = ledger_of(out)
    assert [e["round"] for e in ledger["rounds"]] == [0, 1, 2]
    # round 1 learns from 4 trials, too few for a Gaussian process over 4 parameters: all TPE; round 2
    # (the last of two) has 8: the GP proposes 3 of its 4 trials, after TPE's one
    assert [p["source"] for e in ledger["rounds"] for p in e["trials"]] == \
        ["sobol"] * 4 + ["tpe"] * 4 + ["tpe"] + ["gp"] * 3
    trials = {p: json.loads((out / "tiny" / "trials" / f"{p}.json").read_text()) for p in
              (f"trial-{k:03d}" for k in range(12))}
    assert sorted(r["status"] for r in trials.values()) == ["ok"] * 3 + ["pruned"] * 9
    assert summary["completed_trials"] == 3 and summary["pruned_trials"] == 9 and not summary["failed_trials"]
    # each round: 4 × 2 images, then 2 × 2 more, then 1 × 2 more
    assert summary["evaluations"] == 3 * (4 * 2 + 2 * 2 + 1 * 2) and summary["evaluations_full"] == 12 * 6
    # the last progress report counts the evaluations done, as the report does, not trials × images
    progress = json.loads((out / "tiny" / "progress.json").read_text())
    assert progress["finished"] and progress["evaluations_done"] == progress["evaluations_total"] == 42
    assert progress["evaluations_full"] == 72
    settings = json.loads((out / "tiny" / "run_settings.json").read_text())
    rows = [ManifestRow.from_record(r) for r in settings["images"]]
    detail = image_detail(rows)
    # each image's detail: its file's compressed bits per pixel, from the manifest's size and dimensions
    for r in rows:
        assert r.image_bytes == (denoise_data / r.image_path).stat().st_size
    order = image_order([p.stem for p in (denoise_data / "images").iterdir()], sweep.seed,
                        settings["manifest_digest"], detail, sweep.early_stopping.rung_sizes(len(rows)))
    # the first rung (2 images) spans the set's detail: one from the smoother half, one from the other
    by_detail = sorted(detail, key=lambda i: (detail[i], i))
    assert sorted(by_detail.index(i) for i in order[:2])[0] < 3 <= sorted(by_detail.index(i) for i in order[:2])[1]
    for rec in trials.values():
        if rec["status"] == "pruned":  # scored on the first images of the seeded order, rung by rung
            assert [p["id"] for p in rec["per_image"]] == order[:len(rec["per_image"])]
            assert rec["partial_score"] == pytest.approx(sum(p["score"] for p in rec["per_image"]) / len(rec["per_image"]))
        else:  # a finalist's score is its pipeline's mean PSNR over every image, computed independently
            assert rec["score"] == pytest.approx(independent_denoise_psnr(sweep, rec["stages"]), rel=1e-9)
        proposal = next(p for e in ledger["rounds"] for p in e["trials"] if p["index"] == int(rec["trial"][6:]))
        assert rec["params"] == proposal["params"] and rec["source"] == proposal["source"]

    # pruned trials carry their rung and partial mean as metadata, and rank below complete trials
    mats = {m.asset_materialization.partition: m.asset_materialization.metadata for m in
            instance.fetch_materializations(asset_key(sweep, "experiment_results"), limit=50).records}
    pruned_key = next(k for k, r in trials.items() if r["status"] == "pruned")
    assert mats[pruned_key]["status"].value == "pruned"
    # its status first, no score (the UI plots scores across partitions), its partial mean next
    assert list(mats[pruned_key])[:2] == ["status", "partial_score"] and "score" not in mats[pruned_key]
    complete_key = next(k for k, r in trials.items() if r["status"] == "ok")
    assert list(mats[complete_key])[:3] == ["status", "score", "partial_score"]
    assert mats[pruned_key]["rung"].value == trials[pruned_key]["rung"]
    assert mats[pruned_key]["partial_score"].value == pytest.approx(trials[pruned_key]["partial_score"])
    # with the estimate of its full mean that ranked it, in the leaderboard too
    assert math.isfinite(trials[pruned_key]["estimated_score"])
    assert mats[pruned_key]["estimated_score"].value == pytest.approx(trials[pruned_key]["estimated_score"])
    with open(out / "tiny" / "leaderboard.csv") as f:
        board = list(csv.DictReader(f))
    assert [row["status"] for row in board] == ["ok"] * 3 + ["pruned"] * 9
    assert all(row["estimated_score"] for row in board[3:]) and not any(row["estimated_score"] for row in board[:3])
    assert [int(row["rung"]) for row in board[3:]] == sorted((int(row["rung"]) for row in board[3:]), reverse=True)
    assert (out / "tiny" / "plots" / "search_progress.png").stat().st_size > 0
    # every round scores the same images: their decoded chunks stayed in the object store
    assert json.loads((out / "tiny" / "last_experiment_run.json").read_text())["decodes_per_image"] == 1.0

    checks = {e.check_name: e.passed for e in report.get_asset_check_evaluations()}
    assert checks["report_complete"] is True
    metadata = instance.fetch_materializations(asset_key(sweep, "sweep_report"), limit=1).records[0] \
        .asset_materialization.metadata
    assert metadata["evaluations"].value == summary["evaluations"]
    assert metadata["evaluations_full"].value == 72
    assert (metadata["metric"].value, metadata["sampler"].value) == ("psnr (higher is better)", "tpe, successive halving")
    assert summary["notes"] == [] and "notes" not in metadata  # early stopping did stop trials


def test_early_stopping_that_stops_nothing_is_said_in_the_logs_the_report_and_its_metadata(tmp_path, denoise_data,
                                                                                           local_ray, instance):
    """``min_images`` not below the number of images: the sweep runs (a nightly folder may shrink), every
    trial scores every image, and the run says so where a user looks."""
    staged = {**STAGED, "early_stopping": {"method": "successive_halving", "min_images": 50}}
    sweep_file = write_sweep(tmp_path / "tiny.yaml", denoise_data, trials=4, **staged)
    out = tmp_path / "outputs"
    sweep, assets, instance, ranged, report = run_sweep(sweep_file, out, instance)
    assert ranged.success
    summary = report.output_for_node(node(assets.sweep_report))
    assert summary["completed_trials"] == 4 and summary["pruned_trials"] == 0
    assert summary["evaluations"] == summary["evaluations_full"] == 4 * 6
    note, initial_only = summary["notes"]
    assert note.startswith("early_stopping.min_images 50 is not below the 6 usable images")
    # 4 trials, all of them the initial design (n_startup 4): TPE proposed none, and the report says so
    assert initial_only.startswith("sampler tpe: all 4 trials are the initial design (round 0 holds 4)")
    assert json.loads((out / "tiny" / "report.json").read_text())["notes"] == [note, initial_only]
    for key in ("run_settings", "sweep_report"):
        metadata = instance.fetch_materializations(asset_key(sweep, key), limit=1).records[0].asset_materialization.metadata
        assert note in metadata["notes"].value, key
    warnings = [e.message for e in instance.all_logs(ranged.run_id) if e.level == logging.WARNING]
    assert any(note in w for w in warnings), warnings  # the experiment step's log


def test_rerunning_a_trial_evaluates_its_recorded_parameters(tmp_path, denoise_data, local_ray, instance):
    sweep_file = write_sweep(tmp_path / "tiny.yaml", denoise_data, trials=8, sampler="tpe",
                             search={"batch_size": 4, "n_startup": 4})
    out = tmp_path / "outputs"
    sweep, assets, instance, ranged, _ = run_sweep(sweep_file, out, instance, report=False)
    assert ranged.success
    before = json.loads((out / "tiny" / "trials" / "trial-006.json").read_text())
    ledger = ledger_of(out)
    again = materialize(assets.all(), selection=[assets.experiment_results], instance=instance,
                        resources=resources(out), partition_key="trial-006")
    assert again.success
    after = json.loads((out / "tiny" / "trials" / "trial-006.json").read_text())
    assert after["params"] == before["params"] == ledger["rounds"][1]["trials"][2]["params"]
    assert after["score"] == pytest.approx(before["score"], rel=1e-12)
    assert ledger_of(out) == ledger  # nothing proposed again


def test_a_resumed_staged_range_logs_what_it_reuses_and_what_it_computes(tmp_path, denoise_data, local_ray, instance):
    sweep_file = write_sweep(tmp_path / "tiny.yaml", denoise_data, trials=8, sampler="tpe",
                             search={"batch_size": 4, "n_startup": 4})
    out = tmp_path / "outputs"
    sweep, assets, instance, first, _ = run_sweep(sweep_file, out, instance, report=False,
                                                  tags={"dagster/asset_partition_range_start": "trial-000",
                                                        "dagster/asset_partition_range_end": "trial-003"})
    assert first.success
    trials = out / "tiny" / "trials"
    before = {p.name: p.stat().st_mtime_ns for p in trials.glob("trial-*.json")}
    assert len(before) == 4
    resumed = materialize(assets.all(), selection=[assets.experiment_results], instance=instance,
                          resources=resources(out), tags=range_tags(sweep),
                          run_config={"ops": {node(assets.experiment_results): {"config": {"skip_finished": True}}}})
    assert resumed.success
    infos = [e.message for e in instance.all_logs(resumed.run_id) if e.level == logging.INFO]
    assert "reusing 4 finished trial(s) (skip_finished), computing 4 of 8" in infos, infos
    after = {p.name: p.stat().st_mtime_ns for p in trials.glob("trial-*.json")}
    assert len(after) == 8 and all(after[name] == mtime for name, mtime in before.items())  # as it said
    assert not [e for e in instance.all_logs(first.run_id) if "skip_finished" in (e.message or "")]


def test_a_trial_asked_before_its_round_can_be_proposed_fails_naming_the_missing_ones(tmp_path, denoise_data,
                                                                                        local_ray, instance):
    sweep_file = write_sweep(tmp_path / "tiny.yaml", denoise_data, trials=12, **STAGED)
    _, _, _, ranged, _ = run_sweep(sweep_file, tmp_path / "outputs", instance, report=False,
                                   tags={"dagster/asset_partition_range_start": "trial-008",
                                         "dagster/asset_partition_range_end": "trial-011"})
    assert not ranged.success
    failure = next(e for e in ranged.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.step_failure_data.error.message if failure.step_failure_data.error else ""
    description = failure.step_failure_data.user_failure_data.description
    assert "round 2" in description and "trial-000" in description and "whole range" in description, \
        description or message
    assert not list((tmp_path / "outputs" / "tiny" / "trials").glob("trial-*.json"))  # nothing half-done


def test_new_images_start_from_the_last_reports_best_parameters(tmp_path, denoise_data, local_ray, instance):
    data = tmp_path / "data"
    shutil.copytree(denoise_data, data)
    sweep_file = write_sweep(tmp_path / "tiny.yaml", data, trials=8, sampler="tpe",
                             search={"batch_size": 4, "n_startup": 4, "warm_start": 2})
    out = tmp_path / "outputs"
    _, _, _, _, report = run_sweep(sweep_file, out, instance)
    first = json.loads((out / "tiny" / "report.json").read_text())
    assert first["top_params"][0] == first["best_params"]
    # the images change (one more); the next sweep's first trials are the last report's two best
    image = next((data / "images").iterdir())
    shutil.copy(image, data / "images" / f"zz-{image.name}")
    shutil.copy(data / "targets" / image.name, data / "targets" / f"zz-{image.name}")
    run_sweep(sweep_file, out, instance, report=False)
    ledgers = sorted((out / "tiny" / "search").glob("ledger-*.json"), key=lambda p: p.stat().st_mtime)
    assert len(ledgers) == 2
    round0 = json.loads(ledgers[-1].read_text())["rounds"][0]["trials"]
    assert [p["source"] for p in round0] == ["warm-start", "warm-start", "sobol", "sobol"]
    assert [p["params"] for p in round0[:2]] == first["top_params"][:2]


def test_a_grid_with_more_trials_than_points_says_which_repeat(tmp_path, denoise_data, local_ray, instance):
    """Two odd kernel sizes and four grid trials: two trials repeat an earlier one's pipeline. The sweep
    runs, and the settings and the report say so, with the number to lower trials to."""
    sweep_file = write_sweep(tmp_path / "tiny.yaml", denoise_data, trials=4, sampler="grid",
                             pipeline=[{"op": "gaussian_blur", "ksize": {"type": "odd", "low": 3, "high": 5},
                                        "sigma": 1.0}])
    out = tmp_path / "outputs"
    sweep, assets, instance, ranged, report = run_sweep(sweep_file, out, instance)
    assert ranged.success
    summary = report.output_for_node(node(assets.sweep_report))
    expected = ("2 of the 4 trials repeat the parameters of an earlier trial (sampler grid: its grid has 2 "
                "distinct pipelines here): lower trials to 2, or widen the space")
    assert summary["notes"] == [expected]
    settings = instance.fetch_materializations(asset_key(sweep, "run_settings"), limit=1).records[0]
    assert expected in settings.asset_materialization.metadata["notes"].value
