"""The sweep file: a YAML description of an OpenCV pipeline, its search space and an objective.

Loading validates everything before any work starts; every error names the file and the field,
for example ``sweeps/x.yaml: pipeline[1].ksize: parameter 'ksize' must be odd, got 4``.

The checks are pydantic models (one per level: the file, its objective, schedule, each stage and
each search range); the first problem, in the order the fields are read, becomes that message.
Op parameters are checked by their specs in core/ops.py, metric options come from the metric
registry, samplers from the sampler registry, demo sets from demo_data, cron strings from cron.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from imgtune_assets.core.apply import same_folder, within
from imgtune_assets.core.cron import validate_cron
from imgtune_assets.core.demo_data import DEMO_KINDS
from imgtune_assets.core.metrics import METRICS, Objective, metric_options
from imgtune_assets.core.ops import OPS, OpParamError, ParamSpec, check_fixed, validate_stage
from imgtune_assets.core.sampling import ADAPTIVE_SAMPLERS, sampler_names
from imgtune_assets.core.search import INITIAL_DESIGNS, Halving, SearchOptions
from imgtune_assets.core.storage import Location, StorageError, location

RANGE_TYPES = ("int", "float", "odd", "choice")
MAX_TRIALS = 10_000
# A sweep name becomes a folder name under the output folder: keep it a single, plain path part.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Every keyword option of a registered metric (edge_f1's tolerance, ...).
METRIC_OPTIONS = tuple(sorted(set().union(*(metric_options(m) for m in METRICS))))


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
    data_dir: Location  # a local folder (Path) or an object-store URL (UPath)
    objective: Objective
    trials: int
    seed: int
    sampler: str
    pipeline: tuple[Stage, ...]
    schedule_cron: str | None = None
    chunk_size: int | None = None
    demo_data: str | None = None  # generate this demo set into data_dir when the folder is missing
    endpoint_url: str | None = None  # for s3:// URLs of an S3-compatible store
    apply_input: Location | None = None  # the folder the winning pipeline is applied to, and where to
    apply_output: Location | None = None  # write the results (``apply:`` in the file)
    search: SearchOptions = SearchOptions()  # rounds of a staged search (core/search.py)
    early_stopping: Halving | None = None  # successive halving over images
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def higher_is_better(self) -> bool:
        return self.objective.higher_is_better

    @property
    def needs_target(self) -> bool:
        return self.objective.needs_target

    def fingerprint(self) -> str:
        """Hash of everything that decides a trial's parameters and score (not the data).

        ``trials`` is in it only for ``grid``, whose points depend on their number: ``random``,
        ``halton`` and ``sobol`` give trial k the same parameters whatever the count, and a staged
        search extends its rounds (core/search.py), so raising ``trials`` keeps every saved trial."""
        return self._fingerprint(with_trials=self.sampler == "grid")

    def earlier_fingerprints(self) -> tuple[str, ...]:
        """Fingerprints under which earlier versions of imgtune saved results that are this sweep's: a
        sweep of ``random``, ``halton`` or ``sobol`` had its trial count in the hash. A result saved
        under it for the current count is current (one saved for another count is found again once
        it is computed under the current fingerprint)."""
        if self.sampler in ("random", "halton", "sobol") and self.early_stopping is None:
            return (self._fingerprint(with_trials=True),)
        return ()

    def _fingerprint(self, *, with_trials: bool) -> str:
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
        if self.sampler in ADAPTIVE_SAMPLERS or self.early_stopping is not None:
            payload["search"] = self.search.to_dict()
            payload["early_stopping"] = self.early_stopping.to_dict() if self.early_stopping else None
        if not with_trials:
            del payload["trials"]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _fail(path: Path, where: str, message: str) -> SweepFileError:
    return SweepFileError(f"{path}: {where}: {message}" if where else f"{path}: {message}")


# ----------------------------------------------------------------------------- validation models
#
# A check raises ``_problem(message)``: the message is the one users have always seen; ``sub``
# and ``up`` move it from the field being checked to the field path the message names.


def _problem(message: str, *, sub: str = "", up: int = 0) -> PydanticCustomError:
    return PydanticCustomError("sweep", "{message}", {"message": message, "sub": sub, "up": up})


def _says(template: str) -> WrapValidator:
    """Report any failure of the wrapped type or bound as ``template.format(value)``."""

    def check(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise _problem(template.format(value)) from None

    return WrapValidator(check)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def _a(word: str) -> str:
    """``word`` with its indefinite article: "an odd", "an int", "a float", "a choice"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _range_type(value: Any, handler: Any) -> Any:
    if value is None:  # left out (or null): the range says nothing of what it searches
        raise _problem(f"missing: a search range needs a `type` (allowed: {', '.join(RANGE_TYPES)})")
    try:
        return handler(value)
    except ValidationError:
        raise _problem(f"unknown range type {value!r} (allowed: {', '.join(RANGE_TYPES)})") from None


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("blank")
    return value


