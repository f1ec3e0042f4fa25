"""A search that learns: trials proposed in rounds from earlier results (Optuna's TPE or CMA-ES through
ask-and-tell), successive halving over images, warm starts from the previous report, and the ledger
that freezes every proposal.

Plain module (no Dagster, no Ray): the caller supplies ``evaluate`` (the Ray fan-out in the asset, a
process pool in ``benchmarks/search_bench.py``). ``optuna`` is imported where a proposal is made.

Decisions (also in the README):

- **Rounds.** A *staged* sweep (``sampler: tpe|cmaes``, or any sampler with ``early_stopping``) runs its
  trials in rounds: round 0 holds the first ``n_startup`` trials (warm starts, then an initial design
  of Sobol' or Halton points; for ``random``/``grid``/``halton``/``sobol`` simply the sampler's points),
  every later round ``batch_size`` trials. Round boundaries depend only on ``n_startup`` and
  ``batch_size``, never on ``trials``: raising ``trials`` adds rounds (or fills the last one) and
  leaves every earlier proposal as it was. The default ``batch_size`` is the cluster's CPU count when
  the sweep's ledger is started (with early stopping at least ``eta²``: ``default_batch``; it is
  recorded in the ledger and kept after).
- **The ledger** (``<sweep dir>/search/ledger-<fingerprint>-<manifest digest>.json``, written
  atomically) records each round's proposals when they are made: a round is proposed whole, from the
  sweep file, the seed, the manifest and the results of all earlier rounds, and never again. A re-run
  of ``trial-017`` evaluates its recorded parameters; a killed run resumed with ``skip_finished``
  evaluates the recorded proposals and proposes later rounds from the same results, so it ends with
  the same ledger as an undisturbed run. The samplers keep no state: each proposal rebuilds an Optuna
  study from the ledger and the results (TPE from the finished trials; CMA-ES by replaying its earlier
  generations with their recorded parameters, ``enqueue_trial`` + ``ask`` + ``tell``). The ledger is
  started and extended under a file lock, re-read first: two runs of one sweep at once agree.
- **TPE fine-tuned by a Gaussian process.** Part of each TPE batch is proposed by expected improvement
  under a Gaussian process (scikit-learn's, one length scale per parameter) fitted to every earlier
  trial, after TPE's part and told about it (``gp_proposals``, recorded with ``source: gp``). The GP's
  share grows over the sweep's rounds (``gp_count``: ``r / (rounds + 1)`` of round ``r``, half of the
  adaptive trials in all): TPE explores first, the GP fine-tunes last. TPE alone found the right region
  but stayed short of the best (0.07 dB at the median on the denoising benchmark); half of every batch
  from the GP fine-tuned well at the median but, exploiting from round 1, sometimes fine-tuned the
  wrong basin (worst seed 0.43 dB short). Optuna's own ``GPSampler`` needs PyTorch, too heavy a
  dependency for this.
- **Choices.** With ``choice`` parameters TPE models each branch (combination of choice values) apart,
  every branch gets a try and the batch is shared by rank (``_branch_tpe``): one model over all
  branches lets a branch that scores well whatever its other parameters starve a better one.
- **A trial requested before it can be proposed** (its earlier rounds have trials without a result)
  is an error that names those trials: proposing from partial results would make the proposal depend
  on which partitions happened to run first. Run the sweep's whole range (the CLI, the schedule, the
  sensor and a backfill do) or the earlier trials first.
- **Successive halving** (``early_stopping: {method: successive_halving, eta, min_images}``) is
  synchronous within a round: every candidate scores the same first ``min_images`` images of one
  seeded order of the images (the same order in every round, so the decoded images stay in Ray's
  object store for the next round; a new order per round was measured, a little better on the worst
  seeds, but it decodes every round's subsets again), the best ``ceil(n / eta)`` go on to
  ``eta`` times as many, and so on; the last rung is every image. The ranking uses only per-image
  scores, so the outcome never depends on timing, and a resumed round recomputes nothing it had
  (per-image scores of settled trials are in their records). A rung ranks its candidates by an
  estimate of their mean over every image: the mean over the rung's images plus the gap to the full
  mean that ``RungGaps`` predicts at the candidate's parameters, learnt from the earlier rounds' trials
  that went on (a few images are not a fair sample; how far their mean is from the full one depends on
  the parameters). A stopped trial is ``pruned``: its rung, the images it scored and its partial mean
  are recorded, and it ranks below complete trials. TPE learns from pruned trials as Optuna's own
  pruners teach it (state ``PRUNED`` with the partial mean as an intermediate value at the number of
  images); CMA-ES, which needs a value for every member of a generation, and the Gaussian process are
  told the same estimate of the full mean that ranked the trial (``trial_values``).
- **Warm starts** (adaptive samplers): when a ledger is started for images that differ from the ones
  the sweep's last report was made for, that report's top ``warm_start`` parameter sets (default 3;
  in the leaderboard's order, so pruned trials fill in where fewer trials completed) are the first
  trials of round 0, recorded with ``source: warm-start``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from imgtune_assets.core.evaluate import TrialOutcome
from imgtune_assets.core.files import atomic_write_json
from imgtune_assets.core.results import per_image_result
from imgtune_assets.core.sampling import (
    ADAPTIVE_SAMPLERS,
    Dimension,
    Point,
    _tidy,
    grid_axes,
    sample_point,
    search_space,
    space_digest,
    trial_index,
    trial_key,
    trial_stages,
)

if TYPE_CHECKING:  # (sweepfile.py imports this module's options)
    from imgtune_assets.core.sweepfile import Sweep

INITIAL_DESIGNS = ("sobol", "halton")
DEFAULT_WARM_START = 3
DEFAULT_ETA = 3
LEDGER_FORMAT = 1

# (trials, image ids, known results: trial -> image id -> result) -> trial -> image id -> result
Evaluate = Callable[[list[dict[str, Any]], list[str], dict[str, dict[str, dict[str, Any]]]],
                    dict[str, dict[str, dict[str, Any]]]]


class SearchError(ValueError):
    """A staged search that cannot go on as asked (e.g. a trial requested before its round can be
    proposed). The message names the trials."""


# ---------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Halving:
    """Successive halving over images."""

    eta: int = DEFAULT_ETA
    min_images: int | None = None  # default: max(3, ceil(n_images / eta²)) — three rungs for a few dozen

    def rung_sizes(self, n_images: int) -> list[int]:
        """Images scored at each rung, ending with all of them."""
        if n_images <= 0:
            return [0]
        first = self.min_images if self.min_images is not None else max(3, math.ceil(n_images / self.eta ** 2))
        sizes, size = [], max(1, first)
        while size < n_images:
            sizes.append(size)
            size *= self.eta
        return sizes + [n_images]

    def expected_images_per_trial(self, n_candidates: int, n_images: int) -> float:
        """The images a trial of a round of ``n_candidates`` is scored on, on average, when the round
        runs its rungs as ``run_round`` does (the best ``ceil(n / eta)`` go on from each rung): what the
        progress line expects the unfinished trials to cost."""
        keep, total, scored = max(1, n_candidates), 0, 0
        for size in self.rung_sizes(n_images):
            total += keep * (size - scored)
            scored, keep = size, max(1, math.ceil(keep / self.eta))
        return total / max(1, n_candidates)

    def inactive_reason(self, n_images: int) -> str | None:
        """Why early stopping stops nothing with ``n_images`` images (``min_images`` not below their
        number: one rung, every trial scores every image), or None when it works. Not an error: a
        nightly sweep's folder may hold fewer images one night; the run says so instead."""
        if n_images <= 0 or len(self.rung_sizes(n_images)) > 1:
            return None
        if self.min_images is None:
            return (f"early_stopping: the first rung (at least 3 images) holds all {n_images} usable images: every "
                    f"trial scores every image, nothing is stopped early")
        default = max(3, math.ceil(n_images / self.eta ** 2))
        advice = (f"lower min_images, or leave it out: by default {default} here" if default < n_images
                  else f"min_images must be below {n_images} for any trial to stop early")
        return (f"early_stopping.min_images {self.min_images} is not below the {n_images} usable images: every "
                f"trial scores every image, nothing is stopped early ({advice})")

    def to_dict(self) -> dict[str, Any]:
        return {"method": "successive_halving", "eta": self.eta, "min_images": self.min_images}


