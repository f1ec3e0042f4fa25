"""``python -m imgtune_assets.cli sweep``: materialize sweeps with the real ``dagster`` CLI.

For each sweep, one ``dagster job execute`` of its ``<group>_sweep`` job tagged with the range of its
trials, exactly what a user would type (see :func:`sweep_run_command`; the schedule and the sensor
request the same run): manifest, run settings, every trial partition, the report (and the tuned
images) in one process. Dagster's own output goes to a log file under ``$DAGSTER_HOME/sweep_logs/``; the
terminal shows a progress bar of the trials (read from the sweep's ``progress.json``) and a short
summary from its ``report.json``. While Dagster starts, a local data folder's files are read and
hashed into the sweep's probe cache (``manifest.ProbeAhead``), which the run's manifest waits for and
then finds complete. :func:`sweep_commands` are the same steps as separate
``dagster asset materialize`` commands (the README's step-by-step route).

    python -m imgtune_assets.cli sweep                            # the one sweep served ($IMGTUNE_SWEEP)
    python -m imgtune_assets.cli sweep denoise-demo segment-demo  # sweeps by name
    python -m imgtune_assets.cli sweep --all                      # every sweep served
    python -m imgtune_assets.cli sweep denoise-demo --resume      # reuse the trials an interrupted run finished
    python -m imgtune_assets.cli apply outputs/NAME/best_pipeline.yaml photos/ tuned/   # apply a winner

Uses $DAGSTER_HOME (required, so the history is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Sequence

from imgtune_assets import run_watch
from imgtune_assets.core import embedded_ray
from imgtune_assets.core.catalog import (
    EXECUTOR_ENV,
    SWEEP_ENV,
    SweepCatalogError,
    find_sweep,
    group_name,
    sweeps_from_environment,
)
from imgtune_assets.core.files import atomic_write_bytes, atomic_write_text
from imgtune_assets.core.launcher import LAUNCHER_PID_ENV, LAUNCHER_TAG, process_tag
from imgtune_assets.core.manifest import PROBE_CACHE_FILE, ProbeAhead
from imgtune_assets.core.metrics import improves
from imgtune_assets.core.paths import default_output_dir, sweep_command, sweep_output_dir
from imgtune_assets.core.progress import BOUNDED_BY_ONE, counted, describe, format_score
from imgtune_assets.core.sampling import stage_labels, trial_keys
from imgtune_assets.core.sweepfile import Sweep, SweepFileError

MODULE = "imgtune_assets.definitions"
# The project's instance configuration (beside the package in a checkout or an editable install).
PROJECT_DAGSTER_YAML = Path(__file__).resolve().parents[1] / "dagster.yaml"
# How the one-run sweep is shown on the terminal.
SWEEP_LABEL = "manifest, trials, report"
# What each of the step-by-step commands of ``sweep_commands`` does (the benchmark prints them).
STEP_LABELS = ("image_manifest + run_settings", "experiment_results", "sweep_report", "tuned_images")
PROGRESS_FILE = "progress.json"
REPORT_FILE = "report.json"
SETTINGS_FILE = "run_settings.json"
LOG_TAIL_LINES = 30
# Tags the run the sweep command launches, so that the command reads that run's failure and no other's.
INVOCATION_TAG = "imgtune/cli_invocation"
INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C or SIGTERM (128 + SIGINT)
# After a Ctrl-C is passed on to the run, how long before it is passed on once more (it can be lost).
INTERRUPT_AGAIN_SECONDS = 10
NOT_ALL_WRITTEN = 4  # apply: some outputs could not be read or written (not their content's fault): run again
NO_RESULT = 3  # the sweep ran, but no trial completed: no best pipeline (every trial failed)
POLL_SECONDS = 0.25
BAR_WIDTH = 20


# ----------------------------------------------------------------------------- the command lines
def dagster_executable() -> str:
    beside = Path(sys.executable).with_name("dagster")
    return str(beside) if beside.exists() else (shutil.which("dagster") or "dagster")


def asset_selection(sweep_name: str, *assets: str) -> str:
    """``--select`` value for assets of one sweep: ``denoise-demo/image_manifest,denoise-demo/run_settings``."""
    return ",".join(f"{sweep_name}/{asset}" for asset in assets)


def sweep_commands(sweep_name: str, trial_keys: Sequence[str], *, apply: bool = False) -> list[list[str]]:
    """The ``dagster asset materialize`` command lines (argv lists) that run a whole sweep: manifest +
    run settings, every trial as one ranged run, the report — and, for a sweep file with ``apply:``
    (``apply=True``), the winning pipeline applied to its folder. The one place they are spelled out:
    the CLI, the benchmark and the tests use them."""
    if not trial_keys:
        raise ValueError(f"sweep {sweep_name!r} has no trials")
    base = [dagster_executable(), "asset", "materialize", "-m", MODULE]
    return [
        [*base, "--select", asset_selection(sweep_name, "image_manifest", "run_settings")],
        [*base, "--select", asset_selection(sweep_name, "experiment_results"),
         "--partition-range", f"{trial_keys[0]}...{trial_keys[-1]}"],
        [*base, "--select", asset_selection(sweep_name, "sweep_report")],
        *([[*base, "--select", asset_selection(sweep_name, "tuned_images")]] if apply else []),
    ]


def ensure_instance_config(home: Path) -> Path | None:
    """Put the project's dagster.yaml into a new or empty DAGSTER_HOME (what ``make demo`` does), so a
    sweep runs on the instance imgtune is measured on: its event log writes a run's trial events in one
    transaction (Dagster's default SQLite storage writes them one by one). A home that already
    holds a dagster.yaml or a history is the user's and is left alone. Returns the file written, if any."""
    target = home / "dagster.yaml"
    source = PROJECT_DAGSTER_YAML
    if not source.exists() or (home.exists() and any(home.iterdir())):
        return None
    home.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: a half-copied file would make the home "the user's" and never be repaired.
    atomic_write_bytes(target, source.read_bytes())
    return target


def instance_config_note(home: Path) -> str | None:
    """``ensure_instance_config``, and what to tell the user about it: the file installed, or how to
    install it where the home already holds files but no dagster.yaml (Dagster's defaults apply)."""
    installed = ensure_instance_config(home)
    if installed:
        return f"(no dagster.yaml in DAGSTER_HOME: installed the project's, {installed})"
    if PROJECT_DAGSTER_YAML.exists() and not (home / "dagster.yaml").exists():
        return (f"(no dagster.yaml in DAGSTER_HOME {home}, which already holds files: Dagster's defaults apply; "
                f"`cp {shlex.quote(str(PROJECT_DAGSTER_YAML))} {shlex.quote(str(home))}/` for the project's "
                "faster event log)")
    return None


def experiment_results_op(sweep_name: str) -> str:
    """The op name of ``<sweep>/experiment_results`` in run config: Dagster's
    ``AssetKey.to_python_identifier()``, spelled out so the command does not load Dagster for it."""
    return f"{sweep_name}__experiment_results".replace("-", "_").replace(".", "_")


def resume_run_config(sweep_name: str) -> str:
    """Run config (YAML) that resumes a sweep: its experiment_results' ``ExperimentConfig`` with
    ``skip_finished: true``, so trials saved for the same sweep fingerprint and images are reused."""
    return f"ops:\n  {experiment_results_op(sweep_name)}:\n    config:\n      skip_finished: true\n"


def sweep_run_command(sweep_name: str, trial_keys: Sequence[str], invocation: str | None = None,
                      config: str | os.PathLike | None = None, launched_by: str | None = None) -> list[str]:
    """The whole sweep as ONE run of its ``<group>_sweep`` job (what the schedule and the sensor
    request): manifest, settings, every trial as one partition range, the report (and ``tuned_images``
    when the sweep applies its winner), with their checks, in one process with one Ray start.
    ``python -m imgtune_assets.cli sweep`` runs this; ``sweep_commands`` are the same steps one by one.
    ``invocation``: a tag (``INVOCATION_TAG``) by which the command finds its own run afterwards.
    ``config``: a run config file (``-c``; ``dagster job execute`` takes run config from files only).
    ``launched_by``: the launching command (``launcher.LAUNCHER_TAG``), with which the run ends."""
    if not trial_keys:
        raise ValueError(f"sweep {sweep_name!r} has no trials")
    tags = {"dagster/asset_partition_range_start": trial_keys[0],
            "dagster/asset_partition_range_end": trial_keys[-1], "imgtune/trigger": "cli",
            **({INVOCATION_TAG: invocation} if invocation else {}),
            **({LAUNCHER_TAG: launched_by} if launched_by else {})}
    return [dagster_executable(), "job", "execute", "-m", MODULE, "-j", f"{group_name(sweep_name)}_sweep",
            "--tags", json.dumps(tags), *(["-c", str(config)] if config is not None else [])]


# ----------------------------------------------------------------------------- running a command, logged
# Not $DAGSTER_HOME/logs: that folder is Dagster's telemetry queue. The daemon and the webserver move
# whatever lies there to .logs_queue/ and post it to Dagster's telemetry server, whatever dagster.yaml's
# ``telemetry: enabled`` says (it only stops Dagster writing its own events there).
SWEEP_LOGS_FOLDER = "sweep_logs"


# What earlier versions wrote into $DAGSTER_HOME/logs/: <sweep>-<UTC timestamp>.log and .resume.yaml.
_OLD_SWEEP_LOG = re.compile(r"^.+-\d{8}T\d{6}Z\.(log|resume\.yaml)$")


def move_old_sweep_logs(home: Path) -> int:
    """Move the sweep logs (and resume configs) an earlier version kept in ``$DAGSTER_HOME/logs/`` to
    ``sweep_logs/``, before a daemon or webserver posts them to Dagster's telemetry server; Dagster's
    own files there are left alone. How many were moved."""
    old, new = Path(home) / "logs", Path(home) / SWEEP_LOGS_FOLDER
    moved = 0
    try:
        found = [f for f in old.iterdir() if f.is_file() and _OLD_SWEEP_LOG.match(f.name)]
    except OSError:  # no such folder (a new home): nothing to move
        return 0
    for file in found:
        with contextlib.suppress(OSError):
            new.mkdir(exist_ok=True)
            os.replace(file, new / file.name)
            moved += 1
    return moved


def log_file_path(home: Path, sweep_name: str, now: datetime | None = None) -> Path:
    """``$DAGSTER_HOME/sweep_logs/<sweep>-<UTC timestamp>.log``: Dagster's own output for one sweep."""
    now = now or datetime.now(timezone.utc)
    return Path(home) / SWEEP_LOGS_FOLDER / f"{sweep_name}-{now.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}.log"


def claim_log_file(path: Path) -> Path:
    """``path``, created empty for this command alone; ``<stem>-2.log``, ``-3``... when another command
    took it (two sweeps of one name started in the same second must not share a log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = path if attempt == 1 else path.with_name(f"{path.stem}-{attempt}{path.suffix}")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: too many logs of this name")


def launch_logged(command: Sequence[str], log: Path, *, env: dict[str, str] | None = None,
                  cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """Start ``command`` with its stdout and stderr appended to ``log`` (after a ``$ command`` line)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        # The child holds its own copy of the descriptor: closing ours does not cut its output.
        return subprocess.Popen(list(command), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd)


def wait_polling(proc: subprocess.Popen, on_poll: Callable[[], None] | None = None,
                 interval: float = POLL_SECONDS) -> int:
    """Wait for ``proc``, calling ``on_poll`` every ``interval`` seconds meanwhile; its exit code."""
    while True:
        try:
            return proc.wait(timeout=interval)
        except subprocess.TimeoutExpired:
            if on_poll is not None:
                on_poll()


def step_label(step_key: str, sweep_name: str | None = None) -> str:
    """A step as the user names its asset: ``<sweep name>/<asset>`` for a step of the sweep (its key is
    the asset key's Python identifier, ``experiment_results_op``), else the key with ``__`` as ``/``."""
    if sweep_name is not None:
        prefix = experiment_results_op(sweep_name)[: -len("experiment_results")]
        if step_key.startswith(prefix):
            return f"{sweep_name}/{step_key[len(prefix):]}"
    return step_key.replace("__", "/")


def run_failure_reasons(home: Path, invocation: str, sweep_name: str | None = None) -> list[str]:
    """Why the run tagged ``INVOCATION_TAG=invocation`` failed: one line per failed step (``<step>:
    <message>``: the ``Failure``'s description, or the innermost exception; the step named by its asset,
    ``step_label``), else the run's own failure; [] when no such run is recorded. Loads Dagster: for
    failures only."""
    from dagster import DagsterEventType, DagsterInstance, RunsFilter

    with DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs(filters=RunsFilter(tags={INVOCATION_TAG: invocation}), limit=1)
        if not runs:
            return []
        lines = []
        for kind in (DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE):
            for record in instance.get_records_for_run(runs[0].run_id, of_type=kind).records:
                entry = record.event_log_entry
                data = entry.dagster_event.event_specific_data
                user = getattr(data, "user_failure_data", None)
                if user is not None and user.description:
                    reason = user.description
                elif getattr(data, "error", None) is not None:
                    reason = error_summary(data.error)
                else:
                    reason = entry.dagster_event.message or "failed"
                lines += (f"{step_label(entry.step_key, sweep_name)}: {reason}" if entry.step_key else reason).splitlines()
            if lines:
                return lines
    return []


def fail_unfinished_run(home: Path, invocation: str, code: int | None, how: str | None = None,
                        by: str = "the imgtune sweep command") -> bool:
    """Mark failed the run tagged ``INVOCATION_TAG=invocation`` if it is still in progress although its
    process has ended (``code``: its exit status; killed by SIGKILL or the OOM killer, it could not say
    so itself; or ``how`` it ended, said otherwise): else it would show as running for ever, and the
    sweep's new-images sensor would wait for it. Returns whether it did. Loads Dagster: for failures only."""
    from dagster import DagsterInstance, RunsFilter

    from imgtune_assets.defs.jobs import IN_PROGRESS

    with DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs(filters=RunsFilter(tags={INVOCATION_TAG: invocation}), limit=1)
        if not runs or runs[0].status not in IN_PROGRESS:
            return False
        if how is None:
            how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 \
                and -code in signal.valid_signals() else f"exit {code}"
        instance.report_run_failed(runs[0], message=f"the run's process ended ({how}) before the run did; "
                                                     f"marked failed by {by}")
        return True


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_summary(error) -> str:
    """An error (Dagster's ``SerializableErrorInfo``) as a user reads it: the innermost cause's message,
    and when that message carries a traceback of its own (a Ray task's error), its last line — the
    exception — only; terminal colours removed."""
    while error.cause is not None:
        error = error.cause
    lines = [line.rstrip() for line in _ANSI.sub("", error.message).splitlines() if line.strip()]
    if any(line.lstrip().startswith('File "') for line in lines):
        lines = [lines[-1].strip()]
    if lines:  # imgtune's own errors say what happened; their module path says nothing to a user
        lines[0] = _OWN_ERROR_CLASS.sub("", lines[0])
    return "\n".join(lines)


_OWN_ERROR_CLASS = re.compile(r"^imgtune_assets(\.\w+)+: ")


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(log, encoding="utf-8", errors="replace") as handle:
            return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]
    except OSError:
        return []


