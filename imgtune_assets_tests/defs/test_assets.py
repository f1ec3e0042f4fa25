"""A sweep's assets, built by the factory for a sweep object of the test's own: single assets with
build_asset_context, and the asset group with `materialize` on a real instance on disk (the project's
dagster.yaml in a temporary folder: the ``instance`` fixture), with a real embedded Ray."""

import base64
import json
import logging
import math
import shutil

import cv2
import numpy as np
import pytest
from dagster import AssetKey, AssetSelection, Failure, build_asset_context, materialize
from skimage.metrics import peak_signal_noise_ratio

from imgtune_assets.core.catalog import group_name
from imgtune_assets.core.ops import apply_pipeline
from imgtune_assets.core.results import TrialStore
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.assets import ExperimentConfig
from imgtune_assets.defs.checks import build_sweep_checks
from imgtune_assets.defs.keys import asset_key
from imgtune_assets.defs.partitions import trial_partitions
from imgtune_assets.defs.resources import RayResource, SweepResource
from imgtune_assets_tests.conftest import write_sweep
from imgtune_assets_tests.support.asset_groups import built, data_files, independent_denoise_psnr, node, resources
from imgtune_assets_tests.support.files import age
from imgtune_assets_tests.support.sweeps import range_tags

REPORT_FILES = ("leaderboard.csv", "per_image_scores.csv", "best_pipeline.yaml", "report.json",
                "plots/score_vs_params.png", "plots/best_so_far.png", "plots/best_trial_images.png")


def independent_identity_psnr(sweep) -> float:
    return float(np.mean([peak_signal_noise_ratio(cv2.imread(str(t), cv2.IMREAD_UNCHANGED),
                                                  cv2.imread(str(i), cv2.IMREAD_UNCHANGED), data_range=255)
                          for i, t in data_files(sweep)]))


def independent_dice(sweep, stages) -> float:
    scores = []
    for image_file, target_file in data_files(sweep):
        pred = apply_pipeline(cv2.imread(str(image_file), cv2.IMREAD_UNCHANGED), [tuple(s) for s in stages]) > 0
        truth = cv2.imread(str(target_file), cv2.IMREAD_UNCHANGED) > 0
        total = pred.sum() + truth.sum()
        scores.append(1.0 if total == 0 else 2.0 * (pred & truth).sum() / total)
    return float(np.mean(scores))


# ------------------------------------------------------------------------------------ single assets


def test_the_assets_are_keyed_and_grouped_by_the_sweep_they_were_built_for(tmp_path, denoise_data):
    sweep, assets = built(write_sweep(tmp_path / "s.yaml", denoise_data, name="my-sweep.v2", trials=3))
    assert [a.key for a in assets.all()] == [AssetKey(["my-sweep.v2", n]) for n in
                                             ("image_manifest", "run_settings", "experiment_results", "sweep_report")]
    assert {a.group_names_by_key[a.key] for a in assets.all()} == {"my_sweep_v2"} == {group_name(sweep.name)}
    assert assets.experiment_results.partitions_def.get_partition_keys() == ["trial-000", "trial-001", "trial-002"]
    assert assets.image_manifest.partitions_def is None and assets.sweep_report.partitions_def is None
    deps = assets.sweep_report.asset_deps[assets.sweep_report.key]
    assert {asset_key(sweep, "run_settings"), asset_key(sweep, "experiment_results")} <= set(deps)


def test_image_manifest_lists_every_file(tmp_path, tiny_sweep):
    _, assets = built(tiny_sweep)
    output = assets.image_manifest(build_asset_context(), imgtune=SweepResource(output_dir=str(tmp_path / "out")))
    frame = output.value
    assert len(frame) == 6 and set(frame["status"]) == {"ok"}
    assert frame["target_path"].notna().all()
    assert output.data_version.value == output.metadata["content_hash"].value
    assert output.metadata["usable_images"].value == 6 and output.metadata["skipped_files"].value == 0


