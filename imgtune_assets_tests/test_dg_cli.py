"""Dagster's `dg` CLI on the project: `dg check defs`, `dg list defs`, `dg launch` (one partition and a
partition range) and `dg dev`, run from the project folder as a user would, over a sweeps folder of
two sweeps of our own, on a temporary DAGSTER_HOME."""

import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from dagster import AssetKey, DagsterInstance
from skimage.metrics import peak_signal_noise_ratio

from imgtune_assets.core.imageio import read_image
from imgtune_assets.core.ops import apply_pipeline
from imgtune_assets_tests.support.dagster_services import run_checked
from imgtune_assets_tests.support.processes import Service, free_port
from imgtune_assets_tests.support.sweeps import PROJECT, VENV_BIN, sweeps_dir_env, write_sweep
from imgtune_assets_tests.support.waiting import wait_for

DG = str(VENV_BIN / "dg")


@pytest.fixture
def two_sweeps(tmp_path, denoise_data, segment_data):
    folder = tmp_path / "sweeps"
    folder.mkdir()
    write_sweep(folder / "denoise.yaml", denoise_data, name="den-oise", trials=3)
    write_sweep(folder / "segment.yml", segment_data, name="seg", trials=2, metric="dice", pipeline=[
        {"op": "gaussian_blur", "ksize": {"type": "odd", "low": 1, "high": 5}, "sigma": 0},
        {"op": "threshold", "method": {"type": "choice", "values": ["otsu", "mean"]}}])
    return folder, sweeps_dir_env(tmp_path, folder)


def dg(env, *args) -> subprocess.CompletedProcess:
    return run_checked([DG, *args], env)


def test_dg_check_and_list_defs_show_every_sweep(two_sweeps):
    _, env = two_sweeps
    dg(env, "check", "defs")
    listed = json.loads(dg(env, "list", "defs", "--json").stdout)
    assets = {a["asset_key"]: a for a in listed["assets"]}
    assert len(assets) == 8
    for name, group in (("den-oise", "den_oise"), ("seg", "seg")):
        for asset in ("image_manifest", "run_settings", "experiment_results", "sweep_report"):
            assert assets[f"{name}/{asset}"]["group_name"] == group
    checks = {c["key"] for c in listed["asset_checks"]}
    assert {"den-oise/sweep_report:tuning_beats_identity", "seg/image_manifest:manifest_has_usable_images"} <= checks
    assert {j["name"] for j in listed["jobs"]} >= {"den_oise_sweep", "den_oise_trials", "seg_sweep", "seg_trials"}
    assert {s["name"] for s in listed["schedules"]} == {"den_oise_nightly_sweep", "seg_nightly_sweep"}
    assert {s["name"] for s in listed["sensors"]} == {"den_oise_new_images", "seg_new_images"}


def test_dg_check_defs_names_a_bad_file(two_sweeps):
    folder, env = two_sweeps
    bad = folder / "bad.yaml"
    bad.write_text((folder / "denoise.yaml").read_text().replace("name: den-oise", "name: other")
                   .replace("low: 3\n", "low: 9\n", 1))
    result = subprocess.run([DG, "check", "defs"], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"{bad}: pipeline[0].d: low (9) > high (7)" in result.stdout + result.stderr


def test_dg_launch_a_sweep_under_its_own_keys(two_sweeps):
    folder, env = two_sweeps
    dg(env, "launch", "--assets", "den-oise/image_manifest,den-oise/run_settings")
    dg(env, "launch", "--assets", "den-oise/experiment_results", "--partition-range", "trial-000...trial-002")
    dg(env, "launch", "--assets", "den-oise/experiment_results", "--partition", "trial-001")
    dg(env, "launch", "--assets", "den-oise/sweep_report")

    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        records = instance.fetch_materializations(AssetKey(["den-oise", "experiment_results"]), limit=100).records
        per_partition: dict[str, int] = {}
        for record in records:
            key = record.asset_materialization.partition
            per_partition[key] = per_partition.get(key, 0) + 1
        assert per_partition == {"trial-000": 1, "trial-001": 2, "trial-002": 1}
        report = instance.fetch_materializations(AssetKey(["den-oise", "sweep_report"]), limit=1).records[0]
        metadata = report.asset_materialization.metadata
        # The other sweep was not touched.
        assert not instance.fetch_materializations(AssetKey(["seg", "sweep_report"]), limit=1).records

    out = Path(env["IMGTUNE_OUTPUT_DIR"]) / "den-oise"
    trial = json.loads((out / "trials" / f"{metadata['best_trial'].value}.json").read_text())
    data = (folder / yaml.safe_load((folder / "denoise.yaml").read_text())["data_dir"]).resolve()
    scores = [peak_signal_noise_ratio(read_image(data / "targets" / f.name),
                                      apply_pipeline(read_image(f), [tuple(s) for s in trial["stages"]]), data_range=255)
              for f in sorted((data / "images").iterdir())]
    assert metadata["best_score"].value == pytest.approx(float(np.mean(scores)), rel=1e-9)
    assert (out / "storage" / "run_settings").is_file()


def _asset_groups(port: int) -> dict[str, str] | None:
    """{asset key: group} as the webserver serves them; None while it (or the code location) is not up."""
    query = json.dumps({"query": "{ assetNodes { assetKey { path } groupName } }"}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=query,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            nodes = json.loads(response.read())["data"]["assetNodes"]
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return {"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes} or None


def test_dg_dev_serves_every_sweep(two_sweeps, tmp_path):
    _, env = two_sweeps
    port = free_port()
    with Service("dg dev", [DG, "dev", "--host", "127.0.0.1", "--port", str(port)], env,
                 tmp_path / "dg_dev.log") as dev:
        def served():
            if not dev.alive():
                raise RuntimeError(f"dg dev exited:\n{dev.tail()}")
            return _asset_groups(port)

        groups = wait_for(served, 180, what=lambda: f"dg dev to serve the assets; log:\n{dev.tail()}")
    assert groups["den-oise/sweep_report"] == "den_oise" and groups["seg/experiment_results"] == "seg"
    assert len(groups) == 8
