"""Where things are by default: the bundled sweeps folder and the project-local output folder."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path


def _project_root() -> Path:
    """The checkout holding ``sweeps/`` (an editable install), else the working folder (a plain
    ``pip install .`` puts the package in site-packages, away from the project's files)."""
    beside_package = Path(__file__).resolve().parents[2]
    return beside_package if (beside_package / "sweeps").is_dir() else Path.cwd()


PROJECT_ROOT = _project_root()
BUNDLED_SWEEPS = PROJECT_ROOT / "sweeps"
# Where sweeps write their results (default: ``outputs/`` in the project folder).
OUTPUT_DIR_ENV = "IMGTUNE_OUTPUT_DIR"
SWEEP_ENV = "IMGTUNE_SWEEP"  # one sweep file to serve (core/catalog.py)
SWEEPS_DIR_ENV = "IMGTUNE_SWEEPS_DIR"  # the folder of sweep files to serve
RAY_ADDRESS_ENV = "IMGTUNE_RAY_ADDRESS"  # a Ray cluster's address (the embedded Ray without it)


def default_output_dir() -> Path:
    """``IMGTUNE_OUTPUT_DIR`` when set, else ``outputs/`` in the project folder."""
    value = os.environ.get(OUTPUT_DIR_ENV, "").strip()
    return Path(value).expanduser().resolve() if value else PROJECT_ROOT / "outputs"


def sweep_output_dir(output_dir: Path, sweep_name: str) -> Path:
    """Each sweep writes only under its own folder; names are validated as single path parts."""
    root = Path(output_dir).resolve()
    folder = (root / sweep_name).resolve()
    if folder.parent != root:
        raise ValueError(f"sweep name {sweep_name!r} would write outside the output folder {root}")
    return folder


def imgtune_command() -> str:
    """``<python> -m imgtune_assets.cli`` as the messages that tell the user what to run spell it, with
    the interpreter that has imgtune installed (a bare ``python`` is often another one, without it):
    relative to the working folder when it lies inside it (``.venv/bin/python``), ``python`` when that is
    the one ``PATH`` finds (an activated venv), else its absolute path."""
    executable = Path(sys.executable)
    # A console script (`.venv/bin/dg`, `dagster`) runs the interpreter its shebang names, often
    # `python3.11`: the venv's `python` beside it is the same one, and what the README spells.
    plain = executable.with_name("python")
    try:
        if executable.name != "python" and plain.exists() and os.path.samefile(plain, executable):
            executable = plain
    except OSError:
        pass
    try:
        found = shutil.which("python")
        if found and Path(found).absolute() == executable.absolute():
            shown = "python"
        else:
            shown = str(executable.absolute().relative_to(Path.cwd()))
            shown = shown if "/" in shown else f"./{shown}"  # a bare name would be looked up on PATH
    except (ValueError, OSError):  # elsewhere, or the working folder is gone (these messages explain errors)
        shown = str(executable)
    return f"{shlex.quote(shown)} -m imgtune_assets.cli"


def sweep_command(sweep_name: str, *args: str, environ=None) -> str:
    """The sweep command for ``sweep_name`` as a message tells the user to run it: with the variables that
    chose the sweep files (``IMGTUNE_SWEEP``, ``IMGTUNE_SWEEPS_DIR``), where its trials are saved
    (``IMGTUNE_OUTPUT_DIR``) and the Ray cluster it ran on (``IMGTUNE_RAY_ADDRESS``) in front, so that,
    run as printed in another shell, it finds the same sweep, its saved trials (in another output folder
    a resume would compute them all again) and its cluster."""
    environ = os.environ if environ is None else environ
    chosen = "".join(f"{name}={shlex.quote(environ[name])} "
                     for name in (SWEEP_ENV, SWEEPS_DIR_ENV, OUTPUT_DIR_ENV, RAY_ADDRESS_ENV)
                     if environ.get(name, "").strip())
    return " ".join([f"{chosen}{imgtune_command()} sweep {shlex.quote(sweep_name)}", *args])
