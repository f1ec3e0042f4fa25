"""Search spaces and samplers.

Samplers are registered in ``SAMPLERS`` (name -> ``fn(dims, seed, k, n_trials) -> point``), as ops
are in ``OPS`` and metrics in ``METRICS``; the sweep file's ``sampler:`` takes these names.

Trial k's parameters depend only on (seed, search space, k) — plus, for ``grid``, the number of
trials, which sets the grid's resolution — so re-running or backfilling one trial evaluates exactly
the parameters it had before.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from imgtune_assets.core.ops import validate_stage

if TYPE_CHECKING:  # annotations only: sweepfile imports SAMPLERS from here
    from imgtune_assets.core.sweepfile import SearchRange, Sweep


@dataclass(frozen=True)
class Dimension:
    """One searched parameter. ``name`` is ``op.param`` (``op[i].param`` when an op repeats)."""

    name: str
    stage_index: int
    param: str
    range: SearchRange

    def candidates(self, levels: int) -> list[Any]:
        """At most ``levels`` values spread over the range (all values when fewer exist)."""
        r = self.range
        if r.type == "choice":
            return list(r.values)
        if r.type in ("int", "odd"):
            step = 2 if r.type == "odd" else 1
            start = int(r.low) + (1 if r.type == "odd" and int(r.low) % 2 == 0 else 0)
            every = list(range(start, int(r.high) + 1, step))
            if len(every) <= levels:
                return every
            picks = np.linspace(0, len(every) - 1, levels).round().astype(int)
            return sorted({every[i] for i in picks})
        if levels == 1:
            return [_tidy(math.sqrt(r.low * r.high) if r.log else (r.low + r.high) / 2)]
        points = np.geomspace(r.low, r.high, levels) if r.log else np.linspace(r.low, r.high, levels)
        return [_tidy(p) for p in points]

    def from_unit(self, u: float) -> Any:
        """Map u in [0, 1) to a value of this dimension (uniform, or log-uniform)."""
        r = self.range
        u = min(max(float(u), 0.0), np.nextafter(1.0, 0.0))
        if r.type == "choice":
            return r.values[int(u * len(r.values))]
        if r.type in ("int", "odd"):
            start, step, count = self.integer_grid()
            if r.log:
                lo, hi = math.log(start), math.log(start + step * (count - 1) + 1)
                target = math.exp(lo + u * (hi - lo))
                # the nearest value of the grid (the smaller one on a tie), without listing the grid
                near = {min(max(k, 0), count - 1) for k in (math.floor((target - start) / step),
                                                             math.ceil((target - start) / step))}
                return min((start + step * k for k in near), key=lambda v: (abs(v - target), v))
            return start + step * int(u * count)
        if r.log:
            return _tidy(math.exp(math.log(r.low) + u * (math.log(r.high) - math.log(r.low))))
        return _tidy(r.low + u * (r.high - r.low))

    def integer_grid(self) -> tuple[int, int, int]:
        """An integer range's values as ``start + step * k`` for ``k < count``."""
        r = self.range
        step = 2 if r.type == "odd" else 1
        start = int(r.low) + (1 if r.type == "odd" and int(r.low) % 2 == 0 else 0)
        return start, step, max(0, (int(r.high) - start) // step + 1)

    def to_unit(self, value: Any) -> float:
        """The inverse of ``from_unit``: where ``value`` lies in [0, 1) (a discrete value: the middle of
        its cell)."""
        r = self.range
        if r.type == "choice":
            return (list(r.values).index(value) + 0.5) / len(r.values)
        if r.type in ("int", "odd"):
            start, step, count = self.integer_grid()
            if r.log:
                lo, hi = math.log(start), math.log(start + step * (count - 1) + 1)
                return (math.log(value) - lo) / (hi - lo)
            return ((int(value) - start) // step + 0.5) / count
        if r.log:
            return (math.log(value) - math.log(r.low)) / (math.log(r.high) - math.log(r.low))
        return (float(value) - r.low) / (r.high - r.low)


def _tidy(x: float) -> float:
    # Six significant digits: readable in tables and sweep files, and exactly reproducible.
    return float(f"{float(x):.6g}")


def stage_labels(ops: Sequence[str]) -> list[str]:
    """How each stage's parameters are named (``label.param``): its op, ``op[i]`` when the op repeats."""
    counts = Counter(ops)
    return [op if counts[op] == 1 else f"{op}[{i}]" for i, op in enumerate(ops)]


def search_space(sweep: Sweep) -> list[Dimension]:
    dims = []
    labels = stage_labels([stage.op for stage in sweep.pipeline])
    for i, (stage, label) in enumerate(zip(sweep.pipeline, labels)):
        for param, rng in stage.searched.items():
            dims.append(Dimension(name=f"{label}.{param}", stage_index=i, param=param, range=rng))
    return dims


def space_digest(dims: list[Dimension]) -> int:
    payload = json.dumps([[d.name, d.range.to_dict()] for d in dims], sort_keys=True)
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:8], "big")


Point = dict[str, Any]
Sampler = Callable[[list[Dimension], int, int, int], Point]


def _random(dims: list[Dimension], seed: int, k: int, n_trials: int) -> Point:
    rng = np.random.default_rng(np.random.SeedSequence([seed, k, space_digest(dims)]))
    return {d.name: d.from_unit(u) for d, u in zip(dims, rng.random(len(dims)))}


@functools.lru_cache(maxsize=8)
def _halton_table(d: int, n: int) -> np.ndarray:
    # One table of n points per (dimension count, length): scipy's Halton.fast_forward draws and
    # discards the skipped points, so trial-by-trial fast-forwarding would cost O(k) per trial.
    from scipy.stats import qmc  # imported here: slow to import, only the QMC samplers need it

    table = qmc.Halton(d, scramble=False).random(n)
    table.setflags(write=False)
    return table


