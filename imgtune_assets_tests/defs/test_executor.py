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
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    asset,
    define_asset_job,
    in_process_executor,
    multiprocess_executor,
)

from imgtune_assets.cli import sweep_commands
from imgtune_assets.core.sampling import trial_keys
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.keys import asset_key
from imgtune_assets.defs.executor import (
    NUM_CPUS_TAG,
    STEP_WORKER_MESSAGE,
    RayStepHandler,
    executor_from_environment,
    ray_executor,
)
from imgtune_assets_tests.conftest import PROJECT, VENV_BIN, cli_env, write_sweep
from imgtune_assets_tests.support.processes import ended_after

PID_FILE_ENV = "IMGTUNE_TEST_PID_FILE"
HOLD_RAY_ENV = "IMGTUNE_TEST_HOLD_RAY_SECONDS"
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


if os.environ.get(HOLD_RAY_ENV):
    # For the termination test only (set in its code server's environment, so in the run process):
    # the run process keeps its Ray connection for a while after the executor is done. A driver's
    # disconnect ends its Ray job, and Ray then kills the job's workers anyway; holding it open shows
    # that the step's worker was killed by the executor's ray.cancel, not by the run process exiting.
    _close_now = RayStepHandler.close

    def _close_later(self) -> None:
        time.sleep(float(os.environ[HOLD_RAY_ENV]))
        _close_now(self)

    RayStepHandler.close = _close_later

# A job of its own for the termination test (a run launched through the instance's run launcher).
sleeper_job = define_asset_job("sleeper_job", selection=[sleeper])

