"""End to end through a real ``dagster-daemon run`` on a temporary DAGSTER_HOME, for a sweep named
``night-owl`` (asset keys ``night-owl/...``, group and name prefix ``night_owl``):

1. ``night_owl_nightly_sweep`` (cron ``* * * * *`` via IMGTUNE_SCHEDULE_CRON, started with
   ``dagster schedule start``) launches the whole sweep as ONE ranged run of ``night_owl_sweep`` that
   succeeds;
2. ``night_owl_new_images`` (started with ``dagster sensor start``) sees an image added to the data
   folder and launches exactly one sweep (its next tick, after that run, requests nothing);
3. ``dagster job backfill -j night_owl_trials --partitions ... --noprompt`` queues one run per trial
   and the daemon runs them; each re-run trial gains a materialization.
"""

from __future__ import annotations

import time
from datetime import datetime

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from imgtune_assets.core.demo_data import make_denoise_set
from imgtune_assets.defs.keys import asset_key
from imgtune_assets_tests.support import (
    CODE,
    FINISHED_STATUSES,
    cli_env,
    dagster_cli,
    materializations_by_partition,
    run_failures,
    start_daemon,
    wait_for,
    write_sweep,
)

SWEEP = "night-owl"
GROUP = "night_owl"
SCHEDULE, SENSOR = f"{GROUP}_nightly_sweep", f"{GROUP}_new_images"
SWEEP_JOB, TRIALS_JOB = f"{GROUP}_sweep", f"{GROUP}_trials"
SENSOR_INTERVAL = 5
TRIALS = ["trial-000", "trial-001", "trial-002", "trial-003"]


def key(asset: str):
    return asset_key(SWEEP, asset)


def _runs(instance: DagsterInstance, **tags: str):
    return instance.get_run_records(filters=RunsFilter(tags=tags))


def _finished(instance: DagsterInstance, **tags: str):
    records = _runs(instance, **tags)
    return records if records and all(r.dagster_run.status in FINISHED_STATUSES for r in records) else None


def _trial_materializations(instance: DagsterInstance) -> dict[str, int]:
    return {k: len(v) for k, v in materializations_by_partition(instance, key("experiment_results")).items()}


def _sensor_ticks(instance: DagsterInstance, name: str, after: float):
    """The sensor's ticks evaluated after ``after`` (a time.time()), newest first."""
    states = [s for s in instance.all_instigator_state() if s.instigator_name == name]
    assert len(states) == 1, [s.instigator_name for s in states]
    return instance.get_ticks(states[0].instigator_origin_id, states[0].selector_id, after=after)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("daemon")
    data = tmp / "data"
    make_denoise_set(data, count=6, size=96)
    sweep = write_sweep(tmp / "night-owl.yaml", data, name=SWEEP, trials=len(TRIALS))
    env = cli_env(tmp, sweep, IMGTUNE_SCHEDULE_CRON="* * * * *", IMGTUNE_SENSOR_INTERVAL_SECONDS=str(SENSOR_INTERVAL))
    # Create the instance's SQLite storage before any other process opens it: two processes initializing
    # a fresh DAGSTER_HOME at once can both stamp the schema ("alembic_version has more than one head").
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    daemon = start_daemon(env, tmp / "daemon.log")
    try:
        yield {"tmp": tmp, "data": data, "env": env, "instance": instance, "daemon": daemon}
    finally:
        instance.dispose()
        daemon.stop()