def _halton(dims: list[Dimension], seed: int, k: int, n_trials: int) -> Point:
    # Point k+1 of the plain sequence (point 0 is all zeros), plus a seeded random shift
    # (Cranley-Patterson) so different seeds give different sequences.
    unit = _halton_table(len(dims), max(n_trials, k + 1) + 1)[k + 1]
    shift = np.random.default_rng(np.random.SeedSequence([seed, space_digest(dims)])).random(len(dims))
    return {d.name: d.from_unit((u + s) % 1.0) for d, u, s in zip(dims, unit, shift)}


def _sobol(dims: list[Dimension], seed: int, k: int, n_trials: int) -> Point:
    from scipy.stats import qmc  # imported here: slow to import, only the QMC samplers need it

    # Scrambled Sobol' seeded by (seed, space); fast_forward(k) makes point k independent of the others.
    scramble_seed = int(np.random.SeedSequence([seed, space_digest(dims)]).generate_state(1)[0])
    engine = qmc.Sobol(len(dims), scramble=True, seed=scramble_seed)
    if k:
        engine.fast_forward(k)  # (scipy refuses fast_forward(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "balance properties need n = 2^m": one point at a time
        unit = engine.random(1)[0]
    return {d.name: d.from_unit(u) for d, u in zip(dims, unit)}


def grid_axes(dims: list[Dimension], n_trials: int) -> list[list[Any]]:
    """The values the ``grid`` sampler takes along each dimension for ``n_trials`` trials: about
    ``n_trials ** (1 / dimensions)`` levels each (more where a choice has fewer values), so the grid
    may hold more points than there are trials (trial k is point k, the last dimension varying fastest)."""
    levels = max(1, math.ceil(n_trials ** (1.0 / len(dims)) - 1e-9))
    grids = [d.candidates(levels) for d in dims]
    # Dimensions with few values (choices) leave room: raise the others' resolution to fill n_trials.
    while math.prod(map(len, grids)) < n_trials:
        grown = False
        for i, d in enumerate(dims):
            if d.range.type != "choice":
                bigger = d.candidates(len(grids[i]) + 1)
                if len(bigger) > len(grids[i]):
                    grids[i], grown = bigger, True
            if math.prod(map(len, grids)) >= n_trials:
                break
        if not grown:
            break
    return grids


def _grid(dims: list[Dimension], seed: int, k: int, n_trials: int) -> Point:
    grids = grid_axes(dims, n_trials)
    index = k % math.prod(map(len, grids))
    point = {}
    for d, grid in reversed(list(zip(dims, grids))):
        index, digit = divmod(index, len(grid))
        point[d.name] = grid[digit]
    return {d.name: point[d.name] for d in dims}


# The order is the one listed in error messages.
SAMPLERS: dict[str, Sampler] = {"random": _random, "grid": _grid, "halton": _halton, "sobol": _sobol}
# Samplers that learn from earlier results (core/search.py, through Optuna): a trial's parameters are
# proposed in rounds and frozen in the sweep's ledger, not a function of its index.
ADAPTIVE_SAMPLERS = ("tpe", "cmaes")


def sampler_names() -> tuple[str, ...]:
    """Every name ``sampler:`` accepts (read when a file is checked: the registry may grow)."""
    return (*SAMPLERS, *ADAPTIVE_SAMPLERS)


def sample_point(dims: list[Dimension], sampler: str, seed: int, k: int, n_trials: int) -> Point:
    """Parameters of trial ``k`` as ``{dimension name: value}``."""
    if k < 0:
        raise ValueError(f"trial index must be >= 0, got {k}")
    if not dims:
        return {}
    fn = SAMPLERS.get(sampler) if isinstance(sampler, str) else None
    if fn is None:
        raise ValueError(f"unknown sampler {sampler!r}")
    return fn(dims, seed, k, n_trials)


def trial_key(k: int) -> str:
    """``trial-007``: three digits at least and no more padding past ``trial-999``, so a trial's key (its
    partition, its result file) never changes when ``trials`` grows. Keys order as their indices by
    ``trial_index``, not as strings (``trial-1000`` sorts before ``trial-101``)."""
    return f"trial-{k:03d}"


def trial_index(key: str) -> int:
    prefix, _, number = key.partition("-")
    if prefix != "trial" or not number.isdigit():
        raise ValueError(f"not a trial partition key: {key!r} (expected like 'trial-007')")
    return int(number)


def trial_keys(sweep: Sweep) -> list[str]:
    return [trial_key(k) for k in range(sweep.trials)]


def trial_stages(sweep: Sweep, point: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The full pipeline of a trial: fixed values, sampled values and op defaults, validated."""
    dims = search_space(sweep)
    stages = []
    for i, stage in enumerate(sweep.pipeline):
        params = dict(stage.fixed)
        for d in dims:
            if d.stage_index == i:
                params[d.param] = point[d.name]
        stages.append((stage.op, validate_stage(stage.op, params, where=f"{sweep.path}: pipeline[{i}]")))
    return stages


def trial_settings(sweep: Sweep, k: int) -> dict[str, Any]:
    """Everything a trial needs: key, index, the sampled point and the full stage list."""
    dims = search_space(sweep)
    point = sample_point(dims, sweep.sampler, sweep.seed, k, sweep.trials)
    return {
        "trial": trial_key(k),
        "index": k,
        "params": point,
        "stages": [[op, params] for op, params in trial_stages(sweep, point)],
    }
