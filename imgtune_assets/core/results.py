"""Where a sweep's results live on disk, and which of them are current.

Plain module (no Dagster). A trial's result is ``<sweep dir>/trials/<trial key>.json``, written
atomically as soon as the trial completes. A result is *current* when it was computed from the same
sweep settings (fingerprint) and the same images (manifest digest) as the run asking; an older one is
*stale*: kept on disk, never reused or reported. The identity pipeline's score (no processing), the
baseline the report compares against, is cached beside them under the same rule.

A failed record whose error is one of Ray's own (``lost_to_ray``: written by earlier versions of
imgtune, which recorded the trials whose tasks Ray's dying node took down as failed, blaming an image)
is no result either: neither reused by ``skip_finished`` nor reported (its trial is missing), so its
trial is computed again. Such records are told reliably by their error text: every per-image error is
``<exception class>: <message>``, and Ray's infrastructure classes (``fanout.RAY_INFRASTRUCTURE_ERRORS``)
are never what a pipeline (OpenCV, NumPy) raises. Today ``fanout.run_trials`` records nothing for such
an error (the run fails instead). A trial failed by its own exception, or by a worker lost beyond
Ray's retries (``WorkerCrashedError``, see ``fanout``), stays a failed result and is reused like any
other.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from imgtune_assets.core.evaluate import IDENTITY_STAGES, evaluate_chunk
from imgtune_assets.core.files import atomic_write_json, remove_temporaries
from imgtune_assets.core.metrics import Objective
from imgtune_assets.core.sampling import trial_index, trial_key



def lost_to_ray(record: dict[str, Any]) -> bool:
    """Whether ``record`` is a failed trial whose error (its own, or an image's) is one of Ray's
    infrastructure errors (``fanout.RAY_INFRASTRUCTURE_ERRORS``): a trial Ray lost, not one that failed."""
    if not isinstance(record, dict) or record.get("status") != "failed":
        return False
    errors = [record.get("error")] + [row.get("error") for row in record.get("per_image") or []
                                      if isinstance(row, dict)]
    pattern = _ray_error_pattern()
    return any(isinstance(error, str) and pattern.match(error) for error in errors)


@functools.cache
def _ray_error_pattern() -> re.Pattern[str]:
    """An error text that begins with one of Ray's infrastructure classes: an image's error begins with
    its exception's class name (the record's own ``error`` repeats its first failed image's, after the
    image's name; a trial-level error begins with the class name), and ``ray.get`` raises a task's
    error as ``RayTaskError(OwnerDiedError)``, a class named after its cause."""
    from imgtune_assets.core.fanout import RAY_INFRASTRUCTURE_ERRORS

    return re.compile(rf"(?:RayTaskError\()?(?:{'|'.join(RAY_INFRASTRUCTURE_ERRORS)})\)?:")


TRIAL_STATUSES = ("ok", "failed", "pruned")


def trial_record_problem(record: Any) -> str | None:
    """What makes ``record`` unusable as a saved trial result, or None: the fields every reader of
    results relies on, with their types."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for name, kind in (("trial", str), ("status", str), ("fingerprint", str), ("manifest_digest", str),
                       ("params", dict)):
        if not isinstance(record.get(name), kind):
            return f"its {name!r} is missing or not a {kind.__name__}"
    if record["status"] not in TRIAL_STATUSES:
        return f"its status {record['status']!r} is not one of {', '.join(TRIAL_STATUSES)}"
    score = record.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        return f"its score {score!r} is not a number"
    return None


def damaged_message(file: Path, why: str) -> str:
    return f"{file}: not a usable trial result ({why}): its trial counts as not computed (running it replaces the file)"