# ----------------------------------------------------------------------------- what the terminal shows
def read_progress(path: Path, since: float, sweep_name: str | None = None) -> dict[str, Any] | None:
    """The snapshot in ``progress.json`` if it was written at or after ``since`` (a time.time()) and,
    when it names its sweep, by ``sweep_name``."""
    try:
        snap = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # absent, or not (yet) a progress file
        return None
    if not isinstance(snap, dict):
        return None
    try:
        updated = float(snap.get("updated_at") or 0)
    except (TypeError, ValueError):
        return None
    if updated < since or not isinstance(snap.get("done"), int) or not isinstance(snap.get("total"), int):
        return None
    if sweep_name is not None and snap.get("sweep", sweep_name) != sweep_name:
        return None
    return snap


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = width if total <= 0 or done >= total else min(width - 1, int(width * done / total))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _done_of(snap: dict[str, Any]) -> tuple[int, int]:
    """How far a progress snapshot is: image evaluations when it counts them (trials streamed through
    the cluster chunk by chunk all finish at the end), else trials."""
    if snap.get("evaluations_total"):
        return int(snap.get("evaluations_done") or 0), int(snap["evaluations_total"])
    return int(snap["done"]), int(snap["total"])


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 90 else f"{value / 60:.1f} min"


class StepDisplay:
    """One step of a sweep on the terminal. On a TTY: one line redrawn in place (``\\r``) with the
    elapsed time or, for the trials, a progress bar. Otherwise (a log file, cron): a line when the
    trials start, then a new line only when they reach another tenth, or when ``QUIET_SECONDS`` went by
    without one (slow trials: the log shows the run is alive), and one line when the step ends."""

    QUIET_SECONDS = 60.0

    def __init__(self, label: str, stream: IO[str], *, tty: bool, columns: int = 100, quiet: bool = False):
        self.label, self.stream, self.tty, self.columns, self.quiet = label, stream, tty, max(20, columns), quiet
        self._drawn = 0  # length of the line currently drawn (TTY)
        self._tenth = -1  # last tenth of the trials printed (not a TTY); -1: none yet
        self._printed_at = 0.0  # elapsed seconds at the last line printed (not a TTY)
        self._printed_finished = False

    def _draw(self, text: str) -> None:
        text = text[: self.columns - 1]
        self.stream.write("\r" + text + " " * max(0, self._drawn - len(text)))
        self.stream.flush()
        self._drawn = len(text)

    def _print(self, text: str) -> None:
        """A line that stays: whole (it may wrap), over the line being redrawn if any."""
        if self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self._drawn = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, elapsed: float, snap: dict[str, Any] | None = None) -> None:
        if self.quiet:
            return
        if self.tty:
            if snap is None:
                self._draw(f"{self.label} ... {elapsed:.0f} s")
            else:
                self._draw(f"{self.label} {progress_bar(*_done_of(snap))} {describe(snap)}")
            return
        if snap is None or not snap.get("total"):
            return
        done, total = _done_of(snap)
        tenth = min(10, int(10 * done / total))
        quiet_too_long = not snap.get("finished") and elapsed - self._printed_at >= self.QUIET_SECONDS
        if tenth > self._tenth or quiet_too_long:
            self._tenth = max(tenth, self._tenth)
            self._printed_at = elapsed
            self._printed_finished = bool(snap.get("finished"))
            self._print(f"{self.label} {describe(snap)}")

    def finish(self, elapsed: float, snap: dict[str, Any] | None = None, *, ok: bool = True) -> None:
        if self.quiet:
            return
        if not ok:
            self._print(f"{self.label} failed after {_seconds(elapsed)}")
        elif snap is not None and snap.get("finished"):
            if self.tty or not self._printed_finished:
                self._print(f"{self.label} {describe(snap)}")
        elif snap is not None:  # the run ended before it reported every trial
            self._print(f"{self.label} {describe(snap)}; command done in {_seconds(elapsed)}")
        else:
            self._print(f"{self.label} done in {_seconds(elapsed)}")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return format_score(value)
    return str(value)