@dataclass(frozen=True)
class SearchOptions:
    """The sweep file's ``search:`` mapping."""

    batch_size: int | None = None
    n_startup: int | None = None
    initial_design: str = "sobol"
    warm_start: int = DEFAULT_WARM_START

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "n_startup": self.n_startup,
                "initial_design": self.initial_design, "warm_start": self.warm_start}


def is_staged(sweep) -> bool:
    """Whether the sweep runs in rounds (an adaptive sampler or early stopping)."""
    return sweep.sampler in ADAPTIVE_SAMPLERS or sweep.early_stopping is not None


def default_batch(cpus: int, halving: Halving | None) -> int:
    """``batch_size`` when the sweep file has none: the cluster's CPUs, so that a round fills it; with
    early stopping at least ``eta²``, so that a round has candidates to prune through its rungs (a round
    of 2 keeps 1 of 2 at every rung, and scores over half of what the sweep would without stopping)."""
    return max(1, cpus, halving.eta ** 2 if halving else 1)


def default_n_startup(n_dims: int, batch_size: int) -> int:
    """The initial design: at least 10 points and two per dimension, a whole number of batches."""
    wanted = max(10, 2 * n_dims, batch_size)
    return batch_size * math.ceil(wanted / batch_size)


@dataclass(frozen=True)
class Rounds:
    """Which trials form which round: ``[0, n_startup)``, then ``batch_size`` at a time."""

    batch_size: int
    n_startup: int

    def of(self, index: int) -> int:
        if index < self.n_startup:
            return 0
        return 1 + (index - self.n_startup) // self.batch_size

    def slots(self, r: int) -> range:
        if r == 0:
            return range(0, self.n_startup)
        start = self.n_startup + (r - 1) * self.batch_size
        return range(start, start + self.batch_size)


# ---------------------------------------------------------------------------------------- records


def image_order(ids: Sequence[str], seed: int, manifest_digest: str, detail: Mapping[str, float] | None = None,
                rung_sizes: Sequence[int] = ()) -> list[str]:
    """The images in the order successive halving takes them in (the same in every round): seeded, and,
    given each image's ``detail`` and the ``rung_sizes``, stratified so that every rung but the last
    spans the set's range of detail.

    Why: the first rung is a few images, and a few images drawn at random are often not a fair sample
    — two smooth photographs in a first rung of three favour strong smoothing, and the trial that
    would have won is pruned there (the benchmark's worst seeds). So each rung's new images are drawn
    one from each of as many equal strata of the remaining images, sorted by detail (compressed bits
    per pixel: ``detail_of``); within a stratum, the seeded order picks. Without ``detail`` for every
    image (or without rungs) the order is the seeded permutation alone.
    """
    ordered = sorted(ids)
    salt = int(hashlib.sha256(manifest_digest.encode()).hexdigest()[:15], 16)
    perm = np.random.default_rng(np.random.SeedSequence([seed, salt])).permutation(len(ordered))
    seeded = [ordered[i] for i in perm]
    if not detail or not rung_sizes or any(detail.get(i) is None or not math.isfinite(detail[i]) for i in ids):
        return seeded
    rank = {image: k for k, image in enumerate(seeded)}
    remaining = sorted(ordered, key=lambda i: (detail[i], i))
    out: list[str] = []
    for size in rung_sizes[:-1]:
        draw = min(size, len(ordered)) - len(out)
        if draw <= 0:
            continue
        picks = [min(stratum, key=rank.__getitem__) for stratum in np.array_split(np.array(remaining, dtype=object), draw)]
        out += picks
        taken = set(picks)
        remaining = [i for i in remaining if i not in taken]
    taken = set(out)
    return out + [i for i in seeded if i not in taken]


def detail_of(file_bytes: int | None, width: int | None, height: int | None) -> float | None:
    """How much detail an image holds, for ``image_order``: its file's compressed bits per pixel (a
    smooth picture compresses well; with the same format and noise, this ranks images as their
    gradient energy does). None when the size or the dimensions are unknown."""
    if not file_bytes or not width or not height:
        return None
    return 8.0 * float(file_bytes) / (float(width) * float(height))


def image_detail(rows: Iterable[Any]) -> dict[str, float | None]:
    """``detail_of`` for each manifest row (``ManifestRow``: its image file's size and dimensions), by id."""
    return {r.id: detail_of(r.image_bytes, r.width, r.height) for r in rows}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------- ledger


