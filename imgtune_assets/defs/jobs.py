"""Jobs of a sweep for the schedule, the sensor and CLI backfills, and the one request shape they share.

* ``<group>_sweep``: every asset of the sweep's group (manifest, settings, all trial partitions,
  report) with their checks. A sweep is requested as ONE run of this job tagged with a partition
  range (``dagster/asset_partition_range_start|end`` = first/last trial key): the unpartitioned steps
  run once, ``experiment_results`` sees every trial key in ``context.partition_keys`` and records one
  materialization per trial, then the report reads them all.
* ``<group>_trials``: the sweep's ``experiment_results`` alone, for ``dagster job backfill -j
  <group>_trials`` (one run per partition through the daemon) and for the UI's partition picker.

``<group>`` is the sweep's asset group name (``denoise-demo`` → ``denoise_demo``).

Both carry ``imgtune/ray``: ``embedded`` when their runs start their own local Ray (no cluster address
when the definitions load), ``cluster`` otherwise. The project's ``dagster.yaml`` lets the daemon run
one ``embedded`` run at a time: each such run's Ray would take every CPU and a third of the memory for
its object store, so two nightly sweeps at once would each run at half speed and risk the memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dagster import AssetSelection, DagsterInstance, DagsterRunStatus, JobDefinition, RunRequest, RunsFilter, define_asset_job

from imgtune_assets.core.catalog import group_name
from imgtune_assets.core.embedded_ray import RAY_ADDRESS_ENV
from imgtune_assets.core.launcher import RUN_PROCESS_TAG, own_tag, process_gone
from imgtune_assets.core.sweepfile import Sweep
from imgtune_assets.defs.keys import asset_key

TRIGGER_TAG = "imgtune/trigger"
SWEEP_TAG = "imgtune/sweep"
RAY_TAG = "imgtune/ray"  # embedded | cluster: where a job's runs do their work (dagster.yaml limits embedded)
# The tags Dagster itself puts on a ranged run (dagster._core.storage.tags; spelled out to avoid a private import).
ASSET_PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
ASSET_PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"
PARTITION_TAG = "dagster/partition"  # a run of one partition (a backfill's)
IN_PROGRESS = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
               DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]


def live_runs_failing_orphans(instance: DagsterInstance, job_name: str | None, *, marked_by: str, log=None,
                              besides: str | None = None) -> list:
    """The job's runs (every job's, with None) that are queued or running (but the run ``besides``) —
    after marking failed those whose run process, tied to the sweep command that launched it, is gone
    (``launcher.process_gone``: the command and the run killed together, a power cut): Dagster's run
    monitoring does not watch runs that ``dagster job execute`` started, so they would show as running
    for ever and hold the new-images sensor for ever. A run with no such tie (another executor's,
    another system's, the daemon's) is never taken for gone."""
    return [r.dagster_run for r in _live_records(instance, job_name, marked_by=marked_by, log=log, besides=besides)]


def _live_records(instance: DagsterInstance, job_name: str | None, *, marked_by: str, log=None,
                  besides: str | None = None) -> list:
    live = []
    filters = RunsFilter(job_name=job_name, statuses=IN_PROGRESS) if job_name else RunsFilter(statuses=IN_PROGRESS)
    for record in instance.get_run_records(filters=filters, limit=200):
        run = record.dagster_run
        if run.run_id == besides:
            continue
        if process_gone(own_tag(run.tags, RUN_PROCESS_TAG)):
            instance.report_run_failed(run, message="this run's process is gone (with the imgtune sweep command "
                                                    f"that launched it); marked failed by {marked_by}")
            if log is not None:
                log.warning(f"run {run.run_id} was left in progress by a run process that is gone: marked failed")
        else:
            live.append(record)
    return live


def run_sweep_name(run) -> str | None:
    """The sweep a run works on: its sweep jobs' tag, or the key prefix of the assets it selects (a run
    of Dagster's asset job: the UI's Materialize, a backfill, ``dagster asset materialize``)."""
    if run.tags.get(SWEEP_TAG):
        return run.tags[SWEEP_TAG]
    prefixes = {key.path[0] for key in (run.asset_selection or ()) if len(key.path) > 1}
    return next(iter(prefixes)) if len(prefixes) == 1 else None


def trials_only(run) -> bool:
    """Whether a run computes trials and nothing else: runs of disjoint trials (a multi-run backfill)
    may go side by side, as each writes only its own trials' files."""
    if run.job_name.endswith("_trials") and run.tags.get(SWEEP_TAG):
        return True
    selection = run.asset_selection or ()
    return bool(selection) and all(key.path[-1] == "experiment_results" for key in selection)


