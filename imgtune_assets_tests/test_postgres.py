"""The Postgres-backed instance (deploy/postgres/dagster.yaml) against a real PostgreSQL server on
127.0.0.1 (imgtune_assets_tests/support/pgserver.py), a real ``dagster-daemon run`` and one shared two-node
Ray cluster on loopback:

* the config file holds no credentials, every connection field comes from DAGSTER_PG_*, and Dagster
  1.13 accepts ``{env: DAGSTER_PG_PORT}`` for the port (IntSource) — checked on a real instance;
* ``dagster job backfill -j pgsweep_trials`` (the sweep's trials job) queues one run per trial; the daemon launches them up to
  ``max_concurrent_runs`` (4) with ``IMGTUNE_EXECUTOR=ray``: four runs write to the one Postgres
  instance at the same time, from the run processes and from the Ray workers running their steps.

PostgreSQL missing is a FAILURE here, not a skip: CI installs it (`apt-get install -y postgresql`).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from imgtune_assets.cli import sweep_commands
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.executor import STEP_WORKER_MESSAGE
from imgtune_assets.defs.jobs import trials_job_name
from imgtune_assets.defs.keys import asset_key
from imgtune_assets_tests.support import (
    CODE,
    FINISHED_STATUSES,
    PROJECT,
    cli_env,
    dagster_cli,
    run_checked,
    run_failures,
    start_daemon,
    wait_for,
    write_sweep,
)
from imgtune_assets_tests.support.pgserver import PgServer, PostgresMissing, find_pg_bin, start_postgres
from imgtune_assets_tests.support.raycluster import start_ray_cluster

PG_CONFIG = PROJECT / "deploy" / "postgres" / "dagster.yaml"
PG_VARS = ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB")
TRIALS = [f"trial-{i:03d}" for i in range(4)]


def test_postgresql_server_programs_are_installed():
    missing = None
    try:
        bin_dir = find_pg_bin()
    except PostgresMissing as exc:
        missing = str(exc)
    if missing:  # a failure, not a skip: CI installs PostgreSQL
        pytest.fail(missing, pytrace=False)
    assert (bin_dir / "initdb").exists() and (bin_dir / "pg_ctl").exists()


@pytest.fixture(scope="module")
def pg():
    missing = None
    try:
        server = start_postgres()
    except PostgresMissing as exc:
        missing = str(exc)
    if missing:
        pytest.fail(missing, pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def postgres_home(folder: Path) -> Path:
    """A DAGSTER_HOME holding deploy/postgres/dagster.yaml, as deploy/README.md tells users to make."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(PG_CONFIG, folder / "dagster.yaml")
    return folder


def test_postgres_config_reads_every_connection_field_from_the_environment(tmp_path, pg: PgServer, monkeypatch,
                                                                          caplog):
    config = yaml.safe_load(PG_CONFIG.read_text())
    fields = config["storage"]["postgres"]["postgres_db"]
    assert {name: fields[name] for name in ("hostname", "port", "username", "password", "db_name")} == {
        "hostname": {"env": "DAGSTER_PG_HOST"}, "port": {"env": "DAGSTER_PG_PORT"},
        "username": {"env": "DAGSTER_PG_USER"}, "password": {"env": "DAGSTER_PG_PASSWORD"},
        "db_name": {"env": "DAGSTER_PG_DB"}}
    # The public run_queue key (a run_coordinator block would name Dagster's private module path).
    assert "run_coordinator" not in config and config["run_queue"]["max_concurrent_runs"] >= 4
    top = yaml.safe_load((PROJECT / "dagster.yaml").read_text())
    for key in ("telemetry", "run_monitoring", "nux"):
        assert config[key] == top[key], key
    assert pg.password not in PG_CONFIG.read_text()
    # The test server listens on loopback only.
    listening = {c.laddr.ip for c in psutil.Process(pg.pid()).net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}, listening

    home = postgres_home(tmp_path / "home")
    for key, value in pg.env.items():
        monkeypatch.setenv(key, value)
    with DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_coordinator.get_run_queue_config().max_concurrent_runs >= 4
        assert instance.run_coordinator.dequeue_use_threads and instance.run_coordinator.dequeue_num_workers == 4
        assert instance.run_monitoring_enabled and not instance.telemetry_enabled
        assert instance.get_runs() == []
        # The instance ref every run worker and step worker opens keeps the env references, not values.
        stored = instance.get_ref().storage_data.config_yaml
        assert "DAGSTER_PG_PASSWORD" in stored and pg.password not in stored
    # The values really come from the environment: a wrong password is refused by the server.
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "wrong")
    with pytest.raises(Exception, match="DB connection"):
        DagsterInstance.from_config(str(home))
    assert "password authentication failed" in caplog.text
    assert not list(home.glob("**/*.db")), "no SQLite database may appear in a Postgres DAGSTER_HOME"


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant (an end at the same instant as a start does not overlap)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda e: (e[0], e[1]))
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


