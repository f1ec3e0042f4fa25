"""``python -m imgtune_assets.cli sweep``: materialize the whole sweep with the real ``dagster`` CLI.

Three ``dagster asset materialize`` calls, exactly what a user would type: the manifest and run
settings, every trial partition as one ranged run, then the report. Prints the best score and where
the report is. Uses $DAGSTER_HOME (required, so the history is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from imgtune_assets.core.paths import (
    default_output_dir,
    default_sweep_path,
    sweep_output_dir,
)
from imgtune_assets.core.sampling import trial_keys
from imgtune_assets.core.sweepfile import SweepFileError, load_sweep

MODULE = "imgtune_assets.definitions"
# The project's instance configuration (beside the package in a checkout or an editable install).
PROJECT_DAGSTER_YAML = Path(__file__).resolve().parents[1] / "dagster.yaml"


def dagster_executable() -> str:
    beside = Path(sys.executable).with_name("dagster")
    return str(beside) if beside.exists() else (shutil.which("dagster") or "dagster")


def materialize_commands(keys: list[str]) -> list[list[str]]:
    base = [dagster_executable(), "asset", "materialize", "-m", MODULE]
    return [
        [*base, "--select", "image_manifest,run_settings"],
        [*base, "--select", "experiment_results", "--partition-range", f"{keys[0]}...{keys[-1]}"],
        [*base, "--select", "sweep_report"],
    ]


def ensure_instance_config(home: Path) -> Path | None:
    """Put the project's dagster.yaml into a new or empty DAGSTER_HOME (what ``make demo`` does), so a
    sweep runs on the instance imgtune is measured on: its event log writes a run's trial events in one
    transaction (Dagster's default SQLite storage takes ~16 ms more per trial). A home that already
    holds a dagster.yaml or a history is the user's and is left alone. Returns the file written, if any."""
    target = home / "dagster.yaml"
    source = PROJECT_DAGSTER_YAML
    if not source.exists() or (home.exists() and any(home.iterdir())):
        return None
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def run_sweep(quiet: bool = False) -> int:
    try:
        sweep = load_sweep(default_sweep_path())
    except SweepFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not os.environ.get("DAGSTER_HOME"):
        print("error: set DAGSTER_HOME to a folder that keeps the run history (the Makefile uses .dagster_home/)",
              file=sys.stderr)
        return 2
    installed = ensure_instance_config(Path(os.environ["DAGSTER_HOME"]))
    if installed:
        print(f"(no dagster.yaml in DAGSTER_HOME: installed the project's, {installed})", flush=True)
    for command in materialize_commands(trial_keys(sweep)):
        print("$ dagster " + " ".join(command[1:]), flush=True)
        result = subprocess.run(command, stdout=subprocess.DEVNULL if quiet else None)
        if result.returncode != 0:
            print(f"error: step failed (exit {result.returncode}): {' '.join(command)}", file=sys.stderr)
            return result.returncode
    report = sweep_output_dir(default_output_dir(), sweep.name) / "report.json"
    summary = json.loads(report.read_text())
    print()
    print(f"sweep {summary['sweep']}: {summary['completed_trials']}/{summary['total_trials']} trials completed")
    print(f"best {summary['metric']}: {summary['best_score']:.4f} ({summary['best_trial']}) — "
          f"identity pipeline: {summary['identity_score']:.4f}")
    print(f"best parameters: {json.dumps(summary['best_params'])}")
    print(f"report: {summary['output_dir']} (leaderboard.csv, best_pipeline.yaml, plots/)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgtune_assets.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser("sweep", help="materialize the sweep in use ($IMGTUNE_SWEEP or the demo)")
    sweep.add_argument("--quiet", action="store_true", help="hide the dagster CLI's own output")
    args = parser.parse_args(argv)
    if args.command == "sweep":
        return run_sweep(quiet=args.quiet)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
