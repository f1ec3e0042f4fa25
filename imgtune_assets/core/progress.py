"""Progress of a sweep's trials while they run: counts, best score so far, rate and time left.

Plain module (no Dagster, no Ray). The experiment asset feeds it every finished trial and asks, as
trials finish and on a periodic tick, whether a report is due; a due report is a snapshot (a dict,
written to ``<sweep dir>/progress.json``) and a one-line summary for the run log::

    progress = SweepProgress(len(keys), n_images, sweep.objective)
    progress.trial_done(record, reused=False)
    snap = progress.report_if_due()
    if snap:
        context.log.info(progress.line())

Trials that finish together at the end (a data set streamed through the cluster chunk by chunk, every
trial scored on each chunk) show their progress in image evaluations: the caller feeds each chunk
of images done (``chunk_done``), and the line says how many of all image evaluations are done.

A report is due when ``min_interval_seconds`` have passed since the last one (even if no trial
finished: long trials still show signs of life), when ``step_fraction`` of all trials (or of all image
evaluations) finished since it, or, once, when every trial is done.

Image evaluations are counted as done: a trial stopped early by successive halving (``pruned``)
counts the images it was scored on, not all of them, and the evaluations still to do
(``evaluations_total`` less those done; ``evaluations_full`` is trials × images) are every image of
each unfinished trial — or, under successive halving, the images such a trial is expected to be scored
on (``expect_images_per_trial``: the rungs' sizes and the share kept at each), so that the time left is
not that of scoring every trial on every image.

The rate counts computed trials only: trials reused from an earlier run (``reused=True``) cost
nothing, would inflate it and make the time left too optimistic. The rate is measured from
construction, or from :meth:`SweepProgress.start_computing` when the caller marks the moment the
computing starts (after decoding images and starting Ray, say).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

from imgtune_assets.core.metrics import Objective
from imgtune_assets.core.sampling import trial_index


class SweepProgress:
    def __init__(
        self,
        total_trials: int,
        images: int,
        objective: Objective,
        *,
        min_interval_seconds: float = 5.0,
        step_fraction: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sweep_trials: int | None = None,
    ):
        """``sweep_trials``: the sweep's trials, when this run computes only some of them (a backfill, a
        trial from the UI): its best is then the best of this run's trials, and is said to be."""
        if total_trials < 0 or images < 0:
            raise ValueError(f"total_trials and images must be >= 0, got {total_trials} and {images}")
        self.total = int(total_trials)
        self.sweep_trials = int(sweep_trials) if sweep_trials is not None else self.total
        self.images = int(images)
        self.objective = objective
        self.min_interval_seconds = float(min_interval_seconds)
        self.step_fraction = float(step_fraction)
        self._clock = clock
        self._wall_clock = wall_clock
        self._started = clock()
        self._computing_since = self._started
        self.done = 0
        self.failed = 0
        self.pruned = 0
        self.reused = 0
        self.computed = 0
        self.best: float | None = None
        self.best_trial: str | None = None
        self._last_report_at = self._started
        self._done_at_last_report = 0
        self._evaluations_at_last_report = 0
        self._reported_finished = False
        self._partial: dict[str, int] = {}  # unfinished trial -> image evaluations computed so far
        self._finished_evaluations = 0  # finished trials' image evaluations (reused ones included)
        self._expected_images: float | None = None  # per unfinished trial, under successive halving
        self._computed_evaluations = 0  # ... of the trials computed by this run

    # ------------------------------------------------------------------ feeding
    def start_computing(self) -> None:
        """Mark when the trials start being computed: the rate is measured from here (optional)."""
        self._computing_since = self._clock()

    def chunk_done(self, evaluations: Mapping[str, int]) -> None:
        """Image evaluations computed for trials not finished yet (trial -> images of a chunk)."""
        for trial, count in evaluations.items():
            self._partial[trial] = self._partial.get(trial, 0) + int(count)

    def trial_done(self, record: Mapping[str, Any], reused: bool = False) -> None:
        """One trial finished: ``record`` has ``trial``, ``status`` ("ok" | "failed" | "pruned": stopped
        early by successive halving) and ``score``."""
        self._partial.pop(record.get("trial"), None)  # its images count as a finished trial's now
        self.done += 1
        evaluations = self._evaluations_of(record)
        self._finished_evaluations += evaluations
        if reused:
            self.reused += 1
        else:
            self.computed += 1
            self._computed_evaluations += evaluations
        score = record.get("score")
        if record.get("status") == "pruned":
            self.pruned += 1
        elif record.get("status") != "ok":
            self.failed += 1
        elif score is not None and math.isfinite(float(score)) and (
                self.objective.better(float(score), self.best)
                or float(score) == self.best and trial_index(record["trial"]) < trial_index(self.best_trial)):
            # a tie goes to the lower trial, as the report's best_record has it, whatever finished first
            self.best = float(score)
            self.best_trial = record.get("trial")

    def _evaluations_of(self, record: Mapping[str, Any]) -> int:
        """The image evaluations a finished trial took: its per-image results (a pruned trial's rung
        images; none for a pipeline that failed before any image), or every image for a record
        without them."""
        per_image = record.get("per_image")
        return len(per_image) if isinstance(per_image, (list, tuple)) else self.images

    # ------------------------------------------------------------------ reading
    @property
    def finished(self) -> bool:
        return self.done >= self.total

    @property
    def partial_evaluations(self) -> int:
        return sum(self._partial.values())

    @property
    def evaluations_done(self) -> int:
        """Image evaluations done: finished trials' (reused ones included) and unfinished trials' chunks."""
        return self._finished_evaluations + self.partial_evaluations

    def expect_images_per_trial(self, images: float) -> None:
        """Under successive halving, an unfinished trial is expected to be scored on ``images`` images
        on average (``Halving.expected_images_per_trial``), not on all of them."""
        self._expected_images = min(float(self.images), max(0.0, float(images)))

    @property
    def evaluations_total(self) -> int:
        """Image evaluations in all: the finished trials' own, and for each unfinished trial every image
        (or the images it is expected to be scored on: ``expect_images_per_trial``); never below those
        done."""
        per_trial = self.images if self._expected_images is None else self._expected_images
        left = round(max(0, self.total - self.done) * per_trial)
        return max(self._finished_evaluations + left, self.evaluations_done)

    def evaluations_per_second(self) -> float | None:
        """Computed (trial × image) evaluations per second since computing started; None before any."""
        seconds = self._clock() - self._computing_since
        # (no usable images: every trial fails at once, and trials are the unit)
        computed = self._computed_evaluations + self.partial_evaluations if self.images else self.computed
        if computed == 0 or seconds <= 0:
            return None
        return computed / seconds

    def eta_seconds(self) -> float | None:
        if self.finished:
            return 0.0
        rate = self.evaluations_per_second()
        if not rate:
            return None
        left = self.evaluations_total - self.evaluations_done if self.images else self.total - self.done
        return max(0, left) / rate

    def snapshot(self) -> dict[str, Any]:
        """The current state (does not count as a report)."""
        rate = self.evaluations_per_second()
        eta = self.eta_seconds()
        return {
            "done": self.done,
            "total": self.total,
            "sweep_trials": self.sweep_trials,
            "failed": self.failed,
            "pruned": self.pruned,
            "reused": self.reused,
            "images": self.images,
            # image evaluations done (finished trials' and unfinished trials' chunks) out of all
            "evaluations_done": self.evaluations_done,
            "evaluations_total": self.evaluations_total,
            "evaluations_full": self.total * self.images,
            "evaluations_in_progress": self.partial_evaluations,  # of trials not finished yet
            "metric": self.objective.metric,
            "best": self.best,
            "best_trial": self.best_trial,
            "evaluations_per_second": None if rate is None else round(rate, 3),
            "eta_seconds": None if eta is None else round(eta, 3),
            "elapsed_seconds": round(self._clock() - self._started, 3),
            "finished": self.finished,
            "updated_at": self._wall_clock(),
        }

    def is_due(self) -> bool:
        if self._reported_finished:
            return False
        if self.finished:
            return True
        if self._clock() - self._last_report_at >= self.min_interval_seconds:
            return True
        since = self.done - self._done_at_last_report
        if since > 0 and since >= self.step_fraction * self.total:
            return True
        evaluations = self.evaluations_done - self._evaluations_at_last_report
        return evaluations > 0 and evaluations >= self.step_fraction * self.total * self.images

    def report_if_due(self) -> dict[str, Any] | None:
        """A snapshot when a report is due (and count it as reported), else None."""
        if not self.is_due():
            return None
        self._last_report_at = self._clock()
        self._done_at_last_report = self.done
        self._evaluations_at_last_report = self.evaluations_done
        self._reported_finished = self.finished
        return self.snapshot()

    def line(self) -> str:
        """One line for the run log: ``12/32 trials (38%), 1 failed, best psnr 28.41 (trial-007), ...``
        (``best ssim 0.961234``: see ``format_score``)."""
        return describe(self.snapshot())


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 1:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def percent(done: int, total: int) -> int:
    """Whole percent done; never 100 before everything is done."""
    if total <= 0:
        return 100
    value = round(100 * done / total)
    return 100 if done >= total else min(99, value)