def test_image_manifest_reads_only_files_changed_since_its_last_scan(tmp_path, denoise_data):
    data = tmp_path / "data"
    shutil.copytree(denoise_data, data)
    for path in data.glob("*/*.png"):
        age(path)  # older than the racy window: their probes are kept
    _, assets = built(write_sweep(tmp_path / "tiny.yaml", data))
    imgtune = SweepResource(output_dir=str(tmp_path / "out"))
    first = assets.image_manifest(build_asset_context(), imgtune=imgtune)
    assert (first.metadata["files_read"].value, first.metadata["files_unchanged"].value) == (12, 0)
    again = assets.image_manifest(build_asset_context(), imgtune=imgtune)
    assert (again.metadata["files_read"].value, again.metadata["files_unchanged"].value) == (0, 12)
    assert again.value.equals(first.value) and again.data_version == first.data_version
    changed = sorted((data / "images").iterdir())[0]
    changed.write_bytes(sorted((data / "images").iterdir())[1].read_bytes())
    third = assets.image_manifest(build_asset_context(), imgtune=imgtune)
    assert (third.metadata["files_read"].value, third.metadata["files_unchanged"].value) == (1, 11)
    assert third.data_version != first.data_version


def test_image_manifest_refuses_targetless_folder_for_psnr(tmp_path, denoise_data):
    folder = tmp_path / "no_targets"
    (folder / "images").mkdir(parents=True)
    for file in sorted((denoise_data / "images").iterdir())[:2]:
        (folder / "images" / file.name).write_bytes(file.read_bytes())
    sweep, assets = built(write_sweep(tmp_path / "s.yaml", folder))
    with pytest.raises(Failure) as err:
        assets.image_manifest(build_asset_context(), imgtune=SweepResource(output_dir=str(tmp_path / "out")))
    assert f"{sweep.path}: objective.metric: psnr needs ground-truth targets" in str(err.value)


def test_run_settings_are_deterministic_and_pin_the_images(tmp_path, tiny_sweep):
    _, assets = built(tiny_sweep)
    imgtune = SweepResource(output_dir=str(tmp_path / "out"))
    manifest = assets.image_manifest(build_asset_context(), imgtune=imgtune)
    first = assets.run_settings(build_asset_context(), imgtune=imgtune, image_manifest=manifest.value).value
    second = assets.run_settings(build_asset_context(), imgtune=imgtune, image_manifest=manifest.value).value
    assert first == second
    assert [r["id"] for r in first["images"]] == list(manifest.value["id"])
    assert first["manifest_digest"] == manifest.metadata["content_hash"].value
    assert [t["trial"] for t in first["trials"]] == ["trial-000", "trial-001", "trial-002", "trial-003"]
    written = json.loads((tmp_path / "out" / "tiny" / "run_settings.json").read_text())
    assert written["fingerprint"] == first["fingerprint"]


def test_trials_refuse_settings_made_from_another_version_of_the_sweep(tmp_path, denoise_data, tiny_sweep):
    _, old_assets = built(tiny_sweep)
    imgtune = SweepResource(output_dir=str(tmp_path / "out"))
    manifest = old_assets.image_manifest(build_asset_context(), imgtune=imgtune).value
    old_settings = old_assets.run_settings(build_asset_context(), imgtune=imgtune, image_manifest=manifest).value
    # the same sweep name, now with a different seed
    changed, assets = built(write_sweep(tmp_path / "tiny.yaml", denoise_data, seed=7))
    with pytest.raises(Failure, match=f"tiny/run_settings was made from another version of {changed.path}"):
        assets.experiment_results(build_asset_context(partition_key="trial-000"), config=ExperimentConfig(),
                                  imgtune=imgtune, ray_cluster=RayResource(), run_settings=old_settings)
    assert not (tmp_path / "out" / "tiny" / "trials").exists()
    # The report says what it needs too, as a report (not "before running trials").
    with pytest.raises(Failure, match="materialize image_manifest and run_settings again, then the trials, "
                                      "before reporting"):
        assets.sweep_report(build_asset_context(), imgtune=imgtune, run_settings=old_settings)


