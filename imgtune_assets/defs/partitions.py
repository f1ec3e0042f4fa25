"""Trial partitions: one static partition per trial of a sweep (``trial-000`` ...)."""

from __future__ import annotations

from dagster import StaticPartitionsDefinition

from imgtune_assets.core.sampling import trial_keys
from imgtune_assets.core.sweepfile import Sweep


def trial_partitions(sweep: Sweep) -> StaticPartitionsDefinition:
    """The sweep's trials as partitions; the sweep file decides them, so they change when it does."""
    return StaticPartitionsDefinition(trial_keys(sweep))
