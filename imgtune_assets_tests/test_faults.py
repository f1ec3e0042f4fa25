"""Faults through the real `dagster` CLI (and the sweep command): the run process killed mid-sweep and
resumed, Ray's node killed mid-sweep and resumed, two sweeps at once on one instance, and a data folder
with bad files mixed in."""

import json
import os
import re
import shlex
import subprocess
import time

import cv2
import numpy as np
import pytest
from dagster import AssetCheckKey, DagsterInstance

from skimage.metrics import peak_signal_noise_ratio

from imgtune_assets.cli import sweep_commands
from imgtune_assets.core.demo_data import make_denoise_set
from imgtune_assets.defs.keys import asset_key
from imgtune_assets_tests.support import (PROJECT, VENV_BIN, Service, cli_env, run_checked, sweeps_dir_env, tail_text,
                                          wait_for, write_sweep)

SLOW_PIPELINE = [{"op": "nl_means", "h": {"type": "float", "low": 3, "high": 20}, "template_window_size": 7,
                  "search_window_size": {"type": "odd", "low": 21, "high": 35}}]


def sweep_steps(name: str, trials: int) -> list[list[str]]:
    """A sweep's three command lines (manifest + settings, every trial as one ranged run, report)."""
    return sweep_commands(name, [f"trial-{i:03d}" for i in range(trials)])