def test_the_report_without_trial_results_says_what_to_materialize(tmp_path, tiny_sweep):
    _, assets = built(tiny_sweep)
    imgtune = SweepResource(output_dir=str(tmp_path / "out"))
    manifest = assets.image_manifest(build_asset_context(), imgtune=imgtune).value
    settings = assets.run_settings(build_asset_context(), imgtune=imgtune, image_manifest=manifest).value
    with pytest.raises(Failure, match="no trial results for sweep 'tiny'.*materialize tiny/experiment_results first"):
        assets.sweep_report(build_asset_context(), imgtune=imgtune, run_settings=settings)
    # Results of an earlier version of the sweep file are there, and are said to be stale.
    trials = tmp_path / "out" / "tiny" / "trials"
    trials.mkdir(parents=True)
    (trials / "trial-000.json").write_text(json.dumps({"trial": "trial-000", "fingerprint": "an-earlier-one",
                                                      "manifest_digest": settings["manifest_digest"], "status": "ok",
                                                      "params": {}}))
    with pytest.raises(Failure, match=r"in .*trials \(1 result file\(s\) there are of another version of the "
                                      r"sweep file or of other images\)"):
        assets.sweep_report(build_asset_context(), imgtune=imgtune, run_settings=settings)


# ------------------------------------------------------------------------------------ the asset group


def test_whole_sweep_materializes_on_a_temporary_instance(tmp_path, tiny_sweep, local_ray, instance):
    sweep, assets = built(tiny_sweep)
    checks = build_sweep_checks(assets)
    res = resources(tmp_path / "outputs")
    assert materialize([assets.image_manifest, assets.run_settings], instance=instance, resources=res).success
    ranged = materialize(assets.all(), selection=[assets.experiment_results], instance=instance, resources=res,
                         tags=range_tags(sweep))
    assert ranged.success
    partitions = instance.get_materialized_partitions(asset_key(sweep, "experiment_results"))
    assert partitions == {"trial-000", "trial-001", "trial-002", "trial-003"}
    report = materialize([*assets.all(), *checks], selection=[assets.sweep_report], instance=instance, resources=res)
    assert report.success
    summary = report.output_for_node(node(assets.sweep_report))
    assert summary["completed_trials"] == 4 and summary["total_trials"] == 4
    assert summary["best_score"] > summary["identity_score"]
    evaluations = report.get_asset_check_evaluations()
    assert {e.asset_key for e in evaluations} == {asset_key(sweep, "sweep_report")}
    assert {e.check_name: e.passed for e in evaluations} == {
        "scores_are_numbers": True, "tuning_beats_identity": True, "report_complete": True}

    # The recorded best score is the best trial's mean PSNR, recomputed here image by image.
    out = tmp_path / "outputs" / "tiny"
    best = json.loads((out / "trials" / f"{summary['best_trial']}.json").read_text())
    assert math.isclose(summary["best_score"], independent_denoise_psnr(sweep, best["stages"]), rel_tol=1e-9)
    assert math.isclose(summary["identity_score"], independent_identity_psnr(sweep), rel_tol=1e-9)
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    # the stored values are the sweep's own, under its own folder
    assert sorted(p.name for p in (out / "storage").iterdir()) == ["image_manifest", "run_settings", "sweep_report"]

    mat = instance.fetch_materializations(asset_key(sweep, "sweep_report"), limit=1).records[0]
    metadata = mat.asset_materialization.metadata
    assert metadata["best_score"].value == pytest.approx(summary["best_score"])
    assert metadata["improvement"].value == pytest.approx(summary["best_score"] - summary["identity_score"])
    # the images it covers, as the manifest hashed them (the new-images sensor compares with it)
    manifest = instance.fetch_materializations(asset_key(sweep, "image_manifest"), limit=1).records[0]
    assert metadata["content_hash"].value == manifest.asset_materialization.metadata["content_hash"].value
    assert "data:image/png;base64," in metadata["plots"].value
    # the photographs as JPEG, smaller than their PNG file, which stays lossless on disk
    embedded = metadata["plots"].value.split("![best_trial_images](data:image/jpeg;base64,")[1].split(")")[0]
    photo_file = tmp_path / "outputs" / sweep.name / "plots" / "best_trial_images.png"
    assert 0 < len(base64.b64decode(embedded)) < photo_file.stat().st_size
    assert len(metadata["top_10"].records) == 4


