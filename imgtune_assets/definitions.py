"""Assembles imgtune's Dagster definitions; nothing else happens here."""

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules

from imgtune_assets.defs import assets, checks
from imgtune_assets.defs.executor import executor_from_environment
from imgtune_assets.defs.jobs import sweep_job, trials_job
from imgtune_assets.defs.partitions import active_sweep
from imgtune_assets.defs.resources import RayResource, SweepResource, sweep_io_manager
from imgtune_assets.defs.schedules import nightly_sweep
from imgtune_assets.defs.sensors import new_images

defs = Definitions(
    assets=load_assets_from_modules([assets]),
    asset_checks=load_asset_checks_from_modules([checks]),
    jobs=[sweep_job, trials_job],
    schedules=[nightly_sweep],
    sensors=[new_images],
    resources={
        "imgtune": SweepResource.from_environment(),
        "ray_cluster": RayResource(),
        "io_manager": sweep_io_manager(active_sweep),
    },
    # Default (IMGTUNE_EXECUTOR unset): steps run in the run's own process; Ray does the parallel work
    # inside experiment_results, and a process per step would only add start-up time.
    # IMGTUNE_EXECUTOR=ray: each step runs as a Ray task (defs/executor.py); =multiprocess: one process per step.
    executor=executor_from_environment(),
)
