import json
import math
from pathlib import Path

import numpy as np
import pytest

from imgtune_assets.core.ops import validate_stage
from imgtune_assets.core.sampling import (
    SAMPLERS,
    sample_point,
    search_space,
    trial_index,
    trial_key,
    trial_keys,
    trial_settings,
)
from imgtune_assets.core.sweepfile import parse_sweep

RAW = {
    "name": "s",
    "data_dir": "d",
    "objective": {"metric": "psnr"},
    "trials": 40,
    "seed": 7,
    "pipeline": [
        {"op": "bilateral_filter", "d": {"type": "int", "low": 3, "high": 11},
         "sigma_color": {"type": "float", "low": 10, "high": 150, "log": True}},
        {"op": "gaussian_blur", "ksize": {"type": "odd", "low": 2, "high": 15}},
        {"op": "threshold", "method": {"type": "choice", "values": ["otsu", "mean", "gaussian"]}},
    ],
}


def sweep(tmp_path, **changes):
    return parse_sweep({**RAW, **changes}, tmp_path / "s.yaml")


@pytest.mark.parametrize("sampler", ["random", "grid", "halton", "sobol"])
def test_values_stay_in_range_and_type(tmp_path, sampler):
    s = sweep(tmp_path, sampler=sampler)
    dims = {d.name: d for d in search_space(s)}
    for k in range(s.trials):
        point = sample_point(list(dims.values()), sampler, s.seed, k, s.trials)
        assert 3 <= point["bilateral_filter.d"] <= 11 and isinstance(point["bilateral_filter.d"], int)
        assert 10 <= point["bilateral_filter.sigma_color"] <= 150
        assert point["gaussian_blur.ksize"] % 2 == 1 and 3 <= point["gaussian_blur.ksize"] <= 15
        assert point["threshold.method"] in ("otsu", "mean", "gaussian")


@pytest.mark.parametrize("sampler", ["random", "grid", "halton", "sobol"])
def test_trial_depends_only_on_seed_space_and_index(tmp_path, sampler):
    s = sweep(tmp_path, sampler=sampler)
    # Trial 17 alone, drawn fresh, equals trial 17 drawn in sequence after the others.
    in_sequence = [trial_settings(s, k) for k in range(s.trials)][17]
    assert trial_settings(s, 17) == in_sequence
    other_seed = sweep(tmp_path, sampler=sampler, seed=8)
    if sampler != "grid":  # a grid is the same whatever the seed
        assert trial_settings(other_seed, 17)["params"] != in_sequence["params"]


def test_random_trials_differ_and_cover_choices(tmp_path):
    s = sweep(tmp_path)
    points = [trial_settings(s, k)["params"] for k in range(s.trials)]
    assert len({tuple(sorted(p.items())) for p in points}) == s.trials
    assert {p["threshold.method"] for p in points} == {"otsu", "mean", "gaussian"}


def test_log_range_samples_low_values_more_often(tmp_path):
    s = sweep(tmp_path, trials=400)
    values = [trial_settings(s, k)["params"]["bilateral_filter.sigma_color"] for k in range(400)]
    geometric_mid = math.sqrt(10 * 150)
    below = sum(v < geometric_mid for v in values) / len(values)
    assert 0.4 < below < 0.6  # log-uniform: half below the geometric midpoint (linear would give ~0.2)


def test_grid_covers_every_combination_once(tmp_path):
    raw_pipeline = [{"op": "gaussian_blur", "ksize": {"type": "odd", "low": 3, "high": 7},
                     "sigma": {"type": "float", "low": 1, "high": 2}}]
    s = sweep(tmp_path, sampler="grid", trials=9, pipeline=raw_pipeline)
    points = [(p["gaussian_blur.ksize"], p["gaussian_blur.sigma"])
              for p in (trial_settings(s, k)["params"] for k in range(9))]
    assert sorted(points) == sorted((k, sg) for k in (3, 5, 7) for sg in (1.0, 1.5, 2.0))


def test_stages_are_complete_and_valid(tmp_path):
    s = sweep(tmp_path)
    settings = trial_settings(s, 3)
    ops = [op for op, _ in settings["stages"]]
    assert ops == ["bilateral_filter", "gaussian_blur", "threshold"]
    for op, params in settings["stages"]:
        assert validate_stage(op, params) == params  # defaults filled, values valid


def test_trial_keys_are_readable_and_round_trip():
    assert trial_key(7) == "trial-007"
    assert trial_key(1234) == "trial-1234"
    assert trial_index("trial-007") == 7
    with pytest.raises(ValueError, match="not a trial partition key"):
        trial_index("007")


def test_trial_keys_of_sweep(tmp_path):
    keys = trial_keys(sweep(tmp_path, trials=3))
    assert keys == ["trial-000", "trial-001", "trial-002"]


# Trial parameters recorded from the samplers before Halton moved to scipy (the hand-written
# radical inverse): every sampler must keep giving exactly these, so re-running or backfilling a
# trial of an existing sweep evaluates the same parameters. See sampler_golden.json for the sweeps.
GOLDEN = json.loads((Path(__file__).parent / "sampler_golden.json").read_text())