def passes_a_tenth(before: int, done: int, total: int) -> bool:
    """Whether going from ``before`` to ``done`` of ``total`` items passes into a new tenth of them (or
    finishes): where a log of "n/total done" says so, whatever steps ``done`` moves by."""
    if total <= 0:
        return False
    return done >= total or done * 10 // total > before * 10 // total


# Metrics whose scores are bounded by 1 (SSIM; Dice, IoU, edge F1 and MAE, a fraction of the range, in
# [0, 1]): good trials differ in the 4th-5th decimal, so their scores are shown with 6 decimals. (PSNR is
# in dB; sharpness, a variance of the Laplacian, is not bounded by 1.)
BOUNDED_BY_ONE = frozenset({"ssim", "dice", "iou", "edge_f1", "mae"})


def format_score(score: float, metric: str | None = None) -> str:
    """A score as progress lines show it: for a metric of ``BOUNDED_BY_ONE``, 6 decimals (4 significant
    digits below 0.001, where 6 decimals would show an MAE of 0.0000234 as ``0.000023``); else 4
    significant digits (a whole number from 10,000 on)."""
    if metric in BOUNDED_BY_ONE:
        return f"{score:#.4g}" if score != 0 and abs(score) < 1e-3 else f"{score:.6f}"
    return f"{score:.4g}" if abs(score) < 1e4 else f"{score:.0f}"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: ``1 trial``, ``0 trials``, ``3 image/target pairs``.
    A fixed pipeline (``trials: 1``, a best_pipeline.yaml run as a sweep) makes a count of one common."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def describe(snap: Mapping[str, Any], *, with_counts: bool = True) -> str:
    """A progress snapshot (``SweepProgress.snapshot()`` or a ``progress.json``) as one line."""
    done, total = int(snap.get("done", 0)), int(snap.get("total", 0))
    parts = [f"{done}/{counted(total, 'trial')} ({percent(done, total)}%)"] if with_counts else []
    evals, all_evals = int(snap.get("evaluations_done") or 0), int(snap.get("evaluations_total") or 0)
    in_progress = snap.get("evaluations_in_progress")
    partly = in_progress > 0 if isinstance(in_progress, int) else evals > done * int(snap.get("images") or 0)
    if with_counts and not snap.get("finished") and all_evals and partly:
        # trials that finish together at the end: how far the images are
        parts[0] = f"{done}/{counted(total, 'trial')}, {percent(evals, all_evals)}% of image evaluations"
    if snap.get("failed"):
        parts.append(f"{snap['failed']} failed")
    if snap.get("pruned"):
        parts.append(f"{snap['pruned']} pruned")
    metric = snap.get("metric") or "score"
    if snap.get("best") is not None:
        of = " of this run" if int(snap.get("sweep_trials") or total) > total else ""
        parts.append(f"best{of} {metric} {format_score(float(snap['best']), metric)} ({snap.get('best_trial')})")
    rate = snap.get("evaluations_per_second")
    if rate:
        parts.append(f"{rate:.1f} evaluations/s")
    if snap.get("finished"):
        parts.append(f"done in {_duration(snap.get('elapsed_seconds') or 0)}")
    elif snap.get("eta_seconds") is not None:
        eta = float(snap["eta_seconds"])
        parts.append("about a second left" if eta < 1.5 else f"about {_duration(eta)} left")
    return ", ".join(parts)


def reuse_message(reused: int, total: int) -> str:
    """The experiment step's log line when it runs with ``skip_finished`` (a resumed sweep)."""
    return f"reusing {reused} finished trial(s) (skip_finished), computing {total - reused} of {total}"


def partial_reuse_message(known: dict[str, dict[str, Any]], keys: Sequence[str]) -> str | None:
    """With ``skip_finished``, what the chunks an interrupted run saved (``known``: trial -> image ->
    result) spare the trials ``keys`` still to compute; None when they spare nothing."""
    saved = {k: len(known[k]) for k in keys if known.get(k)}
    if not saved:
        return None
    return (f"reusing {sum(saved.values())} saved image evaluation(s) of {len(saved)} unfinished trial(s) "
            "(skip_finished)")
