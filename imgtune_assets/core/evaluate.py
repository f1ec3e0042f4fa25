"""Evaluating one trial's pipeline on images: the unit of work, shared by every runner
(Ray tasks, the benchmark's multiprocessing floor, the report's before/after pictures)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from imgtune_assets.core.metrics import Objective
from imgtune_assets.core.ops import apply_pipeline

Stages = Sequence[tuple[str, dict[str, Any]]]
NAN_SCORE = "metric returned NaN"
# No processing: the baseline every sweep's report compares against.
IDENTITY_STAGES = [("identity", {})]


def evaluate_image(stages: Stages, image: np.ndarray, target: np.ndarray | None,
                   objective: Objective) -> dict[str, Any]:
    """Run the pipeline on one image and score it; an exception becomes an ``error`` entry."""
    start = time.perf_counter()
    try:
        output = apply_pipeline(image, stages)
        value = float(objective.score(output, target))
        error = None
        if math.isnan(value):
            error, value = NAN_SCORE, float("nan")
    except Exception as exc:  # noqa: BLE001 - a trial's failure is data: it is recorded, not raised
        value, error = float("nan"), f"{type(exc).__name__}: {exc}".strip()
    return {"score": value, "seconds": time.perf_counter() - start, "error": error}


def evaluate_chunk(stages: Stages, images: Sequence[np.ndarray], targets: Sequence[np.ndarray | None],
                   objective: Objective) -> list[dict[str, Any]]:
    return [evaluate_image(stages, img, tgt, objective) for img, tgt in zip(images, targets)]


@dataclass
class TrialOutcome:
    """A trial's result: the mean of its per-image scores, and the per-image scores themselves."""

    trial: str
    params: dict[str, Any]
    stages: list
    image_ids: list[str]
    per_image: list[dict[str, Any]]
    seconds: float = 0.0
    workers: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    # Staged searches (core/search.py): the round that proposed it, by what, the last rung it reached
    # and whether successive halving stopped it there.
    round: int | None = None
    source: str | None = None
    rung: int | None = None
    pruned: bool = False
    round_started_at: float | None = None  # wall clock (epoch seconds) when its round started
    # A pruned trial's estimate of its mean over every image, by which its rung ranked it (its partial
    # mean plus the gap that the earlier rounds predict from its parameters; search.RungGaps).
    estimated_score: float | None = None

    @property
    def images_failed(self) -> int:
        return sum(1 for r in self.per_image if r.get("error"))

    @property
    def images_scored(self) -> int:
        return len(self.per_image) - self.images_failed

    @property
    def status(self) -> str:
        # A trial with any failed image is not comparable with the others: it is failed, not ranked.
        if self.error or self.images_failed or not self.per_image:
            return "failed"
        return "pruned" if self.pruned else "ok"

    @property
    def score(self) -> float:
        values = [r["score"] for r in self.per_image if not r.get("error")]
        return float(np.mean(values)) if values and self.status == "ok" else float("nan")

    @property
    def first_error(self) -> str | None:
        if self.error:
            return self.error
        for image_id, r in zip(self.image_ids, self.per_image):
            if r.get("error"):
                return f"image {image_id}: {r['error']}"
        return None

    @property
    def partial_score(self) -> float:
        """Mean over the images scored (a pruned trial's only score)."""
        values = [r["score"] for r in self.per_image if not r.get("error")]
        return float(np.mean(values)) if values else float("nan")

    def to_record(self, *, sweep_name: str, fingerprint: str, metric: str, manifest_digest: str) -> dict[str, Any]:
        staged = {} if self.round is None else {
            "round": self.round, "source": self.source, "rung": self.rung,
            "partial_score": None if math.isnan(self.partial_score) else self.partial_score,
            "estimated_score": self.estimated_score,
            "round_started_at": self.round_started_at, "finished_at": time.time()}
        return {
            "sweep": sweep_name,
            "fingerprint": fingerprint,
            "manifest_digest": manifest_digest,
            "trial": self.trial,
            "metric": metric,
            "status": self.status,
            "error": self.first_error,
            "score": None if math.isnan(self.score) else self.score,
            "params": self.params,
            "stages": self.stages,
            "images_scored": self.images_scored,
            "images_failed": self.images_failed,
            "seconds": self.seconds,
            "per_image": [
                {"id": i, "score": None if math.isnan(r["score"]) else r["score"], "seconds": r["seconds"],
                 "error": r["error"]}
                for i, r in zip(self.image_ids, self.per_image)
            ],
            "workers": self.workers,
            **staged,
        }
