"""The ``tuned_images`` asset of a sweep file with ``apply:``: the whole sweep materialized on a real
instance on disk (the ``instance`` fixture) with a real embedded Ray, then the report's best pipeline applied to a folder.
A second materialization finds every output up to date. A sweep without ``apply:`` has no such asset."""

import hashlib
import json

import cv2
import numpy as np
import pytest
from dagster import AssetCheckSeverity, AssetKey, AssetSelection, materialize

from imgtune_assets.core.apply import LEDGER_NAME, fixed_stages, pipeline_key
from imgtune_assets.core.catalog import group_name
from imgtune_assets.core.demo_data import make_denoise_set
from imgtune_assets.core.ops import apply_pipeline
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.factory import build_definitions
from imgtune_assets.defs.keys import asset_key
from imgtune_assets_tests.conftest import write_sweep
from imgtune_assets_tests.support.sweeps import range_tags

BLUR_SPACE = [{"op": "gaussian_blur", "ksize": {"type": "odd", "low": 3, "high": 9},
               "sigma": {"type": "float", "low": 0.5, "high": 3.0}}]
SWEEP_ASSETS = ("image_manifest", "run_settings", "experiment_results", "sweep_report")


def decode(path):
    return cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)


def asset_keys(defs):
    return {key for assets_def in defs.assets for key in assets_def.keys}


def latest(instance, key):
    [record] = instance.fetch_materializations(key, limit=1).records
    return record.asset_materialization.metadata


@pytest.fixture
def apply_sweep(tmp_path):
    data = tmp_path / "data"
    make_denoise_set(data, count=4, size=64)
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in sorted((data / "images").iterdir())[:3]:  # three grey 8-bit PNGs ...
        (photos / image.name).write_bytes(image.read_bytes())
    rng = np.random.default_rng(7)  # ... a 16-bit colour one, and a file that is not an image
    ok, buffer = cv2.imencode(".png", rng.integers(0, 65535, (40, 56, 3), dtype=np.uint16))
    (photos / "colour16.png").write_bytes(buffer.tobytes())
    (photos / "README.txt").write_text("the photos to tune\n")
    return load_sweep(write_sweep(tmp_path / "sweeps" / "tune.yaml", data, name="tune", trials=3,
                                  pipeline=BLUR_SPACE,
                                  apply={"input_dir": str(photos), "output_dir": str(tmp_path / "tuned")}))


def test_tuned_images_apply_the_reports_best_pipeline(tmp_path, apply_sweep, local_ray, instance):
    sweep = apply_sweep
    photos, tuned, out = tmp_path / "photos", tmp_path / "tuned", tmp_path / "outputs"
    assert sweep.apply_input == photos and sweep.apply_output == tuned
    defs = build_definitions([sweep], output_dir=str(out))
    tuned_key = AssetKey(["tune", "tuned_images"])  # (keys.asset_key does not know tuned_images)
    assert tuned_key in asset_keys(defs)
    [tuned_def] = [a for a in defs.assets if tuned_key in a.keys]
    assert asset_key(sweep, "sweep_report") in tuned_def.asset_deps[tuned_key]
    assert tuned_def.group_names_by_key[tuned_key] == group_name(sweep.name)

    result = materialize([*defs.assets, *defs.asset_checks], selection=AssetSelection.groups(group_name(sweep.name)),
                         instance=instance, resources=defs.resources, tags=range_tags(sweep))
    assert result.success
    materialized = {e.asset_key for e in result.get_asset_materialization_events()}
    assert tuned_key in materialized and asset_key(sweep, "sweep_report") in materialized

    report = json.loads((out / "tune" / "report.json").read_text())
    assert report["completed_trials"] == 3 and report["best_pipeline"] == str(out / "tune" / "best_pipeline.yaml")
    stages = fixed_stages(load_sweep(report["best_pipeline"]))
    trial = json.loads((out / "tune" / "trials" / f"{report['best_trial']}.json").read_text())
    assert [(op, params) for op, params in trial["stages"]] == stages  # the winner, not another trial

    metadata = latest(instance, tuned_key)
    images = sorted(p.name for p in photos.iterdir() if p.suffix == ".png")
    assert metadata["written"].value == len(images) == 4
    assert metadata["unchanged"].value == 0 and metadata["skipped"].value == 1
    assert metadata["best_trial"].value == report["best_trial"]
    assert metadata["input_dir"].value == str(photos) and metadata["output_dir"].value == str(tuned)
    rows = {row.data["input"].rsplit("/", 1)[-1]: row.data for row in metadata["outputs"].records}
    assert sorted(rows) == sorted([*images, "README.txt"])
    assert rows["README.txt"]["status"] == "skipped" and str(photos / "README.txt") in rows["README.txt"]["reason"]
    [complete] = [e for e in result.get_asset_check_evaluations() if e.check_name == "tuned_images_complete"]
    assert not complete.passed and complete.severity == AssetCheckSeverity.WARN
    assert complete.metadata["skipped"].value == 1 and complete.metadata["reasons"].value == rows["README.txt"]["reason"]
    for name in images:
        row = rows[name]
        assert row["status"] == "written" and row["output"] == str(tuned / name)
        assert row["input_key"] == hashlib.sha256((photos / name).read_bytes()).hexdigest()
        assert row["output_sha256"] == hashlib.sha256((tuned / name).read_bytes()).hexdigest()
        original, written = decode(photos / name), decode(tuned / name)
        assert written.dtype == original.dtype and written.shape == original.shape
        assert np.array_equal(written, apply_pipeline(original, stages)), name
        assert not np.array_equal(written, original), name  # the pipeline did something
    assert sorted(p.name for p in tuned.iterdir()) == sorted([*images, LEDGER_NAME])

    summary = json.loads((out / "tune" / "tuned_images.json").read_text())
    assert metadata["outputs_file"].value == str(out / "tune" / "tuned_images.json")
    assert summary["written"] == 4 and summary["stages"] == [[op, p] for op, p in stages]
    assert json.loads((tuned / LEDGER_NAME).read_text())["pipeline"] == pipeline_key(stages)
    stamps = {name: (tuned / name).stat().st_mtime_ns for name in images}

    # Again: the report's pipeline and the photos did not change, so nothing is written.
    again = materialize([*defs.assets, *defs.asset_checks], selection=AssetSelection.assets(tuned_key),
                        instance=instance, resources=defs.resources)
    assert again.success
    assert {e.asset_key for e in again.get_asset_materialization_events()} == {tuned_key}
    metadata = latest(instance, tuned_key)
    assert metadata["unchanged"].value == len(images) and metadata["written"].value == 0
    assert metadata["skipped"].value == 1
    assert {row.data["status"] for row in metadata["outputs"].records
            if not row.data["input"].endswith(".txt")} == {"unchanged"}
    assert {name: (tuned / name).stat().st_mtime_ns for name in images} == stamps
    assert len(instance.fetch_materializations(tuned_key, limit=10).records) == 2


def test_a_sweep_without_apply_has_no_tuned_images(tmp_path, denoise_data):
    sweep = load_sweep(write_sweep(tmp_path / "plain.yaml", denoise_data, name="plain", trials=2,
                                   pipeline=BLUR_SPACE))
    assert sweep.apply_input is None and sweep.apply_output is None
    defs = build_definitions([sweep], output_dir=str(tmp_path / "outputs"))
    assert asset_keys(defs) == {AssetKey(["plain", name]) for name in SWEEP_ASSETS}
    assert AssetKey(["plain", "tuned_images"]) not in asset_keys(defs)