# int stays int (10, not 10.0): values are written back into documents and hashed by fingerprint().
Number = Annotated[Union[StrictInt, StrictFloat], AfterValidator(_finite), _says("expected a number, got {!r}")]


class _Model(BaseModel):
    # Check order for picking the first problem: field names, "+" for unknown keys, "!" for missing.
    _ORDER: ClassVar[tuple[str, ...]] = ()
    _NESTED: ClassVar[dict[str, type[_Model]]] = {}
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def _unknown(cls, keys: list[Any]) -> tuple[str, str]:
        """(path below this model, message) for unknown keys."""
        raise NotImplementedError


class _Range(_Model):
    """A searched parameter; validated with ``context={"spec": ParamSpec}``."""

    _ORDER = ("+", "type", "values", "low", "high", "log")
    type: Annotated[Literal["int", "float", "odd", "choice"], WrapValidator(_range_type)] = Field(
        None, validate_default=True)
    values: Optional[list[Any]] = None
    low: Number = None  # an explicit null is not a number; absence is checked by _keys_fit_type
    high: Number = None
    log: Annotated[StrictBool, _says("expected true or false, got {!r}")] = False

    @classmethod
    def _unknown(cls, keys: list[Any]) -> tuple[str, str]:
        return "", (f"unknown key(s) {sorted(keys)} in search range "
                    "(allowed: type, low, high, log, values)")

    @model_validator(mode="before")
    @classmethod
    def _keys_fit_type(cls, raw: Any) -> Any:
        # Which keys a range type takes is checked before their values.
        if not isinstance(raw, dict) or set(raw) - set(cls.model_fields):
            return raw  # unknown keys are reported first, by extra="forbid"
        kind = raw.get("type")
        if kind not in RANGE_TYPES:
            return raw  # the type field reports it
        if kind == "choice":
            values = raw.get("values")
            if not isinstance(values, list) or not values:
                raise _problem("a choice needs a non-empty list of values", sub=".values")
            if "low" in raw or "high" in raw or raw.get("log"):
                raise _problem("a choice takes `values`, not low/high/log")
            return {k: v for k, v in raw.items() if k != "log"}  # a false log is ignored
        if "values" in raw:
            raise _problem(f"{_a(kind)} range takes low/high, not values")
        for key in ("low", "high"):
            if key not in raw:
                raise _problem(f"missing ({_a(kind)} range needs low and high)", sub=f".{key}")
        return raw

    @model_validator(mode="after")
    def _fits_parameter(self, info: ValidationInfo) -> _Range:
        spec: ParamSpec = info.context["spec"]
        if self.type == "choice":
            checked = []
            for i, value in enumerate(self.values):
                try:
                    checked.append(spec.validate(value))
                except OpParamError as exc:
                    raise _problem(str(exc), sub=f".values[{i}]") from None
            if len(set(map(repr, checked))) != len(checked):
                raise _problem(f"duplicate values in {self.values!r}", sub=".values")
            self.values = checked
            return self
        kind, low, high = self.type, self.low, self.high
        if low > high:
            raise _problem(f"low ({low}) > high ({high})")
        if self.log and low <= 0:
            raise _problem(f"a log range needs low > 0, got {low}", sub=".low")
        # (odd values are whole numbers: an int parameter may be searched over its odd values only)
        allowed = {"int": ("int", "odd"), "odd": ("odd",), "float": ("float", "int")}.get(spec.kind, ())
        if kind not in allowed:
            expected = " or ".join(allowed) if allowed else "choice"
            raise _problem(f"parameter {spec.name!r} is {spec.kind}: use type {expected}, not {kind}", sub=".type")
        if kind in ("int", "odd"):
            if low != int(low) or high != int(high):
                raise _problem(f"{kind} range bounds must be whole numbers, got {low}..{high}")
            low, high = int(low), int(high)
        if kind == "odd" and not any(v % 2 == 1 for v in range(low, high + 1)):
            raise _problem(f"no odd value in {low}..{high}")
        for key, value in (("low", low), ("high", high)):
            if spec.low is not None and value < spec.low or spec.high is not None and value > spec.high:
                raise _problem(f"{value} is outside the allowed range {spec.low}..{spec.high} of {spec.name!r}",
                               sub=f".{key}")
        self.low, self.high = low, high
        return self

    def to_range(self) -> SearchRange:
        if self.type == "choice":
            return SearchRange(type="choice", values=tuple(self.values))
        return SearchRange(type=self.type, low=self.low, high=self.high, log=self.log)


