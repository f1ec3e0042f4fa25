from pathlib import Path

import pytest

from imgtune_assets.core.paths import BUNDLED_SWEEPS
from imgtune_assets.core.sweepfile import SweepFileError, load_sweep

GOOD = """
name: t
data_dir: data
objective: {metric: psnr}
trials: 8
seed: 3
sampler: random
pipeline:
  - op: bilateral_filter
    d: {type: int, low: 3, high: 11}
    sigma_color: {type: float, low: 10, high: 150}
  - op: gaussian_blur
    ksize: {type: odd, low: 3, high: 15}
    sigma: {type: float, low: 0.3, high: 3.0, log: true}
  - op: threshold
    method: {type: choice, values: [otsu, mean, gaussian]}
    block_size: 11
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_good_sweep_parses(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD))
    assert sweep.name == "t"
    assert sweep.data_dir == (tmp_path / "data").resolve()
    assert sweep.trials == 8 and sweep.seed == 3 and sweep.objective.metric == "psnr"
    assert [s.op for s in sweep.pipeline] == ["bilateral_filter", "gaussian_blur", "threshold"]
    assert set(sweep.pipeline[0].searched) == {"d", "sigma_color"}
    assert sweep.pipeline[2].fixed == {"block_size": 11}
    assert sweep.pipeline[1].searched["sigma"].log is True
    assert sweep.higher_is_better


@pytest.mark.parametrize("path", sorted(BUNDLED_SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_sweeps_are_valid(path):
    assert load_sweep(path).trials >= 1


def test_fingerprint_changes_with_search_space(tmp_path):
    a = load_sweep(write(tmp_path, GOOD)).fingerprint()
    b = load_sweep(write(tmp_path, GOOD.replace("high: 150", "high: 151"))).fingerprint()
    assert a != b


@pytest.mark.parametrize(
    "change, field, words",
    [
        (("op: bilateral_filter", "op: bilatreal"), "pipeline[0].op", "unknown op 'bilatreal'"),
        (("d: {type: int", "dd: {type: int"), "pipeline[0].dd", "unknown parameter"),
        (("low: 3, high: 11", "low: 12, high: 11"), "pipeline[0].d", "low (12) > high (11)"),
        (("block_size: 11", "block_size: 10"), "pipeline[2].block_size", "10"),
        (("metric: psnr", "metric: psnrr"), "objective.metric", "unknown metric 'psnrr'"),
        (("trials: 8", "trials: 0"), "trials", "between 1"),
        (("trials: 8", "trials: many"), "trials", "'many'"),
        (("name: t", "name: ../x"), "name", "'../x'"),
        (("sampler: random", "sampler: tpe"), "sampler", "unknown sampler 'tpe'"),
        (("{type: float, low: 10, high: 150}", "{type: float, low: ten, high: 150}"), "pipeline[0].sigma_color.low", "'ten'"),
        (("ksize: {type: odd", "ksize: {type: float"), "pipeline[1].ksize.type", "odd"),
        (("values: [otsu, mean, gaussian]", "values: [otsu, median]"), "pipeline[2].method", "median"),
        (("log: true", "log: true, step: 2"), "pipeline[1].sigma", "step"),
    ],
)
def test_bad_sweeps_name_file_and_field(tmp_path, change, field, words):
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(SweepFileError) as err:
        load_sweep(path)
    message = str(err.value)
    assert str(path) in message
    assert field in message
    assert words in message


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, GOOD.replace("trials: 8", "trials: [8"))
    with pytest.raises(SweepFileError, match=r"sweep.yaml: line \d+, column \d+: YAML syntax error"):
        load_sweep(path)


def test_missing_file_and_missing_field(tmp_path):
    with pytest.raises(SweepFileError, match="sweep file not found"):
        load_sweep(tmp_path / "nope.yaml")
    with pytest.raises(SweepFileError, match=r"sweep.yaml: pipeline: missing"):
        load_sweep(write(tmp_path, "name: a\ndata_dir: d\nobjective: psnr\ntrials: 2\n"))


def test_log_range_needs_positive_low(tmp_path):
    path = write(tmp_path, GOOD.replace("low: 0.3, high: 3.0, log: true", "low: 0, high: 3.0, log: true"))
    with pytest.raises(SweepFileError, match=r"pipeline\[1\].sigma.low: a log range needs low > 0"):
        load_sweep(path)


def test_tolerance_only_for_edge_f1(tmp_path):
    with pytest.raises(SweepFileError, match="objective.tolerance"):
        load_sweep(write(tmp_path, GOOD.replace("{metric: psnr}", "{metric: psnr, tolerance: 2}")))
    sweep = load_sweep(write(tmp_path, GOOD.replace("{metric: psnr}", "{metric: edge_f1, tolerance: 2}")))
    assert sweep.objective.options == {"tolerance": 2}


def test_direction_overrides_the_metric_and_is_validated(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD.replace("{metric: psnr}", "{metric: psnr, direction: minimize}")))
    assert sweep.higher_is_better is False
    with pytest.raises(SweepFileError, match=r"objective.direction: expected maximize or minimize, got 'up'"):
        load_sweep(write(tmp_path, GOOD.replace("{metric: psnr}", "{metric: psnr, direction: up}")))