def test_a_resumed_range_logs_what_it_reuses_and_what_it_computes(tmp_path, tiny_sweep, local_ray, instance):
    sweep, assets = built(tiny_sweep)
    out = tmp_path / "outputs"
    res = resources(out)
    assert materialize([assets.image_manifest, assets.run_settings], instance=instance, resources=res).success
    first = materialize(assets.all(), selection=[assets.experiment_results], instance=instance, resources=res,
                        tags={"dagster/asset_partition_range_start": "trial-000",
                              "dagster/asset_partition_range_end": "trial-001"})
    assert first.success
    # what an interrupted run saved of trial-002: a chunk of two images
    settings = json.loads((out / "tiny" / "run_settings.json").read_text())
    ids = [row["id"] for row in settings["images"] if row["status"] == "ok"][:2]
    TrialStore(out / "tiny", sweep.fingerprint(), settings["manifest_digest"]).save_chunk(
        ids, {"trial-002": [{"score": 30.0, "seconds": 0.01, "error": None}] * 2}, None)
    resumed = materialize(assets.all(), selection=[assets.experiment_results], instance=instance, resources=res,
                          tags=range_tags(sweep),
                          run_config={"ops": {node(assets.experiment_results): {"config": {"skip_finished": True}}}})
    assert resumed.success

    def infos(run_id):
        return [e.message for e in instance.all_logs(run_id) if e.level == logging.INFO]

    assert "reusing 2 finished trial(s) (skip_finished), computing 2 of 4" in infos(resumed.run_id)
    assert "reusing 2 saved image evaluation(s) of 1 unfinished trial(s) (skip_finished)" in infos(resumed.run_id)
    assert not [m for m in infos(first.run_id) if "skip_finished" in m]  # a run that reuses nothing says nothing