class _Stage(_Model):
    """One pipeline stage: ``{op: name, <param>: fixed value or search range, ...}``."""

    op: Any
    params: dict[Any, Any]  # not in the file: the stage's keys other than op, gathered here

    @model_validator(mode="before")
    @classmethod
    def _gather_params(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise _problem(f"each stage is a mapping with `op:` and parameters, got {raw!r}")
        if "op" not in raw:
            others = f" (found: {', '.join(sorted(map(str, raw)))})" if raw else ""
            raise _problem(f"missing{others}", sub=".op")
        return {"op": raw["op"], "params": {k: v for k, v in raw.items() if k != "op"}}

    @field_validator("op")
    @classmethod
    def _known_op(cls, op: Any) -> str:
        if not isinstance(op, str) or op not in OPS:
            raise _problem(f"unknown op {op!r} (known: {', '.join(sorted(OPS))})")
        return op

    @field_validator("params")
    @classmethod
    def _check_params(cls, params: dict, info: ValidationInfo) -> dict[str, Any]:
        """Each parameter, in file order: a fixed value, or a SearchRange for a mapping."""
        if "op" not in info.data:
            return params  # the op is reported
        op = info.data["op"]
        spec = OPS[op]
        out: dict[str, Any] = {}
        for name, value in params.items():
            if name not in spec.params:
                known = ", ".join(sorted(spec.params)) or "none"
                raise _problem(f"unknown parameter for {op} (known: {known})", sub=f".{name}")
            if isinstance(value, dict):
                try:
                    out[name] = _Range.model_validate(value, context={"spec": spec.params[name]}).to_range()
                except ValidationError as exc:
                    where, message = _first_problem(exc, _Range)
                    raise _problem(message, sub=f".{name}{where}") from None
            else:
                try:
                    out[name] = spec.params[name].validate(value)
                except OpParamError as exc:
                    raise _problem(str(exc), sub=f".{name}") from None
        return out

    @model_validator(mode="after")
    def _stage_as_a_whole(self) -> _Stage:
        # Check the stage as a whole once, with each searched parameter at one end of its range.
        probe = {name: (value.values[0] if value.type == "choice" else _first_value(value))
                 if isinstance(value, SearchRange) else value for name, value in self.params.items()}
        try:
            full = validate_stage(self.op, probe)
            check_fixed(self.op, {name: value for name, value in full.items()
                                  if not isinstance(self.params.get(name), SearchRange)})
        except OpParamError as exc:
            raise _problem(str(exc)) from None
        return self

    def to_stage(self) -> Stage:
        return Stage(
            op=self.op,
            fixed={k: v for k, v in self.params.items() if not isinstance(v, SearchRange)},
            searched={k: v for k, v in self.params.items() if isinstance(v, SearchRange)},
        )


def _first_value(rng: SearchRange):
    if rng.type == "odd":
        low = int(rng.low)
        return low if low % 2 == 1 else low + 1
    if rng.type == "int":
        return int(rng.low)
    return float(rng.low)


def _option_taken(value: Any, info: ValidationInfo) -> Any:
    metric = info.data.get("metric")  # absent when the metric itself is wrong (reported first)
    if metric is not None and info.field_name not in metric_options(metric):
        takers = [m for m in METRICS if info.field_name in metric_options(m)]
        who = takers[0] if len(takers) == 1 else f"{', '.join(takers[:-1])} and {takers[-1]}"
        raise _problem(f"only {who} {'takes' if len(takers) == 1 else 'take'} {_a(info.field_name)}")
    return value


def _non_negative(value: float) -> float:
    if value < 0:
        raise _problem(f"must be >= 0, got {value}")
    return value


def _positive(value: float) -> float:
    if not value > 0:
        raise _problem(f"must be > 0, got {value}")
    return value


# Each metric option's check: a data range (the images' full scale, for psnr, ssim and mae) must be > 0;
# the others so far are tolerances, >= 0.
_OPTION_CHECKS = {"data_range": _positive}


class _ObjectiveFields(_Model):
    _ORDER = ("metric", "direction", "+", *METRIC_OPTIONS)
    metric: Any
    direction: Annotated[
        Optional[Literal["maximize", "minimize"]], _says("expected maximize or minimize, got {!r}")
    ] = None

    @classmethod
    def _unknown(cls, keys: list[Any]) -> tuple[str, str]:
        allowed = ", ".join(("metric", "direction", *METRIC_OPTIONS))
        return "", f"unknown option(s) {sorted(keys)} (allowed: {allowed})"

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, raw: Any) -> Any:
        if isinstance(raw, str):
            raw = {"metric": raw}
        if not isinstance(raw, dict):
            raise _problem("expected a mapping like {metric: psnr}")
        if "metric" not in raw:
            others = f" (found: {', '.join(sorted(map(str, raw)))})" if raw else ""
            raise _problem(f"missing{others}", sub=".metric")
        return raw

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: Any) -> str:
        if not isinstance(metric, str) or metric not in METRICS:
            raise _problem(f"unknown metric {metric!r} (known: {', '.join(sorted(METRICS))})")
        return metric

    def to_objective(self) -> Objective:
        options = {name: getattr(self, name) for name in METRIC_OPTIONS if name in self.model_fields_set}
        return Objective(metric=self.metric, options=options, direction=self.direction)


