"""Single assets with build_asset_context, and the asset group with `materialize` on a temporary
instance, with a real embedded Ray."""

import json
import math

import numpy as np
import pytest
import yaml
from dagster import AssetKey, DagsterInstance, Failure, build_asset_context, materialize

from imgtune_assets.core.imageio import read_image
from imgtune_assets.core.metrics import psnr
from imgtune_assets.core.ops import apply_pipeline
from imgtune_assets.defs.assets import experiment_results, image_manifest, run_settings, sweep_report
from imgtune_assets.defs.checks import (
    manifest_all_files_usable,
    manifest_has_usable_images,
    report_complete,
    scores_are_numbers,
    tuning_beats_identity,
)
from imgtune_assets.defs.resources import RayResource, SweepResource
from imgtune_assets_tests.conftest import write_sweep

RANGE_TAGS = {"dagster/asset_partition_range_start": "trial-000", "dagster/asset_partition_range_end": "trial-003"}
ALL_ASSETS = [image_manifest, run_settings, experiment_results, sweep_report]
ALL_CHECKS = [manifest_has_usable_images, manifest_all_files_usable, scores_are_numbers, tuning_beats_identity,
              report_complete]


@pytest.fixture(scope="module")
def local_ray():
    """One real embedded Ray for the module; RayResource reuses an existing connection."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def resources(tmp_path, sweep):
    return {"imgtune": SweepResource(sweep_path=str(sweep), output_dir=str(tmp_path / "outputs")),
            "ray_cluster": RayResource()}


def test_image_manifest_lists_every_file(tmp_path, tiny_sweep):
    sweep_resource = SweepResource(sweep_path=str(tiny_sweep), output_dir=str(tmp_path / "out"))
    output = image_manifest(build_asset_context(), imgtune=sweep_resource)
    frame = output.value
    assert len(frame) == 6 and set(frame["status"]) == {"ok"}
    assert frame["target_path"].notna().all()
    assert output.data_version.value == output.metadata["content_hash"].value


def test_image_manifest_refuses_targetless_folder_for_psnr(tmp_path, denoise_data):
    folder = tmp_path / "no_targets"
    (folder / "images").mkdir(parents=True)
    for file in sorted((denoise_data / "images").iterdir())[:2]:
        (folder / "images" / file.name).write_bytes(file.read_bytes())
    sweep = write_sweep(tmp_path / "s.yaml", folder)
    with pytest.raises(Failure) as err:
        image_manifest(build_asset_context(), imgtune=SweepResource(sweep_path=str(sweep), output_dir=str(tmp_path)))
    assert f"{sweep}: objective.metric: psnr needs ground-truth targets" in str(err.value)


def test_run_settings_are_deterministic_and_pin_the_images(tmp_path, tiny_sweep):
    sweep_resource = SweepResource(sweep_path=str(tiny_sweep), output_dir=str(tmp_path / "out"))
    manifest = image_manifest(build_asset_context(), imgtune=sweep_resource)
    first = run_settings(build_asset_context(), imgtune=sweep_resource, image_manifest=manifest.value).value
    second = run_settings(build_asset_context(), imgtune=sweep_resource, image_manifest=manifest.value).value
    assert first == second
    assert [r["id"] for r in first["images"]] == list(manifest.value["id"])
    assert first["manifest_digest"] == manifest.metadata["content_hash"].value
    assert [t["trial"] for t in first["trials"]] == ["trial-000", "trial-001", "trial-002", "trial-003"]
    written = json.loads((tmp_path / "out" / "tiny" / "run_settings.json").read_text())
    assert written["fingerprint"] == first["fingerprint"]


def test_whole_sweep_materializes_on_a_temporary_instance(tmp_path, tiny_sweep, local_ray):
    instance = DagsterInstance.ephemeral()
    res = resources(tmp_path, tiny_sweep)
    assert materialize([image_manifest, run_settings], instance=instance, resources=res).success
    ranged = materialize(ALL_ASSETS, selection=[experiment_results], instance=instance, resources=res,
                         tags=RANGE_TAGS)
    assert ranged.success
    partitions = instance.get_materialized_partitions(AssetKey("experiment_results"))
    assert partitions == {"trial-000", "trial-001", "trial-002", "trial-003"}
    report = materialize([*ALL_ASSETS, *ALL_CHECKS], selection=["sweep_report"], instance=instance, resources=res)
    assert report.success
    summary = report.output_for_node("sweep_report")
    assert summary["completed_trials"] == 4 and summary["total_trials"] == 4
    assert summary["best_score"] > summary["identity_score"]
    checks = {e.check_name: e.passed for e in report.get_asset_check_evaluations()}
    assert checks == {"scores_are_numbers": True, "tuning_beats_identity": True, "report_complete": True}

    # The recorded best score is the best trial's mean PSNR, recomputed here image by image.
    out = tmp_path / "outputs" / "tiny"
    best = json.loads((out / "trials" / f"{summary['best_trial']}.json").read_text())
    data = tiny_sweep.parent / yaml.safe_load(tiny_sweep.read_text())["data_dir"]
    scores = []
    for image_file in sorted((data / "images").iterdir()):
        out_image = apply_pipeline(read_image(image_file), [tuple(s) for s in best["stages"]])
        scores.append(psnr(out_image, read_image(data / "targets" / image_file.name)))
    assert math.isclose(summary["best_score"], float(np.mean(scores)), abs_tol=1e-9)
    for name in ("leaderboard.csv", "per_image_scores.csv", "best_pipeline.yaml", "report.json",
                 "plots/score_vs_params.png", "plots/best_so_far.png", "plots/best_trial_images.png"):
        assert (out / name).stat().st_size > 0, name

    mat = instance.fetch_materializations(AssetKey("sweep_report"), limit=1).records[0]
    metadata = mat.asset_materialization.metadata
    assert metadata["best_score"].value == pytest.approx(summary["best_score"])
    assert "data:image/png;base64," in metadata["plots"].value
    assert len(metadata["top_10"].records) == 4


def test_failing_trial_is_recorded_and_the_others_complete(tmp_path, segment_data, local_ray):
    # Sobel with dx = dy = 0 passes validation but OpenCV refuses it at run time.
    pipeline = [{"op": "sobel", "dx": {"type": "int", "low": 0, "high": 1}, "dy": {"type": "int", "low": 0, "high": 1}},
                {"op": "threshold", "method": "otsu"}]
    sweep = write_sweep(tmp_path / "f.yaml", segment_data, name="fails", trials=4, metric="dice", pipeline=pipeline,
                        sampler="grid")
    instance = DagsterInstance.ephemeral()
    res = resources(tmp_path, sweep)
    assert materialize([image_manifest, run_settings], instance=instance, resources=res).success
    result = materialize(ALL_ASSETS, selection=[experiment_results], instance=instance, resources=res, tags=RANGE_TAGS)
    assert result.success
    assert len(instance.get_materialized_partitions(AssetKey("experiment_results"))) == 4
    trials = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "outputs" / "fails" / "trials").glob("*.json")}
    failed = [t for t in trials.values() if t["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["params"] == {"sobel.dx": 0, "sobel.dy": 0}
    assert "dx+dy > 0" in failed[0]["error"] and failed[0]["score"] is None
    assert all(t["score"] is not None for t in trials.values() if t is not failed[0])

    report = materialize([*ALL_ASSETS, *ALL_CHECKS], selection=["sweep_report"], instance=instance, resources=res)
    assert report.success
    summary = report.output_for_node("sweep_report")
    assert summary["failed_trials"] == [failed[0]["trial"]] and summary["completed_trials"] == 3
    board = (tmp_path / "outputs" / "fails" / "leaderboard.csv").read_text()
    assert f"{failed[0]['trial']},failed" in board