def test_failing_trial_is_recorded_and_the_others_complete(tmp_path, segment_data, local_ray, instance):
    # Sobel with dx = dy = 0 passes validation but OpenCV refuses it at run time.
    pipeline = [{"op": "sobel", "dx": {"type": "int", "low": 0, "high": 1}, "dy": {"type": "int", "low": 0, "high": 1}},
                {"op": "threshold", "method": "otsu"}]
    sweep, assets = built(write_sweep(tmp_path / "f.yaml", segment_data, name="fails", trials=4, metric="dice",
                                      pipeline=pipeline, sampler="grid"))
    checks = build_sweep_checks(assets)
    res = resources(tmp_path / "outputs")
    assert materialize([assets.image_manifest, assets.run_settings], instance=instance, resources=res).success
    result = materialize(assets.all(), selection=[assets.experiment_results], instance=instance, resources=res,
                         tags=range_tags(sweep))
    assert result.success
    assert len(instance.get_materialized_partitions(asset_key(sweep, "experiment_results"))) == 4
    trials = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "outputs" / "fails" / "trials").glob("*.json")}
    failed = [t for t in trials.values() if t["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["params"] == {"sobel.dx": 0, "sobel.dy": 0}
    assert "dx+dy > 0" in failed[0]["error"] and failed[0]["score"] is None
    assert all(t["score"] is not None for t in trials.values() if t is not failed[0])

    report = materialize([*assets.all(), *checks], selection=[assets.sweep_report], instance=instance, resources=res)
    assert report.success
    summary = report.output_for_node(node(assets.sweep_report))
    assert summary["failed_trials"] == [failed[0]["trial"]] and summary["completed_trials"] == 3
    checks_passed = {e.check_name: e.passed for e in report.get_asset_check_evaluations()}
    assert checks_passed["report_complete"] is False
    board = (tmp_path / "outputs" / "fails" / "leaderboard.csv").read_text()
    assert f"{failed[0]['trial']},failed" in board


def damaged_inside(png: bytes) -> bytes:
    """``png`` with its pixel data replaced by a valid but far too short zlib stream, every chunk's CRC
    right: the header probe and the chunk check pass, the decode fails."""
    import zlib

    out, pos = bytearray(png[:8]), 8
    while pos < len(png):
        length, kind = int.from_bytes(png[pos:pos + 4], "big"), png[pos + 4:pos + 8]
        data = zlib.compress(bytes(10)) if kind == b"IDAT" else png[pos + 8:pos + 8 + length]
        out += len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
        pos += 12 + length
    return bytes(out)


@pytest.mark.parametrize("sampler", ["random", "tpe"])  # the plain fan-out, and the staged search's
def test_an_image_that_does_not_decode_fails_one_run_and_the_next_manifest_skips_it(tmp_path, denoise_data, local_ray,
                                                                                   sampler, instance):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(denoise_data, data)
    bad = sorted((data / "images").iterdir())[2]
    bad.write_bytes(damaged_inside(bad.read_bytes()))
    sweep, assets = built(write_sweep(tmp_path / "d.yaml", data, name="damaged", sampler=sampler))
    res = resources(tmp_path / "outputs")
    assert materialize([assets.image_manifest, assets.run_settings], instance=instance, resources=res).success
    manifest = instance.fetch_materializations(asset_key(sweep, "image_manifest"), limit=1).records[0]
    assert manifest.asset_materialization.metadata["skipped_files"].value == 0  # the manifest cannot tell
    failed = materialize(assets.all(), selection=[assets.experiment_results], instance=instance, resources=res,
                         tags=range_tags(sweep), raise_on_error=False)
    assert not failed.success
    message = failed.failure_data_for_node(node(assets.experiment_results)).error.message
    recorded = tmp_path / "outputs" / "damaged" / "undecodable.json"
    assert str(bad) in message and "does not decode" in message and str(recorded) in message

    # The next manifest skips the file with its reason, and the sweep runs on the other images.
    assert materialize([assets.image_manifest, assets.run_settings], instance=instance, resources=res).success
    rows = materialize([assets.image_manifest], instance=instance, resources=res).output_for_node(
        node(assets.image_manifest))
    row = rows[rows["image_path"] == f"images/{bad.name}"].iloc[0]
    assert row["status"] == "skipped" and "does not decode" in row["reason"], row["reason"]
    assert (rows["status"] == "ok").sum() == len(rows) - 1
    assert materialize(assets.all(), selection=[assets.experiment_results], instance=instance, resources=res,
                       tags=range_tags(sweep)).success

    # A replaced file has another content key: read again.
    bad.write_bytes((denoise_data / "images" / bad.name).read_bytes())
    rows = materialize([assets.image_manifest], instance=instance, resources=res).output_for_node(
        node(assets.image_manifest))
    assert (rows["status"] == "ok").all()


def test_two_sweeps_side_by_side_in_one_instance(tmp_path, denoise_data, segment_data, local_ray, instance):
    from imgtune_assets.defs.factory import build_definitions

    denoise = load_sweep(write_sweep(tmp_path / "d.yaml", denoise_data, name="den-a", trials=3))
    segment = load_sweep(write_sweep(
        tmp_path / "s.yaml", segment_data, name="seg.b", trials=2, metric="dice",
        pipeline=[{"op": "gaussian_blur", "ksize": {"type": "odd", "low": 1, "high": 5}, "sigma": 0},
                  {"op": "threshold", "method": "otsu"}]))
    out = tmp_path / "outputs"
    defs = build_definitions([denoise, segment], output_dir=str(out))
    summaries = {}
    for sweep in (denoise, segment):
        # the whole sweep in one ranged run, as its schedule and sensor request it
        result = materialize([*defs.assets, *defs.asset_checks],
                             selection=AssetSelection.groups(group_name(sweep.name)),
                             instance=instance, resources=defs.resources, tags=range_tags(sweep))
        assert result.success
        assert {e.asset_key.path[0] for e in result.get_asset_materialization_events()} == {sweep.name}
        summaries[sweep.name] = json.loads((out / sweep.name / "report.json").read_text())

    assert instance.get_materialized_partitions(asset_key(denoise, "experiment_results")) == \
        {"trial-000", "trial-001", "trial-002"}
    assert instance.get_materialized_partitions(asset_key(segment, "experiment_results")) == {"trial-000", "trial-001"}
    assert sorted(p.name for p in out.iterdir()) == ["den-a", "seg.b"]
    for sweep in (denoise, segment):
        summary = summaries[sweep.name]
        assert summary["sweep"] == sweep.name and summary["output_dir"] == str(out / sweep.name)
        assert summary["completed_trials"] == summary["total_trials"] == sweep.trials
        assert sorted(p.stem for p in (out / sweep.name / "trials").glob("*.json")) == \
            trial_partitions(sweep).get_partition_keys()
        for name in REPORT_FILES:
            assert (out / sweep.name / name).stat().st_size > 0, (sweep.name, name)
        # each report's best_score under its own key: the second run did not touch the first
        [record] = instance.fetch_materializations(asset_key(sweep, "sweep_report"), limit=5).records
        assert record.asset_materialization.metadata["best_score"].value == pytest.approx(summary["best_score"])
        assert record.asset_materialization.metadata["output_dir"].value == str(out / sweep.name)

    den, seg = summaries["den-a"], summaries["seg.b"]
    assert den["metric"] == "psnr" and seg["metric"] == "dice"
    den_best = json.loads((out / "den-a" / "trials" / f"{den['best_trial']}.json").read_text())
    assert math.isclose(den["best_score"], independent_denoise_psnr(denoise, den_best["stages"]), rel_tol=1e-9)
    assert math.isclose(den["identity_score"], independent_identity_psnr(denoise), rel_tol=1e-9)
    seg_best = json.loads((out / "seg.b" / "trials" / f"{seg['best_trial']}.json").read_text())
    assert 0 < seg["best_score"] <= 1
    assert math.isclose(seg["best_score"], independent_dice(segment, seg_best["stages"]), rel_tol=1e-9)


def manifest_refusal(assets, instance, res, tags) -> str:
    """The message of ``image_manifest``'s failure in a run of the manifest and settings with ``tags``."""
    failed = materialize([assets.image_manifest, assets.run_settings], instance=instance, resources=res,
                         tags=tags, raise_on_error=False)
    assert not failed.success
    return failed.failure_data_for_node(node(assets.image_manifest)).error.message


def test_a_run_requested_for_trials_the_file_no_longer_has_stops_before_the_manifest(tmp_path, denoise_data,
                                                                                      instance):
    # A schedule or UI loaded when the file had 5 trials asks for trial-000..trial-004; the file now has 2.
    sweep, assets = built(write_sweep(tmp_path / "s.yaml", denoise_data, name="edited", trials=2))
    res = resources(tmp_path / "outputs")
    stale = {"dagster/asset_partition_range_start": "trial-000", "dagster/asset_partition_range_end": "trial-004"}
    message = manifest_refusal(assets, instance, res, stale)
    assert f"this run asks for trial-004, which {sweep.path} no longer has (trials: 2)" in message
    assert "reload the code location" in message
    assert not (tmp_path / "outputs" / "edited" / "storage").exists()  # nothing made for the other file
    assert materialize([assets.image_manifest, assets.run_settings], instance=instance, resources=res,
                       tags={**stale, "dagster/asset_partition_range_end": "trial-001"}).success


def test_a_reversed_range_fails_instead_of_succeeding_with_nothing_done(tmp_path, denoise_data, instance):
    sweep, assets = built(write_sweep(tmp_path / "s.yaml", denoise_data, name="back", trials=4))
    res = resources(tmp_path / "outputs")
    backwards = {"dagster/asset_partition_range_start": "trial-003", "dagster/asset_partition_range_end": "trial-001"}
    message = manifest_refusal(assets, instance, res, backwards)
    assert "partition range trial-003...trial-001 ends before it starts" in message, message
    assert not (tmp_path / "outputs" / "back" / "storage").exists()


def test_unchanged_settings_keep_their_data_version_and_the_sweep_file_is_the_code_version(tmp_path, denoise_data,
                                                                                          instance):
    sweep, assets = built(write_sweep(tmp_path / "s.yaml", denoise_data, name="same", trials=3))
    res = resources(tmp_path / "outputs")
    for _ in range(2):
        assert materialize([assets.image_manifest, assets.run_settings], instance=instance, resources=res).success
    records = instance.fetch_materializations(asset_key(sweep, "run_settings"), limit=2).records
    versions = [r.asset_materialization.tags["dagster/data_version"] for r in records]
    assert len(versions) == 2 and versions[0] == versions[1]  # made again unchanged: nothing downstream is stale
    for asset in (assets.run_settings, assets.experiment_results, assets.sweep_report):
        assert set(asset.code_versions_by_key.values()) == {sweep.fingerprint()}
    assert set(assets.image_manifest.code_versions_by_key.values()) == {None}  # the images decide it, not the file
    other, _ = built(write_sweep(tmp_path / "s.yaml", denoise_data, name="same", trials=3, seed=1))
    assert other.fingerprint() != sweep.fingerprint()