TIMELINE_EVENTS = ("RUN_DEQUEUED", "RUN_STARTING", "RUN_START", "STEP_WORKER_STARTING", "STEP_START", "STEP_SUCCESS",
                   "RUN_SUCCESS")


def _timeline(instance: DagsterInstance, records) -> str:
    """Per run, when each stage happened (seconds after the first run was created)."""
    t0 = min(r.create_timestamp.timestamp() for r in records)
    lines = []
    for record in sorted(records, key=lambda r: r.start_time):
        marks = [f"{e.dagster_event.event_type.name.lower()} {e.timestamp - t0:.1f}"
                 for e in instance.all_logs(record.dagster_run.run_id)
                 if e.is_dagster_event and e.dagster_event.event_type.name in TIMELINE_EVENTS]
        lines.append(f"  {record.dagster_run.tags['dagster/partition']}: " + ", ".join(marks))
    return "\n".join(lines)


class ConnectionSampler:
    """Samples the server's client connections (pg_stat_activity) in a thread, for the peak."""

    def __init__(self, pg: PgServer, interval: float = 0.1):
        self._conn = pg.connect()
        self._conn.autocommit = True
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        with self._conn.cursor() as cur:
            while not self._stop.is_set():
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
                self.peak = max(self.peak, cur.fetchone()[0] - 1)  # minus this sampler's own connection
                self._stop.wait(interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        self._conn.close()
        return self.peak


def test_four_backfill_runs_at_once_on_postgres_with_the_ray_executor(tmp_path, pg: PgServer, denoise_data):
    began = time.monotonic()
    phases: dict[str, float] = {}
    sweep = write_sweep(tmp_path / "pg.yaml", denoise_data, name="pgsweep", trials=len(TRIALS))
    env = cli_env(tmp_path, sweep, **pg.env)
    postgres_home(Path(env["DAGSTER_HOME"]))  # replaces the SQLite dagster.yaml cli_env put there
    job_name = trials_job_name(load_sweep(sweep))
    results_key = asset_key("pgsweep", "experiment_results")

    # 1. The trials' inputs, in the CLI's own process (default executor), into the Postgres instance.
    run_checked(sweep_commands("pgsweep", TRIALS)[0], env)
    phases["inputs"] = time.monotonic() - began

    # 2. One shared Ray cluster for all runs (2 nodes × 2 logical CPUs: four step tasks at once). Its
    #    nodes are started WITHOUT DAGSTER_PG_*: a step opens the Postgres instance itself, with the
    #    variables ray_executor forwards from the run process.
    assert not any(key in os.environ for key in PG_VARS)
    cluster = start_ray_cluster(tmp_path / "ray", nodes=2, num_cpus=2)
    phases["ray"] = time.monotonic() - began
    daemon = sampler = instance = None
    try:
        run_env = {**env, **cluster.env, "IMGTUNE_EXECUTOR": "ray", "IMGTUNE_RAY_ADDRESS": cluster.address}
        run_env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # a client of a multi-node cluster must not carry it
        with pytest.MonkeyPatch.context() as mp:
            for key, value in pg.env.items():
                mp.setenv(key, value)
            instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
        # 3. One run per partition, queued. The daemon starts only after all four are queued, so its
        #    first dequeue sees them all and launches them together (max_concurrent_runs: 4, threads).
        dagster_cli(["job", "backfill", "-j", job_name, "--partitions", ",".join(TRIALS), "--noprompt",
                     *CODE], run_env)
        queued = instance.get_run_records(filters=RunsFilter(job_name=job_name))
        assert sorted(r.dagster_run.status.value for r in queued) == ["QUEUED"] * len(TRIALS)
        phases["backfill queued"] = time.monotonic() - began
        sampler = ConnectionSampler(pg)
        daemon = start_daemon(run_env, tmp_path / "daemon.log")
        daemon_started = time.time()

        def all_finished():
            records = instance.get_run_records(filters=RunsFilter(job_name=job_name))
            if len(records) == len(TRIALS) and all(r.dagster_run.status in FINISHED_STATUSES for r in records):
                return records
            if not daemon.alive():
                raise AssertionError(f"dagster-daemon exited:\n{daemon.tail()}")
            return None

        records = wait_for(all_finished, timeout=240, interval=0.5,
                           what=lambda: f"{len(TRIALS)} backfill runs to finish\n{daemon.tail()}")
        phases["runs done"] = time.monotonic() - began
        peak_connections = sampler.stop()
        sampler = None
        assert all(r.dagster_run.status == DagsterRunStatus.SUCCESS for r in records), run_failures(
            instance, records, events=("STEP_FAILURE", "RUN_FAILURE", "ENGINE_EVENT"))

        # At least four runs in flight at once: RUN_START .. RUN_SUCCESS intervals from the instance.
        intervals = [(r.start_time, r.end_time) for r in records]
        overlap = _max_overlap(intervals)
        first_start, last_start = min(s for s, _ in intervals), max(s for s, _ in intervals)
        first_end = min(e for _, e in intervals)
        assert overlap >= 4, f"at most {overlap} runs were in flight at once: {intervals}"

        # Every partition recorded exactly once, by its own run.
        by_run = {r.dagster_run.run_id: r.dagster_run.tags["dagster/partition"] for r in records}
        assert sorted(by_run.values()) == TRIALS
        mats = instance.fetch_materializations(results_key, limit=100).records
        recorded = sorted((m.run_id, m.asset_materialization.partition) for m in mats)
        assert recorded == sorted(by_run.items()), recorded
        assert instance.get_materialized_partitions(results_key) == set(TRIALS)
        for m in mats:
            assert m.asset_materialization.metadata["status"].value == "ok"
            assert m.asset_materialization.metadata["images_scored"].value == 6

        # Each run's step ran in a Ray worker of the shared cluster and wrote its events from there.
        nodes = set()
        for run_id in by_run:
            worker_events = [e for e in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)
                             if STEP_WORKER_MESSAGE in (e.dagster_event.message or "")]
            assert len(worker_events) == 1, f"run {run_id}: {[e.message for e in worker_events]}"
            metadata = worker_events[0].dagster_event.engine_event_data.metadata
            nodes.add(metadata["ray_node_ip"].value)
        assert nodes <= set(cluster.node_ips), nodes
        assert not list(Path(env["DAGSTER_HOME"]).glob("**/*.db")), "a SQLite database appeared in DAGSTER_HOME"
        # The steps opened Postgres with the password, which no node wrote into its logs (Ray's
        # runtime-env agent logs every task's env_vars): it went as the tasks' argument.
        leaked = [f for f in cluster.temp_dir.rglob("*") if f.is_file() and pg.password.encode() in f.read_bytes()]
        assert not leaked, leaked
        assert daemon.alive(), daemon.tail()
        # Short-lived connections (dagster-postgres uses no pool): far below PostgreSQL's default of 100.
        assert peak_connections < 100, peak_connections

        print(f"\npostgres backfill: {len(records)} runs, max {overlap} in flight at once; starts spread "
              f"{last_start - first_start:.1f}s, all started {first_end - last_start:.1f}s before the first ended; "
              f"first start {first_start - daemon_started:.1f}s after the daemon started, last end "
              f"{max(e for _, e in intervals) - daemon_started:.1f}s; run seconds "
              f"{sorted(round(e - s, 1) for s, e in intervals)}; step nodes {sorted(nodes)}; "
              f"peak Postgres client connections {peak_connections}; "
              f"phases {({k: round(v, 1) for k, v in phases.items()})}")
        print(_timeline(instance, records))
    finally:
        if sampler is not None:
            sampler.stop()
        if instance is not None:
            instance.dispose()
        if daemon is not None:
            daemon.stop()
        cluster.stop()