class Ledger:
    """The frozen proposals of one sweep for one (fingerprint, manifest digest)."""

    def __init__(self, folder: Path, fingerprint: str, manifest_digest: str):
        self.file = Path(folder) / f"ledger-{fingerprint}-{manifest_digest[:16]}.json"
        self.fingerprint = fingerprint
        self.manifest_digest = manifest_digest
        self.data: dict[str, Any] | None = None
        self._read()

    def _read(self) -> None:
        if not self.file.exists():
            return
        try:
            data = json.loads(self.file.read_text())
        except json.JSONDecodeError as exc:  # written atomically: a damaged file is foreign or hand-edited
            raise SearchError(f"{self.file}: not a search ledger ({exc}); move it away to start the "
                              f"search again") from None
        if not isinstance(data, dict) or (data.get("format"), data.get("fingerprint"), data.get("manifest_digest")) \
                != (LEDGER_FORMAT, self.fingerprint, self.manifest_digest):
            raise SearchError(f"{self.file}: a ledger for other settings or images; move it away")
        self.data = data

    @property
    def started(self) -> bool:
        return self.data is not None

    def start(self, header: dict[str, Any]) -> None:
        self.data = {"format": LEDGER_FORMAT, "fingerprint": self.fingerprint,
                     "manifest_digest": self.manifest_digest, **header, "rounds": []}
        self.save()

    def save(self) -> None:
        atomic_write_json(self.file, self.data)

    @property
    def rounds(self) -> Rounds:
        return Rounds(batch_size=self.data["batch_size"], n_startup=self.data["n_startup"])

    @contextlib.contextmanager
    def locked(self):
        """Hold the ledger's lock and re-read it: two runs of one sweep at once (a schedule and a sensor)
        agree on every round, whichever proposes it first."""
        lock_file = self.file.with_suffix(".lock")
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_file, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self._read()
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def round(self, r: int) -> dict[str, Any] | None:
        for entry in self.data["rounds"]:
            if entry["round"] == r:
                return entry
        return None

    def add_round(self, entry: dict[str, Any]) -> None:
        self.data["rounds"] = sorted([*self.data["rounds"], entry], key=lambda e: e["round"])
        self.save()

    def proposals(self) -> dict[int, dict[str, Any]]:
        """Every recorded proposal by trial index."""
        return {p["index"]: {**p, "round": e["round"]} for e in self.data["rounds"] for p in e["trials"]}


# ------------------------------------------------------------------------------------- proposals


def _distributions(dims: list[Dimension]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for d in dims:
        r = d.range
        if r.type == "choice":
            out[d.name] = CategoricalDistribution(list(r.values))
        elif r.type == "odd":
            values = d.candidates(levels=10**9)
            out[d.name] = IntDistribution(values[0], values[-1], step=2)
        elif r.type == "int":
            out[d.name] = IntDistribution(int(r.low), int(r.high), log=r.log)
        else:
            out[d.name] = FloatDistribution(float(r.low), float(r.high), log=r.log)
    return out


def _clean(dims: list[Dimension], params: dict[str, Any]) -> Point:
    """A proposal as the sweep's trials record values: floats to six significant digits, in range."""
    out = {}
    for d in dims:
        value = params[d.name]
        if d.range.type == "float":
            value = min(max(_tidy(value), float(d.range.low)), float(d.range.high))
        elif d.range.type in ("int", "odd"):
            value = int(value)
        out[d.name] = value
    return out


def fits(dims: list[Dimension], params: dict[str, Any]) -> bool:
    """Whether ``params`` is a point of this search space (a warm start from an older report may not be)."""
    if set(params) != {d.name for d in dims}:
        return False
    for d in dims:
        value, r = params[d.name], d.range
        if r.type == "choice":
            if value not in r.values:
                return False
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not r.low <= value <= r.high:
            return False
        elif r.type in ("int", "odd") and (int(value) != value or (r.type == "odd" and int(value) % 2 == 0)):
            return False
    return True


def _seed(*parts: Any) -> int:
    return int(np.random.SeedSequence([abs(hash_int(p)) for p in parts]).generate_state(1)[0])


def hash_int(part: Any) -> int:
    return int(hashlib.sha256(str(part).encode()).hexdigest()[:15], 16)


@dataclass
class HistoryTrial:
    """What a proposal learns from an earlier trial."""

    index: int
    params: Point
    status: str  # ok | failed | pruned
    score: float  # full mean (ok), partial mean (pruned), NaN (failed)
    images_scored: int
    per_image: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_record(cls, index: int, record: dict[str, Any]) -> HistoryTrial:
        per = {p["id"]: p["score"] for p in record.get("per_image", []) if not p.get("error") and p["score"] is not None}
        status = record["status"]
        score = record["score"] if status == "ok" else record.get("partial_score") if status == "pruned" else None
        return cls(index=index, params=record["params"], status=status,
                   score=float("nan") if score is None else float(score), images_scored=len(per), per_image=per)


@dataclass(frozen=True)
class SearchSpec:
    """Everything a proposal depends on besides the results."""

    dims: list[Dimension]
    sampler: str
    seed: int
    maximize: bool
    rounds: Rounds
    initial_design: str = "sobol"
    n_trials: int = 0  # the sweep's trials: the grid's resolution depends on it

    @property
    def adaptive(self) -> bool:
        return self.sampler in ADAPTIVE_SAMPLERS


def propose(spec: SearchSpec, r: int, history: list[HistoryTrial], warm: Sequence[Point] = (),
            replay: dict[int, list[dict[str, Any]]] | None = None, gaps: RungGaps | None = None) -> list[dict[str, Any]]:
    """The proposals of round ``r`` (every slot of the round): ``[{index, params, source}]``.

    ``history``: the results of every trial of rounds < r. ``replay``: earlier rounds' recorded
    proposals (CMA-ES replays its generations with them).
    """
    slots = spec.rounds.slots(r)
    if not spec.dims:
        return [{"index": k, "params": {}, "source": spec.sampler} for k in slots]
    if not spec.adaptive:  # the sampler's own points, exactly as without rounds
        n = spec.n_trials or slots.stop
        return [{"index": k, "params": sample_point(spec.dims, spec.sampler, spec.seed, k, n), "source": spec.sampler}
                for k in slots]
    if r == 0:
        out = []
        seen: list[Point] = []
        for params in warm:
            if len(out) < len(slots) and fits(spec.dims, params) and params not in seen:
                seen.append(params)
                out.append({"index": slots[len(out)], "params": dict(params), "source": "warm-start"})
        # The design's points in order, passing over one that a warm start evaluates already (the last
        # report's best were often design points of the same seed): no trial is spent twice on a point.
        j = 0
        while len(out) < len(slots):
            params = sample_point(spec.dims, spec.initial_design, spec.seed, j, len(slots))
            j += 1
            if params in seen and j <= len(slots) + len(seen):
                continue
            out.append({"index": slots[len(out)], "params": params, "source": spec.initial_design})
        return out
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = _distributions(spec.dims)
    direction = "maximize" if spec.maximize else "minimize"
    if spec.sampler == "tpe" and any(d.range.type == "choice" for d in spec.dims):
        return _branch_tpe(spec, r, history, dists, direction, gaps)
    if spec.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=_seed(spec.seed, "tpe", r), n_startup_trials=0, multivariate=True,
                                             constant_liar=True)
        study = optuna.create_study(direction=direction, sampler=sampler)
        study.add_trials([_frozen(t, dists) for t in history])
        n_gp = gp_count(len(slots), r, adaptive_rounds(spec), len(history), len(spec.dims))
        asked = [_clean(spec.dims, study.ask(dists).params) for _ in range(len(slots) - n_gp)]
        refined = gp_proposals(spec.dims, {}, history, spec.maximize, n_gp, pending=asked,
                               seed=_seed(spec.seed, "gp", r), gaps=gaps)
        sources = ["tpe"] * len(asked) + ["gp"] * len(refined)
        return [{"index": k, "params": p, "source": src} for k, p, src in zip(slots, asked + refined, sources)]
    study = _cmaes_study(spec, r, history, dists, direction, replay or {}, gaps)
    asked = [study.ask(dists) for _ in slots]
    return [{"index": k, "params": _clean(spec.dims, t.params), "source": spec.sampler} for k, t in zip(slots, asked)]


