"""Shared fixtures: small generated data sets and sweep files in temporary folders, a real Dagster
instance on disk, and a two-node Ray cluster. The helpers behind them live in
:mod:`imgtune_assets_tests.support`; ``write_sweep``, ``cli_env``, ``sweeps_dir_env``, ``free_port``,
``PROJECT`` and ``VENV_BIN`` are importable from here too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imgtune_assets.core.demo_data import make_denoise_set, make_segment_set
from imgtune_assets_tests.support.instances import project_instance
from imgtune_assets_tests.support.processes import free_port
from imgtune_assets_tests.support.sweeps import PROJECT, VENV_BIN, cli_env, sweeps_dir_env, write_sweep

__all__ = ["PROJECT", "VENV_BIN", "cli_env", "free_port", "sweeps_dir_env", "write_sweep"]

# Every test (and every process it starts) keeps Ray on loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


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
def local_ray():
    """One real local Ray per test module (2 CPUs); ``RayResource`` reuses an existing connection."""
    import ray

    # A Ray of its own (address="local"): never a cluster left running, or recorded in
    # /tmp/ray/ray_current_cluster, by an earlier `ray start` on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real two-node Ray cluster on loopback (127.0.0.2 and .3), one per test module that asks."""
    from imgtune_assets_tests.support.raycluster import start_ray_cluster

    with start_ray_cluster(tmp_path_factory.mktemp("raycluster"), nodes=2, num_cpus=1) as started:
        yield started


@pytest.fixture
def instance(tmp_path):
    """A real Dagster instance on disk, as the CLI, daemon and webserver open it: the project's
    dagster.yaml (ImgtuneInstance, its batched SQLite storage) in the test's own folder
    (``tmp_path/instance_home``), not DAGSTER_HOME; disposed after the test."""
    with project_instance(tmp_path / "instance_home") as opened:
        yield opened


@pytest.fixture
def tiny_sweep(tmp_path, denoise_data) -> Path:
    return write_sweep(tmp_path / "tiny.yaml", denoise_data)
