"""End to end through a real ``dagster-daemon run`` on a temporary DAGSTER_HOME:

1. ``nightly_sweep`` (cron ``* * * * *`` via IMGTUNE_SCHEDULE_CRON, started with
   ``dagster schedule start``) launches the whole sweep as ONE ranged run that succeeds;
2. ``new_images`` (started with ``dagster sensor start``) sees an image added to the data folder and
   launches exactly one sweep;
3. ``dagster job backfill -j imgtune_trials --partitions ... --noprompt`` queues one run per trial and
   the daemon runs them; each re-run trial gains a materialization.
"""

from __future__ import annotations

import time
from datetime import datetime

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter

from imgtune_assets.core.demo_data import make_denoise_set
from imgtune_assets_tests.conftest import cli_env, write_sweep
from imgtune_assets_tests.uitools import CODE, dagster_cli, start_daemon, wait_for

TRIALS = ["trial-000", "trial-001", "trial-002", "trial-003"]
FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def _runs(instance: DagsterInstance, **tags: str):
    return instance.get_run_records(filters=RunsFilter(tags=tags))


def _finished(instance: DagsterInstance, **tags: str):
    records = _runs(instance, **tags)
    return records if records and all(r.dagster_run.status in FINISHED for r in records) else None


def _errors(instance: DagsterInstance, records) -> str:
    """The failure messages of any failed runs, for assertion messages."""
    out = []
    for record in records:
        if record.dagster_run.status != DagsterRunStatus.SUCCESS:
            for event in instance.all_logs(record.dagster_run.run_id):
                if event.is_dagster_event and event.dagster_event.event_type_value in ("STEP_FAILURE", "RUN_FAILURE"):
                    out.append(f"{record.dagster_run.run_id}: {event.dagster_event.message}\n"
                               f"{getattr(event.dagster_event.event_specific_data, 'error', '')}")
    return "\n".join(out)[-6000:]


def _trial_materializations(instance: DagsterInstance) -> dict[str, int]:
    records = instance.fetch_materializations(AssetKey("experiment_results"), limit=1000).records
    counts: dict[str, int] = {}
    for record in records:
        key = record.asset_materialization.partition
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("daemon")
    data = tmp / "data"
    make_denoise_set(data, count=6, size=96)
    sweep = write_sweep(tmp / "tiny.yaml", data, name="nightly", trials=len(TRIALS))
    env = cli_env(tmp, sweep, IMGTUNE_SCHEDULE_CRON="* * * * *", IMGTUNE_SENSOR_INTERVAL_SECONDS="5")
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

    # 1. The schedule: every minute in this test; one tick → one ranged run of the whole sweep.
    dagster_cli(["schedule", "start", "nightly_sweep", *CODE], env)
    try:
        scheduled = wait_for(lambda: _finished(instance, **{"imgtune/trigger": "schedule"}), timeout=150,
                             interval=2, what=f"a scheduled sweep\n{daemon.tail()}")
    finally:
        dagster_cli(["schedule", "stop", "nightly_sweep", *CODE], env)
    scheduled = sorted(scheduled, key=lambda r: r.create_timestamp)
    run = scheduled[0].dagster_run
    assert run.status == DagsterRunStatus.SUCCESS, _errors(instance, scheduled)
    assert run.job_name == "imgtune_sweep"
    assert run.tags["dagster/asset_partition_range_start"] == TRIALS[0]
    assert run.tags["dagster/asset_partition_range_end"] == TRIALS[-1]
    scheduled_for = datetime.fromisoformat(run.tags["imgtune/scheduled_for"])
    print(f"\nschedule: tick {scheduled_for:%H:%M:%S} → run success after "
          f"{scheduled[0].end_time - scheduled_for.timestamp():.1f}s "
          f"(run itself {scheduled[0].end_time - scheduled[0].start_time:.1f}s)")
    # Every asset of the sweep in that one run, one materialization per trial.
    for key in ("image_manifest", "run_settings", "sweep_report"):
        event = instance.get_latest_materialization_event(AssetKey(key))
        assert event is not None and event.run_id == run.run_id, key
    assert instance.get_materialized_partitions(AssetKey("experiment_results")) == set(TRIALS)
    assert _trial_materializations(instance) == {key: 1 for key in TRIALS}
    # A tick may have fired just before the stop: let it finish so the sensor sees no sweep in progress.
    wait_for(lambda: _finished(instance), timeout=120, interval=2, what="scheduled runs to finish")
    assert all(r.dagster_run.status == DagsterRunStatus.SUCCESS for r in _runs(instance)), _errors(instance, _runs(instance))

    # 2. The sensor: a new image appears → exactly one sweep over the new images.
    before = {r.dagster_run.run_id for r in _runs(instance)}
    dagster_cli(["sensor", "start", "new_images", *CODE], env)
    added_at = time.time()
    try:
        make_denoise_set(deployment["data"], count=7, size=96)  # adds scene_006, keeps the six others
        sensed = wait_for(lambda: _finished(instance, **{"imgtune/trigger": "new_images"}), timeout=120,
                          interval=2, what=f"a sweep requested by new_images\n{daemon.tail()}")
        time.sleep(6)  # one more sensor interval: nothing else may be requested
        assert len(_runs(instance, **{"imgtune/trigger": "new_images"})) == 1
    finally:
        dagster_cli(["sensor", "stop", "new_images", *CODE], env)
    assert sensed[0].dagster_run.status == DagsterRunStatus.SUCCESS, _errors(instance, sensed)
    print(f"sensor: image added → run success after {sensed[0].end_time - added_at:.1f}s")
    manifest = instance.get_latest_materialization_event(AssetKey("image_manifest")).asset_materialization
    assert manifest.metadata["usable_images"].value == 7
    assert sensed[0].dagster_run.tags["imgtune/images_content_hash"] == manifest.metadata["content_hash"].value
    assert not before & {r.dagster_run.run_id for r in _runs(instance, **{"imgtune/trigger": "new_images"})}

    # 3. A multi-run backfill from the CLI, run by the daemon: one run per trial partition.
    counts = _trial_materializations(instance)
    started = time.time()
    dagster_cli(["job", "backfill", "-j", "imgtune_trials", "--partitions", "trial-000,trial-002", "--noprompt",
                 *CODE], env)
    backfill_runs = wait_for(
        lambda: (lambda rs: rs if len(rs) == 2 and all(r.dagster_run.status in FINISHED for r in rs) else None)(
            [r for r in _runs(instance) if r.dagster_run.job_name == "imgtune_trials"]),
        timeout=150, interval=2, what=f"two backfill runs\n{daemon.tail()}")
    assert all(r.dagster_run.status == DagsterRunStatus.SUCCESS for r in backfill_runs), _errors(instance, backfill_runs)
    assert sorted(r.dagster_run.tags["dagster/partition"] for r in backfill_runs) == ["trial-000", "trial-002"]
    print(f"backfill: 2 runs done {max(r.end_time for r in backfill_runs) - started:.1f}s after the command")
    after = _trial_materializations(instance)
    assert after["trial-000"] == counts["trial-000"] + 1
    assert after["trial-002"] == counts["trial-002"] + 1
    assert after["trial-001"] == counts["trial-001"]
    assert daemon.alive(), daemon.tail()
