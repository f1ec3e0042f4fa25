"""A sweep's jobs, the one ranged request they share, and which of their runs still count as in
progress (on the project's instance on disk)."""

import subprocess

import pytest
from dagster import AssetKey, DagsterRunStatus

from imgtune_assets.core.embedded_ray import RAY_ADDRESS_ENV
from imgtune_assets.core.launcher import RUN_PROCESS_TAG, process_tag
from imgtune_assets.core.sampling import trial_keys
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.factory import build_definitions
from imgtune_assets.defs.jobs import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    RAY_TAG,
    SWEEP_TAG,
    TRIGGER_TAG,
    live_runs_failing_orphans,
    ray_kind,
    runs_in_the_way,
    sweep_job_name,
    sweep_run_request,
    trials_job_name,
)
from imgtune_assets_tests.support.sweeps import PROJECT, write_sweep


@pytest.fixture
def sweep_and_defs(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", tmp_path / "data", name="den-oise", trials=3))
    return sweep, build_definitions([sweep], output_dir=str(tmp_path / "out"))


def test_the_sweep_job_holds_the_whole_group_and_the_trials_job_only_the_trials(sweep_and_defs):
    sweep, defs = sweep_and_defs
    assert (sweep_job_name(sweep), trials_job_name(sweep)) == ("den_oise_sweep", "den_oise_trials")
    whole, trials = defs.resolve_job_def(sweep_job_name(sweep)), defs.resolve_job_def(trials_job_name(sweep))
    names = ("image_manifest", "run_settings", "experiment_results", "sweep_report")
    assert set(whole.asset_layer.executable_asset_keys) == {AssetKey(["den-oise", n]) for n in names}
    assert set(trials.asset_layer.executable_asset_keys) == {AssetKey(["den-oise", "experiment_results"])}
    assert whole.tags[SWEEP_TAG] == trials.tags[SWEEP_TAG] == "den-oise"
    # No partition range in the jobs' own tags: the launchpad's partition picker adds a partition.
    assert ASSET_PARTITION_RANGE_START_TAG not in whole.tags
    assert whole.partitions_def.get_partition_keys() == trial_keys(sweep)


def test_jobs_say_whether_their_runs_start_an_embedded_ray_and_the_instances_limit_those(tmp_path, monkeypatch):
    import yaml

    (tmp_path / "data" / "images").mkdir(parents=True)
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", tmp_path / "data", trials=2))
    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    assert ray_kind() == "embedded" and ray_kind("127.0.0.1:6379") == "cluster"
    embedded = build_definitions([sweep], output_dir=str(tmp_path / "out"))
    clustered = build_definitions([sweep], output_dir=str(tmp_path / "out"), ray_address="127.0.0.1:6379")
    for defs, kind in ((embedded, "embedded"), (clustered, "cluster")):
        assert {defs.resolve_job_def(name(sweep)).tags[RAY_TAG] for name in (sweep_job_name, trials_job_name)} == {kind}
    monkeypatch.setenv(RAY_ADDRESS_ENV, "127.0.0.1:6379")  # as RayResource reads it at run time
    assert ray_kind() == "cluster"
    for config in (PROJECT / "dagster.yaml", PROJECT / "deploy" / "postgres" / "dagster.yaml"):
        limits = yaml.safe_load(config.read_text())["run_queue"]["tag_concurrency_limits"]
        assert {"key": RAY_TAG, "value": "embedded", "limit": 1} in limits, config


def test_a_sweep_is_requested_as_one_run_over_the_range_of_its_trials():
    request = sweep_run_request("s_sweep", ["trial-000", "trial-001", "trial-002"], trigger="schedule",
                                run_key="k", tags={"extra": "1"})
    assert (request.job_name, request.run_key) == ("s_sweep", "k")
    assert request.tags == {ASSET_PARTITION_RANGE_START_TAG: "trial-000", ASSET_PARTITION_RANGE_END_TAG: "trial-002",
                            TRIGGER_TAG: "schedule", "extra": "1"}
    with pytest.raises(ValueError, match="at least one trial"):
        sweep_run_request("s_sweep", [], trigger="schedule")


def test_a_run_whose_tied_process_is_gone_is_marked_failed_and_no_longer_counts(sweep_and_defs, instance):
    sweep, defs = sweep_and_defs
    job = defs.resolve_job_def(sweep_job_name(sweep))
    ended = subprocess.Popen(["sleep", "30"])
    gone_tag = process_tag(ended.pid)
    ended.kill()
    ended.wait()
    abandoned = instance.create_run_for_job(job_def=job, tags={RUN_PROCESS_TAG: gone_tag})
    live = instance.create_run_for_job(job_def=job, tags={RUN_PROCESS_TAG: process_tag()})  # this process
    untied = instance.create_run_for_job(job_def=job)  # the daemon's, another executor's: never judged
    # A re-execution copies its parent's tags: the process named there was the parent's, not its own.
    copied = instance.create_run_for_job(job_def=job, tags={RUN_PROCESS_TAG: gone_tag,
                                                            "dagster/parent_run_id": abandoned.run_id})
    found = live_runs_failing_orphans(instance, job.name, marked_by="a test", besides=untied.run_id)
    assert {r.run_id for r in found} == {live.run_id, copied.run_id}
    assert instance.get_run_by_id(abandoned.run_id).status == DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(untied.run_id).status == DagsterRunStatus.NOT_STARTED
    assert live_runs_failing_orphans(instance, "another_job", marked_by="a test") == []


def test_runs_of_one_sweep_do_not_overlap_but_runs_of_trials_alone_may(instance):
    from dagster import AssetKey
    from dagster._core.test_utils import create_run_for_test

    def run(job, *, sweep="s", selection=None, status=DagsterRunStatus.STARTED):
        tags = {SWEEP_TAG: sweep} if sweep else {}
        return create_run_for_test(instance, job_name=job, status=status, tags=tags,
                                   asset_selection=frozenset(selection) if selection else None)

    def in_the_way(mine):
        return {r.run_id for r in runs_in_the_way(instance, "s", mine.run_id if mine else None, marked_by="a test")}

    first = run("s_sweep")
    second = run("s_sweep", status=DagsterRunStatus.NOT_STARTED)
    assert in_the_way(first) == set() and in_the_way(second) == {first.run_id}  # the earlier goes on
    trials_a, trials_b = run("s_trials"), run("s_trials")
    assert in_the_way(trials_b) == {first.run_id, second.run_id}  # trials beside a whole sweep: no
    instance.report_run_canceled(first)
    instance.report_run_canceled(second)
    assert in_the_way(trials_b) == set()  # ...beside other trials alone: yes (each writes its own trials)
    # Dagster's asset job (the UI's Materialize, a backfill): the sweep is the prefix of its assets.
    report = run("__ASSET_JOB", sweep=None, selection=[AssetKey(["s", "sweep_report"])])
    trial = run("__ASSET_JOB", sweep=None, selection=[AssetKey(["s", "experiment_results"])])
    run("other_sweep", sweep="other")  # another sweep's run holds nothing back
    run("__ASSET_JOB", sweep=None, selection=[AssetKey(["other", "sweep_report"])])
    assert in_the_way(report) == {trials_a.run_id, trials_b.run_id}
    assert in_the_way(trial) == {report.run_id}
    assert in_the_way(None) == {trials_a.run_id, trials_b.run_id, report.run_id, trial.run_id}