def runs_in_the_way(instance: DagsterInstance, sweep_name: str, run_id: str | None, *, marked_by: str,
                    log=None) -> list:
    """The sweep's runs in progress that ``run_id`` must not overlap (every one, with None: a schedule or
    sensor about to request a run). Two runs of one sweep would overwrite each other's manifest,
    settings, trials and report, and leave a report of one run's images over the other's trials; only
    runs of trials alone may go side by side. Of two runs the one created first goes on and the later
    one is in its way: both see the same order, so exactly one goes on."""
    live = [r for r in _live_records(instance, None, marked_by=marked_by, log=log, besides=run_id)
            if run_sweep_name(r.dagster_run) == sweep_name]
    if run_id is None:
        return [r.dagster_run for r in live]
    mine = instance.get_run_record_by_id(run_id)
    if mine is None:
        return []
    # (the storage's own id is the order of creation; timestamps may tie)
    return [r.dagster_run for r in live if r.storage_id < mine.storage_id
            and not (trials_only(mine.dagster_run) and trials_only(r.dagster_run))]


def sweep_job_name(sweep: Sweep) -> str:
    return f"{group_name(sweep.name)}_sweep"


def trials_job_name(sweep: Sweep) -> str:
    return f"{group_name(sweep.name)}_trials"


@dataclass(frozen=True)
class SweepJobs:
    sweep: JobDefinition  # (unresolved until the definitions are assembled)
    trials: JobDefinition


def ray_kind(ray_address: str | None = None) -> str:
    """``embedded`` or ``cluster``: whether runs will start their own Ray (as ``RayResource`` decides)."""
    return "cluster" if ray_address or os.environ.get(RAY_ADDRESS_ENV) else "embedded"


def build_sweep_jobs(sweep: Sweep, ray: str | None = None) -> SweepJobs:
    # Partitions are inferred from the selected assets (the sweep's trial partitions). No default range
    # in the job's tags: Dagster refuses a run that has both a range and a partition (the launchpad's
    # partition picker, a backfill); a launch with neither is refused by experiment_results, saying how.
    tags = {SWEEP_TAG: sweep.name, RAY_TAG: ray or ray_kind()}
    return SweepJobs(
        sweep=define_asset_job(
            sweep_job_name(sweep),
            selection=AssetSelection.groups(group_name(sweep.name)),
            tags=tags,
            description=f"The whole sweep {sweep.name!r} in one run: image_manifest, run_settings, every trial "
            "partition of experiment_results (as one partition range), then sweep_report.",
        ),
        trials=define_asset_job(
            trials_job_name(sweep),
            selection=AssetSelection.assets(asset_key(sweep, "experiment_results")),
            tags=tags,
            description=f"{sweep.name}/experiment_results only: re-run or backfill trials (one run per partition "
            "with `dagster job backfill`, or a range as one run).",
        ),
    )


def reuse_finished_config(sweep: Sweep) -> dict:
    """Run config with the sweep's ``experiment_results`` reusing every trial saved for the same sweep
    file and images (``ExperimentConfig.skip_finished``): what the daemon's runs ask for, so a night
    whose images did not change recomputes nothing, and one after a killed run finishes its trials."""
    op = asset_key(sweep, "experiment_results").to_python_identifier()
    return {"ops": {op: {"config": {"skip_finished": True}}}}


def sweep_run_request(job_name: str, trial_keys: Sequence[str], *, trigger: str, run_key: str | None = None,
                      tags: Mapping[str, str] | None = None, run_config: Mapping | None = None) -> RunRequest:
    """One ranged run of a sweep job covering ``trial_keys`` (first..last, in partition order)."""
    if not trial_keys:
        raise ValueError("a sweep needs at least one trial")
    return RunRequest(
        run_key=run_key,
        job_name=job_name,
        run_config=dict(run_config or {}),
        tags={
            ASSET_PARTITION_RANGE_START_TAG: trial_keys[0],
            ASSET_PARTITION_RANGE_END_TAG: trial_keys[-1],
            TRIGGER_TAG: trigger,
            **(tags or {}),
        },
    )