def _golden_sweep(name: str, **changes):
    return parse_sweep({**GOLDEN["sweeps"][name]["raw"], **changes}, Path("/golden") / f"{name}.yaml")


@pytest.mark.parametrize("name", sorted(GOLDEN["sweeps"]))
@pytest.mark.parametrize("sampler", ["random", "grid", "halton", "sobol"])
def test_points_match_the_recorded_ones(name, sampler):
    s = _golden_sweep(name)
    dims = search_space(s)
    assert [d.name for d in dims] == GOLDEN["sweeps"][name]["dims"]
    for seed in GOLDEN["seeds"]:
        expected = GOLDEN["sweeps"][name]["points"][f"{sampler}/{seed}"]
        got = [[sample_point(dims, sampler, seed, k, s.trials)[d.name] for d in dims] for k in GOLDEN["ks"]]
        # Compared as JSON so 3 and 3.0, True and 1 count as different.
        assert json.dumps(got) == json.dumps(expected), (name, sampler, seed)


@pytest.mark.parametrize("name", sorted(n for n, e in GOLDEN["sweeps"].items() if e["settings"]))
@pytest.mark.parametrize("sampler", ["random", "grid", "halton", "sobol"])
def test_trial_settings_match_the_recorded_ones(name, sampler):
    seed = GOLDEN["settings_seed"]
    s = _golden_sweep(name, sampler=sampler, seed=seed)
    got = [trial_settings(s, k) for k in GOLDEN["settings_ks"]]
    assert json.dumps(got) == json.dumps(GOLDEN["sweeps"][name]["settings"][f"{sampler}/{seed}"])


def test_samplers_are_a_registry():
    assert list(SAMPLERS) == ["random", "grid", "halton", "sobol"]
    dims = search_space(_golden_sweep("one_dim"))
    for name, fn in SAMPLERS.items():
        assert fn(dims, 3, 5, 7) == sample_point(dims, name, 3, 5, 7)
    with pytest.raises(ValueError, match="unknown sampler 'tpe'"):
        sample_point(dims, "tpe", 0, 0, 1)
    with pytest.raises(ValueError, match="trial index must be >= 0"):
        sample_point(dims, "random", 0, -1, 1)


def test_halton_point_does_not_depend_on_the_trial_count_or_order():
    dims = search_space(_golden_sweep("mixed4"))
    late = sample_point(dims, "halton", 5, 300, 1000)
    assert sample_point(dims, "halton", 5, 300, 40) == late  # k beyond n_trials still works
    assert [sample_point(dims, "halton", 5, k, 1000) for k in (0, 300)][1] == late


def test_to_unit_inverts_from_unit(tmp_path):
    raw = {**RAW, "pipeline": RAW["pipeline"] + [
        {"op": "median_blur", "ksize": {"type": "odd", "low": 3, "high": 31, "log": True}}]}
    for d in search_space(parse_sweep(raw, tmp_path / "s.yaml")):
        if d.range.type == "float":
            for value in (d.range.low, 37.5, d.range.high * 0.999):
                assert d.from_unit(d.to_unit(value)) == pytest.approx(value, rel=1e-5)
        else:  # every value of a discrete range maps to a point of its own cell, and back
            values = d.candidates(levels=10**9)
            assert [d.from_unit(d.to_unit(v)) for v in values] == values
            assert all(0.0 <= d.to_unit(v) < 1.0 for v in values)


@pytest.mark.parametrize("kind,low,high,log", [("int", 3, 11, False), ("odd", 2, 15, False), ("int", 1, 300, True),
                                               ("odd", 3, 301, True), ("int", 0, 0, False)])
def test_integer_values_come_from_the_grid_without_listing_it(kind, low, high, log):
    # the reference: the nearest of every listed value (the smaller on a tie), as the samplers always did
    from imgtune_assets.core.sampling import Dimension
    from imgtune_assets.core.sweepfile import SearchRange

    d = Dimension("op.p", 0, "p", SearchRange(kind, low, high, log))
    every = d.candidates(levels=10**9)
    for u in np.linspace(0.0, 1.0, 997):
        if log:
            lo, hi = math.log(every[0]), math.log(every[-1] + 1)
            target = math.exp(lo + min(u, np.nextafter(1.0, 0.0)) * (hi - lo))
            expected = min(every, key=lambda v: (abs(v - target), v))
        else:
            expected = every[int(min(u, np.nextafter(1.0, 0.0)) * len(every))]
        assert d.from_unit(u) == expected
    huge = Dimension("op.q", 0, "q", SearchRange("int", 1, 10**12, log))  # too many values to list
    assert 1 <= huge.from_unit(0.5) <= 10**12 and huge.from_unit(huge.to_unit(123456)) == 123456


def test_raising_trials_past_a_thousand_keeps_every_earlier_key(tmp_path):
    # Keys once padded to the trial count: trial-999 became trial-0999, renaming every partition and
    # result of a sweep raised past 1,000 trials.
    small, large = sweep(tmp_path, trials=1000), sweep(tmp_path, trials=1500)
    before, after = trial_keys(small), trial_keys(large)
    assert after[: len(before)] == before and before[-1] == "trial-999" and after[1000] == "trial-1000"
    assert [trial_index(k) for k in after] == list(range(1500))
