"""The definitions load: the module serves one asset group per sweep file of the environment; the real
CLI (`dagster definitions validate`, `dg list defs`) loads them, and refuses the whole code location
when a sweep file is bad or two declare the same name. What the factory builds per sweep is tested in
defs/test_factory.py."""

import json
import subprocess

from dagster import Definitions

from imgtune_assets.core.catalog import group_name, sweeps_from_environment
from imgtune_assets.defs.keys import ASSET_NAMES as ASSETS
from imgtune_assets_tests.conftest import PROJECT, VENV_BIN, cli_env, sweeps_dir_env, write_sweep
from imgtune_assets_tests.support.sweeps import CHECK_NAMES as CHECKS


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


def test_loading_the_definitions_imports_neither_ray_nor_pandas(tmp_path, tiny_sweep):
    # The code server and the daemon load them again and again: Ray is imported where it is used (in a
    # run), pandas where a manifest or report is built.
    code = ("import sys, imgtune_assets.definitions as d; assert d.defs is not None; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'pandas', 'matplotlib'}))")
    result = subprocess.run([str(VENV_BIN / "python"), "-c", code], cwd=PROJECT, env=cli_env(tmp_path, tiny_sweep),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


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