def expected_scores(data_dir, settings_file):
    """What an undisturbed sweep scores for each trial of its run settings, computed without imgtune's code:
    OpenCV's non-local means (``SLOW_PIPELINE``'s one stage) on each 8-bit grey image of ``data_dir``,
    scored by scikit-image's PSNR against its target, averaged."""
    pairs = []
    for image_file in sorted((data_dir / "images").iterdir()):
        image = cv2.imread(str(image_file), cv2.IMREAD_UNCHANGED)
        target = cv2.imread(str(data_dir / "targets" / image_file.name), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.ndim == 2, image_file  # (the demo set: 8-bit grey)
        pairs.append((image, target))
    expected = {}
    for trial in json.loads(settings_file.read_text())["trials"]:
        [(op, params)] = trial["stages"]
        assert op == "nl_means", trial
        scores = [peak_signal_noise_ratio(target, cv2.fastNlMeansDenoising(
                      image, None, params["h"], params["template_window_size"], params["search_window_size"]),
                      data_range=255)
                  for image, target in pairs]
        expected[trial["trial"]] = float(np.mean(scores))
    return expected


def kill_once_saved(run: Service, folder, pattern: str, at_least: int) -> list[str]:
    """SIGKILL the run's process alone (as a user, or the OOM killer, would) once ``at_least`` files
    matching ``pattern`` are saved in ``folder``; the stems of those saved by then."""
    def saved():
        assert run.alive(), f"the run ended before it could be killed:\n{run.tail()}"
        return len(list(folder.glob(pattern))) >= at_least
    wait_for(saved, 120, interval=0.05, what=f"{at_least} saved {pattern}")
    run.kill_leader()
    return sorted(p.stem for p in folder.glob(pattern))


def resume(folder, name: str, trials_cmd: list[str], report_cmd: list[str], env: dict, config: str = "") -> None:
    """Run the sweep's trials again with ``skip_finished`` (plus ``config``), then its report."""
    file = folder / "resume.yaml"
    op_name = asset_key(name, "experiment_results").to_python_identifier()
    file.write_text(config + f"ops:\n  {op_name}:\n    config:\n      skip_finished: true\n")
    run_checked([*trials_cmd, "-c", str(file)], env)
    run_checked(report_cmd, env)


def test_run_killed_mid_sweep_then_resumed(tmp_path, denoise_data):
    sweep = write_sweep(tmp_path / "slow.yaml", denoise_data, name="slow", trials=10, pipeline=SLOW_PIPELINE)
    env = cli_env(tmp_path, sweep)
    inputs, trials_cmd, report_cmd = sweep_steps("slow", 10)
    run_checked(inputs, env)
    trials_dir = tmp_path / "outputs" / "slow" / "trials"
    # The trials run in a session of their own: after the run process is killed, what it started (its
    # embedded Ray) is still known to the service, and ended by its stop().
    run = Service("trials", trials_cmd, env, tmp_path / "killed-run.log")
    try:
        finished = kill_once_saved(run, trials_dir, "trial-*.json", 2)
        assert 2 <= len(finished) < 10, f"kill came too late or too early: {finished}"
        # No result is half-written: each saved one is whole. A SIGKILL can land inside a write, between
        # its temporary file and the rename: that temporary may stay, but no result came from it.
        for name in finished:
            assert json.loads((trials_dir / f"{name}.json").read_text())["trial"] == name
        for left in trials_dir.glob(".*.tmp"):
            assert left.name.split(".")[1] not in finished, f"{left.name}: a finished trial's result was being replaced"
        # Resumed later than a write lasts, any such temporary file goes; one of a later trial is made
        # here so that the path is taken whatever the kill's timing.
        stale = trials_dir / ".trial-009.json.abcd1234.tmp"
        stale.write_text("{")
        for left in trials_dir.glob(".*.tmp"):
            os.utime(left, (time.time() - 120,) * 2)
        resume(tmp_path, "slow", trials_cmd, report_cmd, env)
        assert not list(trials_dir.glob(".*.tmp"))
    finally:
        run.stop(grace=2)  # what the killed run left running (Ray workers busy on a trial): no clean exit to wait for

    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        records = instance.fetch_materializations(asset_key("slow", "experiment_results"), limit=100).records
    partitions = [r.asset_materialization.partition for r in records]
    assert sorted(partitions) == [f"trial-{k:03d}" for k in range(10)]  # none lost, none twice
    reused = {r.asset_materialization.partition for r in records if r.asset_materialization.metadata["reused"].value}
    assert reused == set(finished)

    expected = expected_scores(denoise_data, tmp_path / "outputs" / "slow" / "run_settings.json")
    report = json.loads((tmp_path / "outputs" / "slow" / "report.json").read_text())
    assert report["completed_trials"] == 10 and not report["missing_trials"]
    best = max(expected, key=expected.get)
    assert report["best_trial"] == best and report["best_score"] == pytest.approx(expected[best], abs=1e-9)
    board = {line.split(",")[1]: float(line.split(",")[3])
             for line in (tmp_path / "outputs" / "slow" / "leaderboard.csv").read_text().splitlines()[1:]}
    assert board == pytest.approx(expected, abs=1e-9)


def test_ray_node_dying_mid_sweep_fails_the_run_and_a_resume_completes_it(tmp_path, denoise_data):
    # `sweep NAME` hosts its embedded Ray: its raylet (the node) is SIGKILLed once two trials are saved. The
    # trials in flight are Ray's loss, not failures of theirs: the run fails saying so, and records none.
    sweep = write_sweep(tmp_path / "fragile.yaml", denoise_data, name="fragile", trials=10, pipeline=SLOW_PIPELINE)
    env = cli_env(tmp_path, sweep)
    command = [str(VENV_BIN / "python"), "-m", "imgtune_assets.cli", "sweep", "fragile", "--quiet"]
    out = tmp_path / "outputs" / "fragile"
    log = tmp_path / "node-killed.log"
    run = Service("sweep", command, env, log)
    try:
        def saved():
            assert run.alive(), f"the sweep ended before its node could be killed:\n{run.tail()}"
            return len(list((out / "trials").glob("trial-*.json"))) >= 2
        wait_for(saved, 120, interval=0.05, what="2 saved trials")
        [raylet] = [p for p in run.processes() if p.name() == "raylet"]
        raylet.kill()
        at_kill = sorted(p.stem for p in (out / "trials").glob("trial-*.json"))
        assert 2 <= len(at_kill) < 10, f"kill came too late: {at_kill}"
        code = run.proc.wait(timeout=150)
    finally:
        run.stop(grace=2)  # what the dead node left (its workers, GCS)
    said = tail_text(log, 20000)
    assert code != 0, said
    assert "the Ray node died during the sweep: LocalRayletDiedError" in said, said
    records = {p.stem: json.loads(p.read_text()) for p in (out / "trials").glob("trial-*.json")}
    assert set(at_kill) <= set(records) and len(records) < 10  # the finished trials are kept, the rest is not
    # nothing recorded as failed (no image blamed) for the node's death
    assert [k for k, r in records.items() if r["status"] != "ok" or any(p["error"] for p in r["per_image"])] == []
    assert re.search(rf"\b{len(records)} of the run's 10 trials are finished and saved\b", said), said

    resumed = run_checked([*command, "--resume"], env)  # a fresh embedded Ray
    assert f"reused {len(records)} finished trial(s) (--resume)" in resumed.stdout, resumed.stdout
    expected = expected_scores(denoise_data, out / "run_settings.json")
    report = json.loads((out / "report.json").read_text())
    assert report["completed_trials"] == 10 and not report["missing_trials"]
    best = max(expected, key=expected.get)
    assert report["best_trial"] == best and report["best_score"] == pytest.approx(expected[best], abs=1e-9)
    board = {line.split(",")[1]: float(line.split(",")[3])
             for line in (out / "leaderboard.csv").read_text().splitlines()[1:]}
    assert board == pytest.approx(expected, abs=1e-9)


def test_two_sweeps_at_once_keep_to_their_own_outputs(tmp_path, denoise_data):
    sweeps = tmp_path / "sweeps"
    for name in ("alpha", "beta"):
        write_sweep(sweeps / f"{name}.yaml", denoise_data, name=name, trials=3)
    env = sweeps_dir_env(tmp_path, sweeps)  # one code location serving both; one DAGSTER_HOME and output folder
    DagsterInstance.from_config(env["DAGSTER_HOME"]).dispose()  # the instance exists before, as in real use
    services = [Service(name, ["bash", "-c", " && ".join(shlex.join(c) for c in sweep_steps(name, 3))], env,
                        tmp_path / f"{name}.log") for name in ("alpha", "beta")]
    try:
        for service in services:
            service.proc.wait(timeout=300)
            assert service.proc.returncode == 0, service.tail()
    finally:
        for service in services:
            service.stop()
    for name in ("alpha", "beta"):
        folder = tmp_path / "outputs" / name
        report = json.loads((folder / "report.json").read_text())
        assert report["sweep"] == name and report["completed_trials"] == 3
        for file in (folder / "trials").glob("*.json"):
            assert json.loads(file.read_text())["sweep"] == name
        settings = json.loads((folder / "run_settings.json").read_text())
        assert settings["sweep"] == name
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["alpha", "beta"]
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        for name in ("alpha", "beta"):
            [report] = instance.fetch_materializations(asset_key(name, "sweep_report"), limit=10).records
            trials = instance.fetch_materializations(asset_key(name, "experiment_results"), limit=10).records
            assert sorted(r.asset_materialization.partition for r in trials) == ["trial-000", "trial-001", "trial-002"]
            assert report.asset_materialization.metadata["completed_trials"].value == 3


def test_a_second_run_of_a_sweep_in_progress_stops_before_touching_its_files(tmp_path, denoise_data):
    # Two runs of one sweep would mix their manifests, settings, trials and report. The sweep command
    # started while a run of the same sweep computes its trials is refused at its first step.
    data = tmp_path / "data"
    make_denoise_set(data, count=6, size=320)  # large enough that the first run is still computing
    sweep = write_sweep(tmp_path / "slow.yaml", data, name="slow", trials=24, pipeline=SLOW_PIPELINE)
    env = cli_env(tmp_path, sweep)
    inputs, trials_cmd, report_cmd = sweep_steps("slow", 24)
    run_checked(inputs, env)
    out = tmp_path / "outputs" / "slow"
    stored = {name: (out / "storage" / name).read_bytes() for name in ("image_manifest", "run_settings")}
    first = Service("trials", trials_cmd, env, tmp_path / "first.log")
    try:
        wait_for(lambda: first.alive() and "STEP_START" in first.tail(), 120, interval=0.05,
                 what=lambda: f"the first run's step to start\n{first.tail()}")
        second = subprocess.run([str(VENV_BIN / "python"), "-m", "imgtune_assets.cli", "sweep", "slow", "--quiet"],
                                cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
        first_alive = first.alive()
    finally:
        wait_for(lambda: not first.alive(), 300, interval=0.5, what="the first run to end")
        first.stop(grace=2)
    shown = second.stdout + second.stderr
    assert second.returncode != 0 or not first_alive, "the first run ended first: make its trials slower"
    assert second.returncode != 0, shown
    assert "another run of the sweep 'slow' is in progress" in shown and "launch it again" in shown, shown
    assert {name: (out / "storage" / name).read_bytes() for name in stored} == stored  # untouched
    run_checked(report_cmd, env)
    report = json.loads((out / "report.json").read_text())
    assert report["completed_trials"] == 24 and not report["missing_trials"] and not report.get("stale_trials")


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
    inputs, trials_cmd, report_cmd = sweep_steps("messy", 2)
    result = run_checked(inputs, env)
    run_checked(trials_cmd, env)
    run_checked(report_cmd, env)
    log = result.stdout + result.stderr
    for name, reason in (("zero.png", "empty file"), ("text.png", "not a decodable image"),
                         ("truncated.png", "not a decodable image"), ("lonely.png", "no target")):
        assert f"skipped images/{name}" in log and reason in log, name
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [AssetCheckKey(asset_key("messy", "image_manifest"), "manifest_all_files_usable")])
        evaluation = next(iter(check.values())).event.dagster_event.event_specific_data
    assert evaluation.passed is False and evaluation.severity.value == "WARN"
    report = json.loads((tmp_path / "outputs" / "messy" / "report.json").read_text())
    assert report["completed_trials"] == 2
    scored = json.loads((tmp_path / "outputs" / "messy" / "trials" / "trial-000.json").read_text())["images_scored"]
    assert scored == 3


def test_run_streaming_chunks_killed_then_resumed_keeps_its_chunk_progress(tmp_path, denoise_data):
    # A budget of one chunk: images stream (each chunk decoded and scored by one task: one CPU, so at least
    # two chunks left suffice), so no trial is complete before the last chunk; what a killed run keeps is
    # its finished chunks (trials/partial/).
    sweep = write_sweep(tmp_path / "stream.yaml", denoise_data, name="stream", trials=3, pipeline=SLOW_PIPELINE,
                        chunk_size=1)
    env = cli_env(tmp_path, sweep)
    inputs, trials_cmd, report_cmd = sweep_steps("stream", 3)
    run_checked(inputs, env)
    budget = tmp_path / "budget.yaml"
    budget.write_text("resources:\n  ray_cluster:\n    config:\n      object_store_budget_mb: 0.001\n      num_cpus: 1\n")
    partial = tmp_path / "outputs" / "stream" / "trials" / "partial"
    run = Service("trials", [*trials_cmd, "-c", str(budget)], env, tmp_path / "killed-run.log")
    try:
        kept = len(kill_once_saved(run, partial, "*.json", 2))
        assert not list((tmp_path / "outputs" / "stream" / "trials").glob("trial-*.json")), \
            "with one chunk at a time no trial can be complete before the last chunk"
        # progress shows in image evaluations meanwhile: a chunk is a sixth of them, so each one reports
        shown = json.loads((tmp_path / "outputs" / "stream" / "progress.json").read_text())
        assert shown["done"] == 0 and shown["evaluations_done"] >= 3 and shown["evaluations_total"] == 18
        resume(tmp_path, "stream", trials_cmd, report_cmd, env, config=budget.read_text())
    finally:
        run.stop(grace=2)

    stats = json.loads((tmp_path / "outputs" / "stream" / "last_experiment_run.json").read_text())
    assert stats["chunks"] == 6 and stats["fused"] and stats["chunks_in_object_store_at_most"] == 0
    assert stats["spilled_bytes"] == 0  # measured (not None: Ray was asked), and streamed: nothing spilled
    assert stats["chunks_decoded"] == 6 - kept  # the saved chunks were neither decoded nor scored again
    assert stats["evaluations"] == 3 * (6 - kept)  # this run's image evaluations: the chunks not saved before
    assert not list(partial.glob("*.json"))  # progress files go once their trials are saved whole
    expected = expected_scores(denoise_data, tmp_path / "outputs" / "stream" / "run_settings.json")
    report = json.loads((tmp_path / "outputs" / "stream" / "report.json").read_text())
    assert report["completed_trials"] == 3
    board = {line.split(",")[1]: float(line.split(",")[3])
             for line in (tmp_path / "outputs" / "stream" / "leaderboard.csv").read_text().splitlines()[1:]}
    assert board == pytest.approx(expected, abs=1e-9)


def leaderboard_rows(out_dir):
    import csv

    with open(out_dir / "leaderboard.csv") as f:
        return [{k: row[k] for k in ("trial", "status", "score", "round", "source", "rung", "partial_score")}
                for row in csv.DictReader(f)]


def ledger_proposals(out_dir):
    (file,) = (out_dir / "search").glob("ledger-*.json")
    return [(e["round"], e["trials"]) for e in json.loads(file.read_text())["rounds"]]


def test_adaptive_sweep_killed_then_resumed_ends_as_an_undisturbed_one(tmp_path, denoise_data):
    # TPE with successive halving, through the real CLI: one run left alone, one killed after a few trials
    # settled and resumed with skip_finished. Same ledger (every proposal), same leaderboard.
    def sweep_in(folder):
        return write_sweep(folder / "adaptive.yaml", denoise_data, name="adaptive", trials=12, pipeline=SLOW_PIPELINE,
                           sampler="tpe", search={"batch_size": 4, "n_startup": 4},
                           early_stopping={"method": "successive_halving", "eta": 2, "min_images": 2})

    inputs, trials_cmd, report_cmd = sweep_steps("adaptive", 12)
    calm = tmp_path / "calm"
    calm_env = cli_env(calm, sweep_in(calm))
    for command in (inputs, trials_cmd, report_cmd):
        run_checked(command, calm_env)

    killed = tmp_path / "killed"
    env = cli_env(killed, sweep_in(killed))
    run_checked(inputs, env)
    trials_dir = killed / "outputs" / "adaptive" / "trials"
    run = Service("trials", trials_cmd, env, killed / "killed-run.log")
    try:
        settled = kill_once_saved(run, trials_dir, "trial-*.json", 5)  # round 0 and part of round 1
        assert 5 <= len(settled) < 12, f"kill came too late: {settled}"
        resume(killed, "adaptive", trials_cmd, report_cmd, env)
    finally:
        run.stop(grace=2)

    calm_out, killed_out = calm / "outputs" / "adaptive", killed / "outputs" / "adaptive"
    assert ledger_proposals(killed_out) == ledger_proposals(calm_out)
    assert leaderboard_rows(killed_out) == leaderboard_rows(calm_out)
    calm_report, report = (json.loads((o / "report.json").read_text()) for o in (calm_out, killed_out))
    assert {k: report[k] for k in ("best_trial", "best_score", "evaluations", "pruned_trials")} == \
        {k: calm_report[k] for k in ("best_trial", "best_score", "evaluations", "pruned_trials")}
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        records = instance.fetch_materializations(asset_key("adaptive", "experiment_results"), limit=100).records
    reused = {r.asset_materialization.partition for r in records if r.asset_materialization.metadata["reused"].value}
    assert reused == set(settled)  # what the killed run had settled was not computed again
