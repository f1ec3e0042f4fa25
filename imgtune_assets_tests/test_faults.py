"""Faults through the real `dagster` CLI: the run process killed mid-sweep and resumed, two sweeps at
once on one instance, and a data folder with bad files mixed in."""

import json
import os
import signal
import subprocess
import time

import cv2
import numpy as np
import psutil
import pytest
from dagster import AssetKey, DagsterInstance

from imgtune_assets.core.evaluate import evaluate_chunk
from imgtune_assets.core.metrics import Objective
from imgtune_assets.core.manifest import load_images, scan_folder
from imgtune_assets_tests.conftest import PROJECT, VENV_BIN, cli_env, write_sweep

MODULE = ["-m", "imgtune_assets.definitions"]
SLOW_PIPELINE = [{"op": "nl_means", "h": {"type": "float", "low": 3, "high": 20}, "template_window_size": 7,
                  "search_window_size": {"type": "odd", "low": 21, "high": 35}}]


def dagster_cmd(*args):
    return [str(VENV_BIN / "dagster"), *args]


def run(env, *args, timeout=300):
    result = subprocess.run(dagster_cmd(*args), cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def instance_for(env):
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        return DagsterInstance.get()
    finally:
        del os.environ["DAGSTER_HOME"]


def kill_run_process(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL the run's process alone, as a user (or the OOM killer) would; return what it had started
    (its embedded Ray), for the test to clean up after the resumed sweep."""
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return children


def reap(processes: list[psutil.Process]) -> None:
    for child in processes:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def expected_scores(sweep_file, data_dir, settings_file):
    """An independent, in-process evaluation of each trial's stages: what an undisturbed sweep scores."""
    ids, images, targets = load_images(data_dir, scan_folder(data_dir, needs_target=True))
    settings = json.loads(settings_file.read_text())
    return {t["trial"]: float(np.mean([r["score"] for r in evaluate_chunk([tuple(s) for s in t["stages"]], images,
                                                                         targets, Objective("psnr"))]))
            for t in settings["trials"]}


def test_run_killed_mid_sweep_then_resumed(tmp_path, denoise_data):
    sweep = write_sweep(tmp_path / "slow.yaml", denoise_data, name="slow", trials=10, pipeline=SLOW_PIPELINE)
    env = cli_env(tmp_path, sweep)
    run(env, "asset", "materialize", *MODULE, "--select", "image_manifest,run_settings")
    trials_dir = tmp_path / "outputs" / "slow" / "trials"
    proc = subprocess.Popen(dagster_cmd("asset", "materialize", *MODULE, "--select", "experiment_results",
                                        "--partition-range", "trial-000...trial-009"),
                            cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(trials_dir.glob("trial-*.json"))) < 2:
        time.sleep(0.05)
    orphans = kill_run_process(proc)
    finished = sorted(p.stem for p in trials_dir.glob("trial-*.json"))
    assert 2 <= len(finished) < 10, f"kill came too late or too early: {finished}"
    assert not list(trials_dir.glob(".*.tmp")), "a half-written result file was left behind"

    config = tmp_path / "resume.yaml"
    config.write_text("ops:\n  experiment_results:\n    config:\n      skip_finished: true\n")
    try:
        run(env, "asset", "materialize", *MODULE, "--select", "experiment_results",
            "--partition-range", "trial-000...trial-009", "-c", str(config))
        run(env, "asset", "materialize", *MODULE, "--select", "sweep_report")
    finally:
        reap(orphans)

    instance = instance_for(env)
    records = instance.fetch_materializations(AssetKey("experiment_results"), limit=100).records
    partitions = [r.asset_materialization.partition for r in records]
    assert sorted(partitions) == [f"trial-{k:03d}" for k in range(10)]  # none lost, none twice
    reused = {r.asset_materialization.partition for r in records if r.asset_materialization.metadata["reused"].value}
    assert reused == set(finished)

    expected = expected_scores(sweep, denoise_data, tmp_path / "outputs" / "slow" / "run_settings.json")
    report = json.loads((tmp_path / "outputs" / "slow" / "report.json").read_text())
    assert report["completed_trials"] == 10 and not report["missing_trials"]
    best = max(expected, key=expected.get)
    assert report["best_trial"] == best and report["best_score"] == pytest.approx(expected[best], abs=1e-9)
    board = {line.split(",")[1]: float(line.split(",")[3])
             for line in (tmp_path / "outputs" / "slow" / "leaderboard.csv").read_text().splitlines()[1:]}
    assert board == pytest.approx(expected, abs=1e-9)


def test_two_sweeps_at_once_keep_to_their_own_outputs(tmp_path, denoise_data):
    home_env = None
    procs = []
    for name in ("alpha", "beta"):
        sweep = write_sweep(tmp_path / f"{name}.yaml", denoise_data, name=name, trials=3)
        env = cli_env(tmp_path, sweep)  # same DAGSTER_HOME and output folder for both
        if home_env is None:
            instance_for(env).dispose()  # the instance exists before the sweeps start, as in real use
        home_env = env
        script = (f"{VENV_BIN / 'dagster'} asset materialize -m imgtune_assets.definitions --select image_manifest,run_settings && "
                  f"{VENV_BIN / 'dagster'} asset materialize -m imgtune_assets.definitions --select experiment_results "
                  f"--partition-range trial-000...trial-002 && "
                  f"{VENV_BIN / 'dagster'} asset materialize -m imgtune_assets.definitions --select sweep_report")
        procs.append(subprocess.Popen(["bash", "-c", script], cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
    for name in ("alpha", "beta"):
        folder = tmp_path / "outputs" / name
        report = json.loads((folder / "report.json").read_text())
        assert report["sweep"] == name and report["completed_trials"] == 3
        for file in (folder / "trials").glob("*.json"):
            assert json.loads(file.read_text())["sweep"] == name
        settings = json.loads((folder / "run_settings.json").read_text())
        assert settings["sweep"] == name
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["alpha", "beta"]
    instance = instance_for(home_env)
    assert len(instance.fetch_materializations(AssetKey("sweep_report"), limit=10).records) == 2


def test_bad_files_are_skipped_and_the_sweep_goes_on(tmp_path, denoise_data):
    data = tmp_path / "messy"
    for sub in ("images", "targets"):
        (data / sub).mkdir(parents=True)
        for file in sorted((denoise_data / sub).iterdir())[:3]:
            (data / sub / f"ph oto ü {file.name}").write_bytes(file.read_bytes())
    (data / "images" / "zero.png").write_bytes(b"")
    (data / "images" / "text.png").write_text("not a png")
    good = (data / "images").iterdir().__next__().read_bytes()
    (data / "images" / "truncated.png").write_bytes(good[: len(good) // 3])
    cv2.imwrite(str(data / "images" / "lonely.png"), np.zeros((96, 96), np.uint8))
    sweep = write_sweep(tmp_path / "messy.yaml", data, name="messy", trials=2)
    env = cli_env(tmp_path, sweep)
    result = run(env, "asset", "materialize", *MODULE, "--select", "image_manifest,run_settings")
    run(env, "asset", "materialize", *MODULE, "--select", "experiment_results", "--partition-range", "trial-000...trial-001")
    run(env, "asset", "materialize", *MODULE, "--select", "sweep_report")
    log = result.stdout + result.stderr
    for name, reason in (("zero.png", "empty file"), ("text.png", "not a decodable image"),
                         ("truncated.png", "not a decodable image"), ("lonely.png", "no target")):
        assert f"skipped images/{name}" in log and reason in log, name
    instance = instance_for(env)
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [__import__("dagster").AssetCheckKey(AssetKey("image_manifest"), "manifest_all_files_usable")])
    evaluation = next(iter(check.values())).event.dagster_event.event_specific_data
    assert evaluation.passed is False and evaluation.severity.value == "WARN"
    report = json.loads((tmp_path / "outputs" / "messy" / "report.json").read_text())
    assert report["completed_trials"] == 2
    scored = json.loads((tmp_path / "outputs" / "messy" / "trials" / "trial-000.json").read_text())["images_scored"]
    assert scored == 3
