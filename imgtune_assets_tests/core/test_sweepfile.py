from pathlib import Path

import pytest
import yaml

from imgtune_assets.core import demo_data, sweepfile
from imgtune_assets.core.cron import validate_cron
from imgtune_assets.core.metrics import METRICS, metric_options
from imgtune_assets.core.paths import BUNDLED_SWEEPS
from imgtune_assets.core.sampling import SAMPLERS
from imgtune_assets.core.sweepfile import SweepFileError, fixed_sweep_document, load_sweep, parse_sweep

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


def assert_message(tmp_path, old, new, message):
    """GOOD with ``old`` replaced by ``new`` is refused with exactly ``<file>: <message>``."""
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(SweepFileError) as err:
        load_sweep(path)
    assert str(err.value) == f"{path}: {message}"


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
        (("sampler: random", "sampler: bayes"), "sampler", "unknown sampler 'bayes' (known: random, grid, halton, sobol, tpe, cmaes)"),
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


@pytest.mark.parametrize(
    "old, new, message",
    [
        # In a stage: PyYAML alone would keep the last one, and the sweep would search 13 without a word.
        ("block_size: 11", "block_size: 11\n    block_size: 13",
         "line 18, column 5: duplicate key 'block_size' (first on line 17): a key may appear once in a mapping"),
        ("trials: 8", "trials: 8\ntrials: 80",
         "line 6, column 1: duplicate key 'trials' (first on line 5): a key may appear once in a mapping"),
        ("{type: int, low: 3, high: 11}", "{type: int, low: 3, high: 11, low: 4}",
         "line 10, column 38: duplicate key 'low' (first on line 10): a key may appear once in a mapping"),
    ],
)
def test_a_duplicate_key_is_refused_with_its_line(tmp_path, old, new, message):
    assert_message(tmp_path, old, new, message)


def test_a_key_of_yamls_value_tag_is_read_as_pyyaml_reads_it(tmp_path):
    """A plain ``=`` key is the string ``'='`` to PyYAML: an unknown field, not a YAML error."""
    path = write(tmp_path, GOOD + "=: 1\n")
    with pytest.raises(SweepFileError) as err:
        load_sweep(path)
    assert str(err.value).startswith(f"{path}: =: unknown field (allowed: "), str(err.value)


def test_a_merge_may_override_keys_but_not_repeat_its_own(tmp_path):
    # A ``<<`` merge brings keys that the mapping may override: that is not a duplicate.
    text = GOOD.replace("d: {type: int, low: 3, high: 11}", "d: {<<: *d, high: 9}").replace(
        "pipeline:", "description: {range: &d {type: int, low: 3, high: 11}}\npipeline:")
    assert load_sweep(write(tmp_path, text)).pipeline[0].searched["d"].high == 9
    path = write(tmp_path, text.replace("high: 9}", "high: 9, high: 7}"))
    with pytest.raises(SweepFileError) as err:
        load_sweep(path)
    assert str(err.value).startswith(f"{path}: line 11, column 26: duplicate key 'high' (first on line 11)")


def test_a_best_pipeline_with_a_duplicate_key_is_refused(tmp_path):
    # ``apply`` and tuned_images read a best_pipeline.yaml through load_sweep too.
    doc = fixed_sweep_document(load_sweep(write(tmp_path, GOOD)), [("gaussian_blur", {"ksize": 5, "sigma": 1.0})],
                               name="t-best")
    text = yaml.safe_dump(doc, sort_keys=False)
    best = tmp_path / "best_pipeline.yaml"
    best.write_text(text)
    assert load_sweep(best).pipeline[0].fixed == {"ksize": 5, "sigma": 1.0}
    best.write_text(text.replace("  ksize: 5\n", "  ksize: 5\n  ksize: 7\n"))
    with pytest.raises(SweepFileError, match=r"best_pipeline.yaml: line \d+, column 3: duplicate key 'ksize'"):
        load_sweep(best)


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


