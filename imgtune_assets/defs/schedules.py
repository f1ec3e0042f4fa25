"""``<group>_nightly_sweep``: a sweep's whole run, every night, as one ranged run of ``<group>_sweep``.

When it runs (UTC, 5-field cron), first match wins:

1. ``$IMGTUNE_SCHEDULE_CRON`` (every sweep; e.g. ``"30 3 * * *"``, ``"* * * * *"`` in tests),
2. the sweep file's ``schedule: {cron: "..."}``,
3. ``0 2 * * *`` (02:00 UTC).

The cron is read when the code loads (like the trial partitions): reload the code location after
changing it. The run reuses every trial saved for the same sweep file and images (``skip_finished``):
a night whose images did not change recomputes no trial and writes the same report, and a night after
a killed run finishes what it left. A tick while a run of the sweep is still in progress requests nothing (two runs of one
sweep would mix their files). Schedules are STOPPED until started: ``dagster schedule start <group>_nightly_sweep`` (or
the toggle in the UI), with ``dagster-daemon run`` running to tick them.
"""


import os
from collections.abc import Mapping

from dagster import RunRequest, ScheduleDefinition, ScheduleEvaluationContext, SkipReason, schedule

from imgtune_assets.core.catalog import group_name
from imgtune_assets.core.cron import validate_cron
from imgtune_assets.core.progress import counted
from imgtune_assets.core.sampling import trial_keys
from imgtune_assets.core.sweepfile import Sweep
from imgtune_assets.defs.jobs import SweepJobs, reuse_finished_config, runs_in_the_way, sweep_run_request

CRON_ENV = "IMGTUNE_SCHEDULE_CRON"
DEFAULT_CRON = "0 2 * * *"
TIMEZONE = "UTC"


def schedule_name(sweep: Sweep) -> str:
    return f"{group_name(sweep.name)}_nightly_sweep"


def resolve_cron(sweep: Sweep, env: Mapping[str, str] | None = None) -> str:
    """The nightly cron: $IMGTUNE_SCHEDULE_CRON, else the sweep file's schedule.cron, else 02:00."""
    env = os.environ if env is None else env
    value, source = (env.get(CRON_ENV) or "").strip(), CRON_ENV
    if not value:
        value, source = (sweep.schedule_cron or "").strip(), f"{sweep.path}: schedule.cron"
    if not value:
        return DEFAULT_CRON
    try:
        return validate_cron(value)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def build_nightly_schedule(sweep: Sweep, jobs: SweepJobs) -> ScheduleDefinition:
    cron = resolve_cron(sweep)
    keys = trial_keys(sweep)

    @schedule(
        name=schedule_name(sweep),
        job=jobs.sweep,
        cron_schedule=cron,
        execution_timezone=TIMEZONE,
        description=f"The whole sweep {sweep.name!r} ({counted(len(keys), 'trial')}) as one ranged run, on cron "
        f"'{cron}' UTC. Override with ${CRON_ENV} or the sweep file's schedule.cron.",
    )
    def nightly_sweep(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
        when = context.scheduled_execution_time
        if context.instance is not None:
            # A night's run still going (or the sensor's, or a command's): a second would mix its files.
            busy = runs_in_the_way(context.instance, sweep.name, None, marked_by=f"the {schedule_name(sweep)} schedule",
                                   log=context.log)
            if busy:
                return SkipReason(f"a run of the sweep {sweep.name!r} is still in progress ({busy[0].run_id}, "
                                  f"{busy[0].status.value.lower()}): this tick requests nothing")
        return sweep_run_request(jobs.sweep.name, keys, trigger="schedule", run_config=reuse_finished_config(sweep),
                                 tags={"imgtune/scheduled_for": when.isoformat() if when else ""})

    return nightly_sweep