def summary_score(value: float, metric: str | None = None) -> str:
    """A score in the summary: for a metric bounded by 1 (SSIM, Dice, IoU, edge F1, MAE), 6 decimals
    (``0.961234``), as progress lines show it (``progress.format_score``); else 4 decimals (``31.4159``),
    or 4 significant digits below 0.1, where 4 decimals would show a tiny value as ``0.0002`` or ``0.0000``."""
    if metric in BOUNDED_BY_ONE:
        return format_score(value, metric)
    if value != 0 and abs(value) < 0.1:
        return f"{value:#.4g}"
    return f"{value:.4f}"


def fixed_pipeline_text(stages: list[dict[str, Any]]) -> str:
    """A fixed pipeline's values, named as parameters are (``gaussian_blur.ksize=5``; ``op[i]`` when the
    op comes twice); a stage without values by its op alone."""
    parts = []
    for stage, label in zip(stages, stage_labels([stage["op"] for stage in stages])):
        values = [f"{label}.{k}={_format_value(v)}" for k, v in stage.items() if k != "op"]
        parts.extend(values or [label])
    return ", ".join(parts)


def summary_lines(report: dict[str, Any], settings: dict[str, Any] | None = None) -> list[str]:
    """A sweep's ``report.json`` in three lines — trials and scores, best parameters (a sweep that searches
    nothing: its fixed values), where the report is —
    a line per note (e.g. early stopping that stopped nothing), and a ``warning:`` line each for files the
    manifest skipped (from ``settings``, the sweep's ``run_settings.json``, when it is the report's images)
    and for a best pipeline that does not beat the identity pipeline (the ``tuning_beats_identity`` check)."""
    metric = report.get("metric") or "score"
    completed, total = report.get("completed_trials", 0), report.get("total_trials", 0)
    failed = report.get("failed_trials") or []
    stopped = [f"{len(failed)} failed"] if failed else []
    if report.get("pruned_trials"):  # stopped early by successive halving
        stopped.append(f"{report['pruned_trials']} pruned")
    first = f"{completed}/{counted(total, 'trial')} completed" + (f" ({', '.join(stopped)})" if stopped else "")
    best, identity = report.get("best_score"), report.get("identity_score")
    has_best = bool(report.get("best_trial")) and best is not None and math.isfinite(float(best))
    has_identity = identity is not None and math.isfinite(float(identity))
    if has_best:
        first += f"; best {metric}: {summary_score(float(best), metric)} ({report['best_trial']})"
    else:
        first += f"; no trial completed, no best {metric}"
    if has_identity:
        first += f"; identity pipeline: {summary_score(float(identity), metric)}"
    params = report.get("best_params") or {}
    if report.get("fixed_pipeline"):  # nothing searched: "best parameters: none" would hide the values that ran
        shown = f"fixed pipeline: {fixed_pipeline_text(report['fixed_pipeline'])}"
    else:
        shown = "best parameters: " + (", ".join(f"{k}={_format_value(v)}" for k, v in params.items()) or "none")
    out_dir = report.get("output_dir", "")
    files = ", ".join(["leaderboard.csv", "per_image_scores.csv",
                       *(["best_pipeline.yaml"] if report.get("best_pipeline") else []), "plots/"])
    lines = [first, shown, f"report: {out_dir} ({files})",
             *(f"note: {note}" for note in report.get("notes") or [])]
    # run_settings.json of other images (a later manifest) would count the wrong files: same digest only.
    images = (settings or {}).get("images") if settings and settings.get("manifest_digest") == \
        report.get("manifest_digest") else None
    skipped = sum(1 for row in images or [] if row.get("status") != "ok")
    if skipped:
        lines.append(f"warning: {skipped} of {counted(len(images), 'file')} skipped "
                     "(see image_manifest's metadata or the run log)")
    if has_best and has_identity and "higher_is_better" in report \
            and not improves(float(best), float(identity), bool(report["higher_is_better"])):  # as the check
        lines.append(f"warning: the best pipeline does not beat the identity pipeline ({metric} "
                     f"{summary_score(float(best), metric)} vs {summary_score(float(identity), metric)}): "
                     + ("best_pipeline.yaml is the best tried, not an improvement" if report.get("best_pipeline")
                        else "the best tried is not an improvement"))
    return lines


