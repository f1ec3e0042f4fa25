"""The definitions load: one asset group per sweep file with its own keys, partitions, jobs, schedule and
sensor; the real CLI (`dagster definitions validate`, `dg list defs`) loads them, and refuses the whole
code location when a sweep file is bad or two declare the same name."""

import json
import subprocess

import pytest
from dagster import AssetKey, Definitions

from imgtune_assets.core.catalog import group_name, sweeps_from_environment
from imgtune_assets.defs.factory import build_definitions
from imgtune_assets_tests.conftest import PROJECT, VENV_BIN, cli_env, sweeps_dir_env, write_sweep

ASSETS = ("image_manifest", "run_settings", "experiment_results", "sweep_report")
CHECKS = {"manifest_has_usable_images", "manifest_all_files_usable", "scores_are_numbers", "tuning_beats_identity",
          "report_complete"}


def validate(env):
    return subprocess.run(
        [str(VENV_BIN / "dagster"), "definitions", "validate", "-m", "imgtune_assets.definitions"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=240,
    )


def test_the_module_definitions_load_one_group_per_sweep_of_the_environment():
    from imgtune_assets.definitions import defs

    Definitions.validate_loadable(defs)
    expected = {group_name(s.name) for s in sweeps_from_environment()}
    graph = defs.resolve_asset_graph()
    assert {graph.get(k).group_name for k in graph.get_all_asset_keys()} == expected


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


def test_dagster_definitions_validate_cli(tmp_path, tiny_sweep):
    result = validate(cli_env(tmp_path, tiny_sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def test_one_sweep_file_alone_with_dg_list_defs(tmp_path, denoise_data):
    sweep = write_sweep(tmp_path / "alone.yaml", denoise_data, name="alone-1", trials=2)
    result = subprocess.run([str(VENV_BIN / "dg"), "list", "defs", "--json"], cwd=PROJECT,
                            env=cli_env(tmp_path, sweep, IMGTUNE_SCHEDULE_CRON="45 3 * * *"),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = json.loads(result.stdout)
    assets = {a["asset_key"]: a for a in listed["assets"]}
    assert sorted(assets) == sorted(f"alone-1/{a}" for a in ASSETS)  # the bundled sweeps are not served
    assert {a["group_name"] for a in assets.values()} == {"alone_1"}
    assert assets["alone-1/experiment_results"]["dependency_keys"] == ["alone-1/run_settings"]
    assert {(c["asset_key"], c["name"]) for c in listed["asset_checks"]} == \
        {("alone-1/image_manifest", c) for c in ("manifest_has_usable_images", "manifest_all_files_usable")} | \
        {("alone-1/sweep_report", c) for c in CHECKS - {"manifest_has_usable_images", "manifest_all_files_usable"}}
    assert sorted(j["name"] for j in listed["jobs"]) == ["alone_1_sweep", "alone_1_trials"]
    assert [(s["name"], s["cron_schedule"]) for s in listed["schedules"]] == [("alone_1_nightly_sweep", "45 3 * * *")]
    assert [s["name"] for s in listed["sensors"]] == ["alone_1_new_images"]
    assert {r["name"] for r in listed["resources"]} >= {"imgtune", "ray_cluster", "io_manager"}


def test_bad_sweep_file_is_refused_when_the_code_loads(tmp_path, tiny_sweep):
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny_sweep.read_text().replace("low: 3\n", "low: 9\n", 1))
    result = validate(cli_env(tmp_path, bad))
    assert result.returncode != 0
    assert f"{bad}: pipeline[0].d: low (9) > high (7)" in result.stdout + result.stderr


def test_two_files_declaring_the_same_name_refuse_the_location_naming_both(tmp_path, denoise_data):
    folder = tmp_path / "sweeps"
    folder.mkdir()
    first = write_sweep(folder / "first.yaml", denoise_data, name="twin", trials=2)
    second = write_sweep(folder / "second.yml", denoise_data, name="twin", trials=2)
    write_sweep(folder / "other.yaml", denoise_data, name="other", trials=2)
    result = validate(sweeps_dir_env(tmp_path, folder))
    assert result.returncode != 0
    assert f"{first} and {second}: both declare the sweep name 'twin'" in result.stdout + result.stderr


def test_a_bad_sweep_file_among_good_ones_refuses_the_location(tmp_path, denoise_data):
    folder = tmp_path / "sweeps"
    folder.mkdir()
    write_sweep(folder / "a.yaml", denoise_data, name="good-a", trials=2)
    bad = write_sweep(folder / "b.yaml", denoise_data, name="bad", trials=2, sampler="bogus")
    write_sweep(folder / "c.yaml", denoise_data, name="good-c", trials=2)
    result = validate(sweeps_dir_env(tmp_path, folder))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{bad}: sampler: unknown sampler 'bogus'" in output
    assert "imgtune: the sweep files cannot be used:" in output  # said plainly, not only in a traceback
