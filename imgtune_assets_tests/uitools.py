"""Moved to :mod:`imgtune_assets_tests.support`; this name stays for the tests that import it."""

from imgtune_assets_tests.support import (
    CODE,
    FINISHED,
    MODULE,
    Service,
    Webserver,
    dagster_cli,
    free_port,
    runs,
    start_daemon,
    start_webserver,
    stop_all,
    wait_for,
    wait_for_run,
)

__all__ = ["CODE", "FINISHED", "MODULE", "Service", "Webserver", "dagster_cli", "free_port", "runs", "start_daemon",
           "start_webserver", "stop_all", "wait_for", "wait_for_run"]