GP_MAX_POINTS = 256  # the most trials a Gaussian process is fitted on (its best ones)


def gp_count(batch: int, r: int, n_rounds: int, n_history: int, n_dims: int) -> int:
    """How many of round ``r``'s ``batch`` trials the Gaussian process proposes, of ``n_rounds`` adaptive
    rounds: a share that grows from round to round, ``r / (n_rounds + 1)`` of the batch (rounded; half of
    all adaptive trials in all), once there are at least ``n_dims + 2`` earlier trials to fit it on.
    Early rounds are mostly TPE's, which explores; late ones mostly the GP's, which fine-tunes."""
    if n_history < n_dims + 2:
        return 0
    return min(batch, math.floor(batch * r / (max(n_rounds, r) + 1) + 0.5))


def adaptive_rounds(spec: SearchSpec) -> int:
    """The rounds after the initial design that the sweep's ``trials`` fill (at least one)."""
    return max(1, spec.rounds.of(max(spec.n_trials, 1) - 1))


def gp_proposals(dims: list[Dimension], fixed: dict[str, Any], history: list[HistoryTrial], maximize: bool,
                 n: int, pending: Sequence[Point] = (), seed: int = 0, gaps: RungGaps | None = None) -> list[Point]:
    """``n`` points chosen by expected improvement under a Gaussian process fitted to ``history``.

    Why, beside TPE: TPE's Parzen densities find the right region fast and do not get stuck, but they do
    not fine-tune — on the denoising benchmark its median best stayed 0.07 dB short, mostly from the
    Gaussian blur's ``ksize`` (3 is a step better than the plateau 5..15) and two sharp parameters
    (``sigma_color``, ``sigma``). A GP with one length scale per parameter (scikit-learn's, Matérn 5/2 +
    white noise, on the unit cube of each parameter's range — log where the range is log) models such a
    step and such ridges; the rest of each batch from TPE (``gp_count``) keeps TPE's robustness.

    - The scores below their median are raised to it before the fit: the model is for the good region,
      and a few very bad trials would otherwise set its scale (a narrow optimum then looks flat).
    - The points it may pick: uniform ones, Gaussian steps of three sizes around the five best trials,
      and every value of each integer parameter at those five (so a step that a plateau hides is tried),
      each snapped to a value a trial can have.
    - A batch is chosen greedily, each point told to the model at its predicted mean (the "kriging
      believer"), after the round's TPE points (``pending``), so the batch does not cluster.
    - Choice parameters are held at ``fixed`` (TPE models branches apart). Pruned and failed trials count
      with ``trial_values``. Deterministic for a given ``seed`` (the fit's restarts are seeded)."""
    if n <= 0:
        return []
    from scipy.stats import norm
    from sklearn.gaussian_process import GaussianProcessRegressor

    numeric = [d for d in dims if d.range.type != "choice"]
    values = trial_values(history, maximize, gaps)
    sign = 1.0 if maximize else -1.0

    def unit(point: Point) -> list[float]:
        return [d.to_unit(point[d.name]) for d in numeric]

    def point_at(row: np.ndarray) -> Point:
        return _clean(dims, {**fixed, **{d.name: d.from_unit(u) for d, u in zip(numeric, row)}})

    # an exact GP costs the cube of its points: a long sweep's model is fitted on its best trials
    kept = {t.index for t in sorted(history, key=lambda t: (-sign * values[t.index], t.index))[:GP_MAX_POINTS]}
    fit_on = [t for t in history if t.index in kept]
    x = np.array([unit(t.params) for t in fit_on], dtype=float).reshape(len(fit_on), len(numeric))
    y = np.array([sign * values[t.index] for t in fit_on], dtype=float)
    y = np.maximum(y, np.median(y))
    rng = np.random.default_rng(seed)
    model = _fit_gp(x, y, len(numeric), int(rng.integers(2**31)))
    fitted = model.kernel_

    def believe(rows: np.ndarray) -> None:
        nonlocal x, y, model
        x, y = np.vstack([x, rows]), np.append(y, model.predict(rows))
        model = GaussianProcessRegressor(fitted, normalize_y=True, optimizer=None).fit(x, y)

    if pending:
        believe(np.array([unit(p) for p in pending], dtype=float))
    def key(point: Point) -> str:
        return json.dumps(point, sort_keys=True)

    seen = {key(t.params) for t in history} | {key(p) for p in pending}
    best = x[np.argsort(-y[: len(fit_on)], kind="stable")[:5]]
    levels = {j: [d.to_unit(v) for v in d.candidates(levels=16)] for j, d in enumerate(numeric)
              if d.range.type in ("int", "odd")}
    out: list[Point] = []
    for _ in range(n):
        pool = [rng.random((1000, len(numeric)))]
        for centre in best:
            pool += [centre + rng.normal(0.0, step, (64, len(numeric))) for step in (0.01, 0.03, 0.1)]
            for j, units in levels.items():
                rows = np.repeat(centre[None, :], len(units), axis=0)
                rows[:, j] = units
                pool.append(rows)
        grid = np.clip(np.vstack(pool), 0.0, np.nextafter(1.0, 0.0))
        for j, d in enumerate(numeric):
            grid[:, j] = _snap_units(d, grid[:, j])
        mean, std = model.predict(grid, return_std=True)
        std = np.maximum(std, 1e-12)
        incumbent = float(y.max())  # believed points count too: the rest of the batch spreads out
        z = (mean - incumbent) / std
        gain = (mean - incumbent) * norm.cdf(z) + std * norm.pdf(z)
        chosen = None
        for i in np.argsort(-gain, kind="stable"):
            point = point_at(grid[i])
            if key(point) not in seen:
                chosen = i
                break
        if chosen is None:  # a space this small has been tried whole: the best candidate again
            chosen = int(np.argmax(gain))
            point = point_at(grid[chosen])
        seen.add(key(point))
        out.append(point)
        believe(grid[chosen][None, :])
    return out


def _snap_units(d: Dimension, u: np.ndarray) -> np.ndarray:
    """Unit coordinates moved to the value a trial would record there (the middle of an integer's cell)."""
    if d.range.type not in ("int", "odd"):
        return u
    if not d.range.log:
        cells = d.integer_grid()[2]
        return (np.minimum(np.floor(u * cells), cells - 1) + 0.5) / cells
    return np.array([d.to_unit(d.from_unit(v)) for v in u])


