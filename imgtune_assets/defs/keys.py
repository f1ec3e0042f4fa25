"""Asset keys of a sweep: ``<sweep name>/<asset>`` (``denoise-demo/experiment_results``)."""

from __future__ import annotations

from dagster import AssetKey

from imgtune_assets.core.sweepfile import Sweep

ASSET_NAMES = ("image_manifest", "run_settings", "experiment_results", "sweep_report")
# Assets only some sweeps have (``tuned_images``: sweep files with ``apply:``).
OPTIONAL_ASSET_NAMES = ("tuned_images",)


def asset_key(sweep: Sweep | str, asset: str) -> AssetKey:
    if asset not in ASSET_NAMES + OPTIONAL_ASSET_NAMES:
        raise ValueError(f"unknown imgtune asset {asset!r} (known: {', '.join(ASSET_NAMES + OPTIONAL_ASSET_NAMES)})")
    return AssetKey([sweep if isinstance(sweep, str) else sweep.name, asset])
