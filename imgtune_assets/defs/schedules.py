"""``nightly_sweep``: the whole sweep, every night, as one ranged run of ``imgtune_sweep``.

When it runs (UTC, 5-field cron), first match wins:

1. ``$IMGTUNE_SCHEDULE_CRON`` (e.g. ``"30 3 * * *"``; ``"* * * * *"`` in tests),
2. the sweep file's ``schedule: {cron: "..."}``,
3. ``0 2 * * *`` (02:00 UTC).

The cron is read when the code loads (like the trial partitions), so restart the daemon/webserver
(or reload the code location) after changing it. Schedules are STOPPED until started:
``dagster schedule start nightly_sweep`` (or the toggle in the UI), with ``dagster-daemon run``
running to tick them.
"""

from __future__ import annotations

import os

from dagster import RunRequest, ScheduleEvaluationContext, schedule

try:  # private helper, the same check Dagster applies to cron_schedule; fall back to a shape check
    from dagster._utils.schedules import is_valid_cron_string
except ImportError:  # pragma: no cover - a future Dagster that moved it
    def is_valid_cron_string(cron_string: str) -> bool:
        return len(cron_string.split()) == 5

from imgtune_assets.defs.jobs import sweep_job, sweep_run_request
from imgtune_assets.defs.partitions import active_sweep, trial_partitions

CRON_ENV = "IMGTUNE_SCHEDULE_CRON"
DEFAULT_CRON = "0 2 * * *"
TIMEZONE = "UTC"


def resolve_cron(env: dict[str, str] | None = None, sweep_cron: str | None = None) -> str:
    """The nightly cron: $IMGTUNE_SCHEDULE_CRON, else the sweep file's schedule.cron, else 02:00."""
    env = os.environ if env is None else env
    value = (env.get(CRON_ENV) or "").strip()
    source = CRON_ENV
    if not value:
        value, source = (sweep_cron or "").strip(), f"{active_sweep.path}: schedule.cron"
    if not value:
        return DEFAULT_CRON
    if not is_valid_cron_string(value):
        raise ValueError(f"{source}: {value!r} is not a valid 5-field cron string (e.g. '0 2 * * *')")
    return value


NIGHTLY_CRON = resolve_cron(sweep_cron=active_sweep.schedule_cron)


@schedule(
    name="nightly_sweep",
    job=sweep_job,
    cron_schedule=NIGHTLY_CRON,
    execution_timezone=TIMEZONE,
    description=f"The whole sweep ({active_sweep.name}, {len(trial_partitions.get_partition_keys())} trials) "
    f"as one ranged run, on cron '{NIGHTLY_CRON}' UTC. Override with ${CRON_ENV} or the sweep file's "
    "schedule.cron.",
)
def nightly_sweep(context: ScheduleEvaluationContext) -> RunRequest:
    when = context.scheduled_execution_time
    return sweep_run_request(
        trial_partitions.get_partition_keys(),
        trigger="schedule",
        tags={"imgtune/scheduled_for": when.isoformat() if when else ""},
    )
