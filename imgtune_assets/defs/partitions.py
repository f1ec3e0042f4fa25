"""Trial partitions: one static partition per trial of the sweep in use (``trial-000`` ...)."""

from __future__ import annotations

from dagster import StaticPartitionsDefinition

from imgtune_assets.core.paths import default_sweep_path
from imgtune_assets.core.sampling import trial_keys
from imgtune_assets.core.sweepfile import load_sweep

# The sweep file decides the partitions, so it is read (and fully validated) when the code loads:
# a bad sweep file is refused before any run starts.
active_sweep = load_sweep(default_sweep_path())
trial_partitions = StaticPartitionsDefinition(trial_keys(active_sweep))
