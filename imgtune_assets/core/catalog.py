"""Which sweeps a code location serves: every sweep file of the sweeps folder, or one file alone.

* ``IMGTUNE_SWEEP=FILE``: that sweep file alone (scripts and CI pin one sweep this way).
* otherwise every ``*.yaml`` / ``*.yml`` file of ``IMGTUNE_SWEEPS_DIR`` (default: the project's
  ``sweeps/``), in name order; hidden files are ignored.

Every file is validated in full. A bad file, two files declaring the same sweep name (or names
that map to the same Dagster group name), or two applying their winners into one folder, refuses
the whole set with one error that names every file and field at fault: a code location that
silently dropped a sweep would also drop its schedule and sensor without anyone noticing, while a
load error is shown on the code location in the UI and by ``dg check defs``, and a fix followed by
*Reload definitions* brings everything back.

Plain module (no Dagster).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from imgtune_assets.core.paths import BUNDLED_SWEEPS, SWEEP_ENV, SWEEPS_DIR_ENV
from imgtune_assets.core.sweepfile import Sweep, SweepFileError, load_sweep

# Which Dagster executor the runs use (defs/executor.py reads it; the sweep command looks at it too).
EXECUTOR_ENV = "IMGTUNE_EXECUTOR"
SWEEP_SUFFIXES = (".yaml", ".yml")


class SweepCatalogError(SweepFileError):
    """The sweeps cannot be served: every problem found, one per line, each naming its file."""


def group_name(sweep_name: str) -> str:
    """The Dagster asset group of a sweep: its name with characters outside ``[A-Za-z0-9_]`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", sweep_name)


def sweep_files(folder: Path) -> list[Path]:
    """The sweep files of a folder (``*.yaml``, ``*.yml``; not hidden; not in its sub-folders), in name order.
    A broken symbolic link among them is an error."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise SweepCatalogError(f"{folder}: sweeps folder not found (set {SWEEPS_DIR_ENV} to a folder of sweep files)")
    candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in SWEEP_SUFFIXES and not p.name.startswith("."))
    broken = [p for p in candidates if p.is_symlink() and not p.exists()]
    if broken:  # a sweep that silently went away (and its schedule with it) would go unnoticed
        raise SweepCatalogError("\n".join(f"{p}: a broken symbolic link (to {os.readlink(p)}): point it at a sweep "
                                          "file, or remove it" for p in broken))
    return [p for p in candidates if p.is_file()]


def load_catalog(files: list[Path]) -> list[Sweep]:
    """Validate every file; refuse the set if any file is bad or two sweeps would share a name or group,
    or one would write its tuned images over another's images (``cross_sweep_problems``)."""
    sweeps: list[Sweep] = []
    problems: list[str] = []
    for file in files:
        try:
            sweeps.append(load_sweep(file))
        except SweepFileError as exc:
            problems.append(str(exc))
    problems += [text for text, _ in cross_sweep_problems(sweeps)]
    if problems:
        raise SweepCatalogError("\n".join(problems))
    return sweeps


def cross_sweep_problems(sweeps: list[Sweep]) -> list[tuple[str, list[Sweep]]]:
    """What stops good sweep files from being served together, each with the sweeps at fault: two with
    one name or group, or one whose tuned images would land on another's files."""
    problems: list[tuple[str, list[Sweep]]] = []
    for label, key in (("sweep name", lambda s: s.name), ("asset group name", lambda s: group_name(s.name)),
                       # their output folders would be one on a case-insensitive file system (macOS, Windows)
                       ("sweep name but for case", lambda s: s.name.casefold())):
        seen: dict[str, Sweep] = {}
        for sweep in sweeps:
            other = seen.setdefault(key(sweep), sweep)
            # (same names also make the same group: reported once, as names)
            if other is not sweep and (label == "sweep name" or other.name != sweep.name):
                shown = f"{other.name!r} / {sweep.name!r}" if label == "sweep name but for case" else repr(key(sweep))
                problems.append((f"{other.path} and {sweep.path}: both declare the {label} {shown}; "
                                 "each sweep needs its own name (it names its asset keys, group and output folder)",
                                 [other, sweep]))
    # Two sweeps applying their winners into one folder would overwrite each other's outputs (and ledger)
    # on every run, each run rewriting everything.
    from imgtune_assets.core.apply import same_folder, within

    applying = [s for s in sweeps if s.apply_output is not None]
    for i, sweep in enumerate(applying):
        for other in applying[:i]:
            if same_folder(other.apply_output, sweep.apply_output) and _same_store(other, sweep, sweep.apply_output):
                problems.append((f"{other.path} and {sweep.path}: both write their tuned images to "
                                 f"{sweep.apply_output} (apply.output_dir); each sweep needs its own output folder",
                                 [other, sweep]))
    # ... nor into another sweep's data folder (its images and targets; its own is refused when loaded),
    # nor into the folder another sweep applies its winner to (its originals)
    for sweep in applying:
        for other in sweeps:
            if other is sweep:
                continue
            for folder, what, harm in ((other.data_dir, "the data folder", "its images"),
                                       (other.apply_input, "the apply.input_dir", "the images it tunes")):
                if folder is not None and within(sweep.apply_output, folder) and _same_store(other, sweep, folder):
                    problems.append((f"{sweep.path}: apply.output_dir {sweep.apply_output} is inside {what} of "
                                     f"{other.path} ({folder}): the tuned images would overwrite {harm}", [sweep]))
    return problems


def _same_store(a: Sweep, b: Sweep, where) -> bool:
    """Whether two sweeps' URLs like ``where`` may name the same store: always for local folders; for
    URLs unless both sweeps name two different endpoints (a default endpoint may be either)."""
    from imgtune_assets.core.storage import is_remote

    def norm(url):
        return url.strip().rstrip("/").lower() if url else None

    return not is_remote(where) or None in (norm(a.endpoint_url), norm(b.endpoint_url)) \
        or norm(a.endpoint_url) == norm(b.endpoint_url)


def served_sweep_files(env: Mapping[str, str] | None = None) -> list[Path]:
    """The files to serve: ``$IMGTUNE_SWEEP`` alone, else every sweep file of ``$IMGTUNE_SWEEPS_DIR``
    (or ``sweeps/``). Raises SweepCatalogError when there are none."""
    env = os.environ if env is None else env
    single = env.get(SWEEP_ENV, "").strip()
    if single:
        return [Path(single).expanduser().resolve()]
    folder = Path(env.get(SWEEPS_DIR_ENV, "").strip() or BUNDLED_SWEEPS).expanduser().resolve()
    files = sweep_files(folder)
    if not files:
        raise SweepCatalogError(f"{folder}: no sweep files (*.yaml, *.yml) in the sweeps folder")
    return files


def sweeps_from_environment(env: Mapping[str, str] | None = None) -> list[Sweep]:
    """The sweeps to serve, validated: see :func:`served_sweep_files`."""
    return load_catalog(served_sweep_files(env))


def find_sweep(sweeps: list[Sweep], name: str) -> Sweep:
    for sweep in sweeps:
        if sweep.name == name:
            return sweep
    known = ", ".join(s.name for s in sweeps) or "none"
    raise SweepCatalogError(f"no sweep named {name!r} (known: {known})")
