"""Real Dagster instances on disk for tests, as the project's CLI, daemon and webserver open them.

* ``open_project_instance(home)``: the project's ``dagster.yaml`` copied into ``home`` (so
  ``ImgtuneInstance``, whose batched SQLite storage lives in ``home``), opened from there without
  DAGSTER_HOME pointing at it; the caller disposes of it;
* ``project_instance(home)``: the same as a context manager, disposed at the end, and with
  ``DAGSTER_EVENT_BATCH_SIZE`` — which the project's storage turns on for the whole process when it is
  created — put back as it was before.

The ``instance`` fixture of ``conftest.py`` is ``project_instance`` in the test's own temporary folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import DagsterInstance

from imgtune_assets_tests.support.sweeps import PROJECT

BATCH_SIZE_ENV = "DAGSTER_EVENT_BATCH_SIZE"


def open_project_instance(home: Path) -> DagsterInstance:
    """An instance on the project's own dagster.yaml in ``home`` (made if missing), opened without
    DAGSTER_HOME pointing at it."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text((PROJECT / "dagster.yaml").read_text())
    return DagsterInstance.from_config(str(home))


@contextmanager
def project_instance(home: Path) -> Iterator[DagsterInstance]:
    """:func:`open_project_instance`, disposed at the end of the block; the process's
    ``DAGSTER_EVENT_BATCH_SIZE`` is left as it was before the block."""
    before = os.environ.get(BATCH_SIZE_ENV)
    try:
        with open_project_instance(home) as instance:
            yield instance
    finally:
        if before is None:
            os.environ.pop(BATCH_SIZE_ENV, None)
        else:
            os.environ[BATCH_SIZE_ENV] = before
