"""Jobs for the schedule, the sensor and CLI backfills, and the one request shape they share.

* ``imgtune_sweep``: every asset of the sweep (manifest, settings, all trial partitions, report)
  with their checks. A sweep is requested as ONE run of this job tagged with a partition range
  (``dagster/asset_partition_range_start|end`` = first/last trial key): the unpartitioned steps run
  once, ``experiment_results`` sees every trial key in ``context.partition_keys`` and records one
  materialization per trial, then the report reads them all.
* ``imgtune_trials``: ``experiment_results`` alone, for ``dagster job backfill -j imgtune_trials``
  (one run per partition through the daemon) and for the UI's partition picker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dagster import AssetSelection, RunRequest, define_asset_job

SWEEP_JOB_NAME = "imgtune_sweep"
TRIALS_JOB_NAME = "imgtune_trials"
TRIGGER_TAG = "imgtune/trigger"
# The tags Dagster itself puts on a ranged run (dagster._core.storage.tags; spelled out to avoid a private import).
ASSET_PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
ASSET_PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"

sweep_job = define_asset_job(
    SWEEP_JOB_NAME,
    selection=AssetSelection.groups("imgtune"),
    description="The whole sweep in one run: image_manifest, run_settings, every trial partition of "
    "experiment_results (as one partition range), then sweep_report.",
)

trials_job = define_asset_job(
    TRIALS_JOB_NAME,
    selection=AssetSelection.assets("experiment_results"),
    description="experiment_results only: re-run or backfill trials (one run per partition with "
    "`dagster job backfill`, or a range as one run).",
)


def sweep_run_request(trial_keys: Sequence[str], *, trigger: str, run_key: str | None = None,
                      tags: Mapping[str, str] | None = None) -> RunRequest:
    """One ranged run of ``imgtune_sweep`` covering ``trial_keys`` (first..last, in partition order)."""
    if not trial_keys:
        raise ValueError("a sweep needs at least one trial")
    return RunRequest(
        run_key=run_key,
        job_name=SWEEP_JOB_NAME,
        tags={
            ASSET_PARTITION_RANGE_START_TAG: trial_keys[0],
            ASSET_PARTITION_RANGE_END_TAG: trial_keys[-1],
            TRIGGER_TAG: trigger,
            **(tags or {}),
        },
    )