# One optional field per metric option; every option so far is a number.
_Objective = create_model(
    "_Objective",
    __base__=_ObjectiveFields,
    __validators__={"_option_taken": field_validator(*METRIC_OPTIONS, mode="before")(_option_taken)}
    if METRIC_OPTIONS else {},
    **{name: (Annotated[Number, AfterValidator(_OPTION_CHECKS.get(name, _non_negative))], None)
       for name in METRIC_OPTIONS},
)


def _check_cron(expr: Any) -> str:
    try:
        return validate_cron(expr)
    except ValueError as exc:
        raise _problem(str(exc)) from None


class _Schedule(_Model):
    _ORDER = ("+", "cron")
    cron: Annotated[Any, AfterValidator(_check_cron)] = Field(None, validate_default=True)

    @classmethod
    def _unknown(cls, keys: list[Any]) -> tuple[str, str]:
        return f".{sorted(map(str, keys))[0]}", "unknown field (allowed: cron)"

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise _problem("expected a mapping like {cron: '0 2 * * *'}")
        return raw


def _endpoint(url: str) -> str:
    from imgtune_assets.core.storage import has_credentials, without_credentials

    if has_credentials(url):  # (named without them: the message goes to logs and the UI)
        raise _problem(f"credentials in the endpoint URL {without_credentials(url)!r} are refused: they come from "
                       "the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE) only")
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
        raise _problem(f"expected an http(s) URL like http://127.0.0.1:9000, got {url!r}")
    return url