def test_data_range_for_psnr_ssim_and_mae_only_and_above_zero(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD.replace("{metric: psnr}", "{metric: ssim, data_range: 4095}")))
    assert sweep.objective.options == {"data_range": 4095}
    before = load_sweep(write(tmp_path, GOOD.replace("{metric: psnr}", "{metric: ssim}")))
    assert before.fingerprint() != sweep.fingerprint()  # another objective: results saved without it are not its
    with pytest.raises(SweepFileError, match=r"objective.data_range: only psnr, ssim and mae take a data_range"):
        load_sweep(write(tmp_path, GOOD.replace("{metric: psnr}", "{metric: dice, data_range: 4095}")))
    with pytest.raises(SweepFileError, match=r"objective.data_range: must be > 0, got 0"):
        load_sweep(write(tmp_path, GOOD.replace("{metric: psnr}", "{metric: psnr, data_range: 0}")))


def test_an_int_parameter_may_be_searched_over_its_odd_values(tmp_path):
    text = GOOD.replace("  - op: threshold", "  - op: morphology\n    ksize: {type: odd, low: 1, high: 7}\n  - op: threshold")
    sweep = load_sweep(write(tmp_path, text))
    from imgtune_assets.core.sampling import trial_settings

    sizes = {trial_settings(sweep, k)["stages"][2][1]["ksize"] for k in range(16)}
    assert len(sizes) > 1 and sizes <= {1, 3, 5, 7}


def test_direction_overrides_the_metric_and_is_validated(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD.replace("{metric: psnr}", "{metric: psnr, direction: minimize}")))
    assert sweep.higher_is_better is False
    with pytest.raises(SweepFileError, match=r"objective.direction: expected maximize or minimize, got 'up'"):
        load_sweep(write(tmp_path, GOOD.replace("{metric: psnr}", "{metric: psnr, direction: up}")))


