"""``ray_executor``: each step runs as a Ray task in a Ray worker process, through the real
``dagster asset materialize`` CLI, on a real two-node loopback cluster and on the embedded local Ray.

This module is also a small Dagster code location (``defs`` below, loaded by the CLI with
``-m imgtune_assets_tests.defs.test_executor``) whose assets fail or sleep on purpose, to check
that a failing step and a killed step worker are reported as failures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    asset,
    in_process_executor,
    multiprocess_executor,
)

from imgtune_assets.cli import materialize_commands
from imgtune_assets.core.sampling import trial_keys
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.executor import (
    NUM_CPUS_TAG,
    STEP_WORKER_MESSAGE,
    executor_from_environment,
    ray_executor,
)
from imgtune_assets_tests.conftest import PROJECT, VENV_BIN, cli_env, write_sweep

PID_FILE_ENV = "IMGTUNE_TEST_PID_FILE"
THIS_MODULE = "imgtune_assets_tests.defs.test_executor"


# --------------------------------------------------------------------------- a code location for the fault tests


@asset(op_tags={NUM_CPUS_TAG: "0"})
def boom() -> None:
    raise ValueError("boom: this step fails on purpose")


@asset
def sleeper() -> None:
    """Writes its pid where the test can find it, then sleeps until the test kills it."""
    Path(os.environ[PID_FILE_ENV]).write_text(str(os.getpid()))
    time.sleep(120)


defs = Definitions(
    assets=[boom, sleeper],
    # The executor's runtime_env env_vars reach every step worker (here: where sleeper writes its pid).
    executor=ray_executor.configured({
        "runtime_env": {"env_vars": {PID_FILE_ENV: os.environ.get(PID_FILE_ENV, "/nonexistent")}},
        "health_check_interval_seconds": 1,
    }),
)


# --------------------------------------------------------------------------- helpers


def ray_env(tmp_path, sweep, cluster=None, **extra) -> dict[str, str]:
    env = cli_env(tmp_path, sweep, IMGTUNE_EXECUTOR="ray", **extra)
    env.pop("IMGTUNE_RAY_ADDRESS", None)
    if cluster is not None:
        env.update(cluster.env, IMGTUNE_RAY_ADDRESS=cluster.address)
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # for an embedded Ray only
    return env


def materialize(env, command: list[str], expect_ok: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert result.returncode == 0, f"{' '.join(command[1:])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def step_workers(instance: DagsterInstance, run_id: str) -> dict[str, dict[str, str]]:
    """What each step's worker said about itself (the engine event the Ray task writes first)."""
    found = {}
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        event = entry.dagster_event
        if event.message and event.message.startswith(STEP_WORKER_MESSAGE):
            found[entry.step_key] = {k: v.value for k, v in event.engine_event_data.metadata.items()}
    return found


def check_steps_ran_in_ray_workers(instance: DagsterInstance, run_ids, node_ips) -> list[float]:
    """Every started step of every run ran in a Ray worker process (named ``ray::...``, child of a
    raylet), not in the run's own process nor a child of it. Returns launch→start seconds per step."""
    overheads = []
    for run_id in run_ids:
        run = instance.get_run_by_id(run_id)
        assert run.status == DagsterRunStatus.SUCCESS
        run_pid = next(iter(instance.all_logs(run_id, of_type=DagsterEventType.RUN_START))).dagster_event.pid
        started = {e.step_key: e.timestamp for e in instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)}
        launched = {e.step_key: e.timestamp
                    for e in instance.all_logs(run_id, of_type=DagsterEventType.STEP_WORKER_STARTING)}
        workers = step_workers(instance, run_id)
        assert started and set(started) == set(workers), (sorted(started), sorted(workers))
        for step_key, worker in workers.items():
            assert int(worker["pid"]) != run_pid and int(worker["ppid"]) != run_pid
            assert worker["parent_name"] == "raylet", worker
            assert worker["process_name"].startswith("ray::"), worker
            assert worker["ray_worker_id"] and worker["ray_node_id"]
            assert worker["ray_node_ip"] in node_ips, worker
            # The step's own events come from that worker process too.
            successes = [e for e in instance.all_logs(run_id, of_type=DagsterEventType.STEP_SUCCESS)
                         if e.step_key == step_key]
            assert successes and successes[0].dagster_event.pid == int(worker["pid"])
            overheads.append(started[step_key] - launched[step_key])
    return overheads


# --------------------------------------------------------------------------- tests


def test_executor_from_environment(monkeypatch):
    monkeypatch.delenv("IMGTUNE_EXECUTOR", raising=False)
    assert executor_from_environment() is in_process_executor
    for value, expected in [("in_process", in_process_executor), ("multiprocess", multiprocess_executor),
                            ("ray", ray_executor), ("RAY", ray_executor)]:
        monkeypatch.setenv("IMGTUNE_EXECUTOR", value)
        assert executor_from_environment() is expected
    monkeypatch.setenv("IMGTUNE_EXECUTOR", "dask")
    with pytest.raises(ValueError, match="IMGTUNE_EXECUTOR"):
        executor_from_environment()


