"""Assembles imgtune's Dagster definitions; nothing else happens here."""

from dagster import Definitions, in_process_executor, load_asset_checks_from_modules, load_assets_from_modules

from imgtune_assets.defs import assets, checks
from imgtune_assets.defs.resources import RayResource, SweepResource

defs = Definitions(
    assets=load_assets_from_modules([assets]),
    asset_checks=load_asset_checks_from_modules([checks]),
    resources={"imgtune": SweepResource.from_environment(), "ray_cluster": RayResource()},
    # Steps run in the run's own process: Ray does the parallel work inside experiment_results,
    # and a process per step would only add start-up time.
    executor=in_process_executor,
)