def _branch_tpe(spec: SearchSpec, r: int, history: list[HistoryTrial], dists, direction,
                gaps: RungGaps | None = None) -> list[dict[str, Any]]:
    """TPE over a space with choices, one branch (combination of choice values) at a time.

    One model over every branch lets a branch that scores well whatever its other parameters (a
    global Otsu threshold beside adaptive ones) fill TPE's "good" group and starve a better branch that
    needs tuning. Here every branch seen fewer than twice gets a trial (up to half the batch), the rest
    of the batch goes by rank of each branch's best value (a complete trial's mean, or a pruned trial's
    estimate of its full mean) — half to the best branch, half of what is left to the next, and so on —
    and each branch's trials are proposed by a TPE fitted on that branch's trials alone, with its
    choices fixed."""
    import itertools

    import optuna
    from optuna.distributions import CategoricalDistribution

    slots = spec.rounds.slots(r)
    choice = [d.name for d in spec.dims if d.range.type == "choice"]
    branches = list(itertools.product(*(d.range.values for d in spec.dims if d.range.type == "choice")))
    sign = -1.0 if spec.maximize else 1.0
    members = {b: [t for t in history if tuple(t.params[n] for n in choice) == b] for b in branches}
    # A branch ranks by its best value: a complete trial's mean, a pruned one's estimated full mean
    # (``trial_values``). With early stopping most trials are pruned (one of eight goes on to every image
    # per round), and a branch ranked on complete trials alone would go unranked, short of trials, for
    # as long as none of its own had gone all the way.
    values = trial_values(history, spec.maximize, gaps)
    best = {b: min((sign * values[t.index] for t in ts
                    if t.status in ("ok", "pruned") and math.isfinite(values[t.index])), default=math.inf)
            for b, ts in members.items()}
    order = sorted(branches, key=lambda b: (best[b], branches.index(b)))
    counts = dict.fromkeys(branches, 0)
    left = len(slots)
    for b in order:
        if len(members[b]) < 2 and left > len(slots) // 2:
            counts[b] += 1
            left -= 1
    ranked = [b for b in order if best[b] < math.inf] or order
    for i, b in enumerate(ranked):
        give = left if i == len(ranked) - 1 else math.ceil(left / 2)
        counts[b] += give
        left -= give
        if not left:
            break
    out: list[tuple[Point, str]] = []
    n_numeric = sum(1 for d in spec.dims if d.range.type != "choice")
    for b in branches:
        if not counts[b]:
            continue
        fixed = dict(zip(choice, b))
        local = {n: CategoricalDistribution([fixed[n]]) if n in fixed else d for n, d in dists.items()}
        sampler = optuna.samplers.TPESampler(seed=_seed(spec.seed, "tpe", r, b), n_startup_trials=0,
                                             multivariate=True, constant_liar=True)
        study = optuna.create_study(direction=direction, sampler=sampler)
        study.add_trials([_frozen(t, local) for t in members[b]])
        # the best branch is fine-tuned by the Gaussian process too (fitted on that branch's trials)
        n_gp = gp_count(counts[b], r, adaptive_rounds(spec), len(members[b]), n_numeric) if n_numeric and b == ranked[0] else 0
        asked = [_clean(spec.dims, study.ask(local).params) for _ in range(counts[b] - n_gp)]
        refined = gp_proposals(spec.dims, fixed, members[b], spec.maximize, n_gp, pending=asked,
                               seed=_seed(spec.seed, "gp", r, b), gaps=gaps)
        out += [(p, "tpe") for p in asked] + [(p, "gp") for p in refined]
    return [{"index": k, "params": p, "source": src} for k, (p, src) in zip(slots, out)]


def _frozen(t: HistoryTrial, dists: dict[str, Any]):
    from optuna.trial import TrialState, create_trial

    if t.status == "ok" and not math.isnan(t.score):
        return create_trial(params=t.params, distributions=dists, value=t.score, state=TrialState.COMPLETE)
    if t.status == "pruned" and not math.isnan(t.score):
        return create_trial(params=t.params, distributions=dists, state=TrialState.PRUNED,
                            intermediate_values={t.images_scored: t.score})
    return create_trial(params=t.params, distributions=dists, state=TrialState.FAIL)


def trial_values(history: list[HistoryTrial], maximize: bool, gaps: RungGaps | None = None) -> dict[int, float]:
    """A value for every trial (CMA-ES needs one per member of a generation; the Gaussian process
    learns from pruned and failed trials through it): complete trials their mean; pruned ones the
    estimate of their full mean that ``gaps`` (``RungGaps``) gives, or without it their partial mean
    shifted by the mean gap, on complete trials, between those images and all; failed ones the worst
    value seen."""
    complete = [t for t in history if t.status == "ok" and not math.isnan(t.score)]
    values: dict[int, float] = {}
    for t in history:
        if t in complete:
            values[t.index] = t.score
        elif t.status == "pruned" and not math.isnan(t.score) and gaps is not None \
                and (estimate := gaps.estimate(t)) is not None:
            values[t.index] = estimate
        elif t.status == "pruned" and not math.isnan(t.score):
            ids = set(t.per_image)
            shifts = [c.score - _mean(v for i, v in c.per_image.items() if i in ids) for c in complete
                      if ids <= set(c.per_image)]
            values[t.index] = t.score + (_mean(shifts) if shifts else 0.0)
    known = list(values.values())
    worst = (min(known) if maximize else max(known)) if known else 0.0
    for t in history:
        values.setdefault(t.index, worst)
    return values


def _cmaes_study(spec: SearchSpec, r: int, history: list[HistoryTrial], dists, direction, replay,
                 gaps: RungGaps | None = None):
    import optuna

    by_index = {t.index: t for t in history}
    values = trial_values(history, spec.maximize, gaps)
    startup = [by_index[k] for k in spec.rounds.slots(0) if k in by_index]
    # CMA-ES starts from the best point of the initial design (not the middle of the space). ``x0`` is
    # deprecated in Optuna 4.9 (to go in 6.0; pinned 5.0 here) for warm starts from ``source_trials``,
    # which need ten or more good points — more than an initial design of a batch or two has.
    ranked = sorted((t for t in startup if t.index in values and t.status != "failed"),
                    key=lambda t: (-values[t.index] if spec.maximize else values[t.index], t.index))
    x0 = {d.name: ranked[0].params[d.name] for d in spec.dims if d.range.type != "choice"} if ranked else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sampler = optuna.samplers.CmaEsSampler(
            x0=x0, seed=_seed(spec.seed, "cmaes"), n_startup_trials=0, popsize=max(spec.rounds.batch_size, 4),
            warn_independent_sampling=False,
            independent_sampler=optuna.samplers.RandomSampler(seed=_seed(spec.seed, "cmaes-independent")))
    study = optuna.create_study(direction=direction, sampler=sampler)
    study.add_trials([_frozen(t, dists) for t in startup])
    # Earlier generations replayed as they happened: the round's proposals asked together, then told.
    for rr in range(1, r):
        asked = []
        for proposal in replay.get(rr, []):
            study.enqueue_trial(proposal["params"])
            trial = study.ask(dists)
            # Every parameter is fixed, so Optuna would not ask the sampler (relative parameters are
            # computed lazily): asking for them makes CMA-ES tag the trial with its generation, so
            # the generation is told its scores and the next one learns from them.
            _ = trial.relative_params
            asked.append((proposal["index"], trial))
        for index, trial in asked:
            study.tell(trial, values[index])
    return study