# Whole messages, recorded from the hand-written parser that the pydantic models replaced: the
# models must word every problem, and pick the same first problem, exactly as it did.
@pytest.mark.parametrize(
    "old, new, message",
    [
        ('ksize: {type: odd, low: 3, high: 15}', 'ksize: 4',
         "pipeline[1].ksize: parameter 'ksize' must be odd, got 4"),
        ('ksize: {type: odd, low: 3, high: 15}', 'ksize: {type: odd, low: 4, high: 4}',
         'pipeline[1].ksize: no odd value in 4..4'),
        ('ksize: {type: odd, low: 3, high: 15}', 'ksize: {type: odd, low: 3.5, high: 15}',
         'pipeline[1].ksize: odd range bounds must be whole numbers, got 3.5..15'),
        ('ksize: {type: odd, low: 3, high: 15}', 'ksize: {type: odd, low: 3, high: 101}',
         "pipeline[1].ksize.high: 101 is outside the allowed range 1..99 of 'ksize'"),
        ('ksize: {type: odd, low: 3, high: 15}', 'ksize: {type: oddd, low: 3, high: 15, step: 2, by: 1}',
         "pipeline[1].ksize: unknown key(s) ['by', 'step'] in search range (allowed: type, low, high, log, values)"),
        ('ksize: {type: odd, low: 3, high: 15}', 'ksize: {type: odd, low: true, high: 15}',
         'pipeline[1].ksize.low: expected a number, got True'),
        ('log: true', 'log: 1',
         'pipeline[1].sigma.log: expected true or false, got 1'),
        ('low: 0.3, high: 3.0, log: true', 'low: .inf, high: 3.0, log: true',
         'pipeline[1].sigma.low: expected a number, got inf'),
        ('values: [otsu, mean, gaussian]', 'values: []',
         'pipeline[2].method.values: a choice needs a non-empty list of values'),
        ('values: [otsu, mean, gaussian]', 'values: [otsu, otsu]',
         "pipeline[2].method.values: duplicate values in ['otsu', 'otsu']"),
        ('values: [otsu, mean, gaussian]', 'values: [otsu], low: 1',
         'pipeline[2].method: a choice takes `values`, not low/high/log'),
        ('values: [otsu, mean, gaussian]', 'values: [otsu, 3]',
         "pipeline[2].method.values[1]: parameter 'method' must be one of 'fixed', 'otsu', 'mean', 'gaussian', got 3"),
        ('{type: choice, values: [otsu, mean, gaussian]}', '{type: int, low: 1, high: 3}',
         "pipeline[2].method.type: parameter 'method' is choice: use type choice, not int"),
        ('block_size: 11', 'block_size: true',
         "pipeline[2].block_size: parameter 'block_size' must be an integer, got True"),
        ('block_size: 11', 'block_size: 11\n  - 7',
         'pipeline[3]: each stage is a mapping with `op:` and parameters, got 7'),
        ('- op: threshold', '- bogus: threshold',
         'pipeline[2].op: missing (found: block_size, bogus, method)'),
        ('name: t', "name: 'a/b'",
         "name: 'a/b' is not a plain name (1 to 100 letters, digits, '_', '-', '.', starting with a letter or digit; it names a folder under the output folder, so no '/' or '..')"),
        ('name: t', 'name: 12',
         "name: 12 is not a plain name (1 to 100 letters, digits, '_', '-', '.', starting with a letter or digit; it names a folder under the output folder, so no '/' or '..')"),
        ('data_dir: data', "data_dir: ''",
         "data_dir: expected a folder path, got ''"),
        ('data_dir: data', 'data_dir: [a]',
         "data_dir: expected a folder path, got ['a']"),
        ('objective: {metric: psnr}', 'objective: [psnr]',
         'objective: expected a mapping like {metric: psnr}'),
        ('objective: {metric: psnr}', 'objective: {direction: maximize}',
         'objective.metric: missing (found: direction)'),
        ('objective: {metric: psnr}', 'objective: {metirc: psnr}',
         'objective.metric: missing (found: metirc)'),
        ('objective: {metric: psnr}', 'objective: {metric: psnr, tolerance: 2, foo: 1}',
         "objective: unknown option(s) ['foo'] (allowed: metric, direction, data_range, tolerance)"),
        ('objective: {metric: psnr}', 'objective: {metric: edge_f1, tolerance: -1}',
         'objective.tolerance: must be >= 0, got -1'),
        ('objective: {metric: psnr}', 'objective: {metric: edge_f1, tolerance: yes}',
         'objective.tolerance: expected a number, got True'),
        ('objective: {metric: psnr}', 'objective: {metric: psnr, direction: up, foo: 1}',
         "objective.direction: expected maximize or minimize, got 'up'"),
        ('trials: 8', 'trials: true',
         'trials: expected a whole number, got True'),
        ('trials: 8', 'trials: 10001',
         'trials: must be between 1 and 10000, got 10001'),
        ('seed: 3', 'seed: -1',
         'seed: expected a whole number >= 0, got -1'),
        ('seed: 3', "seed: '3'",
         "seed: expected a whole number >= 0, got '3'"),
        ('sampler: random', 'sampler: null',
         'sampler: unknown sampler None (known: random, grid, halton, sobol, tpe, cmaes)'),
        ('pipeline:', 'zz: 1\naa: 2\npipeline:',
         'aa: unknown field (allowed: apply, chunk_size, data_dir, demo_data, description, early_stopping, name, objective, pipeline, sampler, schedule, search, seed, storage, trials)'),
        ('trials: 8', "trials: 8\nschedule: {cron: '0 2 * *'}",
         "schedule.cron: expected a 5-field cron string, got '0 2 * *'"),
        ('trials: 8', 'trials: 8\nschedule: {cron: 5}',
         'schedule.cron: expected a 5-field cron string, got 5'),
        ('trials: 8', 'trials: 8\nschedule: {}',
         'schedule.cron: expected a 5-field cron string, got None'),
        ('trials: 8', "trials: 8\nschedule: '0 2 * * *'",
         "schedule: expected a mapping like {cron: '0 2 * * *'}"),
        ('trials: 8', "trials: 8\nschedule: {cron: '0 2 * * *', timezone: UTC}",
         "schedule.timezone: unknown field (allowed: cron)"),
        ('trials: 8', "trials: 8\nschedule: {corn: '0 3 * * *'}",
         "schedule.corn: unknown field (allowed: cron)"),
        ('trials: 8', 'trials: 8\nchunk_size: 0',
         'chunk_size: expected a whole number >= 1, got 0'),
        ('trials: 8', 'trials: 8\nchunk_size: 2.5',
         'chunk_size: expected a whole number >= 1, got 2.5'),
        ('trials: 8', 'trials: 8\ndemo_data: faces',
         "demo_data: unknown demo set 'faces' (known: denoise, segment)"),
        ('name: t\n', '',
         'name: missing'),
    ],
)
def test_messages_are_unchanged(tmp_path, old, new, message):
    assert_message(tmp_path, old, new, message)


