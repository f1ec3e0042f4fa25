"""Helpers for the tests that start real programs (Dagster's CLI, daemon and webserver, PostgreSQL, Ray
clusters, chromium), each written once:

* ``waiting``: ``wait_for(predicate, timeout, interval, what)`` — the one polling loop (no fixed sleeps);
* ``processes``: ``free_port``, ``Service`` (a command in its own session/process group: ``alive``,
  ``tail``, ``processes``, ``kill_leader``, ``stop``), ``stop_all``, ``tail_text``, ``gone``;
* ``sweeps``: ``PROJECT``, ``VENV_BIN``, ``MODULE``, ``write_sweep``, ``cli_env`` (one sweep file),
  ``sweeps_dir_env`` (a folder of sweep files);
* ``dagster_services``: ``dagster_cli``, ``run_checked``, ``start_daemon``, ``start_webserver`` →
  ``Webserver`` (``graphql``, ``locations``, ``wait_for_location``, ``reload_location``), ``runs``,
  ``wait_for_run``, ``run_failures``, ``materializations_by_partition``;
* ``pgserver``: ``start_postgres`` → ``PgServer``; ``raycluster``: ``start_ray_cluster`` → ``RayCluster``
  (import these two from their modules);
* ``instances``: ``open_project_instance``, ``project_instance`` — the project's instance on disk
  (the ``instance`` fixture of conftest.py); ``asset_groups``: ``built``, ``resources``, ``node``,
  ``data_files``, ``independent_denoise_psnr`` — a sweep's asset group in process (import these two
  from their modules).
"""

from imgtune_assets_tests.support.dagster_services import (
    CODE,
    FINISHED,
    FINISHED_STATUSES,
    Webserver,
    dagster_cli,
    materializations_by_partition,
    run_checked,
    run_failures,
    runs,
    start_daemon,
    start_webserver,
    wait_for_run,
)
from imgtune_assets_tests.support.processes import LOOPBACK, Service, free_port, gone, stop_all, tail_text
from imgtune_assets_tests.support.sweeps import MODULE, PROJECT, VENV_BIN, cli_env, sweeps_dir_env, write_sweep
from imgtune_assets_tests.support.waiting import wait_for

__all__ = [
    "CODE", "FINISHED", "FINISHED_STATUSES", "LOOPBACK", "MODULE", "PROJECT", "VENV_BIN", "Service", "Webserver",
    "cli_env", "dagster_cli", "free_port", "gone", "materializations_by_partition", "run_checked", "run_failures",
    "runs", "start_daemon", "start_webserver", "stop_all", "sweeps_dir_env", "tail_text", "wait_for", "wait_for_run",
    "write_sweep",
]
