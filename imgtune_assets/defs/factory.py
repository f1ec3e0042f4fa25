"""The sweep factory: one sweep object in, its Dagster definitions out.

Per sweep: the four assets under the key prefix ``<sweep name>``, in the asset group
``group_name(<sweep name>)``, with its own trial partitions, jobs, nightly schedule, new-images
sensor and asset checks. Resources and the executor are shared and set once, in ``definitions.py``.

A plain function rather than a Dagster Component: the sweep file is the user's contract (its own
schema, validated with errors naming file and field, also read by the CLI, the benchmark and the
sensor), and sweeps live as plain files in one folder chosen by ``IMGTUNE_SWEEPS_DIR`` — a Component
instance would need each sweep wrapped in a ``defs.yaml`` (``type:`` / ``attributes:``) inside the
package's ``defs/`` tree. See the README.
"""

from __future__ import annotations

from collections.abc import Iterable

from dagster import Definitions

from imgtune_assets.core.sweepfile import Sweep
from imgtune_assets.defs.assets import build_sweep_assets
from imgtune_assets.defs.checks import build_sweep_checks
from imgtune_assets.defs.jobs import build_sweep_jobs, ray_kind
from imgtune_assets.defs.partitions import trial_partitions
from imgtune_assets.defs.schedules import build_nightly_schedule
from imgtune_assets.defs.sensors import build_new_images_sensor


def sweep_definitions(sweep: Sweep, ray: str | None = None) -> Definitions:
    """Everything one sweep needs, without resources or executor (``ray``: ``jobs.ray_kind``)."""
    partitions = trial_partitions(sweep)
    assets = build_sweep_assets(sweep, partitions)
    jobs = build_sweep_jobs(sweep, ray)
    return Definitions(
        assets=assets.all(),
        asset_checks=build_sweep_checks(assets),
        jobs=[jobs.sweep, jobs.trials],
        schedules=[build_nightly_schedule(sweep, jobs)],
        sensors=[build_new_images_sensor(sweep, jobs)],
    )


def shared_definitions(*, output_dir: str | None = None, ray_address: str | None = None, executor=None
                       ) -> Definitions:
    """The resources every sweep shares, and the executor (set once)."""
    from imgtune_assets.defs.io_manager import SweepStorageIOManager
    from imgtune_assets.defs.resources import RayResource, SweepResource

    imgtune = SweepResource(output_dir=output_dir) if output_dir else SweepResource.from_environment()
    return Definitions(
        resources={"imgtune": imgtune, "ray_cluster": RayResource(address=ray_address),
                   "io_manager": SweepStorageIOManager(imgtune=imgtune)},
        executor=executor,
    )


def build_definitions(sweeps: Iterable[Sweep], **shared) -> Definitions:
    """The definitions of several sweeps side by side, with the shared resources (tests use this with
    sweep objects of their own)."""
    ray = ray_kind(shared.get("ray_address"))
    return Definitions.merge(*(sweep_definitions(s, ray) for s in sweeps), shared_definitions(**shared))