# ------------------------------------------------------------------------------------ halving

RUNG_MODEL_MIN_TRIALS = 4  # fewer trials past a rung than this: that rung's gap is the plain mean gap


class RungGaps:
    """How a trial's mean moves from one rung's images to the next rung's, as a function of its
    parameters, learnt from the earlier rounds' trials that went on (a Gaussian process per rung,
    Matérn 5/2 with one length scale per parameter + white noise, on the unit cube of the space).

    Why: the first rung is a few images, and a few images are not a fair sample of the set — a
    smooth photograph gains several dB from strong smoothing that costs every textured one a little, so
    a first rung holding it promotes over-smoothing round after round (the benchmark's worst seeds
    ended 0.3–0.8 dB short that way, while better trials had been pruned). The gap between the
    rung's mean and the next rung's is not a constant but depends on the parameters (smoothing more
    moves it), so ranking by the partial mean plus the gap predicted at the candidate's parameters
    ranks by an estimate of the full mean; with too few trials past a rung the gap is the plain mean
    gap, which ranks as the partial mean does."""

    def __init__(self, dims: list[Dimension], history: list[HistoryTrial], order: Sequence[str],
                 sizes: Sequence[int], seed: int = 0):
        self.dims, self.order, self.sizes = dims, list(order), list(sizes)
        self.models: list[tuple[Any, float]] = []  # per rung j < last: (GP or None, mean gap to rung j+1)
        for j in range(len(sizes) - 1):
            near, far = list(order[: sizes[j]]), list(order[: sizes[j + 1]])
            past = [t for t in history if all(i in t.per_image and math.isfinite(t.per_image[i]) for i in far)]
            past = past[-GP_MAX_POINTS:]
            gaps = np.array([_mean(t.per_image[i] for i in far) - _mean(t.per_image[i] for i in near) for t in past])
            mean_gap = float(gaps.mean()) if len(gaps) else 0.0
            model = None
            if dims and len(past) >= RUNG_MODEL_MIN_TRIALS and np.ptp(gaps) > 0:
                model = _fit_gp(np.array([self._unit(t.params) for t in past]), gaps, len(dims), _seed(seed, "rung", j))
            self.models.append((model, mean_gap))

    def estimate(self, t: HistoryTrial) -> float | None:
        """A pruned trial's expected mean over every image: its partial mean plus the gap predicted at its
        parameters (None when its images are not a rung of this order)."""
        for rung, size in enumerate(self.sizes[:-1]):
            if len(t.per_image) == size and all(i in t.per_image for i in self.order[:size]):
                return float(t.score + self.ahead([t.params], rung)[0])
        return None

    def _unit(self, params: Point) -> list[float]:
        return [d.to_unit(params[d.name]) for d in self.dims]

    def ahead(self, params: Sequence[Point], rung: int) -> np.ndarray:
        """For trials scored up to ``rung``: how much their mean over every image is expected to differ
        from their mean over the rung's images."""
        out = np.zeros(len(params))
        if not params:
            return out
        x = np.array([self._unit(p) for p in params]) if self.dims else None
        for model, mean_gap in self.models[rung:]:
            out += model.predict(x) if model is not None else mean_gap
        return out


