"""Shared fixtures: small generated data sets and sweep files in temporary folders, and the
environment a subprocess (the real ``dagster`` CLI) needs to run a sweep on loopback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from imgtune_assets.core.demo_data import make_denoise_set, make_segment_set

# Every test (and every process it starts) keeps Ray on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PROJECT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def write_sweep(path: Path, data_dir: Path, *, name: str = "tiny", trials: int = 4, metric: str = "psnr",
                pipeline: list | None = None, **extra) -> Path:
    doc = {
        "name": name,
        "data_dir": os.path.relpath(data_dir, path.parent),
        "objective": {"metric": metric},
        "trials": trials,
        "seed": 0,
        "sampler": "random",
        "pipeline": pipeline or [
            {"op": "bilateral_filter", "d": {"type": "int", "low": 3, "high": 7},
             "sigma_color": {"type": "float", "low": 10, "high": 120}, "sigma_space": 5},
            {"op": "gaussian_blur", "ksize": {"type": "odd", "low": 3, "high": 7},
             "sigma": {"type": "float", "low": 0.3, "high": 2.0, "log": True}},
        ],
        **extra,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def denoise_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("denoise")
    make_denoise_set(folder, count=6, size=96)
    return folder


@pytest.fixture(scope="session")
def segment_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("segment")
    make_segment_set(folder, count=6, size=96)
    return folder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real two-node Ray cluster on loopback (127.0.0.2 and .3), one per test module that asks."""
    from imgtune_assets_tests.raycluster import start_ray_cluster

    started = start_ray_cluster(tmp_path_factory.mktemp("raycluster"), nodes=2, num_cpus=1)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def tiny_sweep(tmp_path, denoise_data) -> Path:
    return write_sweep(tmp_path / "tiny.yaml", denoise_data)


def cli_env(tmp_path: Path, sweep: Path, **extra: str) -> dict[str, str]:
    """Environment for the real dagster CLI: a temporary DAGSTER_HOME with the project's dagster.yaml."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text((PROJECT / "dagster.yaml").read_text())
    env = dict(os.environ)
    env.update({
        "DAGSTER_HOME": str(home),
        "IMGTUNE_SWEEP": str(sweep),
        "IMGTUNE_OUTPUT_DIR": str(tmp_path / "outputs"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    env.update(extra)
    return env