# Reworded since: a range without a type says so (it said "unknown range type None"), and the
# article fits the type ("an odd range", it said "a odd range").
@pytest.mark.parametrize(
    "old, new, message",
    [
        ('ksize: {type: odd, low: 3, high: 15}', 'ksize: {low: 3, high: 15}',
         'pipeline[1].ksize.type: missing: a search range needs a `type` (allowed: int, float, odd, choice)'),
        ('ksize: {type: odd, low: 3, high: 15}', 'ksize: {type: null, low: 3, high: 15}',
         'pipeline[1].ksize.type: missing: a search range needs a `type` (allowed: int, float, odd, choice)'),
        ('ksize: {type: odd, low: 3, high: 15}', 'ksize: {type: oddd, low: 3, high: 15}',
         "pipeline[1].ksize.type: unknown range type 'oddd' (allowed: int, float, odd, choice)"),
        ('ksize: {type: odd, low: 3, high: 15}', 'ksize: {type: odd, low: 3}',
         'pipeline[1].ksize.high: missing (an odd range needs low and high)'),
        ('ksize: {type: odd, low: 3, high: 15}', 'ksize: {type: odd, low: 3, high: 15, values: [3]}',
         'pipeline[1].ksize: an odd range takes low/high, not values'),
        ('d: {type: int, low: 3, high: 11}', 'd: {type: int, high: 11}',
         'pipeline[0].d.low: missing (an int range needs low and high)'),
        ('sigma_color: {type: float, low: 10, high: 150}', 'sigma_color: {type: float, values: [10]}',
         'pipeline[0].sigma_color: a float range takes low/high, not values'),
    ],
)
def test_range_messages_say_what_is_missing_with_the_right_article(tmp_path, old, new, message):
    assert_message(tmp_path, old, new, message)


def test_not_a_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(SweepFileError) as err:
        load_sweep(path)
    assert str(err.value) == f"{path}: the sweep file must be a YAML mapping (name, data_dir, objective, trials, ...)"


@pytest.mark.parametrize(
    "objective, expected",
    [
        ("{metric: psnr}", "51e440d8346ac209"),
        ("{metric: edge_f1, tolerance: 2, direction: minimize}", "b0bcbbd45eb2066a"),
    ],
)
def test_fingerprint_is_stable(tmp_path, objective, expected):
    # Values computed with the parser before the pydantic rewrite (when the trial count was part of a
    # random sweep's fingerprint): results cached under it must still be found (ints stay ints,
    # options keep their values).
    text = GOOD.replace("{metric: psnr}", objective)
    assert load_sweep(write(tmp_path, text)).earlier_fingerprints() == (expected,)
    extra = "schedule: {cron: '0 2 * * *'}\nchunk_size: 3\ndemo_data: denoise\ndescription: hi\n"
    assert load_sweep(write(tmp_path, text + extra)).earlier_fingerprints() == (expected,)  # not part of it
    assert load_sweep(write(tmp_path, text + extra)).fingerprint() == load_sweep(write(tmp_path, text)).fingerprint()


def test_fingerprint_is_stable_for_float_options_and_other_samplers(tmp_path):
    text = GOOD.replace("{metric: psnr}", "{metric: edge_f1, tolerance: 1.5}").replace("sampler: random", "sampler: halton")
    assert load_sweep(write(tmp_path, text)).earlier_fingerprints() == ("73ffcbf5a232809b",)


@pytest.mark.parametrize("sampler, kept", [("random", True), ("halton", True), ("sobol", True), ("grid", False)])
def test_raising_trials_keeps_the_fingerprint_unless_the_points_depend_on_the_count(tmp_path, sampler, kept):
    from imgtune_assets.core.sampling import trial_settings

    text = GOOD.replace("sampler: random", f"sampler: {sampler}")
    fewer = load_sweep(write(tmp_path, text))
    more = load_sweep(write(tmp_path, text.replace("trials: 8", "trials: 20")))
    assert (fewer.fingerprint() == more.fingerprint()) is kept
    if kept:  # what makes keeping them right: trial k has the same parameters whatever the count
        assert all(trial_settings(fewer, k)["params"] == trial_settings(more, k)["params"] for k in range(8))
    assert more.earlier_fingerprints() == (() if sampler == "grid" else (more._fingerprint(with_trials=True),))


