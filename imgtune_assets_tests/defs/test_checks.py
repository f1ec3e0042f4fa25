"""A sweep's asset checks, invoked directly on the values their assets hold (pure logic: the checks'
runs beside real assets are in defs/test_assets.py and defs/test_search_run.py)."""

import math

import pandas as pd
import pytest
from dagster import AssetCheckSeverity

from imgtune_assets.defs.checks import build_sweep_checks
from imgtune_assets_tests.support.asset_groups import built
from imgtune_assets_tests.support.sweeps import write_sweep


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checks")
    (folder / "data" / "images").mkdir(parents=True)
    _, assets = built(write_sweep(folder / "s.yaml", folder / "data", trials=3))
    return {c.check_key.name: c for c in build_sweep_checks(assets)}


def manifest(*rows):
    return pd.DataFrame([{"image_path": path, "status": status, "reason": reason} for path, status, reason in rows])


def report(**values):
    base = {"nan_scores": 0, "best_score": 30.0, "identity_score": 20.0, "higher_is_better": True,
            "failed_trials": [], "missing_trials": [], "completed_trials": 3, "pruned_trials": 0, "total_trials": 3}
    return {**base, **values}


def test_each_check_is_attached_to_the_asset_it_judges(checks):
    assert {name: c.check_key.asset_key.path[-1] for name, c in checks.items()} == {
        "manifest_has_usable_images": "image_manifest", "manifest_all_files_usable": "image_manifest",
        "scores_are_numbers": "sweep_report", "tuning_beats_identity": "sweep_report",
        "report_complete": "sweep_report"}
    # Only an empty manifest stops the run (nothing to tune); the others warn.
    assert [name for name, c in checks.items() if c.check_specs and next(iter(c.check_specs)).blocking] == [
        "manifest_has_usable_images"]


def test_a_manifest_needs_one_usable_image(checks):
    some = checks["manifest_has_usable_images"](image_manifest=manifest(("a.png", "ok", None), ("b.png", "skipped", "x")))
    assert some.passed and some.metadata["usable_images"].value == 1
    none = checks["manifest_has_usable_images"](image_manifest=manifest(("b.png", "skipped", "unreadable")))
    assert not none.passed and none.metadata["usable_images"].value == 0


def test_skipped_files_are_listed_with_their_reasons(checks):
    result = checks["manifest_all_files_usable"](image_manifest=manifest(
        ("a.png", "ok", None), ("b.png", "skipped", "no target"), ("c.txt", "skipped", "not an image")))
    assert not result.passed and result.severity == AssetCheckSeverity.WARN
    assert result.metadata["skipped_files"].value == 2
    assert result.metadata["reasons"].value == "b.png: no target\nc.txt: not an image"
    assert checks["manifest_all_files_usable"](image_manifest=manifest(("a.png", "ok", None))).passed


def test_nan_scores_fail_their_check(checks):
    assert checks["scores_are_numbers"](sweep_report=report()).passed
    failed = checks["scores_are_numbers"](sweep_report=report(nan_scores=2))
    assert not failed.passed and failed.metadata["nan_scores"].value == 2


@pytest.mark.parametrize("best, identity, higher, passed", [
    (30.0, 20.0, True, True), (20.0, 30.0, True, False), (30.0, 30.0, True, False),
    (0.1, 0.2, False, True), (0.3, 0.2, False, False), (math.nan, 20.0, True, False), (30.0, math.nan, True, False),
])
def test_tuning_must_beat_the_identity_pipeline_in_the_metric_s_direction(checks, best, identity, higher, passed):
    result = checks["tuning_beats_identity"](sweep_report=report(best_score=best, identity_score=identity,
                                                                  higher_is_better=higher))
    assert result.passed is passed and result.severity == AssetCheckSeverity.WARN


def test_a_sweep_without_a_best_trial_fails_the_identity_check_rather_than_erroring(checks):
    # Every trial failed: the report has no best score (and may have no identity score either).
    result = checks["tuning_beats_identity"](sweep_report=report(best_score=None, completed_trials=0,
                                                                  failed_trials=["trial-000"]))
    assert not result.passed and "best_score" not in result.metadata
    result = checks["tuning_beats_identity"](sweep_report=report(best_score=None, identity_score=None))
    assert not result.passed and result.metadata == {}


def test_a_report_is_complete_when_every_trial_settled(checks):
    assert checks["report_complete"](sweep_report=report()).passed
    # Trials stopped by early stopping count as settled.
    assert checks["report_complete"](sweep_report=report(completed_trials=1, pruned_trials=2)).passed
    failed = checks["report_complete"](sweep_report=report(completed_trials=2, failed_trials=["trial-001"]))
    assert not failed.passed and failed.metadata["failed_trials"].value == "trial-001"
    missing = checks["report_complete"](sweep_report=report(completed_trials=2, missing_trials=["trial-002"]))
    assert not missing.passed and missing.metadata["missing_trials"].value == "trial-002"
