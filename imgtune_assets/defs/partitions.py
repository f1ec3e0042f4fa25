"""Trial partitions: one static partition per trial of the sweep in use (``trial-000`` ...)."""

from __future__ import annotations

import sys

from dagster import StaticPartitionsDefinition

from imgtune_assets.core.paths import default_sweep_path
from imgtune_assets.core.sampling import trial_keys
from imgtune_assets.core.sweepfile import Sweep, SweepFileError, load_sweep

# The sweep file decides the partitions, so it is read (and fully validated) when the code loads:
# a bad sweep file is refused before any run starts.
def _load_active_sweep() -> Sweep:
    try:
        return load_sweep(default_sweep_path())
    except SweepFileError as exc:
        # Dagster shows a load error as a long traceback; say the one line that matters first.
        print(f"imgtune: the sweep file cannot be used: {exc}", file=sys.stderr, flush=True)
        raise


active_sweep = _load_active_sweep()
trial_partitions = StaticPartitionsDefinition(trial_keys(active_sweep))
