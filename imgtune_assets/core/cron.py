"""Cron strings for sweep schedules: one check shared by the sweep file and the Dagster schedule.

Parsing is croniter's, the library Dagster's own scheduler vendors, so what passes here has the
same meaning there. A few things croniter accepts are refused because the schedule could not use
them: other than 5 fields (seconds, years, ``@daily``), ``W`` (Dagster's scheduler does not know
it), ``R`` (a random field would validate differently on every load), dates that never come, and
steps as large as their field (``*/90`` minutes fires hourly, not every 90 minutes).
"""

from __future__ import annotations

from datetime import datetime

from croniter import CroniterBadDateError, CroniterError, croniter

__all__ = ["validate_cron"]

# Any fixed start will do: a string that fires at all fires within croniter's search window.
_START = datetime(2000, 1, 1)
_FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
_FIELD_SIZES = (60, 24, 31, 12, 7)
_ONCE_PER = {"minute": "hour", "hour": "day", "day-of-month": "month", "month": "year", "day-of-week": "week"}


def validate_cron(expr: str) -> str:
    """Return ``expr`` unchanged if it is a usable 5-field cron string, else raise ValueError."""
    if not isinstance(expr, str) or len(expr.split()) != 5:
        raise ValueError(f"expected a 5-field cron string, got {expr!r}")
    fields = expr.split()
    if "W" in fields[2].upper():
        raise ValueError(f"{expr!r}: the nearest-weekday 'W' is not supported by Dagster's scheduler")
    if any(term.upper() == "R" or term.upper().startswith("R(") for f in fields for term in f.split(",")):
        raise ValueError(f"{expr!r}: random 'R' fields are not supported (the schedule must be fixed)")
    for name, field, size in zip(_FIELD_NAMES, fields, _FIELD_SIZES):
        for term in field.split(","):
            step = term.partition("/")[2]
            if step.isdigit() and int(step) >= size:
                # croniter takes it and fires at the field's first value only: */90 minutes is hourly
                raise ValueError(f"{expr!r}: the {name} step /{step} is not smaller than the {size} {name} values "
                                 f"it steps through, so it fires once per {_ONCE_PER[name]}")
    try:
        croniter.expand(expr)
    except (CroniterError, ValueError) as exc:
        detail = str(exc).removeprefix(f"[{expr}] ").removeprefix("is ")
        raise ValueError(f"{expr!r} is not a valid cron string: {detail}") from None
    try:
        croniter(expr, _START).get_next(datetime)
    except CroniterBadDateError:
        raise ValueError(f"{expr!r} never fires (no such date, e.g. 30 February)") from None
    return expr

