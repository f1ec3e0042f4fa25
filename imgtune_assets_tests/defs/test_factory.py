"""The sweep factory: each sweep file's own group of assets, checks, partitions, jobs, schedule and sensor,
side by side with the others', and the resources and executor they share (set once)."""

import pytest
from dagster import AssetKey, Definitions, in_process_executor

from imgtune_assets.core.catalog import sweeps_from_environment
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.factory import build_definitions, shared_definitions, sweep_definitions
from imgtune_assets.defs.io_manager import SweepStorageIOManager
from imgtune_assets.defs.keys import ASSET_NAMES as ASSETS
from imgtune_assets.defs.resources import RayResource, SweepResource
from imgtune_assets_tests.support.sweeps import CHECK_NAMES as CHECKS
from imgtune_assets_tests.support.sweeps import write_sweep


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The bundled sweeps folder (the default): denoise-demo and segment-demo."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("IMGTUNE_SCHEDULE_CRON", raising=False)
        mp.delenv("IMGTUNE_SENSOR_INTERVAL_SECONDS", raising=False)
        return build_definitions(sweeps_from_environment({}), output_dir=str(tmp_path_factory.mktemp("out")))


def test_the_bundled_sweeps_folder_gives_two_groups_with_prefixed_keys(bundled):
    Definitions.validate_loadable(bundled)
    graph = bundled.resolve_asset_graph()
    groups = {}
    for key in graph.get_all_asset_keys():
        groups.setdefault(graph.get(key).group_name, set()).add(key.to_user_string())
    assert groups == {
        "denoise_demo": {f"denoise-demo/{a}" for a in ASSETS},
        "segment_demo": {f"segment-demo/{a}" for a in ASSETS},
    }
    for name in ("denoise-demo", "segment-demo"):
        key = lambda asset: AssetKey([name, asset])  # noqa: E731
        # lineage, within the sweep only
        assert graph.get(key("run_settings")).parent_keys == {key("image_manifest")}
        assert graph.get(key("experiment_results")).parent_keys == {key("run_settings")}  # images pinned in settings
        assert graph.get(key("sweep_report")).parent_keys == {key("run_settings"), key("experiment_results")}
        # its own checks
        assert {(c.asset_key, c.name) for c in graph.asset_check_keys if c.asset_key.path[0] == name} == \
            {(key("image_manifest"), c) for c in ("manifest_has_usable_images", "manifest_all_files_usable")} | \
            {(key("sweep_report"), c) for c in CHECKS - {"manifest_has_usable_images", "manifest_all_files_usable"}}


def test_each_bundled_sweep_has_its_own_partitions_jobs_schedule_and_sensor(bundled):
    graph = bundled.resolve_asset_graph()
    trial_keys = [f"trial-{k:03d}" for k in range(32)]
    for name, group in (("denoise-demo", "denoise_demo"), ("segment-demo", "segment_demo")):
        partitions = graph.get(AssetKey([name, "experiment_results"])).partitions_def
        assert partitions.get_partition_keys() == trial_keys
        sweep_job = bundled.resolve_job_def(f"{group}_sweep")
        assert sweep_job.asset_layer.executable_asset_keys == {AssetKey([name, a]) for a in ASSETS}
        assert sweep_job.partitions_def.get_partition_keys() == trial_keys
        trials_job = bundled.resolve_job_def(f"{group}_trials")
        assert trials_job.asset_layer.executable_asset_keys == {AssetKey([name, "experiment_results"])}
        schedule = bundled.resolve_schedule_def(f"{group}_nightly_sweep")
        assert schedule.job_name == f"{group}_sweep" and schedule.cron_schedule == "0 2 * * *"
        sensor = bundled.resolve_sensor_def(f"{group}_new_images")
        assert sensor.job_name == f"{group}_sweep"
    assert {s.name for s in bundled.schedules} == {"denoise_demo_nightly_sweep", "segment_demo_nightly_sweep"}
    assert {s.name for s in bundled.sensors} == {"denoise_demo_new_images", "segment_demo_new_images"}
    assert {j.name for j in bundled.jobs} == {"denoise_demo_sweep", "denoise_demo_trials", "segment_demo_sweep",
                                              "segment_demo_trials"}


def test_a_sweep_s_definitions_leave_resources_and_executor_to_the_shared_ones(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", tmp_path / "data", name="alone", trials=2))
    own = sweep_definitions(sweep)
    assert not own.resources and own.executor is None
    shared = shared_definitions(output_dir=str(tmp_path / "out"), ray_address="127.0.0.1:6379",
                                executor=in_process_executor)
    assert shared.executor is in_process_executor
    resources = shared.resources
    assert isinstance(resources["imgtune"], SweepResource) and resources["imgtune"].output_dir == str(tmp_path / "out")
    assert isinstance(resources["ray_cluster"], RayResource) and resources["ray_cluster"].address == "127.0.0.1:6379"
    # The IO manager writes where the sweep resource says: one setting, not two.
    assert isinstance(resources["io_manager"], SweepStorageIOManager) and resources["io_manager"].imgtune == resources["imgtune"]
    merged = build_definitions([sweep], output_dir=str(tmp_path / "out"), executor=in_process_executor)
    Definitions.validate_loadable(merged)
    assert merged.executor is in_process_executor