def test_parsed_values_keep_their_types(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD.replace("{metric: psnr}", "{metric: edge_f1, tolerance: 2}")))
    assert sweep.objective.options == {"tolerance": 2} and type(sweep.objective.options["tolerance"]) is int
    d = sweep.pipeline[0].searched["d"]
    assert (d.type, d.low, d.high, d.log) == ("int", 3, 11, False) and type(d.low) is int
    sigma_color = sweep.pipeline[0].searched["sigma_color"]
    assert type(sigma_color.low) is int and type(sigma_color.high) is int  # as written: 10, 150
    assert sweep.pipeline[2].searched["method"].values == ("otsu", "mean", "gaussian")
    assert sweep.raw["name"] == "t" and sweep.schedule_cron is None and sweep.demo_data is None


def test_schedule_cron_is_checked_by_core_cron(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD + "schedule: {cron: '*/15 9-17 * * MON-FRI'}\n"))
    assert sweep.schedule_cron == "*/15 9-17 * * MON-FRI"
    for cron in ("99 * * * *", "0 0 30 2 *"):
        path = write(tmp_path, GOOD + f"schedule: {{cron: '{cron}'}}\n")
        with pytest.raises(SweepFileError) as err:
            load_sweep(path)
        with pytest.raises(ValueError) as direct:
            validate_cron(cron)
        assert str(err.value) == f"{path}: schedule.cron: {direct.value}"


def test_sampler_names_come_from_the_sampler_registry(tmp_path, monkeypatch):
    path = write(tmp_path, GOOD.replace("sampler: random", "sampler: lattice"))
    with pytest.raises(SweepFileError, match=r"sampler: unknown sampler 'lattice' \(known: random, grid, halton, sobol, tpe, cmaes\)"):
        load_sweep(path)
    monkeypatch.setitem(SAMPLERS, "lattice", SAMPLERS["random"])
    assert load_sweep(path).sampler == "lattice"


def test_demo_kinds_and_metric_options_come_from_their_registries():
    assert sweepfile.DEMO_KINDS is demo_data.DEMO_KINDS
    assert sweepfile.METRIC_OPTIONS == tuple(sorted(set().union(*map(metric_options, METRICS))))
    assert metric_options("edge_f1") == {"tolerance"} and metric_options("psnr") == {"data_range"}
    assert metric_options("dice") == frozenset()


@pytest.mark.parametrize(
    "old, new, message",
    [
        # Strict types: a YAML true or a quoted number is not a number.
        ("low: 3, high: 11", "low: 3, high: '11'", "pipeline[0].d.high: expected a number, got '11'"),
        ("trials: 8", "trials: '8'", "trials: expected a whole number, got '8'"),
        ("trials: 8", "trials: 8\nchunk_size: true", "chunk_size: expected a whole number >= 1, got True"),
        # The first problem in file order wins, across stages and within a stage.
        ("block_size: 11", "block_size: 10\n    bogus: 1", "pipeline[2].block_size: parameter 'block_size' must be odd, got 10"),
        ("d: {type: int, low: 3, high: 11}", "d: {type: int, low: 3, high: 99}",
         "pipeline[0].d.high: 99 is outside the allowed range 1..25 of 'd'"),
        # Fixed values that no trial could run with; dy's default is 1, so both must be given.
        ("  - op: threshold", "  - op: sobel\n    dx: 0\n    dy: 0\n  - op: threshold",
         "pipeline[2]: sobel: dx and dy are both 0: sobel needs a derivative along x or y (set dx or dy "
         "to 1 or 2, or search one of them)"),
    ],
)
def test_more_messages(tmp_path, old, new, message):
    assert_message(tmp_path, old, new, message)


@pytest.mark.parametrize("stage", ["{op: sobel, dx: 0}", "{op: sobel, dx: 0, dy: {type: int, low: 0, high: 2}}"])
def test_sobel_with_a_derivative_left_to_default_or_search_loads(tmp_path, stage):
    sweep = load_sweep(write(tmp_path, GOOD.replace("  - op: threshold", f"  - {stage}\n  - op: threshold")))
    assert sweep.pipeline[2].op == "sobel" and sweep.pipeline[2].fixed["dx"] == 0


def test_fixed_sweep_document_round_trips(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD))
    doc = fixed_sweep_document(sweep, [("gaussian_blur", {"ksize": 5, "sigma": 1.0})], name="t-best")
    again = parse_sweep(doc, tmp_path / "best.yaml")
    assert again.trials == 1 and again.pipeline[0].fixed == {"ksize": 5, "sigma": 1.0} and not again.pipeline[0].searched