class TrialStore:
    """The trial results of one sweep for one (fingerprint, manifest digest). Results saved under one of
    ``earlier`` fingerprints (``Sweep.earlier_fingerprints``: the same trials, hashed as an earlier
    version did) are current too; new ones are saved under ``fingerprint``."""

    def __init__(self, sweep_dir: Path, fingerprint: str, manifest_digest: str, earlier: Sequence[str] = ()):
        self.folder = Path(sweep_dir) / "trials"
        self.fingerprint = fingerprint
        self.accepted = {fingerprint, *earlier}
        self.manifest_digest = manifest_digest
        self.damaged: dict[Path, str] = {}  # result files that could not be used, and why (``_read_file``)

    @classmethod
    def of_sweep(cls, sweep_dir: Path, sweep, manifest_digest: str) -> TrialStore:
        """The store of ``sweep`` (a ``Sweep``) for these images: its fingerprint, and the earlier ones
        its saved results may carry."""
        return cls(sweep_dir, sweep.fingerprint(), manifest_digest, sweep.earlier_fingerprints())

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def save(self, record: dict[str, Any]) -> Path:
        return atomic_write_json(self.path(record["trial"]), record)

    # A write's temporary file lives for the milliseconds of writing a small JSON file; one this old was
    # left by a run killed (SIGKILL, a lost node) between creating it and renaming it into place.
    KILLED_WRITE_AGE_SECONDS = 60.0

    def remove_killed_writes(self) -> list[Path]:
        """Remove the temporary files of result writes that a killed run left in ``trials/`` and its
        ``partial/`` folder (each one's result was never saved, so nothing is lost); a run that is writing
        beside this one (a parallel backfill of other trials) keeps its own, which are seconds old."""
        return [file for folder in (self.folder, self.partial_folder)
                for file in remove_temporaries(folder, None, older_than_seconds=self.KILLED_WRITE_AGE_SECONDS)]

    def damaged_messages(self) -> list[str]:
        """What the run's log says of each damaged result file read so far (``damaged_message``)."""
        return [damaged_message(file, why) for file, why in self.damaged.items()]

    def _read_file(self, file: Path) -> dict[str, Any] | None:
        """The record in ``file``; None when there is none, or when it is damaged (atomic writes make that
        a hand-edited, foreign or disk-damaged file): then its trial counts as not computed — the next
        run computes it again and replaces the file — and ``damaged`` says why, for the run's log."""
        if not file.exists():
            return None
        try:
            record = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.damaged[file] = f"not JSON ({exc})"
            return None
        problem = trial_record_problem(record)
        if problem is not None:
            self.damaged[file] = problem
            return None
        return record

    def _read(self, key: str) -> dict[str, Any] | None:
        """The result saved under ``key``; or, when there is none or it is stale, a current one saved
        under the key padded to the trial count (``trial-0007`` in a sweep of more than 1,000 trials,
        before keys kept three digits), which is then saved under ``key`` too (the migration)."""
        record = self._read_file(self.path(key))
        if record is not None and self.is_current(record):
            return record
        index = trial_index(key)
        for width in range(len(key) - len("trial-") + 1, 7):
            legacy = self._read_file(self.path(f"trial-{index:0{width}d}"))
            if isinstance(legacy, dict) and self.is_current(legacy):
                migrated = {**legacy, "trial": key}
                self.save(migrated)
                return migrated
        return record

    def is_current(self, record: dict[str, Any]) -> bool:
        return record.get("fingerprint") in self.accepted and record.get("manifest_digest") == self.manifest_digest

    def load(self, key: str) -> dict[str, Any] | None:
        """The trial's result if it is current, else None (absent, stale, or ``lost_to_ray``)."""
        record = self._read(key)
        return record if record is not None and self.is_current(record) and not lost_to_ray(record) else None

    def load_all(self, keys: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
        """Current results of ``keys`` in key order, and how many stale ones were found (a record
        ``lost_to_ray`` is neither: its trial is missing)."""
        records, stale = [], 0
        for key in keys:
            record = self._read(key)
            if record is None or lost_to_ray(record):
                continue
            if self.is_current(record):
                records.append(record)
            else:
                stale += 1
        return records, stale

    # ------------------------------------------------------------------ progress within trials
    @property
    def partial_folder(self) -> Path:
        return self.folder / "partial"

    def save_chunk(self, ids: Sequence[str], results: dict[str, list[dict[str, Any]]],
                   identity: list[dict[str, Any]] | None) -> Path | None:
        """Save one chunk's per-image results of unfinished trials (a run over more images than the
        object store holds completes its trials only at the end): a killed run resumed with
        ``skip_finished`` then recomputes only the chunks it had not finished."""
        if not results and identity is None:
            return None
        name = hashlib.sha256("\0".join(ids).encode()).hexdigest()[:16]
        return atomic_write_json(self.partial_folder / f"{name}.json", {
            "fingerprint": self.fingerprint, "manifest_digest": self.manifest_digest, "ids": list(ids),
            "results": {trial: [dict(r, id=i) for i, r in zip(ids, rows)] for trial, rows in results.items()},
            "identity": [dict(r, id=i) for i, r in zip(ids, identity)] if identity is not None else None,
        })

    def load_chunks(self) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, Any]]]:
        """Current saved chunk progress: (trial -> image id -> result, image id -> identity result).
        Files from other settings or images, or damaged ones, are ignored (progress is a cache)."""
        known: dict[str, dict[str, dict[str, Any]]] = {}
        identity: dict[str, dict[str, Any]] = {}
        if not self.partial_folder.is_dir():
            return known, identity
        for file in sorted(self.partial_folder.glob("*.json")):
            try:
                saved = json.loads(file.read_text())
            except (json.JSONDecodeError, OSError):
                continue
            if not isinstance(saved, dict) or not self.is_current(saved):
                continue
            for trial, rows in saved.get("results", {}).items():
                for row in rows:
                    known.setdefault(trial_key(trial_index(trial)), {})[row["id"]] = per_image_result(row)
            for row in saved.get("identity") or []:
                identity[row["id"]] = per_image_result(row)
        return known, identity

    def clear_chunks(self) -> None:
        """Forget chunk progress once every trial it served is saved whole."""
        if self.partial_folder.is_dir():
            for file in self.partial_folder.glob("*.json"):
                file.unlink(missing_ok=True)

    def split_finished(self, keys: Sequence[str], skip_finished: bool) -> tuple[list[dict[str, Any]], list[str]]:
        """(current results to reuse, keys to compute): with ``skip_finished`` off, everything is computed.
        A failed result is reused (its trial fails the same way again), except one ``lost_to_ray``."""
        if not skip_finished:
            return [], list(keys)
        reused, todo = [], []
        for key in keys:
            record = self.load(key)
            if record is None:
                todo.append(key)
            else:
                reused.append(record)
        return reused, todo


