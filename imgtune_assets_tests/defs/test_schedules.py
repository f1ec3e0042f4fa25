"""<group>_nightly_sweep: the cron it runs on, and that one tick asks for the whole sweep as one ranged run."""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timezone

import pytest
from dagster import build_schedule_context, instance_for_test

from imgtune_assets.core.sweepfile import SweepFileError, load_sweep
from imgtune_assets.defs.factory import build_definitions
from imgtune_assets.defs.jobs import SWEEP_TAG, build_sweep_jobs
from imgtune_assets.defs.keys import asset_key
from imgtune_assets.defs.partitions import trial_partitions
from imgtune_assets.defs.schedules import CRON_ENV, DEFAULT_CRON, build_nightly_schedule, resolve_cron
from imgtune_assets_tests.conftest import write_sweep

WHEN = datetime(2026, 11, 27, 2, 0, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def no_cron_override(monkeypatch):
    monkeypatch.delenv(CRON_ENV, raising=False)


@pytest.fixture
def sweep(tmp_path, denoise_data):
    return load_sweep(write_sweep(tmp_path / "tiny.yaml", denoise_data, trials=3))


def nightly(sweep):
    return build_nightly_schedule(sweep, build_sweep_jobs(sweep))


def tick(schedule):
    with instance_for_test() as instance:
        return schedule.evaluate_tick(build_schedule_context(instance=instance, scheduled_execution_time=WHEN))


def test_a_tick_while_a_run_of_the_sweep_is_in_progress_requests_nothing(sweep, instance):
    from dagster import DagsterRunStatus
    from dagster._core.test_utils import create_run_for_test

    context = build_schedule_context(instance=instance, scheduled_execution_time=WHEN)
    running = create_run_for_test(instance, job_name="tiny_sweep", status=DagsterRunStatus.STARTED,
                                  tags={SWEEP_TAG: "tiny"})
    data = nightly(sweep).evaluate_tick(context)
    assert not data.run_requests
    assert data.skip_message == f"a run of the sweep 'tiny' is still in progress ({running.run_id}, started): " \
                                "this tick requests nothing"
    instance.report_run_failed(running)
    assert len(nightly(sweep).evaluate_tick(context).run_requests) == 1


def test_a_tick_requests_the_whole_sweep_as_one_ranged_run(sweep):
    schedule = nightly(sweep)
    assert schedule.name == "tiny_nightly_sweep"
    data = tick(schedule)
    assert data.skip_message is None
    [request] = data.run_requests  # one run, not one per trial
    partitions = trial_partitions(sweep)
    keys = partitions.get_partition_keys()
    assert keys == ["trial-000", "trial-001", "trial-002"]
    assert request.job_name == "tiny_sweep"
    assert request.tags["dagster/asset_partition_range_start"] == keys[0]
    assert request.tags["dagster/asset_partition_range_end"] == keys[-1]
    assert request.partition_key_range is not None
    # the range covers every trial partition
    assert partitions.get_partition_keys_in_range(request.partition_key_range) == keys
    assert request.tags["imgtune/trigger"] == "schedule"
    assert request.tags["imgtune/scheduled_for"] == WHEN.isoformat()


def test_the_job_it_targets_holds_the_whole_sweep(tmp_path, sweep):
    defs = build_definitions([sweep], output_dir=str(tmp_path / "out"))
    job = defs.resolve_job_def("tiny_sweep")
    assert job.asset_layer.executable_asset_keys == {
        asset_key(sweep, n) for n in ("image_manifest", "run_settings", "experiment_results", "sweep_report")}
    assert job.partitions_def.get_partition_keys() == ["trial-000", "trial-001", "trial-002"]
    assert defs.resolve_schedule_def("tiny_nightly_sweep").job_name == "tiny_sweep"
    trials = defs.resolve_job_def("tiny_trials")
    assert trials.partitions_def.get_partition_keys() == ["trial-000", "trial-001", "trial-002"]
    assert trials.asset_layer.executable_asset_keys == {asset_key(sweep, "experiment_results")}


def test_each_sweep_has_its_own_schedule_requesting_its_own_job(tmp_path, denoise_data, segment_data):
    a = load_sweep(write_sweep(tmp_path / "a.yaml", denoise_data, name="night-a", trials=2))
    b = load_sweep(write_sweep(tmp_path / "b.yaml", segment_data, name="night-b", trials=3, metric="dice",
                               pipeline=[{"op": "threshold", "method": "otsu"}], schedule={"cron": "15 5 * * *"}))
    defs = build_definitions([a, b], output_dir=str(tmp_path / "out"))
    first = defs.resolve_schedule_def("night_a_nightly_sweep")
    second = defs.resolve_schedule_def("night_b_nightly_sweep")
    assert (first.cron_schedule, second.cron_schedule) == (DEFAULT_CRON, "15 5 * * *")
    [request_a] = tick(first).run_requests
    [request_b] = tick(second).run_requests
    assert request_a.job_name == "night_a_sweep" and request_b.job_name == "night_b_sweep"
    assert request_a.tags["dagster/asset_partition_range_end"] == "trial-001"
    assert request_b.tags["dagster/asset_partition_range_end"] == "trial-002"


def test_defaults_to_two_am_utc(sweep):
    assert resolve_cron(sweep, env={}) == DEFAULT_CRON == "0 2 * * *"
    schedule = nightly(sweep)
    assert schedule.cron_schedule == DEFAULT_CRON and schedule.execution_timezone == "UTC"


def test_env_wins_over_the_sweep_file_which_wins_over_the_default(tmp_path, denoise_data, sweep):
    with_cron = load_sweep(write_sweep(tmp_path / "c.yaml", denoise_data, schedule={"cron": "30 4 * * 1"}))
    assert resolve_cron(with_cron, env={}) == "30 4 * * 1"
    assert resolve_cron(with_cron, env={CRON_ENV: "*/5 * * * *"}) == "*/5 * * * *"
    assert resolve_cron(with_cron, env={CRON_ENV: "  "}) == "30 4 * * 1"
    assert resolve_cron(sweep, env={CRON_ENV: "  "}) == DEFAULT_CRON


def test_a_bad_cron_is_refused_and_named(tmp_path, denoise_data, sweep):
    with pytest.raises(ValueError, match=f"^{CRON_ENV}: expected a 5-field cron string, got 'every night'"):
        resolve_cron(sweep, env={CRON_ENV: "every night"})
    with pytest.raises(ValueError, match=f"^{CRON_ENV}: '0 25 \\* \\* \\*' is not a valid cron string"):
        resolve_cron(sweep, env={CRON_ENV: "0 25 * * *"})
    # a sweep file's bad cron is refused when the file loads, naming file and field ...
    bad_file = write_sweep(tmp_path / "bad.yaml", denoise_data, schedule={"cron": "61 2 * * *"})
    with pytest.raises(SweepFileError, match=f"^{re.escape(str(bad_file))}: schedule.cron: .*'61 2"):
        load_sweep(bad_file)
    # ... and by the schedule, should a sweep object carry one
    bad = dataclasses.replace(sweep, schedule_cron="61 2 * * *")
    with pytest.raises(ValueError, match=f"^{re.escape(str(sweep.path))}: schedule.cron: '61 2 \\* \\* \\*' is not"):
        resolve_cron(bad, env={})
    with pytest.raises(ValueError, match=f"^{re.escape(str(sweep.path))}: schedule.cron: "):
        nightly(bad)


def test_the_env_cron_reaches_the_schedule_when_the_definitions_are_built(monkeypatch, tmp_path, denoise_data):
    with_cron = load_sweep(write_sweep(tmp_path / "c.yaml", denoise_data, schedule={"cron": "30 4 * * 1"}))

    def cron() -> str:
        defs = build_definitions([with_cron], output_dir=str(tmp_path / "out"))
        return defs.resolve_schedule_def("tiny_nightly_sweep").cron_schedule

    assert cron() == "30 4 * * 1"
    monkeypatch.setenv(CRON_ENV, "* * * * *")
    assert cron() == "* * * * *"


def test_the_nightly_run_over_unchanged_images_reuses_every_saved_trial(tmp_path, sweep, instance, local_ray):
    import logging

    defs = build_definitions([sweep], output_dir=str(tmp_path / "out"))
    schedule = defs.resolve_schedule_def("tiny_nightly_sweep")
    [request] = schedule.evaluate_tick(build_schedule_context(instance=instance,
                                                              scheduled_execution_time=WHEN)).run_requests
    job = defs.resolve_job_def(request.job_name)
    nights = [job.execute_in_process(run_config=request.run_config, tags=request.tags, instance=instance)
              for _ in range(2)]
    assert all(night.success for night in nights)
    infos = [[e.message for e in instance.all_logs(night.run_id) if e.level == logging.INFO] for night in nights]
    assert "reusing 0 finished trial(s) (skip_finished), computing 3 of 3" in infos[0], infos[0]
    assert "reusing 3 finished trial(s) (skip_finished), computing 0 of 3" in infos[1], infos[1]
    # each night records every trial and a report; the second night's is the first's
    for night in nights:
        keys = [e.dagster_event.event_specific_data.materialization.asset_key
                for e in instance.all_logs(night.run_id) if e.dagster_event and e.dagster_event.is_step_materialization]
        assert keys.count(asset_key(sweep, "experiment_results")) == 3
        assert keys.count(asset_key(sweep, "sweep_report")) == 1
    reports = instance.fetch_materializations(asset_key(sweep, "sweep_report"), limit=2).records
    assert [r.run_id for r in reports] == [nights[1].run_id, nights[0].run_id]
    best = [r.asset_materialization.metadata["best_score"].value for r in reports]
    assert best[0] == best[1]
