"""Assembles imgtune's Dagster definitions: one asset group per sweep file; nothing else happens here."""

import sys

from imgtune_assets.core.catalog import SweepCatalogError, sweeps_from_environment
from imgtune_assets.defs.executor import executor_from_environment
from imgtune_assets.defs.factory import build_definitions

try:  # IMGTUNE_SWEEP=FILE alone, else every sweep file of IMGTUNE_SWEEPS_DIR (default sweeps/)
    sweeps = sweeps_from_environment()
except SweepCatalogError as exc:
    # Dagster shows a load error as a long traceback; say the lines that matter first.
    print(f"imgtune: the sweep files cannot be used:\n{exc}", file=sys.stderr, flush=True)
    raise

# Default executor (IMGTUNE_EXECUTOR unset): steps run in the run's own process and Ray does the
# parallel work inside experiment_results; =ray: each step is a Ray task; =multiprocess: a process per step.
defs = build_definitions(sweeps, executor=executor_from_environment())