def _fit_gp(x: np.ndarray, y: np.ndarray, n_dims: int, seed: int):
    """A Gaussian process (Matérn 5/2, one length scale per parameter, + white noise) fitted to
    ``y`` at unit-cube points ``x``; its restarts seeded, so the fit is a function of its data."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    kernel = (ConstantKernel(1.0, (1e-3, 1e3))
              * Matern(length_scale=np.full(n_dims, 0.3), length_scale_bounds=(1e-2, 1e2), nu=2.5)
              + WhiteKernel(1e-4, (1e-9, 1e-1)))
    model = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=2, random_state=seed % 2**31)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)

def _rank_key(maximize: bool):
    def key(item: tuple[str, int, float]):
        _, index, value = item
        return (-value if maximize else value, index)
    return key


def run_round(candidates: list[dict[str, Any]], order: list[str], halving: Halving | None, evaluate: Evaluate,
              known: dict[str, dict[str, dict[str, Any]]], maximize: bool,
              on_settled: Callable[[TrialOutcome], None], gaps: RungGaps | None = None,
              decided: Mapping[str, int] | None = None) -> list[TrialOutcome]:
    """Evaluate one round's candidates (trial settings with ``trial``, ``index``, ``params``, ``stages``),
    rung by rung when ``halving`` is set. ``known`` per-image results are used, not recomputed.
    ``on_settled`` gets each trial's outcome as soon as it is decided (pruned, failed or complete).
    At each rung the candidates are ranked by their mean over the rung's images plus, with ``gaps``,
    the gap to the full mean predicted at their parameters (``RungGaps``).

    ``decided``: trials whose halving was decided by an earlier run of the round, by the rung at which
    they stopped (the last rung: complete). Their decisions stand — they are scored again on the images
    of the rungs they reached when their scores are not known, and take part in every ranking they took
    part in then — and another candidate goes on from a rung when it ranks among the best
    ``ceil(n / eta)`` of all the rung's candidates, decided or not (as asynchronous halving promotes):
    a round that ``trials`` had cut short and that a larger ``trials`` fills never demotes a trial it
    had (more trials never lower the best score), and a round run again, whole or resumed, decides as
    it did (the same ranking)."""
    sizes = halving.rung_sizes(len(order)) if halving else [len(order)]
    eta = halving.eta if halving else 1
    decided = {t: rung for t, rung in (decided or {}).items() if 0 <= rung < len(sizes)}
    results = {c["trial"]: dict(known.get(c["trial"], {})) for c in candidates}
    active = list(candidates)
    outcomes: list[TrialOutcome] = []
    for rung, size in enumerate(sizes):
        ids = order[:size]
        need = [c for c in active if any(i not in results[c["trial"]] for i in ids)]
        if need:
            fresh = evaluate(need, ids, {c["trial"]: results[c["trial"]] for c in need})
            for c in need:
                results[c["trial"]].update(fresh[c["trial"]])
        last = rung == len(sizes) - 1
        scored = []
        for c in active:
            per = [results[c["trial"]][i] for i in ids]
            if last or any(p.get("error") for p in per):
                outcomes.append(_settle(c, ids, per, rung, pruned=False, on_settled=on_settled))
            else:
                scored.append((c, per))
        if last:
            break
        keep = max(1, math.ceil(len(scored) / eta))
        ahead = gaps.ahead([c["params"] for c, _ in scored], rung) if gaps else np.zeros(len(scored))
        ranked = sorted(((c["trial"], c["index"], _mean(p["score"] for p in per) + gap)
                         for (c, per), gap in zip(scored, ahead)), key=_rank_key(maximize))
        # Decided trials go on as they did; another goes on when it ranks among the best 1/eta of all
        # (where it would have gone on had the earlier run had it too).
        kept = ({t for t, _, _ in ranked[:keep] if t not in decided}
                | {c["trial"] for c, _ in scored if decided.get(c["trial"], -1) > rung})
        active = []
        estimates = {t: value for t, _, value in ranked}
        for c, per in scored:
            if c["trial"] in kept:
                active.append(c)
            else:
                outcomes.append(_settle(c, ids, per, rung, pruned=True, on_settled=on_settled,
                                        estimate=estimates[c["trial"]]))
    index_of = {c["trial"]: c["index"] for c in candidates}
    return sorted(outcomes, key=lambda o: index_of[o.trial])


def _settle(c: dict[str, Any], ids: list[str], per: list[dict[str, Any]], rung: int, pruned: bool,
            on_settled: Callable[[TrialOutcome], None], estimate: float | None = None) -> TrialOutcome:
    outcome = TrialOutcome(trial=c["trial"], params=c["params"], stages=c["stages"], image_ids=list(ids),
                           per_image=[dict(p) for p in per], seconds=sum(p.get("seconds", 0.0) for p in per),
                           workers=[], round=c.get("round"), source=c.get("source"), rung=rung, pruned=pruned,
                           round_started_at=c.get("round_started_at"),
                           estimated_score=None if estimate is None or not math.isfinite(estimate) else float(estimate))
    on_settled(outcome)
    return outcome


# ------------------------------------------------------------------------------------ the search


class Search:
    """A staged sweep's rounds: their proposals (from the ledger, or made and recorded) and their runs."""

    def __init__(self, sweep, sweep_dir: Path, manifest_digest: str, image_ids: Sequence[str], *,
                 default_batch_size: int, warm: Sequence[Point] = (), image_detail: Mapping[str, float] | None = None):
        self.sweep = sweep
        self.dims = search_space(sweep)
        self.ledger = Ledger(Path(sweep_dir) / "search", sweep.fingerprint(), manifest_digest)
        options: SearchOptions = sweep.search
        if not self.ledger.started:
            with self.ledger.locked():
                if not self.ledger.started:
                    self._start(sweep, options, default_batch_size, warm)
        self.rounds = self.ledger.rounds
        self.spec = SearchSpec(dims=self.dims, sampler=sweep.sampler, seed=sweep.seed,
                               maximize=sweep.higher_is_better, rounds=self.rounds,
                               initial_design=self.ledger.data["initial_design"], n_trials=sweep.trials)
        halving = sweep.early_stopping
        self.order = image_order(image_ids, sweep.seed, manifest_digest, image_detail,
                                 halving.rung_sizes(len(image_ids)) if halving else ())
        self._gaps: tuple[tuple, RungGaps] | None = None  # the last round's, by what it was learnt from

    def _start(self, sweep, options: SearchOptions, default_batch_size: int, warm: Sequence[Point]) -> None:
        batch = options.batch_size or default_batch(int(default_batch_size), sweep.early_stopping)
        adaptive = sweep.sampler in ADAPTIVE_SAMPLERS
        n_startup = (options.n_startup or default_n_startup(len(self.dims), batch)) if adaptive else batch
        self.ledger.start({
            "sweep": sweep.name, "sampler": sweep.sampler, "seed": sweep.seed, "batch_size": batch,
            "n_startup": n_startup, "initial_design": options.initial_design,
            "early_stopping": sweep.early_stopping.to_dict() if sweep.early_stopping else None,
            "space_digest": space_digest(self.dims), "started_at": time.time(),
            "warm_start": [dict(p) for p in warm][: options.warm_start] if adaptive else [],
        })

    def key(self, index: int) -> str:
        return trial_key(index)

    def rounds_of(self, keys: Iterable[str]) -> list[int]:
        return sorted({self.rounds.of(trial_index(k)) for k in keys})

    def candidates(self, r: int, records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Round ``r``'s trials (within ``trials``) as trial settings, proposing the round first when the
        ledger does not have it yet. ``records``: current results by trial key."""
        entry = self.ledger.round(r)
        if entry is None:
            with self.ledger.locked():
                entry = self.ledger.round(r) or self._propose(r, records)
        out = []
        for p in entry["trials"]:
            if p["index"] < self.sweep.trials:
                out.append({"trial": self.key(p["index"]), "index": p["index"], "params": p["params"],
                            "source": p["source"], "round": r,
                            "stages": [[op, params] for op, params in trial_stages(self.sweep, p["params"])]})
        return out

    def _propose(self, r: int, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Propose round ``r`` from the results of every earlier round, and record it (under the lock)."""
        earlier = [k for rr in range(r) for k in self.rounds.slots(rr)]
        missing = [self.key(k) for k in earlier if self.key(k) not in records]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise SearchError(
                f"round {r} of sweep {self.sweep.name!r} (trials {self.key(self.rounds.slots(r)[0])}…) is proposed "
                f"from the results of every earlier trial; {len(missing)} have none yet ({shown}): run the "
                f"sweep's whole range, or those trials first")
        history = [HistoryTrial.from_record(k, records[self.key(k)]) for k in earlier]
        replay = {rr: self.ledger.round(rr)["trials"] for rr in range(1, r)}
        proposals = propose(self.spec, r, history, warm=self.ledger.data.get("warm_start", ()), replay=replay,
                            gaps=self.rung_gaps(r, records))
        entry = {"round": r, "proposed_at": time.time(), "from_trials": len(history), "trials": proposals}
        self.ledger.add_round(entry)
        return entry

    def run(self, r: int, records: dict[str, dict[str, Any]], evaluate: Evaluate,
            known: dict[str, dict[str, dict[str, Any]]], on_settled: Callable[[TrialOutcome], None],
            requested: set[str] | None = None, recompute: set[str] = frozenset()) -> list[TrialOutcome]:
        """Evaluate round ``r``'s trials in ``requested`` (default: all of them). A trial with a current
        record that is not in ``recompute`` is settled from it (its per-image scores are known); with
        halving, the round's other trials take part through their records, and must have one."""
        started = time.time()
        candidates = [{**c, "round_started_at": started} for c in self.candidates(r, records)]
        known = {t: dict(v) for t, v in known.items() if t not in recompute}
        for c in candidates:
            rec = records.get(c["trial"])
            if rec is not None and c["trial"] not in recompute:
                known.setdefault(c["trial"], {}).update(
                    {p["id"]: per_image_result(p) for p in rec.get("per_image", [])})
        if requested is not None:
            others = [c["trial"] for c in candidates if c["trial"] not in requested and c["trial"] not in records]
            if others and self.sweep.early_stopping is not None:
                raise SearchError(f"successive halving compares the trials of a round with each other: "
                                  f"{', '.join(others)} (round {r}) have no result; run the round together, in "
                                  f"one run: the whole range (`--partition-range`, the sweep job, the CLI's "
                                  f"`sweep`), not a backfill of one run per trial")
            candidates = [c for c in candidates if c["trial"] in requested
                          or (self.sweep.early_stopping is not None and c["trial"] in records)]
        halving = self.sweep.early_stopping
        # Halving decisions recorded by an earlier run of the round (scores recomputed or not) stand.
        decided = {c["trial"]: records[c["trial"]]["rung"] for c in candidates
                   if records.get(c["trial"], {}).get("status") in ("ok", "pruned")
                   and isinstance(records[c["trial"]].get("rung"), int)}
        return run_round(candidates, self.order, halving, evaluate, known, self.spec.maximize, on_settled,
                         self.rung_gaps(r, records), decided=decided if halving else None)

    def rung_gaps(self, r: int, records: dict[str, dict[str, Any]]) -> RungGaps | None:
        """The rung gaps learnt from the rounds before ``r`` (None without early stopping); fitted once
        for a round's proposal and its run while those rounds' results stay the same."""
        halving = self.sweep.early_stopping
        if halving is None:
            return None
        earlier = [HistoryTrial.from_record(k, records[self.key(k)]) for rr in range(r)
                   for k in self.rounds.slots(rr) if self.key(k) in records]
        key = (r, json.dumps([(t.index, t.status, sorted(t.per_image.items())) for t in earlier]))
        if self._gaps is None or self._gaps[0] != key:
            self._gaps = (key, RungGaps(self.dims, earlier, self.order, halving.rung_sizes(len(self.order)),
                                        _seed(self.sweep.seed, r)))
        return self._gaps[1]


# ------------------------------------------------------------------- what run_settings and the report say


# The proposal sources of trials that an adaptive sampler chose (TPE's batches take a Gaussian-process share).
LEARNT_SOURCES = {"tpe": ("tpe", "gp"), "cmaes": ("cmaes",)}


def early_stopping_notes(sweep: Sweep, n_images: int, records: Sequence[dict[str, Any]] = ()) -> list[str]:
    """What the user should know about how the sweep searches on ``n_images`` images: early stopping that
    stops nothing, and (given the trials' ``records``) an adaptive sampler that proposed no trial, every
    one being from the initial design; logged as warnings, and kept in the report."""
    reason = sweep.early_stopping.inactive_reason(n_images) if sweep.early_stopping else None
    notes = [reason] if reason else []
    learnt = LEARNT_SOURCES.get(sweep.sampler)
    # only once every trial has a result: a range that ran round 0 alone has not reached the learning yet
    if learnt and len(records) >= sweep.trials and not any(r.get("source") in learnt for r in records):
        first = sum(1 for r in records if r.get("round") == 0)
        every = "the only trial is" if len(records) == 1 else f"all {len(records)} trials are"
        notes.append(f"sampler {sweep.sampler}: {every} the initial design (round 0 holds "
                     f"{first}); none was proposed by {sweep.sampler} — raise trials above {first} (or lower "
                     f"search.n_startup) for the search to learn from results")
    return notes


# Beyond this many values a discrete space's size is not worth counting (nor saying).
DISCRETE_LIMIT = 100_000


def repeated_trials_note(sweep: Sweep, trials: Sequence[dict[str, Any]]) -> str | None:
    """A fixed design (``grid``, ``random``...) over a space with fewer distinct points than trials gives
    some trials the parameters of an earlier one: they cost as much and say nothing new. None when every
    trial's parameters are its own, or the trials are proposed as the search goes (``is_staged``)."""
    if is_staged(sweep):
        return None
    seen: set[str] = set()
    repeats = 0
    for trial in trials:
        if trial.get("params") is None:
            continue
        key = json.dumps(trial["params"], sort_keys=True, default=str)
        repeats += key in seen
        seen.add(key)
    if not repeats:
        return partial_grid_note(sweep, len(trials))
    verb = "repeats" if repeats == 1 else "repeat"
    if sweep.sampler == "grid":
        return (f"{repeats} of the {len(trials)} trials {verb} the parameters of an earlier trial (sampler grid: "
                f"its grid has {len(seen)} distinct pipelines here): lower trials to {len(seen)}, or widen the space")
    dims = search_space(sweep)
    size = math.prod(len(d.candidates(DISCRETE_LIMIT + 1)) for d in dims) \
        if all(d.range.type != "float" for d in dims) else None
    held = f" of the {size} the search space holds" if size is not None and size <= DISCRETE_LIMIT else ""
    return (f"{repeats} of the {len(trials)} trials {verb} the parameters of an earlier trial (sampler "
            f"{sweep.sampler} drew {len(seen)} distinct pipelines{held}): widen the space, or use sampler grid to "
            "try each distinct pipeline once")


def partial_grid_note(sweep: Sweep, n_trials: int) -> str | None:
    """A ``grid`` of more points than trials: the trials take its first points in order, so the first
    parameter's last levels are never tried. None for any other sampler, or a grid the trials cover."""
    if sweep.sampler != "grid" or not n_trials:
        return None
    dims = search_space(sweep)
    axes = grid_axes(dims, n_trials)
    points = math.prod(map(len, axes))
    if not dims or points <= n_trials:
        return None
    tried = min(len(axes[0]), math.ceil(n_trials / math.prod(map(len, axes[1:]))))
    shape = " x ".join(f"{len(a)} {d.name}" for d, a in zip(dims, axes))
    return (f"sampler grid: the {n_trials} trials take the first {n_trials} of the {points} points of the grid "
            f"({shape}), the last parameter varying fastest: {dims[0].name} is tried at {tried} of its "
            f"{len(axes[0])} values; set trials to {points} to cover the grid")


def staged_trials(sweep: Sweep, sweep_dir: Path, manifest_digest: str) -> list[dict[str, Any]]:
    """``run_settings``' trial list for a staged sweep: the recorded proposals where the ledger has them;
    the others are proposed by the experiment step, from the results of the rounds before theirs."""
    try:
        ledger = Ledger(Path(sweep_dir) / "search", sweep.fingerprint(), manifest_digest)
    except SearchError:  # a damaged ledger is reported by the experiment step, which needs it
        ledger = None
    recorded = ledger.proposals() if ledger is not None and ledger.started else {}
    out = []
    for k in range(sweep.trials):
        p = recorded.get(k)
        out.append({"trial": trial_key(k), "index": k, "params": p["params"] if p else None,
                    "round": p["round"] if p else None, "source": p["source"] if p else None})
    return out


def warm_start_params(sweep: Sweep, sweep_dir: Path, manifest_digest: str) -> list[dict[str, Any]]:
    """The top parameter sets of the sweep's last report, when it was made for other images and the
    same search space (a sweep run again after its images changed starts from them)."""
    file = Path(sweep_dir) / "report.json"
    if not file.exists():
        return []
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError:
        return []
    if not isinstance(report, dict):  # not a report this code wrote: nothing to start from
        return []
    if report.get("manifest_digest") in (None, manifest_digest):
        return []
    if report.get("space_digest") != space_digest(search_space(sweep)):
        return []
    return [p for p in report.get("top_params") or [] if isinstance(p, dict)]
