"""The definitions load, hold the four assets in lineage order, and pass `dagster definitions validate`."""

import subprocess

from dagster import AssetKey, Definitions

from imgtune_assets.definitions import defs
from imgtune_assets_tests.conftest import PROJECT, VENV_BIN, cli_env


def test_definitions_load_with_the_four_assets_in_order():
    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {"image_manifest", "run_settings", "experiment_results", "sweep_report"} <= keys
    parents = {k: {p.to_user_string() for p in graph.get(AssetKey(k)).parent_keys}
               for k in ("run_settings", "experiment_results", "sweep_report")}
    assert "image_manifest" in parents["run_settings"]
    assert parents["experiment_results"] == {"run_settings"}  # the images come pinned in the settings
    assert "experiment_results" in parents["sweep_report"]
    partitions = graph.get(AssetKey("experiment_results")).partitions_def
    assert partitions.get_partition_keys()[0] == "trial-000"


def test_dagster_definitions_validate_cli(tmp_path, tiny_sweep):
    result = subprocess.run(
        [str(VENV_BIN / "dagster"), "definitions", "validate", "-m", "imgtune_assets.definitions"],
        cwd=PROJECT, env=cli_env(tmp_path, tiny_sweep), capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_sweep_file_is_refused_when_the_code_loads(tmp_path, tiny_sweep):
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny_sweep.read_text().replace("low: 3\n", "low: 9\n", 1))
    result = subprocess.run(
        [str(VENV_BIN / "dagster"), "definitions", "validate", "-m", "imgtune_assets.definitions"],
        cwd=PROJECT, env=cli_env(tmp_path, bad), capture_output=True, text=True, timeout=180,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{bad}: pipeline[0].d: low (9) > high (7)" in output