class _Storage(_Model):
    """Options for object-store URLs (``data_dir``, ``apply``): no credentials, ever."""

    _ORDER = ("+", "endpoint_url")
    endpoint_url: Optional[Annotated[StrictStr, _says("expected a URL, got {!r}"), AfterValidator(_endpoint)]] = None

    @classmethod
    def _unknown(cls, keys: list[Any]) -> tuple[str, str]:
        return (f".{sorted(keys, key=str)[0]}",
                "unknown field (allowed: endpoint_url); credentials are never read from the sweep file: they "
                "come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) or the "
                "standard credential chain")

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise _problem("expected a mapping like {endpoint_url: 'http://127.0.0.1:9000'}")
        return raw


class _Apply(_Model):
    """Where the winning pipeline is applied: every image of ``input_dir`` to ``output_dir``.

    Once both are resolved (local folders relative to the sweep file, or URLs), ``output_dir`` must not
    be ``input_dir``, however spelled (``../data/photos`` and ``../data/./photos/``): the comparison is
    apply's own (``core.apply.same_folder``), made when the file is loaded rather than after the sweep,
    by ``_SweepDoc.to_sweep``. An output folder inside the input folder (or the reverse) is allowed:
    apply reads only the files directly in ``input_dir`` (or, in a sweep's data folder, in its
    ``images/``: ``core.apply.input_images``), never deeper, so outputs written to ``photos/tuned/`` are
    not read as inputs by the next run. An output folder that is the input's ``images/`` is refused too:
    the first run would create it, and every later run would read its outputs as its inputs.
    """

    _ORDER = ("+", "!", "input_dir", "output_dir")
    input_dir: Annotated[StrictStr, AfterValidator(_not_blank), _says("expected a folder path or URL, got {!r}")]
    output_dir: Annotated[StrictStr, AfterValidator(_not_blank), _says("expected a folder path or URL, got {!r}")]

    @classmethod
    def _unknown(cls, keys: list[Any]) -> tuple[str, str]:
        return f".{sorted(keys, key=str)[0]}", "unknown field (allowed: input_dir, output_dir)"

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise _problem("expected a mapping like {input_dir: photos/, output_dir: tuned/}")
        return raw


class _Search(_Model):
    """How a staged search (adaptive sampler or early stopping) forms its rounds (core/search.py)."""

    _ORDER = ("+", "batch_size", "n_startup", "initial_design", "warm_start")
    batch_size: Optional[Annotated[StrictInt, Field(ge=1), _says("expected a whole number >= 1, got {!r}")]] = None
    n_startup: Optional[Annotated[StrictInt, Field(ge=1), _says("expected a whole number >= 1, got {!r}")]] = None
    initial_design: Annotated[Literal[INITIAL_DESIGNS],  # type: ignore[valid-type]
                              _says(f"expected one of {', '.join(INITIAL_DESIGNS)}, got {{!r}}")] = "sobol"
    warm_start: Annotated[StrictInt, Field(ge=0), _says("expected a whole number >= 0, got {!r}")] = 3

    @classmethod
    def _unknown(cls, keys: list[Any]) -> tuple[str, str]:
        return (f".{sorted(keys, key=str)[0]}",
                "unknown field (allowed: batch_size, n_startup, initial_design, warm_start)")

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise _problem("expected a mapping like {batch_size: 8, n_startup: 16}")
        return raw

    def to_options(self) -> SearchOptions:
        return SearchOptions(batch_size=self.batch_size, n_startup=self.n_startup,
                             initial_design=self.initial_design, warm_start=self.warm_start)


