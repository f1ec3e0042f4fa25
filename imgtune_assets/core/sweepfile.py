"""The sweep file: a YAML description of an OpenCV pipeline, its search space and an objective.

Loading validates everything before any work starts; every error names the file and the field,
for example ``sweeps/x.yaml: pipeline[1].ksize: fixed value 4 must be odd``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imgtune_assets.core.metrics import METRICS, Objective
from imgtune_assets.core.ops import OPS, OpParamError, validate_stage

SAMPLERS = ("random", "grid", "halton", "sobol")
RANGE_TYPES = ("int", "float", "odd", "choice")
MAX_TRIALS = 10_000
# A sweep name becomes a folder name under the output folder: keep it a single, plain path part.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
TOP_LEVEL_FIELDS = {
    "name", "data_dir", "objective", "trials", "seed", "sampler", "pipeline", "schedule", "chunk_size",
    "description", "demo_data",
}
DEMO_KINDS = ("denoise", "segment")


class SweepFileError(ValueError):
    """A sweep file that cannot be used. The message names the file and the field."""


@dataclass(frozen=True)
class SearchRange:
    """A searched parameter: ``{type: int|float|odd|choice, low, high, log, values}``."""

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: tuple = ()

    def to_dict(self) -> dict[str, Any]:
        if self.type == "choice":
            return {"type": "choice", "values": list(self.values)}
        out: dict[str, Any] = {"type": self.type, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        return out


@dataclass(frozen=True)
class Stage:
    op: str
    fixed: dict[str, Any]
    searched: dict[str, SearchRange]


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    data_dir: Path
    objective: Objective
    trials: int
    seed: int
    sampler: str
    pipeline: tuple[Stage, ...]
    schedule_cron: str | None = None
    chunk_size: int | None = None
    demo_data: str | None = None  # generate this demo set into data_dir when the folder is missing
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def higher_is_better(self) -> bool:
        return self.objective.higher_is_better

    @property
    def needs_target(self) -> bool:
        return self.objective.needs_target

    def fingerprint(self) -> str:
        """Hash of everything that decides a trial's parameters and score (not the data)."""
        payload = {
            "metric": self.objective.metric,
            "metric_options": self.objective.options,
            "direction": self.objective.direction,
            "seed": self.seed,
            "sampler": self.sampler,
            "trials": self.trials,
            "pipeline": [
                {"op": s.op, "fixed": s.fixed, "searched": {k: r.to_dict() for k, r in s.searched.items()}}
                for s in self.pipeline
            ],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _fail(path: Path, where: str, message: str) -> SweepFileError:
    return SweepFileError(f"{path}: {where}: {message}" if where else f"{path}: {message}")


def _number(value: Any, path: Path, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, where, f"expected a number, got {value!r}")
    return value


def _parse_range(raw: dict, spec, path: Path, where: str) -> SearchRange:
    unknown = set(raw) - {"type", "low", "high", "log", "values"}
    if unknown:
        raise _fail(path, where, f"unknown key(s) {sorted(unknown)} in search range "
                                 "(allowed: type, low, high, log, values)")
    kind = raw.get("type")
    if kind not in RANGE_TYPES:
        raise _fail(path, f"{where}.type", f"unknown range type {kind!r} (allowed: {', '.join(RANGE_TYPES)})")
    if kind == "choice":
        values = raw.get("values")
        if not isinstance(values, list) or not values:
            raise _fail(path, f"{where}.values", "a choice needs a non-empty list of values")
        if "low" in raw or "high" in raw or raw.get("log"):
            raise _fail(path, where, "a choice takes `values`, not low/high/log")
        checked = []
        for i, value in enumerate(values):
            try:
                checked.append(spec.validate(value, f"{path}: {where}.values[{i}]"))
            except OpParamError as exc:
                raise SweepFileError(str(exc)) from None
        if len(set(map(repr, checked))) != len(checked):
            raise _fail(path, f"{where}.values", f"duplicate values in {values!r}")
        return SearchRange(type="choice", values=tuple(checked))

    if "values" in raw:
        raise _fail(path, where, f"a {kind} range takes low/high, not values")
    for key in ("low", "high"):
        if key not in raw:
            raise _fail(path, f"{where}.{key}", f"missing (a {kind} range needs low and high)")
    low = _number(raw["low"], path, f"{where}.low")
    high = _number(raw["high"], path, f"{where}.high")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise _fail(path, f"{where}.log", f"expected true or false, got {log!r}")
    if low > high:
        raise _fail(path, where, f"low ({low}) > high ({high})")
    if log and low <= 0:
        raise _fail(path, f"{where}.low", f"a log range needs low > 0, got {low}")

    allowed = {"int": ("int",), "odd": ("odd",), "float": ("float", "int")}.get(spec.kind, ())
    if kind not in allowed:
        expected = " or ".join(allowed) if allowed else "choice"
        raise _fail(path, f"{where}.type", f"parameter {spec.name!r} is {spec.kind}: use type {expected}, not {kind}")
    if kind in ("int", "odd"):
        if low != int(low) or high != int(high):
            raise _fail(path, where, f"{kind} range bounds must be whole numbers, got {low}..{high}")
        low, high = int(low), int(high)
    if kind == "odd":
        if not any(v % 2 == 1 for v in range(low, high + 1)):
            raise _fail(path, where, f"no odd value in {low}..{high}")
    for key, value in (("low", low), ("high", high)):
        if spec.low is not None and value < spec.low or spec.high is not None and value > spec.high:
            raise _fail(path, f"{where}.{key}",
                        f"{value} is outside the allowed range {spec.low}..{spec.high} of {spec.name!r}")
    return SearchRange(type=kind, low=low, high=high, log=log)


def _parse_stage(raw: Any, index: int, path: Path) -> Stage:
    where = f"pipeline[{index}]"
    if not isinstance(raw, dict):
        raise _fail(path, where, f"each stage is a mapping with `op:` and parameters, got {raw!r}")
    if "op" not in raw:
        raise _fail(path, f"{where}.op", "missing")
    op = raw["op"]
    if op not in OPS:
        raise _fail(path, f"{where}.op", f"unknown op {op!r} (known: {', '.join(sorted(OPS))})")
    spec = OPS[op]
    fixed: dict[str, Any] = {}
    searched: dict[str, SearchRange] = {}
    for name, value in raw.items():
        if name == "op":
            continue
        if name not in spec.params:
            known = ", ".join(sorted(spec.params)) or "none"
            raise _fail(path, f"{where}.{name}", f"unknown parameter for {op} (known: {known})")
        if isinstance(value, dict):
            searched[name] = _parse_range(value, spec.params[name], path, f"{where}.{name}")
        else:
            try:
                fixed[name] = spec.params[name].validate(value, f"{path}: {where}.{name}")
            except OpParamError as exc:
                raise SweepFileError(str(exc)) from None
    # Check the stage as a whole once, with each searched parameter at one end of its range.
    probe = dict(fixed)
    for name, rng in searched.items():
        probe[name] = rng.values[0] if rng.type == "choice" else _first_value(rng)
    try:
        validate_stage(op, probe, where=f"{path}: {where}")
    except OpParamError as exc:
        raise SweepFileError(str(exc)) from None
    return Stage(op=op, fixed=fixed, searched=searched)


def _first_value(rng: SearchRange):
    if rng.type == "odd":
        low = int(rng.low)
        return low if low % 2 == 1 else low + 1
    if rng.type == "int":
        return int(rng.low)
    return float(rng.low)


def parse_sweep(raw: Any, path: Path) -> Sweep:
    """Validate an already-parsed YAML document; ``path`` is used for messages and ``data_dir``."""
    if not isinstance(raw, dict):
        raise _fail(path, "", "the sweep file must be a YAML mapping (name, data_dir, objective, trials, ...)")
    unknown = set(raw) - TOP_LEVEL_FIELDS
    if unknown:
        raise _fail(path, sorted(unknown)[0], f"unknown field (allowed: {', '.join(sorted(TOP_LEVEL_FIELDS))})")
    for required in ("name", "data_dir", "objective", "trials", "pipeline"):
        if required not in raw:
            raise _fail(path, required, "missing")

    name = raw["name"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise _fail(path, "name", f"{name!r} is not a plain name (letters, digits, '_', '-', '.'; "
                                  "it names a folder under the output folder, so no '/' or '..')")
    data_dir = raw["data_dir"]
    if not isinstance(data_dir, str) or not data_dir.strip():
        raise _fail(path, "data_dir", f"expected a folder path, got {data_dir!r}")
    resolved_data_dir = (path.parent / data_dir).resolve()

    objective = raw["objective"]
    if isinstance(objective, str):
        objective = {"metric": objective}
    if not isinstance(objective, dict) or "metric" not in objective:
        raise _fail(path, "objective", "expected a mapping like {metric: psnr}")
    metric = objective["metric"]
    if metric not in METRICS:
        raise _fail(path, "objective.metric", f"unknown metric {metric!r} (known: {', '.join(sorted(METRICS))})")
    direction = objective.get("direction")
    if direction is not None and direction not in ("maximize", "minimize"):
        raise _fail(path, "objective.direction", f"expected maximize or minimize, got {direction!r}")
    metric_options = {k: v for k, v in objective.items() if k not in ("metric", "direction")}
    if metric_options and set(metric_options) != {"tolerance"}:
        raise _fail(path, "objective", f"unknown option(s) {sorted(set(metric_options) - {'tolerance'})} "
                                       "(allowed: metric, direction, tolerance)")
    if "tolerance" in metric_options:
        if metric != "edge_f1":
            raise _fail(path, "objective.tolerance", "only edge_f1 takes a tolerance")
        tol = _number(metric_options["tolerance"], path, "objective.tolerance")
        if tol < 0:
            raise _fail(path, "objective.tolerance", f"must be >= 0, got {tol}")

    trials = raw["trials"]
    if isinstance(trials, bool) or not isinstance(trials, int):
        raise _fail(path, "trials", f"expected a whole number, got {trials!r}")
    if not 1 <= trials <= MAX_TRIALS:
        raise _fail(path, "trials", f"must be between 1 and {MAX_TRIALS}, got {trials}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _fail(path, "seed", f"expected a whole number >= 0, got {seed!r}")
    sampler = raw.get("sampler", "random")
    if sampler not in SAMPLERS:
        raise _fail(path, "sampler", f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")

    pipeline_raw = raw["pipeline"]
    if not isinstance(pipeline_raw, list) or not pipeline_raw:
        raise _fail(path, "pipeline", "expected a non-empty list of stages")
    pipeline = tuple(_parse_stage(stage, i, path) for i, stage in enumerate(pipeline_raw))

    cron = None
    schedule = raw.get("schedule")
    if schedule is not None:
        if not isinstance(schedule, dict) or set(schedule) - {"cron"}:
            raise _fail(path, "schedule", "expected a mapping like {cron: '0 2 * * *'}")
        cron = schedule.get("cron")
        if not isinstance(cron, str) or len(cron.split()) != 5:
            raise _fail(path, "schedule.cron", f"expected a 5-field cron string, got {cron!r}")
    chunk_size = raw.get("chunk_size")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise _fail(path, "chunk_size", f"expected a whole number >= 1, got {chunk_size!r}")

    demo_data = raw.get("demo_data")
    if demo_data is not None and demo_data not in DEMO_KINDS:
        raise _fail(path, "demo_data", f"unknown demo set {demo_data!r} (known: {', '.join(DEMO_KINDS)})")

    return Sweep(
        path=path, name=name, data_dir=resolved_data_dir,
        objective=Objective(metric=metric, options=metric_options, direction=direction),
        trials=trials, seed=seed, sampler=sampler, pipeline=pipeline, schedule_cron=cron,
        chunk_size=chunk_size, demo_data=demo_data, raw=raw,
    )


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file."""
    file = Path(path).expanduser().resolve()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SweepFileError(f"{file}: sweep file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SweepFileError(f"{file}: cannot read sweep file ({exc})") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        raise SweepFileError(f"{file}: {where}: YAML syntax error: {problem}") from None
    return parse_sweep(raw, file)


def fixed_sweep_document(sweep: Sweep, stages: list[tuple[str, dict[str, Any]]], *, name: str) -> dict[str, Any]:
    """A sweep file with every parameter fixed: the tuned pipeline, reusable as-is (trials: 1)."""
    return {
        "name": name,
        "data_dir": str(sweep.data_dir),
        "objective": sweep.objective.to_dict(),
        "trials": 1,
        "seed": sweep.seed,
        "sampler": "grid",
        "pipeline": [{"op": op, **params} for op, params in stages],
    }
