"""End to end through the real `dagster` CLI on a temporary DAGSTER_HOME: the whole sweep as one
ranged run, then one trial re-run; the instance then holds two materializations for that trial and
one for each of the others. The recorded best score is checked against scikit-image's PSNR."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from dagster import AssetKey, DagsterInstance
from skimage.metrics import peak_signal_noise_ratio

from imgtune_assets.core.imageio import read_image
from imgtune_assets.core.ops import apply_pipeline
from imgtune_assets_tests.conftest import PROJECT, VENV_BIN, cli_env

MODULE = ["-m", "imgtune_assets.definitions"]


def dagster(env, *args, timeout=300):
    result = subprocess.run([str(VENV_BIN / "dagster"), *args], cwd=PROJECT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"dagster {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def test_whole_sweep_then_one_trial_again(tmp_path, tiny_sweep):
    env = cli_env(tmp_path, tiny_sweep)
    dagster(env, "asset", "materialize", *MODULE, "--select", "image_manifest,run_settings")
    dagster(env, "asset", "materialize", *MODULE, "--select", "experiment_results",
            "--partition-range", "trial-000...trial-003")
    dagster(env, "asset", "materialize", *MODULE, "--select", "sweep_report")
    dagster(env, "asset", "materialize", *MODULE, "--select", "experiment_results", "--partition", "trial-002")

    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        with DagsterInstance.get() as instance:
            records = instance.fetch_materializations(AssetKey("experiment_results"), limit=100).records
            per_partition = {}
            for record in records:
                key = record.asset_materialization.partition
                per_partition[key] = per_partition.get(key, 0) + 1
            assert per_partition == {"trial-000": 1, "trial-001": 1, "trial-002": 2, "trial-003": 1}
            ranged_runs = {r.run_id for r in records if r.asset_materialization.partition != "trial-002"}
            assert len(ranged_runs) == 1  # the whole sweep was one run
            report = instance.fetch_materializations(AssetKey("sweep_report"), limit=1).records[0]
            metadata = report.asset_materialization.metadata
    finally:
        del os.environ["DAGSTER_HOME"]

    best_trial = metadata["best_trial"].value
    best_score = metadata["best_score"].value
    assert metadata["completed_trials"].value == 4
    # Independent check: the best trial's pipeline re-applied, scored by scikit-image.
    trial = json.loads((tmp_path / "outputs" / "tiny" / "trials" / f"{best_trial}.json").read_text())
    data = (tiny_sweep.parent / yaml.safe_load(tiny_sweep.read_text())["data_dir"]).resolve()
    scores = []
    for image_file in sorted((data / "images").iterdir()):
        out = apply_pipeline(read_image(image_file), [tuple(s) for s in trial["stages"]])
        scores.append(peak_signal_noise_ratio(read_image(data / "targets" / image_file.name), out, data_range=255))
    assert best_score == pytest.approx(float(np.mean(scores)), abs=0.05)
    best_pipeline = yaml.safe_load((tmp_path / "outputs" / "tiny" / "best_pipeline.yaml").read_text())
    assert [s["op"] for s in best_pipeline["pipeline"]] == ["bilateral_filter", "gaussian_blur"]
    assert all(not isinstance(v, dict) for s in best_pipeline["pipeline"] for v in s.values())


def test_cli_sweep_command_prints_best_score(tmp_path, tiny_sweep):
    env = cli_env(tmp_path, tiny_sweep)
    home_config = Path(env["DAGSTER_HOME"]) / "dagster.yaml"
    home_config.unlink()  # a DAGSTER_HOME the user just made: the command installs the project's dagster.yaml
    result = subprocess.run([str(VENV_BIN / "python"), "-m", "imgtune_assets.cli", "sweep", "--quiet"], cwd=PROJECT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"installed the project's, {home_config}" in result.stdout
    assert home_config.read_text() == (PROJECT / "dagster.yaml").read_text()
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        assert type(instance.event_log_storage).__name__ == "BatchedSqliteEventLogStorage"
    report = json.loads((tmp_path / "outputs" / "tiny" / "report.json").read_text())
    assert f"best psnr: {report['best_score']:.4f} ({report['best_trial']})" in result.stdout
    assert f"report: {tmp_path / 'outputs' / 'tiny'}" in result.stdout


def test_an_existing_instance_config_is_left_alone(tmp_path):
    from imgtune_assets.cli import ensure_instance_config

    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: true\n")
    assert ensure_instance_config(tmp_path) is None
    assert (tmp_path / "dagster.yaml").read_text() == "telemetry:\n  enabled: true\n"
    assert ensure_instance_config(tmp_path / "fresh") == tmp_path / "fresh" / "dagster.yaml"