# ----------------------------------------------------------------------------- the sweep command
def select_sweeps(served: list[Sweep], names: Sequence[str], all_sweeps: bool) -> list[Sweep]:
    """The sweeps to run: by name, all of them, or the only one served. Raises SweepCatalogError."""
    known = ", ".join(s.name for s in served) or "none"
    if names and all_sweeps:
        raise SweepCatalogError("name sweeps or pass --all, not both")
    if all_sweeps:
        return list(served)
    if names:
        return [find_sweep(served, name) for name in dict.fromkeys(names)]
    if len(served) == 1:
        return list(served)
    raise SweepCatalogError(f"{len(served)} sweeps are served (known: {known}): name the ones to run, or pass --all "
                            "(or set IMGTUNE_SWEEP to one sweep file)")


def sweeps_alone(names: Sequence[str]) -> list[Sweep] | None:
    """When the served sweep files cannot be used as a whole (another team's file has a typo), the named
    sweeps read from their own files — each name that of exactly one good file, at fault in none of the
    good files' conflicts (``catalog.cross_sweep_problems``: a sweep that would write its tuned images
    over another's is refused, not run alone) — else None. Each then runs with ``IMGTUNE_SWEEP`` set to
    its file, so its run loads that file alone."""
    from imgtune_assets.core.catalog import cross_sweep_problems, served_sweep_files
    from imgtune_assets.core.sweepfile import load_sweep

    if not names:
        return None
    try:
        files = served_sweep_files()
    except SweepCatalogError:
        return None
    good = []
    for file in files:
        try:
            good.append(load_sweep(file))
        except SweepFileError:
            continue
    chosen = []
    for name in dict.fromkeys(names):
        found = [s for s in good if s.name == name]
        if len(found) != 1:
            return None
        chosen.append(found[0])
    if any(sweep in at_fault for _, at_fault in cross_sweep_problems(good) for sweep in chosen):
        return None
    return chosen