defs = Definitions(
    assets=[boom, sleeper],
    jobs=[sleeper_job],
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


@pytest.mark.parametrize("name, shared", [("in_process", True), ("multiprocess", False), ("ray", False)])
def test_steps_share_the_run_process_only_with_the_in_process_executor(tmp_path, name, shared):
    """Asked of the executor the definitions set (as a run's context has it), whatever the environment
    says: definitions built with an explicit executor are not second-guessed by $IMGTUNE_EXECUTOR."""
    from dagster import in_process_executor, multiprocess_executor

    from imgtune_assets.core.sweepfile import load_sweep
    from imgtune_assets.defs.executor import ray_executor, steps_share_the_run_process
    from imgtune_assets.defs.factory import build_definitions

    executor = {"in_process": in_process_executor, "multiprocess": multiprocess_executor, "ray": ray_executor}[name]
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(f"name: s\ndata_dir: {tmp_path}\nobjective: {{metric: psnr}}\ntrials: 2\n"
                          "pipeline:\n- op: gaussian_blur\n  ksize: {type: odd, low: 3, high: 5}\n")
    defs = build_definitions([load_sweep(sweep_file)], executor=executor, output_dir=str(tmp_path / "out"))
    job = defs.resolve_job_def("s_sweep")
    assert steps_share_the_run_process(job.executor_def) is shared


def test_whole_sweep_with_ray_executor_on_a_two_node_cluster(tmp_path, cluster, denoise_data):
    # Tasks of tens of milliseconds (non-local means), not a few: with millisecond tasks the whole fan-out
    # can finish on the free node before Ray sees the step's own worker blocked and lends its CPU back.
    pipeline = [{"op": "nl_means", "h": {"type": "float", "low": 3, "high": 20}, "template_window_size": 7,
                 "search_window_size": 21}]
    sweep = write_sweep(tmp_path / "sweep.yaml", denoise_data, name="onray", trials=6, chunk_size=1,
                        pipeline=pipeline)
    env = ray_env(tmp_path, sweep, cluster)
    keys = trial_keys(load_sweep(sweep))
    for command in sweep_commands("onray", keys):
        materialize(env, command)

    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs()
        assert len(runs) == 3
        overheads = check_steps_ran_in_ray_workers(instance, [r.run_id for r in runs], cluster.node_ips)
        assert instance.get_materialized_partitions(asset_key("onray", "experiment_results")) == set(keys)
        records = instance.fetch_materializations(asset_key("onray", "experiment_results"), limit=100).records
        nodes = set().union(*(r.asset_materialization.metadata["nodes"].value for r in records))
        assert {r.asset_materialization.metadata["status"].value for r in records} == {"ok"}
        report = instance.fetch_materializations(asset_key("onray", "sweep_report"), limit=1).records[0]
        assert report.asset_materialization.metadata["completed_trials"].value == 6
    # The experiment step, itself a Ray task, fanned its trials out over both nodes (its CPU is lent
    # back while it waits on them).
    assert len(nodes) == 2, nodes
    print(f"\nray_executor on the cluster: launch→STEP_START per step: "
          f"mean {sum(overheads) / len(overheads):.2f}s, max {max(overheads):.2f}s over {len(overheads)} steps")


def test_ray_executor_on_the_embedded_local_ray(tmp_path, denoise_data):
    sweep = write_sweep(tmp_path / "sweep.yaml", denoise_data, name="embedded", trials=2)
    env = ray_env(tmp_path, sweep)
    for command in sweep_commands("embedded", trial_keys(load_sweep(sweep)))[:2]:
        materialize(env, command)
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs()
        # The embedded Ray is on loopback only: its node (and so every step worker) is 127.0.0.1, as the
        # step workers themselves report it (without the loopback switch Ray would advertise the
        # machine's own address).
        overheads = check_steps_ran_in_ray_workers(instance, [r.run_id for r in runs], ["127.0.0.1"])
        assert instance.get_materialized_partitions(asset_key("embedded", "experiment_results")) == {
            "trial-000", "trial-001"}
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


def _sleeper_run(env) -> subprocess.Popen:
    """``dagster asset materialize`` of the sleeper, once its step's worker has written its pid."""
    pid_file = Path(env[PID_FILE_ENV])
    command = [str(VENV_BIN / "dagster"), "asset", "materialize", "-m", THIS_MODULE, "--select", "sleeper"]
    proc = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not pid_file.exists() or not pid_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            output, _ = proc.communicate()
            raise AssertionError(f"the sleeper step never started:\n{output.decode()[-4000:]}")
        time.sleep(0.2)
    return proc


def _failed_run(env, proc, output: bytes) -> tuple[str, int, str | None]:
    """The one run of the instance, failed by one step failure: (its message, the pid that reported it,
    the sleeper's step worker pid)."""
    assert proc.returncode != 0, output.decode()[-3000:]
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        (run,) = instance.get_runs()
        assert run.status == DagsterRunStatus.FAILURE
        (failure,) = _failures(instance, run.run_id)
        worker = step_workers(instance, run.run_id).get("sleeper", {}).get("pid")
        return str(failure.dagster_event.step_failure_data.error.message), failure.dagster_event.pid, worker


def test_a_killed_step_worker_is_failed_by_the_health_check(tmp_path, cluster, tiny_sweep):
    pid_file = tmp_path / "sleeper.pid"
    env = ray_env(tmp_path, tiny_sweep, cluster, **{PID_FILE_ENV: str(pid_file)})
    proc = _sleeper_run(env)
    worker_pid = int(pid_file.read_text())

    def another_process() -> None:
        assert worker_pid != proc.pid

    # (the sleeper sleeps 120 s: a run that waited for it, or for a retry of it, runs into the timeout)
    output, _, detected_in = ended_after(proc, another_process, lambda: os.kill(worker_pid, signal.SIGKILL), 110)
    message, reported_by, step_worker = _failed_run(env, proc, output)
    assert "failed health check" in message and "Ray task ended" in message, message
    assert reported_by == proc.pid  # reported by the run process: the worker was dead
    assert step_worker == str(worker_pid)
    print(f"\nkilled step worker detected and the run ended in {detected_in:.1f}s")
    # A check a second: seconds, not the sleeper's 120 (generous for a busy machine).
    assert detected_in < 60


def test_a_cluster_whose_gcs_goes_fails_the_step_by_the_health_check(tmp_path, tiny_sweep):
    """The GCS of the cluster that runs the steps killed (its head's control store): the health check
    sees the step's task lost with its node (the raylet follows its GCS) and the run fails, well before
    Ray's client would end the run process (60 s), which would leave the run shown as started."""
    import psutil

    from imgtune_assets_tests.support.raycluster import start_ray_cluster

    pid_file = tmp_path / "sleeper.pid"
    mine = start_ray_cluster(tmp_path / "cluster", nodes=1, num_cpus=2)
    try:
        env = ray_env(tmp_path, tiny_sweep, mine, **{PID_FILE_ENV: str(pid_file)})
        proc = _sleeper_run(env)

        def kill_gcs() -> None:
            [gcs] = [p for p in map(psutil.Process, mine.pids()) if p.name().startswith("gcs_server")]
            gcs.kill()

        output, _, detected_in = ended_after(proc, lambda: None, kill_gcs, 90)
    finally:
        mine.stop()
    message, _, _ = _failed_run(env, proc, output)
    assert "failed health check" in message and "the Ray node died" in message, message
    print(f"\nthe GCS's loss detected and the run ended in {detected_in:.1f}s")
    assert detected_in < 50, output.decode()[-3000:]


def _ray_step_processes(cluster) -> dict[int, str]:
    """The cluster's processes that are running a Dagster step task (Ray titles them ``ray::<task name>``)."""
    import psutil

    found = {}
    for pid in cluster.pids():
        try:
            title = " ".join(psutil.Process(pid).cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if title.startswith("ray::dagster-step"):
            found[pid] = title
    return found


def _launch_sleeper_run(instance: DagsterInstance, workspace, location_name: str) -> str:
    """Create a run of ``sleeper_job`` from the code server and launch it with the instance's run
    launcher (what the daemon does for a dequeued run), bypassing the queue."""
    location = workspace.get_code_location(location_name)
    repository = next(iter(location.get_repositories().values()))
    remote_job = repository.get_full_job("sleeper_job")
    plan = location.get_execution_plan(remote_job, {}, step_keys_to_execute=None, known_state=None,
                                       instance=instance)
    run = instance.create_run(
        job_name=remote_job.name, run_id=None, run_config={}, status=None, tags=remote_job.tags,
        root_run_id=None, parent_run_id=None, resolved_op_selection=None, op_selection=None,
        step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute,
        job_snapshot=remote_job.job_snapshot, execution_plan_snapshot=plan.execution_plan_snapshot,
        parent_job_snapshot=remote_job.parent_job_snapshot, remote_job_origin=remote_job.get_remote_origin(),
        job_code_origin=remote_job.get_python_origin(), asset_selection=None, asset_check_selection=None,
        asset_graph=repository.asset_graph,
    )
    instance.launch_run(run.run_id, workspace)
    return run.run_id


def test_terminating_a_launched_run_cancels_its_ray_step_tasks(tmp_path, cluster, tiny_sweep):
    """A run launched by the instance's DefaultRunLauncher (on a code server, as the daemon and the UI
    launch runs) and terminated with ``run_launcher.terminate`` (what the UI's Terminate does): the
    run process forwards the interrupt to the executor, whose ``terminate_step`` cancels the step's
    Ray task with force, which kills the Ray worker running the step. The run process holds its Ray
    connection for ``hold`` seconds after the executor ends (HOLD_RAY_ENV), so a worker gone before
    then was killed by the cancel, not by the end of the run's Ray job."""
    import psutil
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import GrpcServerTarget
    from dagster._grpc.client import DagsterGrpcClient

    from imgtune_assets_tests.support import Service, free_port, wait_for

    hold = 30.0  # long enough that the cancel has generous time to act before the run's Ray job ends
    pid_file = tmp_path / "sleeper.pid"
    env = ray_env(tmp_path, tiny_sweep, cluster, **{PID_FILE_ENV: str(pid_file), HOLD_RAY_ENV: str(hold)})
    port, location_name = free_port(), "executor_tests"
    # The code server (and the run process it spawns) gets the Ray cluster's address and token; it
    # runs in its own process group, which the test stops.
    server = Service("code-server", [str(VENV_BIN / "dagster"), "api", "grpc", "-m", THIS_MODULE,
                                     "-h", "127.0.0.1", "-p", str(port), "--location-name", location_name],
                     env, tmp_path / "code-server.log")
    try:
        def server_up():
            assert server.alive(), server.tail()
            try:
                return DagsterGrpcClient(port=port, host="127.0.0.1").ping("x") is not None
            except Exception:  # noqa: BLE001 - not serving yet
                return False
        wait_for(server_up, 60, interval=0.5, what="the code server")
        with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance, WorkspaceProcessContext(
                instance, GrpcServerTarget(host="127.0.0.1", port=port, socket=None,
                                           location_name=location_name)) as process_context:
            assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
            run_id = _launch_sleeper_run(instance, process_context.create_request_context(), location_name)

            def started():
                run = instance.get_run_by_id(run_id)
                assert not run.is_finished, f"run ended {run.status} before its step started\n{server.tail()}"
                return pid_file.exists() and pid_file.read_text()
            worker_pid = int(wait_for(started, 60, interval=0.2, what="the sleeper step to start"))
            assert step_workers(instance, run_id)["sleeper"]["pid"] == str(worker_pid)
            assert worker_pid in _ray_step_processes(cluster), _ray_step_processes(cluster)
            assert instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTED

            terminated_at = time.monotonic()
            assert instance.run_launcher.terminate(run_id) is True

            def worker_gone():
                try:
                    return psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    return True
            wait_for(worker_gone, hold, interval=0.1, what=f"the step's Ray worker (pid {worker_pid}) to exit")
            worker_gone_in = time.monotonic() - terminated_at
            # Killed while the run process was still connected to Ray: by the cancel.
            status_when_gone = instance.get_run_by_id(run_id).status
            assert status_when_gone == DagsterRunStatus.CANCELING, (status_when_gone, worker_gone_in)
            assert worker_gone_in < hold - 5, worker_gone_in
            assert not _ray_step_processes(cluster), _ray_step_processes(cluster)

            run = wait_for(lambda: (r := instance.get_run_by_id(run_id)).is_finished and r, hold + 30,
                           interval=0.2, what="the terminated run to finish")
            run_ended_in = time.monotonic() - terminated_at

            # Dagster's termination outcome: CANCELED (not FAILURE); the step neither succeeded nor failed.
            assert run.status == DagsterRunStatus.CANCELED, run.status
            assert run_ended_in >= hold - 1, run_ended_in  # the hold did apply in the run process
            messages = [e.message or "" for e in instance.all_logs(run_id)]
            assert any("Executor received termination signal, forwarding to steps" in m for m in messages), messages
            assert any(m.startswith("Cancelled the Ray task of step sleeper") for m in messages), messages
            assert not instance.all_logs(run_id, of_type={DagsterEventType.STEP_SUCCESS,
                                                          DagsterEventType.STEP_FAILURE})
            assert not _ray_step_processes(cluster), _ray_step_processes(cluster)
    finally:
        server.stop()
    print(f"\nthe step's Ray worker was gone {worker_gone_in:.1f}s after terminate; "
          f"the run was CANCELED after {run_ended_in:.1f}s (Ray connection held {hold:g}s)")


def test_step_env_vars_carry_the_instance_and_resolved_sweep(monkeypatch, tmp_path):
    from imgtune_assets.defs.executor import step_env_vars, step_secrets

    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: x\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMGTUNE_SWEEP", "s.yaml")  # relative here: the worker gets the absolute path
    monkeypatch.delenv("IMGTUNE_SWEEPS_DIR", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_PG_HOST", "127.0.0.1")
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "s3cret")
    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", "1000")
    monkeypatch.delenv("IMGTUNE_OUTPUT_DIR", raising=False)
    env = step_env_vars({"EXTRA": "1", "OMP_NUM_THREADS": "2"})
    # The password goes as the task's argument: Ray logs a task's runtime_env (env_vars too) on every node.
    assert "DAGSTER_PG_PASSWORD" not in env and step_secrets() == {"DAGSTER_PG_PASSWORD": "s3cret"}
    assert env["DAGSTER_EVENT_BATCH_SIZE"] == "1000"  # Postgres batches the step's events only with it
    assert env["IMGTUNE_SWEEP"] == str(sweep)
    assert "IMGTUNE_SWEEPS_DIR" not in env
    assert Path(env["IMGTUNE_OUTPUT_DIR"]).is_absolute()
    assert env["DAGSTER_HOME"] == str(tmp_path / "home") and env["DAGSTER_PG_HOST"] == "127.0.0.1"
    assert env["EXTRA"] == "1" and env["OMP_NUM_THREADS"] == "2"
    assert len(env["IMGTUNE_SWEEP_SHA"]) == 16
    sweep.write_text("name: y\n")
    assert step_env_vars()["IMGTUNE_SWEEP_SHA"] != env["IMGTUNE_SWEEP_SHA"]  # a changed sweep: fresh workers


def test_step_env_vars_carry_the_resolved_sweeps_folder(monkeypatch, tmp_path):
    from imgtune_assets.core.paths import BUNDLED_SWEEPS
    from imgtune_assets.defs.executor import step_env_vars

    folder = tmp_path / "sweeps"
    folder.mkdir()
    (folder / "a.yaml").write_text("name: a\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMGTUNE_SWEEP", raising=False)
    monkeypatch.setenv("IMGTUNE_SWEEPS_DIR", "sweeps")  # relative here: the worker gets the absolute path
    env = step_env_vars()
    assert env["IMGTUNE_SWEEPS_DIR"] == str(folder)
    assert "IMGTUNE_SWEEP" not in env
    first = env["IMGTUNE_SWEEP_SHA"]
    assert len(first) == 16
    (folder / "b.yml").write_text("name: b\n")  # a sweep added to the folder: fresh workers
    second = step_env_vars()["IMGTUNE_SWEEP_SHA"]
    assert second != first
    (folder / ".hidden.yaml").write_text("name: h\n")  # not a sweep file of the folder
    (folder / "notes.txt").write_text("x")
    assert step_env_vars()["IMGTUNE_SWEEP_SHA"] == second

    # Both set: both go through, absolute (IMGTUNE_SWEEP wins in the worker, as here).
    monkeypatch.setenv("IMGTUNE_SWEEP", "sweeps/a.yaml")
    env = step_env_vars()
    assert env["IMGTUNE_SWEEP"] == str(folder / "a.yaml") and env["IMGTUNE_SWEEPS_DIR"] == str(folder)

    # Neither set: the default sweeps folder, as this process finds it.
    monkeypatch.delenv("IMGTUNE_SWEEP")
    monkeypatch.setenv("IMGTUNE_SWEEPS_DIR", "  ")  # blank counts as unset
    env = step_env_vars()
    assert env["IMGTUNE_SWEEPS_DIR"] == str(Path(BUNDLED_SWEEPS).resolve())
    assert "IMGTUNE_SWEEP" not in env


def test_a_step_s_secrets_are_in_its_worker_s_environment_only_while_it_runs(monkeypatch):
    from imgtune_assets.defs.executor import _environment

    monkeypatch.delenv("DAGSTER_PG_PASSWORD", raising=False)
    monkeypatch.setenv("DAGSTER_PG_USER", "before")
    with _environment({"DAGSTER_PG_PASSWORD": "s3cret", "DAGSTER_PG_USER": "step"}):
        assert (os.environ["DAGSTER_PG_PASSWORD"], os.environ["DAGSTER_PG_USER"]) == ("s3cret", "step")
    assert "DAGSTER_PG_PASSWORD" not in os.environ and os.environ["DAGSTER_PG_USER"] == "before"
    with pytest.raises(RuntimeError), _environment({"DAGSTER_PG_PASSWORD": "s3cret"}):
        raise RuntimeError("the step failed")
    assert "DAGSTER_PG_PASSWORD" not in os.environ  # a reused worker keeps no secret
