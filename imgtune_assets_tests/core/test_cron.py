import pytest

from imgtune_assets.core.cron import validate_cron

VALID = [
    "0 2 * * *",
    "*/15 9-17 * * MON-FRI",
    "0 0 1,15 * *",
    "0-59/7 * * * *",
    "0 12 * * 0-6",
    "0 0 * * 7",
    "0 0 1 jan *",
    "0 0 29 2 *",  # fires in leap years
    "0 0 L * *",
    "0 0 * * 5#3",
]

INVALID = [
    ("*/90 * * * *", "'*/90 * * * *': the minute step /90 is not smaller than the 60 minute values it steps "
                     "through, so it fires once per hour"),
    ("0 */36 * * *", "the hour step /36 is not smaller than the 24 hour values"),
    (None, "expected a 5-field cron string, got None"),
    (5, "expected a 5-field cron string, got 5"),
    ("0 2 * *", "expected a 5-field cron string, got '0 2 * *'"),
    ("0 0 2 * * *", "expected a 5-field cron string"),  # seconds or years: not for a Dagster schedule
    ("@daily", "expected a 5-field cron string, got '@daily'"),
    ("99 * * * *", "'99 * * * *' is not a valid cron string: not acceptable, out of range"),
    ("0 24 * * *", "not a valid cron string"),
    ("0 0 * * 8", "not a valid cron string"),
    ("*/0 * * * *", "not a valid cron string"),
    ("a b c d e", "not a valid cron string"),
    ("0 0 30 2 *", "'0 0 30 2 *' never fires"),
    ("0 0 31 4 *", "never fires"),
    ("0 0 15W * *", "'W' is not supported"),
    ("R * * * *", "random 'R'"),
]


@pytest.mark.parametrize("expr", VALID)
def test_valid_strings_pass_unchanged(expr):
    assert validate_cron(expr) == expr


@pytest.mark.parametrize("expr, words", INVALID)
def test_invalid_strings_say_why(expr, words):
    with pytest.raises(ValueError) as err:
        validate_cron(expr)
    assert words in str(err.value)


def test_dagster_accepts_whatever_passes_here():
    # The schedule that runs a sweep hands the same string to Dagster: nothing accepted here may
    # be refused there. (This test may import Dagster; core/cron.py itself must not: see core/test_init.py.)
    from dagster import ScheduleDefinition

    for expr in VALID:
        assert ScheduleDefinition(name="nightly", cron_schedule=expr, job_name="sweep").cron_schedule == expr