class _EarlyStopping(_Model):
    _ORDER = ("+", "!", "method", "eta", "min_images")
    method: Annotated[Literal["successive_halving"],
                      _says("unknown method {!r} (allowed: successive_halving)")]
    eta: Annotated[StrictInt, Field(ge=2), _says("expected a whole number >= 2, got {!r}")] = 3
    min_images: Optional[Annotated[StrictInt, Field(ge=1), _says("expected a whole number >= 1, got {!r}")]] = None

    @classmethod
    def _unknown(cls, keys: list[Any]) -> tuple[str, str]:
        return f".{sorted(keys, key=str)[0]}", "unknown field (allowed: method, eta, min_images)"

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise _problem("expected a mapping like {method: successive_halving, eta: 3}")
        return raw

    def to_halving(self) -> Halving:
        return Halving(eta=self.eta, min_images=self.min_images)


def _plain_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise _problem(f"{name!r} is not a plain name (1 to 100 letters, digits, '_', '-', '.', starting with "
                       "a letter or digit; it names a folder under the output folder, so no '/' or '..')")
    return name


def _trials_range(trials: int) -> int:
    if not 1 <= trials <= MAX_TRIALS:
        raise _problem(f"must be between 1 and {MAX_TRIALS}, got {trials}")
    return trials


def _known_sampler(sampler: Any) -> str:
    if not isinstance(sampler, str) or sampler not in sampler_names():
        raise _problem(f"unknown sampler {sampler!r} (known: {', '.join(sampler_names())})")
    return sampler


def _known_demo(kind: Any) -> Any:
    if kind is not None and kind not in DEMO_KINDS:
        raise _problem(f"unknown demo set {kind!r} (known: {', '.join(DEMO_KINDS)})")
    return kind