def per_image_result(row: dict[str, Any]) -> dict[str, Any]:
    """A saved per-image row as the fan-out's result (a missing score is NaN)."""
    score = row.get("score")
    return {"score": float("nan") if score is None else float(score), "seconds": row.get("seconds", 0.0),
            "error": row.get("error")}


class IdentityBaseline:
    """The identity pipeline's mean score on a sweep's images, cached in ``<sweep dir>/identity.json``."""

    def __init__(self, sweep_dir: Path, objective: Objective, manifest_digest: str):
        self.file = Path(sweep_dir) / "identity.json"
        self.objective = objective
        self.manifest_digest = manifest_digest

    def _key(self) -> dict[str, Any]:
        return {"manifest_digest": self.manifest_digest, "objective": self.objective.to_dict()}

    def cached(self) -> float | None:
        if not self.file.exists():
            return None
        try:
            saved = json.loads(self.file.read_text())
        except json.JSONDecodeError:  # a cache: a damaged one is recomputed (and rewritten whole)
            return None
        if not isinstance(saved, dict):
            return None
        if {k: saved.get(k) for k in ("manifest_digest", "objective")} != self._key() or saved.get("score") is None:
            return None
        return float(saved["score"])

    def save(self, results: Iterable[dict[str, Any]]) -> float:
        """Cache the mean of per-image identity results (as the fan-out's decode tasks score them)."""
        scores = [r["score"] for r in results if not r.get("error") and r["score"] == r["score"]]
        score = float(np.mean(scores)) if scores else None
        atomic_write_json(self.file, {**self._key(), "score": score})
        return float("nan") if score is None else score

    def compute(self, images: Iterable[tuple[np.ndarray, np.ndarray | None]]) -> float:
        """Score the identity pipeline over (image, target) pairs taken one at a time (so a generator
        keeps one decoded image in memory), and cache it."""
        results = [evaluate_chunk(IDENTITY_STAGES, [image], [target], self.objective)[0] for image, target in images]
        return self.save(results)

    def score(self, pairs: Callable[[], Iterable[tuple[np.ndarray, np.ndarray | None]]]) -> float:
        """The cached score, or computed from ``pairs()`` when there is none for these images."""
        cached = self.cached()
        if cached is not None:
            return cached
        return self.compute(pairs())