def test_nightly_schedule_then_new_images_sensor_then_cli_backfill(deployment):
    env, instance, daemon = deployment["env"], deployment["instance"], deployment["daemon"]
    daemon_log = lambda: daemon.tail()  # noqa: E731 - read when a wait times out

    # 1. The schedule: every minute in this test; one tick → one ranged run of the whole sweep.
    dagster_cli(["schedule", "start", SCHEDULE, *CODE], env)
    try:
        scheduled = wait_for(lambda: _finished(instance, **{"imgtune/trigger": "schedule"}), timeout=150,
                             interval=1, what=lambda: f"a scheduled sweep\n{daemon_log()}")
    finally:
        dagster_cli(["schedule", "stop", SCHEDULE, *CODE], env)
    scheduled = sorted(scheduled, key=lambda r: r.create_timestamp)
    run = scheduled[0].dagster_run
    assert run.status == DagsterRunStatus.SUCCESS, run_failures(instance, scheduled)
    assert run.job_name == SWEEP_JOB
    assert run.tags["imgtune/sweep"] == SWEEP
    assert run.tags["dagster/asset_partition_range_start"] == TRIALS[0]
    assert run.tags["dagster/asset_partition_range_end"] == TRIALS[-1]
    scheduled_for = datetime.fromisoformat(run.tags["imgtune/scheduled_for"])
    print(f"\nschedule: tick {scheduled_for:%H:%M:%S} → run success after "
          f"{scheduled[0].end_time - scheduled_for.timestamp():.1f}s "
          f"(run itself {scheduled[0].end_time - scheduled[0].start_time:.1f}s)")
    # Every asset of the sweep in that one run, one materialization per trial.
    for name in ("image_manifest", "run_settings", "sweep_report"):
        event = instance.get_latest_materialization_event(key(name))
        assert event is not None and event.run_id == run.run_id, name
    assert instance.get_materialized_partitions(key("experiment_results")) == set(TRIALS)
    assert _trial_materializations(instance) == {k: 1 for k in TRIALS}
    # A tick may have fired just before the stop: let it finish so the sensor sees no sweep in progress.
    wait_for(lambda: _finished(instance), timeout=120, interval=1, what="scheduled runs to finish")
    assert all(r.dagster_run.status == DagsterRunStatus.SUCCESS for r in _runs(instance)), \
        run_failures(instance, _runs(instance))

    # 2. The sensor: a new image appears → exactly one sweep over the new images.
    before = {r.dagster_run.run_id for r in _runs(instance)}
    dagster_cli(["sensor", "start", SENSOR, *CODE], env)
    added_at = time.time()
    try:
        make_denoise_set(deployment["data"], count=7, size=96)  # adds scene_006, keeps the six others
        sensed = wait_for(lambda: _finished(instance, **{"imgtune/trigger": "new_images"}), timeout=120,
                          interval=1, what=lambda: f"a sweep requested by {SENSOR}\n{daemon_log()}")
        # The sensor's first tick that starts after that run ended must request nothing more.
        sensed_end = max(r.end_time for r in sensed)
        later = wait_for(lambda: [t for t in _sensor_ticks(instance, SENSOR, after=sensed_end)
                                  if t.status.value != "STARTED"],
                         timeout=SENSOR_INTERVAL * 6, interval=0.5,
                         what=lambda: f"a {SENSOR} tick after the sensed run\n{daemon_log()}")
        assert all(t.status.value == "SKIPPED" and not t.run_ids for t in later), \
            [(t.status, t.run_ids, t.skip_reason) for t in later]
        assert len(_runs(instance, **{"imgtune/trigger": "new_images"})) == 1
    finally:
        dagster_cli(["sensor", "stop", SENSOR, *CODE], env)
    assert sensed[0].dagster_run.status == DagsterRunStatus.SUCCESS, run_failures(instance, sensed)
    assert sensed[0].dagster_run.job_name == SWEEP_JOB
    print(f"sensor: image added → run success after {sensed[0].end_time - added_at:.1f}s")
    manifest = instance.get_latest_materialization_event(key("image_manifest")).asset_materialization
    assert manifest.metadata["usable_images"].value == 7
    assert sensed[0].dagster_run.tags["imgtune/images_content_hash"] == manifest.metadata["content_hash"].value
    assert not before & {r.dagster_run.run_id for r in _runs(instance, **{"imgtune/trigger": "new_images"})}

    # 3. A multi-run backfill from the CLI, run by the daemon: one run per trial partition.
    counts = _trial_materializations(instance)
    started = time.time()
    dagster_cli(["job", "backfill", "-j", TRIALS_JOB, "--partitions", "trial-000,trial-002", "--noprompt", *CODE], env)

    def two_backfill_runs_done():
        records = instance.get_run_records(filters=RunsFilter(job_name=TRIALS_JOB))
        return records if len(records) == 2 and all(r.dagster_run.status in FINISHED_STATUSES for r in records) \
            else None
    backfill_runs = wait_for(two_backfill_runs_done, timeout=150, interval=1,
                             what=lambda: f"two {TRIALS_JOB} backfill runs\n{daemon_log()}")
    assert all(r.dagster_run.status == DagsterRunStatus.SUCCESS for r in backfill_runs), \
        run_failures(instance, backfill_runs)
    assert sorted(r.dagster_run.tags["dagster/partition"] for r in backfill_runs) == ["trial-000", "trial-002"]
    # Each starts its own embedded Ray: dagster.yaml's limit on imgtune/ray=embedded runs them one at a time.
    assert {r.dagster_run.tags["imgtune/ray"] for r in backfill_runs} == {"embedded"}
    first, second = sorted(backfill_runs, key=lambda r: r.start_time)
    assert second.start_time >= first.end_time, (first.start_time, first.end_time, second.start_time)
    print(f"backfill: 2 runs done {max(r.end_time for r in backfill_runs) - started:.1f}s after the command")
    after = _trial_materializations(instance)
    assert after["trial-000"] == counts["trial-000"] + 1
    assert after["trial-002"] == counts["trial-002"] + 1
    assert after["trial-001"] == counts["trial-001"]
    assert daemon.alive(), daemon.tail()
