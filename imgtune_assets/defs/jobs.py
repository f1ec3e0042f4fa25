"""Jobs of a sweep for the schedule, the sensor and CLI backfills, and the one request shape they share.

* ``<group>_sweep``: every asset of the sweep's group (manifest, settings, all trial partitions,
  report) with their checks. A sweep is requested as ONE run of this job tagged with a partition
  range (``dagster/asset_partition_range_start|end`` = first/last trial key): the unpartitioned steps
  run once, ``experiment_results`` sees every trial key in ``context.partition_keys`` and records one
  materialization per trial, then the report reads them all.
* ``<group>_trials``: the sweep's ``experiment_results`` alone, for ``dagster job backfill -j
  <group>_trials`` (one run per partition through the daemon) and for the UI's partition picker.

``<group>`` is the sweep's asset group name (``denoise-demo`` → ``denoise_demo``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dagster import AssetSelection, DagsterInstance, DagsterRunStatus, JobDefinition, RunRequest, RunsFilter, define_asset_job

from imgtune_assets.core.catalog import group_name
from imgtune_assets.core.launcher import RUN_PROCESS_TAG, own_tag, process_gone
from imgtune_assets.core.sweepfile import Sweep
from imgtune_assets.defs.keys import asset_key

TRIGGER_TAG = "imgtune/trigger"
SWEEP_TAG = "imgtune/sweep"
# The tags Dagster itself puts on a ranged run (dagster._core.storage.tags; spelled out to avoid a private import).
ASSET_PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
ASSET_PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"
PARTITION_TAG = "dagster/partition"  # a run of one partition (a backfill's)
IN_PROGRESS = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
               DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]


def live_runs_failing_orphans(instance: DagsterInstance, job_name: str, *, marked_by: str, log=None,
                              besides: str | None = None) -> list:
    """The job's runs that are queued or running (but the run ``besides``) — after marking failed those
    whose run process, tied to the sweep command that launched it, is gone (``launcher.process_gone``:
    the command and the run killed together, a power cut): Dagster's run monitoring does not watch runs
    that ``dagster job execute`` started, so they would show as running for ever and hold the
    new-images sensor for ever. A run with no such tie (another executor's, another system's, the
    daemon's) is never taken for gone."""
    live = []
    for record in instance.get_run_records(filters=RunsFilter(job_name=job_name, statuses=IN_PROGRESS), limit=50):
        run = record.dagster_run
        if run.run_id == besides:
            continue
        if process_gone(own_tag(run.tags, RUN_PROCESS_TAG)):
            instance.report_run_failed(run, message="this run's process is gone (with the imgtune sweep command "
                                                    f"that launched it); marked failed by {marked_by}")
            if log is not None:
                log.warning(f"run {run.run_id} was left in progress by a run process that is gone: marked failed")
        else:
            live.append(run)
    return live


def sweep_job_name(sweep: Sweep) -> str:
    return f"{group_name(sweep.name)}_sweep"


def trials_job_name(sweep: Sweep) -> str:
    return f"{group_name(sweep.name)}_trials"


@dataclass(frozen=True)
class SweepJobs:
    sweep: JobDefinition  # (unresolved until the definitions are assembled)
    trials: JobDefinition


def build_sweep_jobs(sweep: Sweep) -> SweepJobs:
    # Partitions are inferred from the selected assets (the sweep's trial partitions). No default range
    # in the job's tags: Dagster refuses a run that has both a range and a partition (the launchpad's
    # partition picker, a backfill); a launch with neither is refused by experiment_results, saying how.
    return SweepJobs(
        sweep=define_asset_job(
            sweep_job_name(sweep),
            selection=AssetSelection.groups(group_name(sweep.name)),
            tags={SWEEP_TAG: sweep.name},
            description=f"The whole sweep {sweep.name!r} in one run: image_manifest, run_settings, every trial "
            "partition of experiment_results (as one partition range), then sweep_report.",
        ),
        trials=define_asset_job(
            trials_job_name(sweep),
            selection=AssetSelection.assets(asset_key(sweep, "experiment_results")),
            tags={SWEEP_TAG: sweep.name},
            description=f"{sweep.name}/experiment_results only: re-run or backfill trials (one run per partition "
            "with `dagster job backfill`, or a range as one run).",
        ),
    )


def sweep_run_request(job_name: str, trial_keys: Sequence[str], *, trigger: str, run_key: str | None = None,
                      tags: Mapping[str, str] | None = None) -> RunRequest:
    """One ranged run of a sweep job covering ``trial_keys`` (first..last, in partition order)."""
    if not trial_keys:
        raise ValueError("a sweep needs at least one trial")
    return RunRequest(
        run_key=run_key,
        job_name=job_name,
        tags={
            ASSET_PARTITION_RANGE_START_TAG: trial_keys[0],
            ASSET_PARTITION_RANGE_END_TAG: trial_keys[-1],
            TRIGGER_TAG: trigger,
            **(tags or {}),
        },
    )