def test_whole_sweep_with_ray_executor_on_a_two_node_cluster(tmp_path, cluster, denoise_data):
    sweep = write_sweep(tmp_path / "sweep.yaml", denoise_data, name="onray", trials=6, chunk_size=1)
    env = ray_env(tmp_path, sweep, cluster)
    keys = trial_keys(load_sweep(sweep))
    for command in materialize_commands(keys):
        materialize(env, command)

    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs()
        assert len(runs) == 3
        overheads = check_steps_ran_in_ray_workers(instance, [r.run_id for r in runs], cluster.node_ips)
        assert instance.get_materialized_partitions(AssetKey("experiment_results")) == set(keys)
        records = instance.fetch_materializations(AssetKey("experiment_results"), limit=100).records
        nodes = set().union(*(r.asset_materialization.metadata["nodes"].value for r in records))
        assert {r.asset_materialization.metadata["status"].value for r in records} == {"ok"}
        report = instance.fetch_materializations(AssetKey("sweep_report"), limit=1).records[0]
        assert report.asset_materialization.metadata["completed_trials"].value == 6
    # The experiment step, itself a Ray task, fanned its trials out over both nodes (its CPU is lent
    # back while it waits on them).
    assert len(nodes) == 2, nodes
    print(f"\nray_executor on the cluster: launch→STEP_START per step: "
          f"mean {sum(overheads) / len(overheads):.2f}s, max {max(overheads):.2f}s over {len(overheads)} steps")


def test_ray_executor_on_the_embedded_local_ray(tmp_path, denoise_data):
    sweep = write_sweep(tmp_path / "sweep.yaml", denoise_data, name="embedded", trials=2)
    env = ray_env(tmp_path, sweep)
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    for command in materialize_commands(trial_keys(load_sweep(sweep)))[:2]:
        materialize(env, command)
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs()
        # The embedded Ray is on loopback only: its node (and so every step worker) is 127.0.0.1.
        overheads = check_steps_ran_in_ray_workers(instance, [r.run_id for r in runs], ["127.0.0.1"])
        assert instance.get_materialized_partitions(AssetKey("experiment_results")) == {"trial-000", "trial-001"}
    print(f"\nray_executor embedded: launch→STEP_START per step: mean {sum(overheads) / len(overheads):.2f}s")


def _failures(instance, run_id):
    return [e for e in instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)]


def test_a_failing_step_fails_the_run(tmp_path, cluster, tiny_sweep):
    env = ray_env(tmp_path, tiny_sweep, cluster)
    command = [str(VENV_BIN / "dagster"), "asset", "materialize", "-m", THIS_MODULE, "--select", "boom"]
    result = materialize(env, command, expect_ok=False)
    assert result.returncode != 0
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        (run,) = instance.get_runs()
        assert run.status == DagsterRunStatus.FAILURE
        (failure,) = _failures(instance, run.run_id)
        assert "boom: this step fails on purpose" in str(failure.dagster_event.step_failure_data.error)
        worker = step_workers(instance, run.run_id)["boom"]
        assert failure.dagster_event.pid == int(worker["pid"])  # reported by the step's own Ray worker
        starting = next(iter(instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_WORKER_STARTING)))
        assert starting.dagster_event.engine_event_data.metadata["num_cpus"].value == 0.0  # the op tag


def test_a_killed_step_worker_is_failed_by_the_health_check(tmp_path, cluster, tiny_sweep):
    pid_file = tmp_path / "sleeper.pid"
    env = ray_env(tmp_path, tiny_sweep, cluster, **{PID_FILE_ENV: str(pid_file)})
    command = [str(VENV_BIN / "dagster"), "asset", "materialize", "-m", THIS_MODULE, "--select", "sleeper"]
    proc = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not pid_file.exists() or not pid_file.read_text():
            assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
            assert time.monotonic() < deadline, "the sleeper step never started"
            time.sleep(0.2)
        worker_pid = int(pid_file.read_text())
        assert worker_pid != proc.pid
        os.kill(worker_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = proc.communicate(timeout=60)
        detected_in = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, output.decode()[-3000:]
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        (run,) = instance.get_runs()
        assert run.status == DagsterRunStatus.FAILURE
        (failure,) = _failures(instance, run.run_id)
        message = str(failure.dagster_event.step_failure_data.error.message)
        assert "failed health check" in message and "Ray task ended" in message, message
        assert failure.dagster_event.pid == proc.pid  # reported by the run process: the worker was dead
        assert step_workers(instance, run.run_id)["sleeper"]["pid"] == str(worker_pid)
    print(f"\nkilled step worker detected and the run ended in {detected_in:.1f}s")
    assert detected_in < 30


def test_step_env_vars_carry_the_instance_and_resolved_sweep(monkeypatch, tmp_path):
    from imgtune_assets.defs.executor import step_env_vars

    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: x\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMGTUNE_SWEEP", "s.yaml")  # relative here: the worker gets the absolute path
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_PG_HOST", "127.0.0.1")
    monkeypatch.delenv("IMGTUNE_OUTPUT_DIR", raising=False)
    env = step_env_vars({"EXTRA": "1", "OMP_NUM_THREADS": "2"})
    assert env["IMGTUNE_SWEEP"] == str(sweep)
    assert Path(env["IMGTUNE_OUTPUT_DIR"]).is_absolute()
    assert env["DAGSTER_HOME"] == str(tmp_path / "home") and env["DAGSTER_PG_HOST"] == "127.0.0.1"
    assert env["EXTRA"] == "1" and env["OMP_NUM_THREADS"] == "2"
    assert len(env["IMGTUNE_SWEEP_SHA"]) == 16