def write_with_apply(tmp_path, input_dir, output_dir):
    """A good sweep file in ``tmp_path/sweeps`` with an ``apply:`` section."""
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    return write(sweeps, GOOD + f"apply: {{input_dir: '{input_dir}', output_dir: '{output_dir}'}}\n")


@pytest.mark.parametrize(
    "input_dir, output_dir",
    [
        ("../data/photos", "../data/photos"),
        ("../data/photos", "../data/./photos/"),  # the same folder spelled another way
        ("../data/photos", "../data/tuned/../photos"),
        ("s3://bucket/photos", "s3://bucket/./photos/"),
        ("../data/photos", "../data/photos/images"),  # what apply would read from the second run on
        ("s3://bucket/photos", "s3://bucket/photos/images/"),
    ],
)
def test_apply_output_must_differ_from_input(tmp_path, input_dir, output_dir):
    # Refused when the file is loaded, not after the sweep when tuned_images runs.
    path = write_with_apply(tmp_path, input_dir, output_dir)
    with pytest.raises(SweepFileError) as err:
        load_sweep(path)
    both = input_dir if "://" in input_dir else (tmp_path / "data" / "photos").resolve()
    if output_dir.rstrip("/").endswith("images"):
        assert str(err.value).startswith(f"{path}: apply.output_dir: must not be apply.input_dir's images/")
    else:
        assert str(err.value) == f"{path}: apply.output_dir: must differ from apply.input_dir (both are {both})"


@pytest.mark.parametrize(
    "input_dir, output_dir",
    [
        ("../data/photos", "../data/tuned"),
        ("../data/photos", "../data/photos/tuned"),  # inside the input: allowed (only its files are read)
        ("../data/photos", "../data"),
        ("s3://bucket/photos", "s3://bucket/tuned"),
        ("s3://bucket/photos", "../data/photos"),
    ],
)
def test_apply_folders_that_differ_load(tmp_path, input_dir, output_dir):
    sweep = load_sweep(write_with_apply(tmp_path, input_dir, output_dir))
    if "://" not in output_dir:
        assert sweep.apply_output == (tmp_path / "sweeps" / output_dir).resolve()
    assert str(sweep.apply_input) != str(sweep.apply_output)


@pytest.mark.parametrize("output_dir", ["data", "data/images", "./data/targets/", "data/tuned", "../sweeps/data/images"])
def test_apply_output_inside_the_sweeps_data_folder_is_refused(tmp_path, output_dir):
    # The tuned images would overwrite the images and targets the next sweep tunes on.
    path = write_with_apply(tmp_path, "../photos", output_dir)
    with pytest.raises(SweepFileError) as err:
        load_sweep(path)
    data = (path.parent / "data").resolve()
    assert str(err.value) == (f"{path}: apply.output_dir: must not be data_dir or inside it "
                              f"({(path.parent / output_dir).resolve()} is in {data}): the tuned images would "
                              "overwrite the images and targets the sweep tunes on")


def test_credentials_in_a_url_are_refused_naming_the_field_not_the_secret(tmp_path):
    for old, new, field in (("data_dir: data", "data_dir: s3://KEYID:SeCrEt@photos/set", "data_dir"),
                            ("data_dir: data", "data_dir: s3://photos/set\nstorage: {endpoint_url: "
                                               "'http://user:SeCrEt@127.0.0.1:9000'}", "storage.endpoint_url")):
        with pytest.raises(SweepFileError) as refused:
            load_sweep(write(tmp_path, GOOD.replace(old, new)))
        assert f": {field}: " in str(refused.value) and "SeCrEt" not in str(refused.value), str(refused.value)
        assert "credentials in" in str(refused.value)


@pytest.mark.parametrize("text, message", [
    ("description: " + "[" * 20000 + "]" * 20000 + "\n", "YAML nested too deeply"),
    ("seed_note: " + "9" * 5000 + "\n", "YAML value refused: Exceeds the limit"),
    ("# padding\n" * 120000, "bytes: a sweep file is refused above 1048576 bytes"),
])
def test_hostile_yaml_is_a_sweep_file_error_naming_the_file(tmp_path, text, message):
    path = write(tmp_path, GOOD + text)
    with pytest.raises(SweepFileError) as refused:
        load_sweep(path)
    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value), str(refused.value)[:300]
