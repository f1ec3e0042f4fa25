"""nightly_sweep: the cron it runs on, and that one tick asks for the whole sweep as one ranged run."""

from __future__ import annotations

import importlib
from datetime import datetime, timezone

import pytest
from dagster import build_schedule_context, instance_for_test

from imgtune_assets.definitions import defs
from imgtune_assets.defs import schedules
from imgtune_assets.defs.partitions import trial_partitions
from imgtune_assets.defs.schedules import CRON_ENV, DEFAULT_CRON, nightly_sweep, resolve_cron


def test_a_tick_requests_the_whole_sweep_as_one_ranged_run():
    keys = trial_partitions.get_partition_keys()
    when = datetime(2026, 11, 27, 2, 0, tzinfo=timezone.utc)
    with instance_for_test() as instance:
        data = nightly_sweep.evaluate_tick(build_schedule_context(instance=instance, scheduled_execution_time=when))
    assert data.skip_message is None
    [request] = data.run_requests  # one run, not one per trial
    assert request.job_name == "imgtune_sweep"
    assert request.tags["dagster/asset_partition_range_start"] == keys[0]
    assert request.tags["dagster/asset_partition_range_end"] == keys[-1]
    assert request.partition_key_range is not None
    # the range covers every trial partition
    assert trial_partitions.get_partition_keys_in_range(request.partition_key_range) == keys
    assert request.tags["imgtune/trigger"] == "schedule"
    assert request.tags["imgtune/scheduled_for"] == when.isoformat()


def test_the_job_it_targets_holds_the_whole_sweep():
    job = defs.resolve_job_def("imgtune_sweep")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {
        "image_manifest", "run_settings", "experiment_results", "sweep_report"}
    assert job.partitions_def == trial_partitions
    assert defs.resolve_schedule_def("nightly_sweep").job_name == "imgtune_sweep"
    assert defs.resolve_job_def("imgtune_trials").partitions_def == trial_partitions


def test_defaults_to_two_am_utc(monkeypatch):
    monkeypatch.delenv(CRON_ENV, raising=False)
    assert resolve_cron(sweep_cron=None) == DEFAULT_CRON == "0 2 * * *"
    assert nightly_sweep.execution_timezone == "UTC"


def test_env_wins_over_the_sweep_file_which_wins_over_the_default():
    assert resolve_cron(env={}, sweep_cron="30 4 * * 1") == "30 4 * * 1"
    assert resolve_cron(env={CRON_ENV: "*/5 * * * *"}, sweep_cron="30 4 * * 1") == "*/5 * * * *"
    assert resolve_cron(env={CRON_ENV: "  "}, sweep_cron=None) == DEFAULT_CRON


def test_a_bad_cron_is_refused_and_named():
    with pytest.raises(ValueError, match=f"{CRON_ENV}: 'every night'"):
        resolve_cron(env={CRON_ENV: "every night"})
    with pytest.raises(ValueError, match="schedule.cron: '61 2 \\* \\* \\*'"):
        resolve_cron(env={}, sweep_cron="61 2 * * *")


def test_the_env_cron_reaches_the_schedule_when_the_code_loads(monkeypatch):
    monkeypatch.setenv(CRON_ENV, "* * * * *")
    try:
        assert importlib.reload(schedules).nightly_sweep.cron_schedule == "* * * * *"
    finally:
        monkeypatch.delenv(CRON_ENV)
        importlib.reload(schedules)
    assert schedules.nightly_sweep.cron_schedule == resolve_cron(sweep_cron=schedules.active_sweep.schedule_cron)