def resume_hint(sweep_name: str, environ: Mapping[str, str] | None = None) -> str:
    """How to go on after an interrupted or killed run: the trials it finished are saved. The command
    carries the variables that chose the sweep files (``IMGTUNE_SWEEP``, ``IMGTUNE_SWEEPS_DIR``) and
    where its trials are saved (``IMGTUNE_OUTPUT_DIR``), so that, run as printed, it finds the same
    sweep and reuses its trials (in another output folder it would compute them all again)."""
    return f"finished trials are kept: `{sweep_command(sweep_name, '--resume', environ=environ)}` resumes"


def run_one_sweep(sweep: Sweep, home: Path, *, out: IO[str], err: IO[str], tty: bool, columns: int,
                  quiet: bool = False, env: dict[str, str] | None = None,
                  on_poll: Callable[[], object] | None = None, resume: bool = False) -> int:
    keys = trial_keys(sweep)
    invocation = uuid.uuid4().hex
    sweep_dir = sweep_output_dir(default_output_dir(), sweep.name)
    log = claim_log_file(log_file_path(home, sweep.name))
    config = None
    if resume:
        # Kept beside the log (not a temporary file), so the command line the log records can be run again.
        config = log.with_suffix(".resume.yaml")
        atomic_write_text(config, resume_run_config(sweep.name))
    print(f"{sweep.name}: {counted(len(keys), 'trial')}{' (resuming)' if resume else ''}; Dagster's log: {log}",
          file=out, flush=True)
    # One run of the sweep's job: one process, one Dagster start, one Ray start for all its steps.
    steps = [(SWEEP_LABEL + (" + tuned images" if sweep.apply_input is not None else ""),
              sweep_run_command(sweep.name, keys, invocation=invocation, config=config, launched_by=process_tag()))]
    for label, command in steps:
        display = StepDisplay(f"  {label}", out, tty=tty, columns=columns, quiet=quiet)
        started = time.time()
        clock = time.perf_counter()
        is_trials = True
        state: dict[str, Any] = {"snap": None}

        def poll() -> None:
            if is_trials:
                state["snap"] = read_progress(sweep_dir / PROGRESS_FILE, started, sweep.name) or state["snap"]
            display.update(time.perf_counter() - clock, state["snap"])
            if on_poll is not None:
                on_poll()

        # The images are read and hashed while Dagster starts; the run's manifest waits for it and finds
        # them probed. Not for a cluster (its nodes may see another copy of the folder).
        ahead = None
        if not (env or os.environ).get(embedded_ray.RAY_ADDRESS_ENV):
            try:
                ahead = ProbeAhead(sweep.data_dir, sweep.needs_target, sweep_dir / PROBE_CACHE_FILE)
            except OSError as exc:  # an output folder it cannot write: the run says so, and fails
                print(f"  (the images are not read ahead: {exc})", file=err, flush=True)
        # The run process ends with this command (core/launcher.py): it is told whose child it is.
        run_env = env if env is not None else dict(os.environ)
        proc = launch_logged(command, log, env={**run_env, LAUNCHER_PID_ENV: str(os.getpid())})
        # Should this command be killed, the run process ends with it, usually before it can record the
        # run's end (its Ray dies with the command): a watch outside this process group records it. The
        # watch is dismissed once this command has seen the run process end and handled the outcome.
        with run_watch.watching(home, invocation, proc, log=log, env=run_env):
            try:
                code = wait_polling(proc, poll)
            except KeyboardInterrupt:
                # Ctrl-C on a terminal reached dagster too (SIGTERM only this command: it is passed on): let it
                # stop its run, then give up.
                try:
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(timeout=INTERRUPT_AGAIN_SECONDS)
                    except subprocess.TimeoutExpired:
                        # Dagster can lose a SIGINT (its handler's exception raised where Python ignores
                        # it, in a weakref callback) and go on: once more, then give up on it.
                        proc.send_signal(signal.SIGINT)
                        proc.wait(timeout=30 - INTERRUPT_AGAIN_SECONDS)
                except (subprocess.TimeoutExpired, OSError):
                    proc.kill()
                    proc.wait()
                    try:
                        fail_unfinished_run(home, invocation, proc.returncode)
                    except Exception as exc:  # noqa: BLE001 - said, on the way out; the run's log has the rest
                        print(f"  (the run could not be marked failed: {type(exc).__name__}: {exc})", file=err)
                display.finish(time.perf_counter() - clock, ok=proc.returncode == 0)
                if proc.returncode == 0:  # it had finished its work when the interruption reached it
                    print(f"interrupted, but the run had finished: it succeeded (the report is in {sweep_dir}); "
                          f"Dagster's log: {log}", file=err, flush=True)
                else:
                    print(f"interrupted; {resume_hint(sweep.name)}; Dagster's log: {log}", file=err, flush=True)
                return INTERRUPTED
            finally:
                if ahead is not None:  # the run is over: a read-ahead it never waited for stops (a failed start)
                    ahead.cancel()
            if is_trials:
                state["snap"] = read_progress(sweep_dir / PROGRESS_FILE, started, sweep.name) or state["snap"]
            display.finish(time.perf_counter() - clock, state["snap"], ok=code == 0)
            if code != 0:
                # (the command line, with its tags, heads the log named last: here the reasons come first)
                how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
                    else f"exit {code}"
                print(f"error: {sweep.name}: {label} failed ({how})", file=err)
                marked = False
                try:
                    marked = fail_unfinished_run(home, invocation, code)
                    reasons = run_failure_reasons(home, invocation, sweep.name)
                except Exception as exc:  # noqa: BLE001 - an instance that cannot be read: said, then the log's tail
                    print(f"    (the run's events could not be read: {type(exc).__name__}: {exc})", file=err)
                    reasons = []
                if reasons:  # what failed and why, from the run's events (the stack traces are in the log)
                    for line in reasons:
                        print(f"    {line}", file=err)
                else:  # no run recorded (Dagster itself failed): its own last words
                    print("the last lines of Dagster's log:", file=err)
                    for line in log_tail(log):
                        print(f"    {line}", file=err)
                if marked or code < 0:  # killed (SIGKILL, the OOM killer) under its run: the saved trials stand
                    print(resume_hint(sweep.name), file=err)
                report_file = sweep_dir / REPORT_FILE
                with contextlib.suppress(OSError):  # a step after the report failed (tuned_images): the report stands
                    if report_file.stat().st_mtime >= started:
                        made = [n for n in ("leaderboard.csv", "best_pipeline.yaml", "plots/") if (sweep_dir / n).exists()]
                        print(f"the report was made before the failure: {sweep_dir} ({', '.join(made)})", file=err)
                print(f"log: {log}", file=err, flush=True)
                return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says it
    report_file = sweep_dir / REPORT_FILE
    try:
        report = json.loads(report_file.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {sweep.name}: no report at {report_file} ({exc}); log: {log}", file=err, flush=True)
        return 1
    try:  # for the files the manifest skipped (a row per file); a warning less without it
        settings = json.loads((sweep_dir / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        settings = None
    reused = (state["snap"] or {}).get("reused") if resume else None
    if reused:
        print(f"  reused {reused} finished trial(s) (--resume)", file=out)
    elif resume:
        print("  reused no finished trial (--resume): none was saved whole for this version of the sweep file (its "
              f"search, objective, seed, sampler) and these images in {sweep_dir / 'trials'} (the image "
              "evaluations an interrupted run saved of unfinished trials are reused all the same: the run's log "
              "says how many)", file=out)
    for line in summary_lines(report, settings):
        print(f"  {line}", file=out)
    tuned = sweep_dir / "tuned_images.json"
    if sweep.apply_input is not None and tuned.exists():
        applied = json.loads(tuned.read_text())
        print(f"  tuned images: {applied['written']} written, {applied['unchanged']} unchanged, "
              f"{applied['skipped']} skipped -> {applied['output_dir']}", file=out)
    out.flush()
    if not report.get("best_trial"):  # the run succeeded, but there is no tuned pipeline: a script must know
        failed = report.get("failed_trials") or []
        print(f"error: {sweep.name}: no trial completed ({len(failed)} failed): no tuned pipeline; each trial's "
              f"error is in {sweep_dir / 'leaderboard.csv'}", file=err, flush=True)
        return NO_RESULT
    return 0


def run_apply(pipeline: str, input_dir: str, output_dir: str, *, endpoint_url: str | None,
              ray_address: str | None) -> int:
    """Apply a fixed pipeline (a ``best_pipeline.yaml``) to every image of a folder, on Ray.

    The pipeline file is read and checked first (a millisecond: its modules are loaded with this
    one), so that a bad one is refused at once. Then the folders are listed and the output folder's
    ledger read (``apply.plan_apply``): when every output stands unread, Ray is not started (or
    connected to) at all. Otherwise, on the embedded Ray (no ``--ray-address``, no
    ``$IMGTUNE_RAY_ADDRESS``), Ray starts in the background while the disk starts reading the local
    files to process (``storage.prefetch``); Dagster is not loaded at all. Ctrl-C or SIGTERM ends it as
    interrupted (130), with the ledger of the outputs written so far.
    """
    from imgtune_assets.core import storage
    from imgtune_assets.core.apply import LEDGER_NAME, ApplyError, fixed_stages, plan_apply
    from imgtune_assets.core.files import remove_temporaries
    from imgtune_assets.core.sweepfile import load_sweep

    # Ctrl-C and SIGTERM (a job scheduler's timeout) interrupt the command: the files being written are
    # finished or removed, the ledger lists the outputs written so far (a re-run goes on from there), Ray
    # is stopped. While it cleans up, one more signal is held, and the next ends it at once.
    global _held_signals
    _held_signals = 0
    previous = {signum: signal.signal(signum, _interrupt_once) for signum in STOP_SIGNALS}
    early: embedded_ray.EmbeddedRayStart | None = None
    target = plan = None
    interrupted, run_started = False, time.time()
    try:
        if "://" in pipeline:  # (Path would fold the URL into a local path that does not exist)
            print(f"error: {pipeline}: the pipeline file is read from this machine's disk, not from a URL: "
                  "copy it here first", file=sys.stderr)
            return 2
        try:
            fixed = load_sweep(pipeline)
            stages = fixed_stages(fixed)
        except (SweepFileError, ApplyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        endpoint = endpoint_url or fixed.endpoint_url
        if endpoint and storage.has_credentials(endpoint):  # (shown without them)
            print(f"error: --endpoint-url {storage.without_credentials(endpoint)}: credentials in a URL are refused; "
                  "they come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE) only",
                  file=sys.stderr)
            return 2
        started = time.perf_counter()
        try:
            source = storage.location(input_dir, base_dir=Path.cwd(), endpoint_url=endpoint)
            target = storage.location(output_dir, base_dir=Path.cwd(), endpoint_url=endpoint)
            plan = plan_apply(stages, source, target)
        except (ApplyError, storage.StorageError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        address = ray_address or os.environ.get(embedded_ray.RAY_ADDRESS_ENV) or None
        early = embedded_ray.EmbeddedRayStart() if address is None and plan.items else None
        return _apply_plan(plan, target, address, early, started)
    except KeyboardInterrupt:
        interrupted = True
        return INTERRUPTED
    finally:
        _hold_stop_signals()
        if early is not None:
            early.settle()  # (Ray's crash handler off SIGTERM, if the start ended after an interruption)
            early.stop()
            embedded_ray.skip_final_collection_at_exit()
        if interrupted:
            if plan is not None and not storage.is_remote(target):  # the stopped tasks' half-written files
                remove_temporaries(target, {item[1].name for item in plan.items}, made_since=run_started)
            print(f"\ninterrupted: {_what_stands(target, LEDGER_NAME)}", file=sys.stderr, flush=True)
        else:  # (interrupted, the process ends next: the signals stay held until then)
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _what_stands(target, ledger_name: str) -> str:
    """What an interrupted ``apply`` leaves: the ledger of what it wrote, if it got that far."""
    from imgtune_assets.core import storage

    try:
        written = target is not None and storage.exists(target / ledger_name)
    except storage.StorageError:
        written = False
    if not written:
        return "no output was written"
    return f"the ledger {target / ledger_name} lists the outputs written; run the same command again to go on"


def _apply_plan(plan, target, address: str | None, early: embedded_ray.EmbeddedRayStart | None,
                started: float) -> int:
    from imgtune_assets.core import storage
    from imgtune_assets.core.apply import LEDGER_NAME, ApplyError, LedgerNotWritten, run_plan
    from imgtune_assets.core.fanout import RayInfrastructureError
    from imgtune_assets.core.imageio import IMAGE_SUFFIXES

    cluster = None
    if early is not None:
        # This machine's Ray reads the files: the disk starts on them while Ray starts.
        in_background(storage.prefetch, plan.sources())
        try:
            early.wait()
        except Exception as exc:  # noqa: BLE001 - Ray's start fails in many ways (its folder, a port, memory)
            print(f"error: the embedded Ray did not start: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        early.restore_sigterm()  # SIGTERM: this command's (an interruption), without Ray's stack dump first
    elif plan.items:  # a cluster: the resource connects
        from imgtune_assets.defs.resources import RayConnectError, RayResource

        cluster = RayResource(address=address)
        try:
            cluster.connect()
        except RayConnectError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except SystemExit as exc:  # Ray's SIGTERM handler, installed by ray.init, exits at once
            if exc.code != signal.SIGTERM:
                raise
            _hold_stop_signals()
            raise KeyboardInterrupt from None
        finally:
            # ray.init (in this thread) put its own SIGTERM handler, and its stack dump, in front of ours.
            if signal.getsignal(signal.SIGTERM) not in (_interrupt_once, _held_stop_signal):
                signal.signal(signal.SIGTERM, _interrupt_once)
    tty = sys.stdout.isatty()
    unrecorded = None  # the ledger could not be written: what was done is printed, and the exit code is 4
    try:
        retries = {"max_retries": cluster.max_retries} if cluster is not None else {}
        result = run_plan(plan, **retries, on_progress=lambda done, total: tty and print(
            f"\r  {progress_bar(done, total)} {done}/{total}", end="", flush=True))
    except LedgerNotWritten as exc:
        result, unrecorded = exc.result, str(exc)
    except (ApplyError, storage.StorageError) as exc:
        print(f"{chr(10) if tty else ''}error: {exc}", file=sys.stderr)
        return 1
    except RayInfrastructureError as exc:  # the ledger lists what was written: a re-run goes on from there
        print(f"{chr(10) if tty else ''}error: {exc.what}; {_what_stands(target, LEDGER_NAME)}", file=sys.stderr)
        return 1
    finally:
        if cluster is not None:
            cluster.teardown_after_execution(None)
    if tty and plan.items:
        print()
    for entry in result.entries:
        if entry["status"] == "skipped":
            print(f"  skipped: {entry['reason']}", file=sys.stderr)
    if not any(entry["output"] for entry in result.entries):
        print(f"warning: no image files in {result.input_dir} ({', '.join(IMAGE_SUFFIXES)})", file=sys.stderr)
    print(f"{result.count('written')} written, {result.count('unchanged')} unchanged, {result.count('skipped')} "
          f"skipped in {time.perf_counter() - started:.1f}s -> {target} (ledger {result.ledger or 'not written'})", flush=True)
    images = [entry for entry in result.entries if entry["output"]]
    if unrecorded is not None:  # (the outputs above stand; without their ledger a re-run redoes them)
        print(f"error: {unrecorded}: the outputs written stand, but without the ledger the same command "
              "run again redoes them", file=sys.stderr)
        return NOT_ALL_WRITTEN
    if images and not any(entry["status"] in ("written", "unchanged") for entry in images):
        # Nothing usable came out: a script (or a scheduler) must see it, not only the lines above.
        where = (" — the Ray cluster's nodes read the files themselves, with the credentials of their own "
                 "environment" if cluster is not None else "")
        print(f"error: none of the {counted(len(images), 'image')} of {result.input_dir} could be processed "
              f"(the reasons are above){where}", file=sys.stderr)
        return 1
    retry = [entry for entry in images if entry["status"] == "skipped" and not entry.get("unusable")]
    if retry:  # a failed read or write (a full disk, a lost connection), not the image's own fault
        print(f"error: {counted(len(retry), 'image')} could not be read or written (the reasons are above), not "
              "for their content: run the same command again to do them", file=sys.stderr)
        return NOT_ALL_WRITTEN
    return 0


def in_background(function: Callable[..., object], *args: Any) -> threading.Thread:
    """``function(*args)`` in a daemon thread (a hint such as a prefetch: the command never waits for it)."""
    thread = threading.Thread(target=function, args=args, name=f"imgtune-{getattr(function, '__name__', 'hint')}",
                              daemon=True)
    thread.start()
    return thread


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_held_signals = 0


def _interrupt_once(signum, frame) -> None:
    """An interruption (KeyboardInterrupt); the signals after it are held while the command cleans up."""
    _hold_stop_signals()
    raise KeyboardInterrupt


def _hold_stop_signals() -> None:
    """From now on (a command cleaning up: its ledger, Ray's stop) Ctrl-C and SIGTERM do not interrupt it:
    the first is held, the second ends the process at once (exit 130, no clean-up)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _held_stop_signal)


def _held_stop_signal(signum, frame) -> None:
    global _held_signals
    _held_signals += 1
    if _held_signals >= 2:
        os._exit(INTERRUPTED)


def hosts_ray(environ: Mapping[str, str]) -> bool:
    """Whether the sweep command starts the embedded Ray for its runs (``ray_for_runs``): not when they
    are to use a cluster (``$IMGTUNE_RAY_ADDRESS``), nor with ``IMGTUNE_EXECUTOR=ray``, whose steps
    start or find their own Ray."""
    executor = environ.get(EXECUTOR_ENV, "").strip().lower()
    return not environ.get(embedded_ray.RAY_ADDRESS_ENV) and executor != "ray"


# The sweep command's folder for its embedded Ray's address, with its owner (launcher.process_tag): a
# command killed with SIGKILL cannot remove its own.
RAY_HOST_FOLDER_PREFIX = "imgtune-ray-host-"
RAY_HOST_OWNER_FILE = "owner.json"


def remove_killed_ray_host_folders(temp_dir: Path) -> list[Path]:
    """Remove the folders of ``ray_for_runs`` that commands killed before their clean-up left in
    ``temp_dir``: this user's, whose owner is known to be gone (``launcher.process_gone``: on this
    machine and pid namespace, no process of its id and start time). Returns those removed."""
    from imgtune_assets.core.launcher import process_gone

    removed = []
    for folder in temp_dir.glob(f"{RAY_HOST_FOLDER_PREFIX}*"):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            owner = (folder / RAY_HOST_OWNER_FILE).read_text()
        except OSError:  # gone already, not ours, or without an owner (an older version's): left alone
            continue
        if process_gone(owner):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
    return removed


@contextlib.contextmanager
def ray_for_runs() -> Iterator[tuple[dict[str, str] | None, embedded_ray.RayHost | None]]:
    """(the environment for the runs the sweep command launches, the command's Ray): with the embedded
    Ray that this command starts at once and stops at the end (``embedded_ray.RayHost``), so that its
    start-up overlaps Dagster's in each run's process, and one Ray serves every sweep of ``--all``;
    (None, None) — the runs start or find their own — when ``hosts_ray`` says no."""
    if not hosts_ray(os.environ):
        yield None, None
        return
    remove_killed_ray_host_folders(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=RAY_HOST_FOLDER_PREFIX) as folder:
        (Path(folder) / RAY_HOST_OWNER_FILE).write_text(process_tag())
        host = embedded_ray.RayHost(folder)
        try:
            yield dict(os.environ, **host.env()), host
        finally:
            host.stop()
            embedded_ray.skip_final_collection_at_exit()


def run_sweeps(names: Sequence[str] = (), all_sweeps: bool = False, quiet: bool = False,
               resume: bool = False) -> int:
    alone = False
    try:
        sweeps = select_sweeps(sweeps_from_environment(), names, all_sweeps)
    except SweepFileError as exc:  # SweepCatalogError too
        picked = sweeps_alone(names) if isinstance(exc, SweepCatalogError) and not all_sweeps else None
        if picked is None:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        # Named sweeps whose own files are good still run: one team's typo does not stop another's sweep.
        sweeps, alone = picked, True
        print(f"warning: the sweep files cannot be served together:\n{exc}\n(the workspace's code location "
              f"refuses to load, and its schedules and sensors wait, until that is fixed); running "
              f"{', '.join(s.name for s in sweeps)} from {'its' if len(sweeps) == 1 else 'their'} own "
              f"file{'s' if len(sweeps) > 1 else ''} ({SWEEP_ENV})", file=sys.stderr, flush=True)
    if not os.environ.get("DAGSTER_HOME"):
        print("error: set DAGSTER_HOME to a folder that keeps the run history (the Makefile uses .dagster_home/)",
              file=sys.stderr)
        return 2
    home = Path(os.environ["DAGSTER_HOME"]).expanduser().resolve()
    note = instance_config_note(home)
    if note:
        print(note, flush=True)
    moved = move_old_sweep_logs(home)
    if moved:
        print(f"moved {counted(moved, 'earlier sweep log file')} from {home / 'logs'} to {home / SWEEP_LOGS_FOLDER} "
              "(Dagster's daemon and webserver post what lies in logs/ to Dagster's telemetry server)", flush=True)
    tty = sys.stdout.isatty()
    columns = shutil.get_terminal_size((100, 24)).columns
    # Every selected sweep runs, whatever happened to the one before: one team's broken data folder
    # must not stop the others' sweeps; the exit code says whether any failed.
    failed: list[tuple[str, int]] = []
    # SIGTERM (a job scheduler, `kill`) stops the command as Ctrl-C does: its run is interrupted and
    # fails cleanly, Ray is stopped, the sweeps after it are not started.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with ray_for_runs() as (env, host):
            for sweep in sweeps:
                # Once the command's Ray is up, SIGTERM is this command's again (not Ray's crash handler's).
                run_env = {**(env if env is not None else os.environ), SWEEP_ENV: str(sweep.path)} if alone else env
                code = run_one_sweep(sweep, home, out=sys.stdout, err=sys.stderr, tty=tty, columns=columns,
                                     quiet=quiet, env=run_env, on_poll=host.restore_sigterm if host else None,
                                     resume=resume)
                if code != 0:
                    failed.append((sweep.name, code))
                if code == INTERRUPTED:
                    break
    except KeyboardInterrupt:  # between runs
        print("interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed:
        ok = [s.name for s in sweeps if s.name not in dict(failed)]
        print(f"failed: {', '.join(f'{name} (exit {code})' for name, code in failed)}"
              + (f"; completed: {', '.join(ok)}" if ok else ""), file=sys.stderr, flush=True)
        return failed[0][1]
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgtune_assets.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser(
        "sweep", help="materialize sweeps: by name, --all, or the one served ($IMGTUNE_SWEEP)",
        description="Run each sweep as one run of its job (`dagster job execute`: manifest, settings, every "
                    "trial, report), on an embedded Ray that this command starts for its runs (unless "
                    "$IMGTUNE_RAY_ADDRESS names a cluster), and print a summary. Dagster's output goes to "
                    "$DAGSTER_HOME/sweep_logs/.")
    sweep.add_argument("names", nargs="*", metavar="NAME", help="sweep names (the `name` of sweep files)")
    sweep.add_argument("--all", action="store_true", dest="all_sweeps", help="every sweep served")
    sweep.add_argument("--quiet", action="store_true", help="no step lines or progress bar, only the summaries")
    sweep.add_argument("--resume", action="store_true",
                       help="finished trials of the current sweep version are reused, not recomputed (after an "
                            "interrupted or failed run: the trials' skip_finished)")
    apply = sub.add_parser(
        "apply", help="apply a tuned pipeline (a best_pipeline.yaml) to every image of a folder, on Ray",
        description="Apply PIPELINE (a sweep file with fixed values, such as the best_pipeline.yaml a sweep report "
                    "writes) to every image directly in INPUT, writing OUTPUT/<same name> in the same format and "
                    "bit depth. Folders may be local or URLs (s3://bucket/prefix); a re-run skips images whose "
                    "input and pipeline did not change. Runs on an embedded local Ray unless --ray-address or "
                    "$IMGTUNE_RAY_ADDRESS names a cluster.")
    apply.add_argument("pipeline", metavar="PIPELINE", help="best_pipeline.yaml (or any sweep file with fixed values)")
    apply.add_argument("input_dir", metavar="INPUT", help="folder or URL of the images")
    apply.add_argument("output_dir", metavar="OUTPUT", help="folder or URL for the results")
    apply.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URLs (default: the pipeline "
                       "file's storage.endpoint_url, else AWS's)")
    apply.add_argument("--ray-address", help="Ray cluster address (default: $IMGTUNE_RAY_ADDRESS, else embedded)")
    args = parser.parse_args(argv)
    if args.command == "sweep":
        return run_sweeps(args.names, args.all_sweeps, quiet=args.quiet, resume=args.resume)
    if args.command == "apply":
        return run_apply(args.pipeline, args.input_dir, args.output_dir, endpoint_url=args.endpoint_url,
                         ray_address=args.ray_address)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
