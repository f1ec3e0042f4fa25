"""Small sweep files and the environment the real ``dagster`` CLI (and daemon, webserver) needs to
serve them on loopback, with a temporary DAGSTER_HOME."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
MODULE = "imgtune_assets.definitions"
# The asset checks every sweep has (defs/checks.py), by name.
CHECK_NAMES = {"manifest_has_usable_images", "manifest_all_files_usable", "scores_are_numbers",
               "tuning_beats_identity", "report_complete"}

DEFAULT_PIPELINE = [
    {"op": "bilateral_filter", "d": {"type": "int", "low": 3, "high": 7},
     "sigma_color": {"type": "float", "low": 10, "high": 120}, "sigma_space": 5},
    {"op": "gaussian_blur", "ksize": {"type": "odd", "low": 3, "high": 7},
     "sigma": {"type": "float", "low": 0.3, "high": 2.0, "log": True}},
]


def write_sweep(path: Path, data_dir: Path, *, name: str = "tiny", trials: int = 4, metric: str = "psnr",
                pipeline: list | None = None, **extra) -> Path:
    """A sweep file (random sampler, seed 0) over ``data_dir`` (written relative to the file)."""
    doc = {
        "name": name,
        "data_dir": os.path.relpath(data_dir, path.parent),
        "objective": {"metric": metric},
        "trials": trials,
        "seed": 0,
        "sampler": "random",
        "pipeline": pipeline or DEFAULT_PIPELINE,
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli_env(tmp_path: Path, sweep: Path, **extra: str) -> dict[str, str]:
    """Environment for the real dagster CLI serving one sweep file (``IMGTUNE_SWEEP``): a temporary
    DAGSTER_HOME with the project's dagster.yaml, outputs under ``tmp_path/outputs``, Ray on loopback.
    ``extra`` is applied last."""
    home = tmp_path / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text((PROJECT / "dagster.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("IMGTUNE_SWEEP", "IMGTUNE_SWEEPS_DIR")}
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


def sweeps_dir_env(tmp_path: Path, folder: Path, **extra: str) -> dict[str, str]:
    """:func:`cli_env` serving every sweep file of ``folder`` (``IMGTUNE_SWEEPS_DIR``, no ``IMGTUNE_SWEEP``)."""
    env = cli_env(tmp_path, folder, **extra)
    del env["IMGTUNE_SWEEP"]
    env["IMGTUNE_SWEEPS_DIR"] = str(folder)
    return env


def range_tags(sweep) -> dict[str, str]:
    """The tags of one ranged run over every trial of ``sweep`` (what the schedule and the CLI request)."""
    from imgtune_assets.core.sampling import trial_keys

    keys = trial_keys(sweep)
    return {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