def _stage_list(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise _problem("expected a non-empty list of stages")
    return value


class _SweepDoc(_Model):
    """The whole file. Fields are declared in the order they are checked."""

    _ORDER = ("+", "!", "name", "data_dir", "storage", "objective", "trials", "seed", "sampler", "search",
              "early_stopping", "pipeline", "schedule", "chunk_size", "demo_data", "apply", "description")
    _NESTED = {"objective": _Objective, "schedule": _Schedule, "storage": _Storage, "apply": _Apply,
               "search": _Search, "early_stopping": _EarlyStopping}
    name: Annotated[Any, AfterValidator(_plain_name)]
    data_dir: Annotated[StrictStr, AfterValidator(_not_blank), _says("expected a folder path, got {!r}")]
    storage: Optional[_Storage] = None
    objective: _Objective
    trials: Annotated[StrictInt, _says("expected a whole number, got {!r}"), AfterValidator(_trials_range)]
    seed: Annotated[StrictInt, Field(ge=0), _says("expected a whole number >= 0, got {!r}")] = 0
    sampler: Annotated[Any, AfterValidator(_known_sampler)] = "random"
    search: Optional[_Search] = None
    early_stopping: Optional[_EarlyStopping] = None
    pipeline: Annotated[list[_Stage], BeforeValidator(_stage_list)]
    schedule: Optional[_Schedule] = None
    chunk_size: Optional[Annotated[StrictInt, Field(ge=1), _says("expected a whole number >= 1, got {!r}")]] = None
    # Generated into data_dir when that folder is missing.
    demo_data: Annotated[Any, AfterValidator(_known_demo)] = None
    apply: Optional[_Apply] = None
    description: Any = None

    @classmethod
    def _unknown(cls, keys: list[Any]) -> tuple[str, str]:
        allowed = ", ".join(sorted(cls.model_fields))
        return f".{sorted(keys, key=str)[0]}", f"unknown field (allowed: {allowed})"

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise _problem("the sweep file must be a YAML mapping (name, data_dir, objective, trials, ...)")
        return raw

    @model_validator(mode="after")
    def _search_needs_rounds(self) -> _SweepDoc:
        if self.search is not None and self.sampler not in ADAPTIVE_SAMPLERS and self.early_stopping is None:
            raise _problem(f"only used by a sampler that learns ({', '.join(ADAPTIVE_SAMPLERS)}) or with "
                           f"early_stopping; sampler is {self.sampler!r}", sub=".search")
        return self

    def to_sweep(self, path: Path, raw: dict[str, Any]) -> Sweep:
        endpoint = self.storage.endpoint_url if self.storage else None

        def where(spec: str, field: str):
            try:
                return location(spec, base_dir=path.parent, endpoint_url=endpoint)
            except StorageError as exc:
                raise _fail(path, field, str(exc)) from None

        data_dir = where(self.data_dir, "data_dir")
        apply_input = apply_output = None
        if self.apply:
            apply_input = where(self.apply.input_dir, "apply.input_dir")
            apply_output = where(self.apply.output_dir, "apply.output_dir")
            if same_folder(apply_input, apply_output):  # see _Apply
                raise _fail(path, "apply.output_dir", f"must differ from apply.input_dir (both are {apply_input})")
            if same_folder(apply_input / "images", apply_output):
                raise _fail(path, "apply.output_dir", f"must not be apply.input_dir's images/ ({apply_output}): "
                                                      "apply reads a folder's images/ when it has one")
            if within(apply_output, data_dir):
                raise _fail(path, "apply.output_dir", f"must not be data_dir or inside it ({apply_output} is in "
                                                      f"{data_dir}): the tuned images would overwrite the images "
                                                      "and targets the sweep tunes on")
        return Sweep(
            path=path, name=self.name, data_dir=data_dir, endpoint_url=endpoint,
            apply_input=apply_input, apply_output=apply_output,
            objective=self.objective.to_objective(), trials=self.trials, seed=self.seed, sampler=self.sampler,
            pipeline=tuple(stage.to_stage() for stage in self.pipeline),
            schedule_cron=self.schedule.cron if self.schedule else None,
            chunk_size=self.chunk_size, demo_data=self.demo_data, raw=raw,
            search=self.search.to_options() if self.search else SearchOptions(),
            early_stopping=self.early_stopping.to_halving() if self.early_stopping else None,
        )


TOP_LEVEL_FIELDS = frozenset(_SweepDoc.model_fields)


# ------------------------------------------------------------------- pydantic errors -> messages


def _rank(model: type[_Model], loc: tuple, kind: str) -> tuple[int, ...]:
    """Where an error's check comes in ``model``'s check order (nested models refine it)."""
    if not loc:
        return (-1,)
    order = model._ORDER
    if kind == "extra_forbidden" and len(loc) == 1:
        return (order.index("+"),)
    if kind == "missing" and len(loc) == 1 and "!" in order:
        return (order.index("!"),)
    head = loc[0]
    rank = order.index(head) if head in order else len(order)
    nested = model._NESTED.get(head)
    return (rank, *(_rank(nested, loc[1:], kind) if nested else ()))


def _path(loc: tuple, *, up: int = 0, sub: str = "") -> str:
    """``('pipeline', 0, 'params', 'd')`` -> ``.pipeline[0].d`` (``params`` is not in the file)."""
    parts = [
        f"[{part}]" if isinstance(part, int) else f".{part}"
        for i, part in enumerate(loc)
        if not (part == "params" and i >= 2 and loc[i - 2] == "pipeline" and isinstance(loc[i - 1], int))
    ]
    return "".join(parts[: len(parts) - up]) + sub


def _first_problem(exc: ValidationError, model: type[_Model]) -> tuple[str, str]:
    """The problem the checks meet first, as (field path like ``.pipeline[0].d``, message)."""
    errors = exc.errors()
    index = min(range(len(errors)), key=lambda i: (_rank(model, errors[i]["loc"], errors[i]["type"]), i))
    error = errors[index]
    loc = error["loc"]
    if error["type"] == "extra_forbidden":
        parent = loc[:-1]
        owner = model
        for part in parent:
            owner = owner._NESTED[part]
        keys = [e["loc"][-1] for e in errors if e["type"] == "extra_forbidden" and e["loc"][:-1] == parent]
        where, message = owner._unknown(keys)
        return _path(parent) + where, message
    if error["type"] == "sweep":
        ctx = error["ctx"]
        return _path(loc, up=ctx["up"], sub=ctx["sub"]), ctx["message"]
    if error["type"] == "missing":
        return _path(loc), "missing"
    return _path(loc), error["msg"]  # not expected: every check above words its own message


def parse_sweep(raw: Any, path: Path) -> Sweep:
    """Validate an already-parsed YAML document; ``path`` is used for messages and ``data_dir``."""
    try:
        doc = _SweepDoc.model_validate(raw)
    except ValidationError as exc:
        where, message = _first_problem(exc, _SweepDoc)
        raise _fail(path, where[1:] if where.startswith(".") else where, message) from None
    return doc.to_sweep(path, raw)


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping that repeats a key (``problem_mark`` is the repeat, ``first_line`` the first, 1-based)."""

    def __init__(self, key: Any, first: yaml.Node, again: yaml.Node) -> None:
        super().__init__(None, None, f"duplicate key {key!r}", again.start_mark)
        self.key, self.first_line = key, first.start_mark.line + 1


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key: YAML forbids it, and PyYAML would
    keep the last value silently (``ksize: 5`` then ``ksize: 7`` would search 7 without a word).

    A ``<<`` merge may still override the keys it brings in: only a mapping's own keys are compared.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[yaml.Node] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Every mapping passes here before PyYAML merges ``<<`` keys into it (its own construction,
        # or a merge that reads it first); once merged, its keys are no longer only its own.
        if node not in self._checked:
            self._checked.add(node)
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag in ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"):
                    continue  # ``<<`` and ``=``: PyYAML's own handling (a ``=`` key becomes the string)
                key = self.construct_object(key_node)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: construct_mapping refuses it
                if first is not key_node:
                    raise _DuplicateKey(key, first, key_node)
        super().flatten_mapping(node)


# Far above any real sweep file (a few KB): a larger one in a shared sweeps folder is a mistake or worse.
MAX_SWEEP_FILE_BYTES = 1024 * 1024


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file (also a ``best_pipeline.yaml``, and each file of a sweeps folder)."""
    file = Path(path).expanduser().resolve()
    try:
        if file.stat().st_size > MAX_SWEEP_FILE_BYTES:
            raise SweepFileError(f"{file}: {file.stat().st_size} bytes: a sweep file is refused above "
                                 f"{MAX_SWEEP_FILE_BYTES} bytes")
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SweepFileError(f"{file}: sweep file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SweepFileError(f"{file}: cannot read sweep file ({exc})") from exc
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        if isinstance(exc, _DuplicateKey):
            raise SweepFileError(f"{file}: {where}: duplicate key {exc.key!r} (first on line {exc.first_line}): "
                                 "a key may appear once in a mapping") from None
        problem = getattr(exc, "problem", None) or str(exc)
        raise SweepFileError(f"{file}: {where}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise SweepFileError(f"{file}: YAML nested too deeply") from None
    except ValueError as exc:  # a number beyond Python's digit limit for int()
        raise SweepFileError(f"{file}: YAML value refused: {str(exc).splitlines()[0]}") from None
    try:
        return parse_sweep(raw, file)
    except RecursionError:
        raise SweepFileError(f"{file}: nested too deeply to be a sweep file") from None


def fixed_sweep_document(sweep: Sweep, stages: list[tuple[str, dict[str, Any]]], *, name: str) -> dict[str, Any]:
    """A sweep file with every parameter fixed: the tuned pipeline, reusable as-is (trials: 1)."""
    document = {
        "name": name,
        "data_dir": str(sweep.data_dir),
        "objective": sweep.objective.to_dict(),
        "trials": 1,
        "seed": sweep.seed,
        "sampler": "grid",
        "pipeline": [{"op": op, **params} for op, params in stages],
    }
    if sweep.endpoint_url:
        document["storage"] = {"endpoint_url": sweep.endpoint_url}
    return document
