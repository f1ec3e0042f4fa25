"""Where a sweep's results live on disk, and which of them are current.

Plain module (no Dagster). A trial's result is ``<sweep dir>/trials/<trial key>.json``, written
atomically as soon as the trial completes. A result is *current* when it was computed from the same
sweep settings (fingerprint) and the same images (manifest digest) as the run asking; an older one is
*stale*: kept on disk, never reused or reported. The identity pipeline's score (no processing), the
baseline the report compares against, is cached beside them under the same rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from imgtune_assets.core.evaluate import evaluate_chunk
from imgtune_assets.core.files import atomic_write_json
from imgtune_assets.core.metrics import Objective

IDENTITY_STAGES = [("identity", {})]


class TrialStore:
    """The trial results of one sweep for one (fingerprint, manifest digest)."""

    def __init__(self, sweep_dir: Path, fingerprint: str, manifest_digest: str):
        self.folder = Path(sweep_dir) / "trials"
        self.fingerprint = fingerprint
        self.manifest_digest = manifest_digest

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def save(self, record: dict[str, Any]) -> Path:
        return atomic_write_json(self.path(record["trial"]), record)

    def _read(self, key: str) -> dict[str, Any] | None:
        file = self.path(key)
        if not file.exists():
            return None
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as exc:  # atomic writes make this a foreign or hand-edited file
            raise ValueError(f"{file}: not a trial result ({exc})") from None

    def is_current(self, record: dict[str, Any]) -> bool:
        return (record.get("fingerprint"), record.get("manifest_digest")) == (self.fingerprint, self.manifest_digest)

    def load(self, key: str) -> dict[str, Any] | None:
        """The trial's result if it is current, else None (absent or stale)."""
        record = self._read(key)
        return record if record is not None and self.is_current(record) else None

    def load_all(self, keys: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
        """Current results of ``keys`` in key order, and how many stale ones were found."""
        records, stale = [], 0
        for key in keys:
            record = self._read(key)
            if record is None:
                continue
            if self.is_current(record):
                records.append(record)
            else:
                stale += 1
        return records, stale

    def split_finished(self, keys: Sequence[str], skip_finished: bool) -> tuple[list[dict[str, Any]], list[str]]:
        """(current results to reuse, keys to compute): with ``skip_finished`` off, everything is computed."""
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
        if {k: saved.get(k) for k in ("manifest_digest", "objective")} != self._key() or saved.get("score") is None:
            return None
        return float(saved["score"])

    def compute(self, images: Sequence[np.ndarray], targets: Sequence[np.ndarray | None]) -> float:
        """Score the identity pipeline on decoded images and cache it."""
        results = evaluate_chunk(IDENTITY_STAGES, images, targets, self.objective)
        scores = [r["score"] for r in results if not r["error"]]
        score = float(np.mean(scores)) if scores else None
        atomic_write_json(self.file, {**self._key(), "score": score})
        return float("nan") if score is None else score

    def score(self, load_images: Callable[[], tuple[Sequence[np.ndarray], Sequence[np.ndarray | None]]]) -> float:
        """The cached score, or computed from ``load_images()`` when there is none for these images."""
        cached = self.cached()
        if cached is not None:
            return cached
        images, targets = load_images()
        return self.compute(images, targets)
