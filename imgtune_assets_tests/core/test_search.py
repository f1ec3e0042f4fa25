"""The staged search (core/search.py) as pure logic: rounds, successive halving, proposals, the ledger,
and whole searches over a synthetic objective (no Dagster, no Ray)."""

import json
import math

import pytest

from imgtune_assets.core.sampling import sample_point, search_space, trial_keys
import imgtune_assets.core.search as search_module
from imgtune_assets.core.search import (
    Halving,
    HistoryTrial,
    Ledger,
    Rounds,
    RungGaps,
    Search,
    SearchError,
    SearchSpec,
    adaptive_rounds,
    default_batch,
    fits,
    gp_count,
    gp_proposals,
    detail_of,
    early_stopping_notes,
    image_order,
    propose,
    repeated_trials_note,
    run_round,
    _seed,
    trial_values,
)
from imgtune_assets.core.sweepfile import parse_sweep

PIPELINE = [
    {"op": "bilateral_filter", "d": {"type": "int", "low": 3, "high": 11},
     "sigma_color": {"type": "float", "low": 10, "high": 150}, "sigma_space": 5},
    {"op": "gaussian_blur", "ksize": {"type": "odd", "low": 3, "high": 9},
     "sigma": {"type": "float", "low": 0.3, "high": 3.0, "log": True}},
    {"op": "threshold", "method": {"type": "choice", "values": ["otsu", "mean"]}, "block_size": 31},
]
IDS = [f"img{i:02d}" for i in range(12)]


def sweep_of(tmp_path, **fields):
    doc = {"name": "s", "data_dir": str(tmp_path / "data"), "objective": {"metric": "psnr"}, "trials": 24,
           "seed": 3, "sampler": "tpe", "pipeline": PIPELINE, **fields}
    return parse_sweep(doc, tmp_path / "s.yaml")


def true_score(params, image_id):
    """A smooth bowl with a per-image offset: the best is near sigma_color 60, sigma 1, d 7, mean."""
    x = (params["bilateral_filter.sigma_color"] - 60) / 140
    y = math.log(params["gaussian_blur.sigma"])
    z = (params["bilateral_filter.d"] - 7) / 8
    bonus = 0.3 if params["threshold.method"] == "mean" else 0.0
    return 30 - 3 * x * x - y * y - z * z + bonus + 0.05 * int(image_id[3:])


class Counter:
    """``evaluate`` over the synthetic objective, counting the (trial, image) pairs it computes."""

    def __init__(self):
        self.pairs = []

    def __call__(self, trials, ids, known):
        out = {}
        for t in trials:
            res = dict(known.get(t["trial"], {}))
            for i in ids:
                if i not in res:
                    self.pairs.append((t["trial"], i))
                    res[i] = {"score": true_score(t["params"], i), "seconds": 0.0, "error": None}
            out[t["trial"]] = res
        return out


def run_search(sweep, folder, rounds=None, evaluate=None, records=None, warm=()):
    evaluate = evaluate or Counter()
    records = {} if records is None else records
    search = Search(sweep, folder, "d" * 64, IDS, default_batch_size=4, warm=warm)
    for r in rounds if rounds is not None else search.rounds_of(trial_keys(sweep)):
        for o in search.run(r, records, evaluate, {}, lambda o: None):
            records[o.trial] = o.to_record(sweep_name="s", fingerprint="f", metric="psnr", manifest_digest="d")
    return search, records, evaluate


def proposals(ledger_file):
    """A ledger's rounds without the time they were proposed at."""
    return [(e["round"], e["trials"]) for e in json.loads(ledger_file.read_text())["rounds"]]


def best_of(records):
    return max(r["score"] for r in records.values() if r["status"] == "ok")


def comparable(records):
    return {k: (r["status"], r["params"], r["score"], r["rung"], r["partial_score"], r["source"])
            for k, r in records.items()}


# --------------------------------------------------------------------------------- rounds and rungs

def test_rung_sizes_grow_by_eta_and_end_with_every_image():
    assert Halving(eta=3).rung_sizes(17) == [3, 9, 17]
    assert Halving(eta=2, min_images=2).rung_sizes(6) == [2, 4, 6]
    assert Halving(eta=3, min_images=20).rung_sizes(17) == [17]
    assert Halving(eta=3).rung_sizes(60) == [7, 21, 60]


def test_early_stopping_that_stops_nothing_says_why():
    assert Halving(eta=3).inactive_reason(17) is None and Halving(eta=3, min_images=16).inactive_reason(17) is None
    reason = Halving(eta=3, min_images=50).inactive_reason(14)
    assert reason.startswith("early_stopping.min_images 50 is not below the 14 usable images") and "by default 3" in reason
    assert "min_images 14 is not below the 14" in Halving(min_images=14).inactive_reason(14)
    assert "holds all 3 usable images" in Halving().inactive_reason(3)  # the default's first rung: 3 images
    # with so few images the default stops nothing either: no advice to fall back on it
    few = Halving(min_images=5).inactive_reason(3)
    assert "by default" not in few and "min_images must be below 3" in few
    assert Halving().inactive_reason(0) is None


def test_rounds_start_with_the_initial_design_then_batches():
    rounds = Rounds(batch_size=4, n_startup=8)
    assert list(rounds.slots(0)) == list(range(8))
    assert list(rounds.slots(2)) == [12, 13, 14, 15]
    assert [rounds.of(k) for k in (0, 7, 8, 11, 12)] == [0, 0, 1, 1, 2]


def test_image_order_is_seeded_and_a_permutation():
    a = image_order(IDS, 1, "abc")
    assert sorted(a) == IDS and a == image_order(list(reversed(IDS)), 1, "abc")
    assert a != image_order(IDS, 2, "abc")


def test_image_order_spreads_each_rung_over_the_images_detail():
    ids = [f"photo-{k:02d}" for k in range(17)]
    detail = {i: float((7 * k) % 17) for k, i in enumerate(ids)}  # detail unrelated to the names' order
    by_detail = sorted(ids, key=detail.__getitem__)
    sizes = Halving(eta=3).rung_sizes(17)  # [3, 9, 17]
    firsts = set()
    for seed in range(6):
        order = image_order(ids, seed, "abc", detail, sizes)
        assert sorted(order) == sorted(ids) and order == image_order(list(reversed(ids)), seed, "abc", detail, sizes)
        # the first rung: one image from each third of the images sorted by detail (6, 6 and 5 of them)
        assert sorted(by_detail.index(i) // 6 for i in order[:3]) == [0, 1, 2], (seed, order[:3])
        # the second rung's six new images: one from each of six strata of the fourteen left (3, 3, 2, 2, 2, 2)
        left = [i for i in by_detail if i not in order[:3]]
        stratum = [0] * 3 + [1] * 3 + [2] * 2 + [3] * 2 + [4] * 2 + [5] * 2
        assert sorted(stratum[left.index(i)] for i in order[3:9]) == [0, 1, 2, 3, 4, 5]
        # within a stratum the seeded order picks, and the rest follow in the seeded order
        seeded = image_order(ids, seed, "abc")
        assert [i for i in seeded if i not in order[:9]] == order[9:]
        firsts.add(tuple(order[:3]))
    assert len(firsts) > 1  # seeds still vary the sample
    # without detail for every image, or without rungs: the seeded order alone
    assert image_order(ids, 1, "abc", {**detail, ids[4]: None}, sizes) == image_order(ids, 1, "abc")
    assert image_order(ids, 1, "abc", detail, ()) == image_order(ids, 1, "abc")
    # fewer images than the first rung: every image, once
    assert sorted(image_order(ids[:2], 0, "abc", detail, [3, 9])) == sorted(ids[:2])


def test_detail_is_compressed_bits_per_pixel():
    assert detail_of(1000, 100, 10) == pytest.approx(8.0)
    assert detail_of(None, 100, 10) is None and detail_of(1000, None, 10) is None and detail_of(0, 100, 10) is None


def test_successive_halving_keeps_the_best_of_each_rung_and_reuses_known_scores():
    candidates = [{"trial": f"t{k}", "index": k, "params": {"v": v}, "stages": []}
                  for k, v in enumerate([5.0, 1.0, 4.0, 2.0, 3.0, 0.5])]
    calls = []

    def evaluate(trials, ids, known):
        calls.append(([t["trial"] for t in trials], list(ids)))
        return {t["trial"]: {i: known.get(t["trial"], {}).get(i) or
                             {"score": t["params"]["v"] + 0.01 * n, "seconds": 0.0, "error": None}
                             for n, i in enumerate(ids)} for t in trials}

    settled = []
    known = {"t0": {"a": {"score": 5.0, "seconds": 0.0, "error": None}}}
    out = run_round(candidates, ["a", "b", "c", "d", "e", "f", "g", "h"], Halving(eta=2, min_images=2), evaluate,
                    known, maximize=True, on_settled=settled.append)
    by = {o.trial: o for o in out}
    # rung 0 (2 images): the best 3 of 6 go on; rung 1 (4 images): the best 2 of 3; rung 2: everything.
    assert {t for t, o in by.items() if o.rung == 0} == {"t1", "t3", "t5"}
    assert {t for t, o in by.items() if o.rung == 1} == {"t4"}
    assert {t for t, o in by.items() if o.status == "ok"} == {"t0", "t2"}
    assert all(by[t].status == "pruned" for t in ("t1", "t3", "t5", "t4"))
    assert len(by["t0"].per_image) == 8 and len(by["t1"].per_image) == 2
    assert math.isnan(by["t1"].score) and by["t1"].partial_score == pytest.approx(1.005)
    # what ranked it: without a gap model, its partial mean; a complete trial has none
    assert by["t1"].estimated_score == pytest.approx(1.005) and by["t0"].estimated_score is None
    # each rung asks only for what it lacks: t0's known first image is not computed again
    assert calls[0] == (["t0", "t1", "t2", "t3", "t4", "t5"], ["a", "b"])
    assert calls[1][0] == ["t0", "t2", "t4"]
    assert [o.trial for o in settled][:3] == ["t1", "t3", "t5"]  # settled as soon as they are pruned


def test_candidates_joining_a_round_never_demote_its_decided_trials():
    def candidate(k, v):
        return {"trial": f"t{k}", "index": k, "params": {"v": v}, "stages": []}

    def evaluate(trials, ids, known):
        return {t["trial"]: {i: {"score": t["params"]["v"] + 0.01 * n, "seconds": 0.0, "error": None}
                             for n, i in enumerate(ids)} for t in trials}

    order, halving = ["a", "b", "c", "d", "e", "f"], Halving(eta=3, min_images=2)
    old = [candidate(0, 2.0), candidate(1, 1.0), candidate(2, 3.0)]
    first = {o.trial: o for o in run_round(old, order, halving, evaluate, {}, True, lambda o: None)}
    assert {t: (o.status, o.rung) for t, o in first.items()} == \
        {"t0": ("pruned", 0), "t1": ("pruned", 0), "t2": ("ok", 1)}
    decided = {t: o.rung for t, o in first.items()}
    # Three better candidates join the round (a larger `trials` filling it), scores recomputed (no known):
    joined = old + [candidate(3, 5.0), candidate(4, 4.0), candidate(5, 0.5)]
    anew = {o.trial: o for o in run_round(joined, order, halving, evaluate, {}, True, lambda o: None)}
    assert anew["t2"].status == "pruned"  # ranked afresh, the round's best so far would be demoted...
    kept = {o.trial: o for o in run_round(joined, order, halving, evaluate, {}, True, lambda o: None,
                                          decided=decided)}
    assert {t: (kept[t].status, kept[t].rung) for t in first} == {t: (o.status, o.rung) for t, o in first.items()}
    assert kept["t2"].score == first["t2"].score  # ...but its decision stands
    # a newcomer goes on when it ranks among the best ceil(6/3) = 2 of the whole rung (t3, t4; not t5),
    # decided trials keeping theirs: three complete where two would be ranked afresh
    assert {t: (kept[t].status, kept[t].rung) for t in ("t3", "t4", "t5")} == \
        {"t3": ("ok", 1), "t4": ("ok", 1), "t5": ("pruned", 0)}
    # the round run again as it was decides as it did
    again = run_round(old, order, halving, evaluate, {}, True, lambda o: None, decided=decided)
    assert [(o.trial, o.status, o.rung, o.per_image) for o in again] == \
        [(o.trial, o.status, o.rung, o.per_image) for o in first.values()]


def test_raising_trials_keeps_the_decisions_of_the_round_it_fills(tmp_path):
    fields = {"search": {"batch_size": 6, "n_startup": 8},
              "early_stopping": {"method": "successive_halving", "eta": 3, "min_images": 3}}
    small = sweep_of(tmp_path, trials=11, **fields)  # round 1 (trials 8-13) cut to three
    _, records, _ = run_search(small, tmp_path / "out")
    bigger = sweep_of(tmp_path, trials=14, **fields)
    old = [k for k in trial_keys(small)[8:]]
    for recompute in (frozenset(), frozenset(trial_keys(bigger))):  # --resume, and a plain run again
        search = Search(bigger, tmp_path / "out", "d" * 64, IDS, default_batch_size=4)
        by = {o.trial: o for o in search.run(1, dict(records), Counter(), {}, lambda o: None, recompute=recompute)}
        assert len(by) == 6
        assert {k: (by[k].status, by[k].rung, by[k].score if by[k].status == "ok" else None) for k in old} == \
            {k: (records[k]["status"], records[k]["rung"], records[k]["score"] if records[k]["status"] == "ok" else None)
             for k in old}


@pytest.mark.parametrize("n, images, eta", [(9, 17, 3), (8, 17, 3), (2, 17, 3), (18, 40, 2), (5, 4, 3)])
def test_the_images_a_trial_is_expected_to_be_scored_on_are_what_a_round_scores(n, images, eta):
    candidates = [{"trial": f"t{k}", "index": k, "params": {"v": float(k)}, "stages": []} for k in range(n)]
    scored = []

    def evaluate(trials, ids, known):
        scored.extend((t["trial"], i) for t in trials for i in ids if i not in known.get(t["trial"], {}))
        return {t["trial"]: {i: known.get(t["trial"], {}).get(i) or {"score": t["params"]["v"], "seconds": 0.0,
                                                                     "error": None} for i in ids} for t in trials}

    halving = Halving(eta=eta)
    run_round(candidates, [f"i{k}" for k in range(images)], halving, evaluate, {}, maximize=True,
              on_settled=lambda o: None)
    assert halving.expected_images_per_trial(n, images) * n == pytest.approx(len(scored))


def test_a_failing_image_fails_the_trial_at_its_rung():
    candidates = [{"trial": f"t{k}", "index": k, "params": {}, "stages": []} for k in range(3)]

    def evaluate(trials, ids, known):
        return {t["trial"]: {i: {"score": float("nan") if t["trial"] == "t1" else 1.0 + t["index"], "seconds": 0.0,
                                 "error": "boom" if t["trial"] == "t1" else None} for i in ids} for t in trials}

    out = {o.trial: o for o in run_round(candidates, ["a", "b", "c", "d"], Halving(eta=2, min_images=2), evaluate,
                                         {}, maximize=True, on_settled=lambda o: None)}
    assert out["t1"].status == "failed" and out["t1"].rung == 0
    assert out["t2"].status == "ok" and out["t0"].status == "pruned"


def _sloped(sigma, image_id):
    """The first two images gain from a large sigma, the other six lose from it: the full mean is best
    at a small sigma, the first two images' mean at a large one."""
    v = (sigma - 0.3) / 2.7
    return 10 + 2 * v if image_id in ("a", "b") else 10 - v


def test_rung_gaps_learn_how_a_parameter_moves_the_full_mean_away_from_a_rungs(tmp_path):
    sweep = sweep_of(tmp_path, pipeline=[
        {"op": "gaussian_blur", "ksize": 3, "sigma": {"type": "float", "low": 0.3, "high": 3.0}}])
    dims = search_space(sweep)
    order = list("abcdefgh")
    sizes = Halving(eta=3, min_images=2).rung_sizes(len(order))
    assert sizes == [2, 6, 8]
    history = [HistoryTrial(k, {"gaussian_blur.sigma": s}, "ok", _mean8(s), 8, {i: _sloped(s, i) for i in order})
               for k, s in enumerate([0.3 + 2.7 * k / 7 for k in range(8)])]
    # a trial with an infinite score (a custom metric's) would make every fit fail: it is left out
    odd = HistoryTrial(99, {"gaussian_blur.sigma": 1.0}, "ok", math.inf, 8, {i: math.inf for i in order})
    gaps = RungGaps(dims, history + [odd], order, sizes, seed=1)
    for sigma in (0.8, 1.65, 2.5):
        partial = (_sloped(sigma, "a") + _sloped(sigma, "b")) / 2
        assert partial + gaps.ahead([{"gaussian_blur.sigma": sigma}], 0)[0] == pytest.approx(_mean8(sigma), abs=0.05)
    # too few trials past the rungs: the plain mean gap, the same for every candidate
    flat = RungGaps(dims, history[:2], order, sizes)
    assert len(set(flat.ahead([{"gaussian_blur.sigma": s} for s in (0.5, 2.5)], 0).round(9))) == 1

    # a round ranked with the gaps promotes the candidate that is best on all images, not on the first two
    candidates = [{"trial": f"t{k}", "index": k, "params": {"gaussian_blur.sigma": s}, "stages": []}
                  for k, s in enumerate([2.7, 0.6, 1.6])]

    def evaluate(trials, ids, known):
        return {t["trial"]: {i: {"score": _sloped(t["params"]["gaussian_blur.sigma"], i), "seconds": 0.0,
                                 "error": None} for i in ids} for t in trials}

    def finalist(with_gaps):
        out = run_round(candidates, order, Halving(eta=3, min_images=2), evaluate, {}, maximize=True,
                        on_settled=lambda o: None, gaps=gaps if with_gaps else None)
        return [o.trial for o in out if o.status == "ok"], {o.trial: o for o in out}

    assert finalist(False)[0] == ["t0"]  # the first two images alone favour the largest sigma
    kept, by = finalist(True)
    assert kept == ["t1"]
    # each pruned trial records the estimate that ranked it: near its true mean over all eight images
    for trial in ("t0", "t2"):
        sigma = by[trial].params["gaussian_blur.sigma"]
        assert by[trial].status == "pruned" and by[trial].estimated_score == pytest.approx(_mean8(sigma), abs=0.05)
    # a pruned trial's value for the models is the same estimate of its full mean
    pruned = HistoryTrial(9, {"gaussian_blur.sigma": 1.6}, "pruned", (_sloped(1.6, "a") + _sloped(1.6, "b")) / 2, 2,
                          {i: _sloped(1.6, i) for i in "ab"})
    assert trial_values(history + [pruned], True, gaps)[9] == pytest.approx(_mean8(1.6), abs=0.05)


def _mean8(sigma):
    return sum(_sloped(sigma, i) for i in "abcdefgh") / 8


# ------------------------------------------------------------------------------------- proposals

@pytest.mark.parametrize("sampler", ["random", "grid", "halton", "sobol"])
def test_plain_samplers_propose_exactly_their_points(tmp_path, sampler):
    sweep = sweep_of(tmp_path, sampler=sampler, early_stopping={"method": "successive_halving"},
                     search={"batch_size": 4})
    dims = search_space(sweep)
    search, records, _ = run_search(sweep, tmp_path / "out")
    for k, key in enumerate(trial_keys(sweep)):
        assert records[key]["params"] == sample_point(dims, sampler, sweep.seed, k, sweep.trials), key
    assert search.ledger.data["batch_size"] == 4


def test_a_grid_whose_last_round_is_cut_short_keeps_the_sweeps_resolution(tmp_path):
    # 10 trials in rounds of 4: the last round has slots 8..11, two beyond the sweep
    one_dim = [{"op": "gaussian_blur", "ksize": 5, "sigma": {"type": "float", "low": 0.3, "high": 3.0}}]
    sweep = sweep_of(tmp_path, sampler="grid", trials=10, early_stopping={"method": "successive_halving"},
                     search={"batch_size": 4}, pipeline=one_dim)  # a grid of 10 values, not 12

    def evaluate(trials, ids, known):
        return {t["trial"]: {i: {"score": t["params"]["gaussian_blur.sigma"], "seconds": 0.0, "error": None}
                             for i in ids} for t in trials}

    _, records, _ = run_search(sweep, tmp_path / "out", evaluate=evaluate)
    dims = search_space(sweep)
    assert [records[key]["params"] for key in trial_keys(sweep)] == \
        [sample_point(dims, "grid", sweep.seed, k, 10) for k in range(10)]


def test_round_zero_is_warm_starts_then_the_initial_design(tmp_path):
    sweep = sweep_of(tmp_path, search={"batch_size": 4, "n_startup": 8, "initial_design": "halton"})
    dims = search_space(sweep)
    spec = SearchSpec(dims=dims, sampler="tpe", seed=3, maximize=True, rounds=Rounds(4, 8), initial_design="halton")
    good = {"bilateral_filter.d": 7, "bilateral_filter.sigma_color": 60.0, "gaussian_blur.ksize": 5,
            "gaussian_blur.sigma": 1.0, "threshold.method": "mean"}
    stale = {**good, "gaussian_blur.ksize": 4}  # not a point of this space (ksize must be odd)
    out = propose(spec, 0, [], warm=[good, stale, good])
    assert [p["source"] for p in out] == ["warm-start"] + ["halton"] * 7
    assert out[0]["params"] == good
    assert [p["params"] for p in out[1:]] == [sample_point(dims, "halton", 3, j, 8) for j in range(7)]
    assert not fits(dims, stale) and fits(dims, good)
    # A warm start that is one of the design's own points (last night's best often is): the design
    # passes over that point instead of evaluating it twice.
    design = [sample_point(dims, "halton", 3, j, 8) for j in range(9)]
    out = propose(spec, 0, [], warm=[design[2]])
    assert [p["params"] for p in out] == [design[2], *design[:2], *design[3:8]]
    assert len({json.dumps(p["params"], sort_keys=True) for p in out}) == 8


@pytest.mark.parametrize("sampler", ["tpe", "cmaes"])
def test_adaptive_proposals_are_a_function_of_the_results(tmp_path, sampler):
    sweep = sweep_of(tmp_path, sampler=sampler, search={"batch_size": 4, "n_startup": 8})
    dims = search_space(sweep)
    spec = SearchSpec(dims=dims, sampler=sampler, seed=3, maximize=True, rounds=Rounds(4, 8))
    first = propose(spec, 0, [])
    history = [HistoryTrial(index=p["index"], params=p["params"], status="ok",
                            score=sum(true_score(p["params"], i) for i in IDS) / len(IDS), images_scored=12)
               for p in first]
    second = propose(spec, 1, history)
    assert second == propose(spec, 1, history)  # no hidden state
    assert [p["index"] for p in second] == [8, 9, 10, 11]
    assert {p["source"] for p in second} <= ({"tpe", "gp"} if sampler == "tpe" else {sampler})
    assert all(fits(dims, p["params"]) for p in second)
    assert len({json.dumps(p["params"], sort_keys=True) for p in second}) == 4  # a batch does not repeat itself
    worse = [HistoryTrial(t.index, t.params, t.status, -t.score, t.images_scored) for t in history]
    assert propose(spec, 1, worse) != second


def test_cmaes_learns_from_every_generation_not_only_the_initial_design(tmp_path):
    sweep = sweep_of(tmp_path, sampler="cmaes", search={"batch_size": 4, "n_startup": 8})
    spec = SearchSpec(dims=search_space(sweep), sampler="cmaes", seed=3, maximize=True, rounds=Rounds(4, 8))

    def last_round(flip_after_design: bool):
        proposals, replay = propose(spec, 0, []), {}
        for r in range(1, 5):
            history = [HistoryTrial(p["index"], p["params"], "ok",
                                    (-1 if flip_after_design and p["index"] >= 8 else 1) *
                                    sum(true_score(p["params"], i) for i in IDS) / len(IDS), len(IDS))
                       for p in proposals]
            replay[r] = propose(spec, r, history, replay=replay)
            proposals += replay[r]
        return replay[4]

    # the same initial design and its scores; only the later generations' scores differ
    assert last_round(False) != last_round(True)


def test_tpe_over_choices_tries_every_branch_and_favours_the_best(tmp_path):
    sweep = sweep_of(tmp_path, search={"batch_size": 8, "n_startup": 4})
    spec = SearchSpec(dims=search_space(sweep), sampler="tpe", seed=3, maximize=True, rounds=Rounds(8, 4))
    design = propose(spec, 0, [])
    # the design happened to try "otsu" only: "mean" must get a trial although otsu scores well
    history = [HistoryTrial(p["index"], {**p["params"], "threshold.method": "otsu"}, "ok", 30.0 + 0.1 * p["index"], 12)
               for p in design]
    batch = propose(spec, 1, history)
    methods = [p["params"]["threshold.method"] for p in batch]
    assert methods.count("mean") >= 1 and methods.count("otsu") > methods.count("mean")
    assert batch == propose(spec, 1, history)
    # once "mean" has the best complete trial, it gets the larger share
    history += [HistoryTrial(p["index"], p["params"], "ok", 40.0 if p["params"]["threshold.method"] == "mean" else 29.0, 12)
                for p in batch]
    spec2 = SearchSpec(dims=spec.dims, sampler="tpe", seed=3, maximize=True, rounds=Rounds(8, 4))
    methods = [p["params"]["threshold.method"] for p in propose(spec2, 2, history)]
    assert methods.count("mean") > methods.count("otsu")


def test_tpe_over_choices_ranks_a_branch_by_its_pruned_trials_too(tmp_path):
    # With early stopping most trials are pruned: a branch whose trials all were is still ranked, by
    # their estimated full means, and gets the largest share when those are the best.
    pipeline = [dict(stage) for stage in PIPELINE]
    threshold = next(stage for stage in pipeline if stage["op"] == "threshold")
    threshold["method"] = {"type": "choice", "values": ["otsu", "mean", "gaussian"]}
    sweep = sweep_of(tmp_path, pipeline=pipeline, search={"batch_size": 8, "n_startup": 10})
    spec = SearchSpec(dims=search_space(sweep), sampler="tpe", seed=3, maximize=True, rounds=Rounds(8, 10))
    branch = ["otsu"] * 4 + ["mean"] * 4 + ["gaussian"] * 2
    history = [HistoryTrial(p["index"], {**p["params"], "threshold.method": branch[p["index"]]},
                            "pruned" if branch[p["index"]] == "mean" else "ok",
                            {"otsu": 30.0, "mean": 40.0, "gaussian": 29.0}[branch[p["index"]]],
                            3 if branch[p["index"]] == "mean" else 12,
                            {i: 40.0 for i in IDS[:3]} if branch[p["index"]] == "mean"
                            else dict.fromkeys(IDS, 30.0 if branch[p["index"]] == "otsu" else 29.0))
               for p in propose(spec, 0, [])]
    assert len(history) == 10
    methods = [p["params"]["threshold.method"] for p in propose(spec, 1, history)]
    assert methods.count("mean") > methods.count("otsu") > 0
    # the same pruned trials estimated worse than the complete ones: the best complete branch leads
    history = [HistoryTrial(t.index, t.params, t.status, 20.0, t.images_scored, dict.fromkeys(t.per_image, 20.0))
               if t.status == "pruned" else t for t in history]
    methods = [p["params"]["threshold.method"] for p in propose(spec, 1, history)]
    assert methods.count("otsu") > methods.count("mean") > 0

def test_the_default_batch_fills_the_cluster_and_leaves_halving_something_to_prune(tmp_path):
    assert default_batch(2, None) == 2 and default_batch(0, None) == 1
    assert default_batch(2, Halving(eta=3)) == 9 and default_batch(2, Halving(eta=2)) == 4
    assert default_batch(16, Halving(eta=3)) == 16
    halved = sweep_of(tmp_path, sampler="tpe", early_stopping={"method": "successive_halving"})
    search = Search(halved, tmp_path / "out", "d" * 64, IDS, default_batch_size=2)
    assert search.rounds.batch_size == 9 and search.ledger.data["batch_size"] == 9


def test_the_gaussian_process_share_grows_over_the_rounds():
    # 6 rounds of 8 after the initial design: TPE explores first, the GP fine-tunes last; half in all
    shares = [gp_count(8, r, n_rounds=6, n_history=16, n_dims=5) for r in range(1, 7)]
    assert shares == [1, 2, 3, 5, 6, 7] and sum(shares) == 24
    assert [gp_count(1, r, 6, 16, 5) for r in range(1, 7)] == [0, 0, 0, 1, 1, 1]  # a batch of one
    assert gp_count(8, 1, 6, n_history=6, n_dims=5) == 0  # too few trials for one length scale per parameter
    assert gp_count(8, 9, 6, 16, 5) == 7  # a round past the planned ones (trials raised since) stays below the batch


def _bowl(params):
    """A narrow ridge in sigma_color and a step at the lowest ksize (as the denoising space has)."""
    return (-((params["bilateral_filter.sigma_color"] - 37.0) / 6.0) ** 2
            - math.log(params["gaussian_blur.sigma"] / 0.8) ** 2 * 4
            - (0.0 if params["gaussian_blur.ksize"] == 3 else 0.5) - 0.05 * abs(params["bilateral_filter.d"] - 9))


def _design(dims, n, maximize=True):
    points = [sample_point(dims, "sobol", 5, j, n) for j in range(n)]
    return [HistoryTrial(j, p, "ok", (1 if maximize else -1) * _bowl(p), 12) for j, p in enumerate(points)]


@pytest.mark.parametrize("maximize", [True, False])
def test_the_gaussian_process_improves_on_the_points_it_learnt_from(tmp_path, maximize):
    sweep = sweep_of(tmp_path)
    dims = [d for d in search_space(sweep) if d.range.type != "choice"]
    history = _design(dims, 16, maximize)
    out = gp_proposals(dims, {}, history, maximize, 4, seed=11)
    assert out == gp_proposals(dims, {}, history, maximize, 4, seed=11)  # no hidden state
    assert all(fits(dims, p) for p in out)
    assert len({json.dumps(p, sort_keys=True) for p in out}) == 4
    assert not {json.dumps(p, sort_keys=True) for p in out} & {json.dumps(t.params, sort_keys=True) for t in history}
    # expected improvement exploits the fitted model: its best point beats every point it was fitted on
    assert max(_bowl(p) for p in out) > max(_bowl(t.params) for t in history)
    # in a TPE round: its share of the batch (round 2 of 3: 4 of 8), after TPE's part
    spec = SearchSpec(dims=dims, sampler="tpe", seed=3, maximize=maximize, rounds=Rounds(8, 8), n_trials=32)
    assert adaptive_rounds(spec) == 3
    batch = propose(spec, 2, history)
    assert [p["source"] for p in batch] == ["tpe"] * 4 + ["gp"] * 4
    assert [p["params"] for p in batch[4:]] == gp_proposals(dims, {}, history, maximize, 4,
                                                            pending=[p["params"] for p in batch[:4]],
                                                            seed=_seed(3, "gp", 2))


def test_a_long_sweeps_gaussian_process_is_fitted_on_its_best_trials(tmp_path, monkeypatch):
    sweep = sweep_of(tmp_path)
    dims = [d for d in search_space(sweep) if d.range.type != "choice"]
    history = _design(dims, 40)
    monkeypatch.setattr(search_module, "GP_MAX_POINTS", 10)
    capped = gp_proposals(dims, {}, history, True, 2, seed=4)
    best = sorted(history, key=lambda t: -t.score)[:10]
    # the worse 30 trials do not change the model: the same points as from the best 10 alone
    assert capped == gp_proposals(dims, {}, sorted(best, key=lambda t: t.index), True, 2, seed=4)


def test_the_gaussian_process_keeps_choices_and_spreads_around_pending_points(tmp_path):
    sweep = sweep_of(tmp_path)
    dims = search_space(sweep)
    numeric = [d for d in dims if d.range.type != "choice"]
    history = [HistoryTrial(t.index, {**t.params, "threshold.method": "mean"}, t.status, t.score, 12)
               for t in _design(numeric, 12)]
    alone = gp_proposals(dims, {"threshold.method": "mean"}, history, True, 2, seed=3)
    assert all(p["threshold.method"] == "mean" and fits(dims, p) for p in alone)
    # told that the first point is already asked (by TPE), it picks another
    after = gp_proposals(dims, {"threshold.method": "mean"}, history, True, 2, pending=alone[:1], seed=3)
    assert alone[0] not in after


def test_trial_values_shift_partial_means_by_the_complete_trials_gap():
    complete = HistoryTrial(0, {}, "ok", 10.0, 4, {"a": 8.0, "b": 9.0, "c": 11.0, "d": 12.0})
    pruned = HistoryTrial(1, {}, "pruned", 7.0, 2, {"a": 6.0, "b": 8.0})
    failed = HistoryTrial(2, {}, "failed", float("nan"), 0)
    values = trial_values([complete, pruned, failed], maximize=True)
    # the complete trial scored 8.5 on the pruned trial's two images and 10 on all: +1.5
    assert values == {0: 10.0, 1: 8.5, 2: 8.5}


# ------------------------------------------------------------------------------ ledger and search

def test_a_search_learns_and_halving_saves_evaluations(tmp_path):
    full = sweep_of(tmp_path, trials=24, search={"batch_size": 4, "n_startup": 8})
    halved = sweep_of(tmp_path, trials=24, search={"batch_size": 4, "n_startup": 8},
                      early_stopping={"method": "successive_halving", "eta": 2, "min_images": 3})
    _, tpe, tpe_cost = run_search(full, tmp_path / "tpe")
    _, sh, sh_cost = run_search(halved, tmp_path / "sh")
    # the rounds proposed from results find better than the space-filling design they learnt from
    design = [r["score"] for r in tpe.values() if r["round"] == 0]
    learnt = [r["score"] for r in tpe.values() if r["round"] >= 1]
    assert max(learnt) > max(design) + 0.1, (max(learnt), max(design))
    assert len(tpe_cost.pairs) == 24 * 12
    assert len(sh_cost.pairs) < 0.6 * 24 * 12
    assert {r["status"] for r in sh.values()} == {"ok", "pruned"}
    assert all(r["images_scored"] == 12 for r in sh.values() if r["status"] == "ok")


@pytest.mark.parametrize("sampler", ["tpe", "cmaes"])
def test_a_resumed_search_proposes_what_an_undisturbed_one_did(tmp_path, sampler):
    fields = {"sampler": sampler, "trials": 20, "search": {"batch_size": 4, "n_startup": 8},
              "early_stopping": {"method": "successive_halving", "eta": 2, "min_images": 3}}
    sweep = sweep_of(tmp_path, **fields)
    whole, records, _ = run_search(sweep, tmp_path / "a")
    # "killed" after round 1 with half of round 2 settled: a new process takes it up from disk
    _, part, _ = run_search(sweep, tmp_path / "b", rounds=[0, 1])
    keys = [whole.key(k) for k in whole.rounds.slots(2)]
    part.update({k: records[k] for k in keys[:2]})
    counter = Counter()
    _, resumed, _ = run_search(sweep, tmp_path / "b", rounds=[2, 3], records=part, evaluate=counter)
    assert comparable(resumed) == comparable(records)
    assert proposals(whole.ledger.file) == proposals(tmp_path / "b" / "search" / whole.ledger.file.name)
    assert all(t not in keys[:2] for t, _ in counter.pairs)  # the settled trials were not computed again


def test_raising_trials_extends_the_search_and_keeps_its_proposals(tmp_path):
    fields = {"search": {"batch_size": 4, "n_startup": 8}}
    small, records, _ = run_search(sweep_of(tmp_path, trials=12, **fields), tmp_path / "out")
    before = proposals(small.ledger.file)
    bigger = sweep_of(tmp_path, trials=20, **fields)
    assert bigger.fingerprint() == small.sweep.fingerprint()
    counter = Counter()
    search, grown, _ = run_search(bigger, tmp_path / "out", records=records, evaluate=counter,
                                  rounds=[2, 3])
    assert proposals(search.ledger.file)[:2] == before and len(proposals(search.ledger.file)) == 4
    assert {t for t, _ in counter.pairs} == set(trial_keys(bigger)[12:])


def test_a_round_asked_before_its_history_exists_names_the_missing_trials(tmp_path):
    sweep = sweep_of(tmp_path, search={"batch_size": 4, "n_startup": 8})
    search = Search(sweep, tmp_path / "out", "d" * 64, IDS, default_batch_size=4)
    records = {}
    for o in search.run(0, records, Counter(), {}, lambda o: None, requested=set(trial_keys(sweep)[:4])):
        records[o.trial] = o.to_record(sweep_name="s", fingerprint="f", metric="psnr", manifest_digest="d")
    assert sorted(records) == trial_keys(sweep)[:4]
    with pytest.raises(SearchError, match=r"round 2 .*8 have none yet \(trial-004, trial-005"):
        search.candidates(2, records)


def test_two_runs_at_once_agree_on_every_round(tmp_path):
    sweep = sweep_of(tmp_path, trials=16, search={"batch_size": 4, "n_startup": 8})
    first = Search(sweep, tmp_path / "out", "d" * 64, IDS, default_batch_size=4)
    second = Search(sweep, tmp_path / "out", "d" * 64, IDS, default_batch_size=2)  # started before round 1
    assert second.rounds == first.rounds  # the ledger the first run started
    records, evaluate = {}, Counter()
    for o in first.run(0, records, evaluate, {}, lambda o: None):
        records[o.trial] = o.to_record(sweep_name="s", fingerprint="f", metric="psnr", manifest_digest="d")
    mine = first.candidates(1, records)
    # the second run saw other results (say, its own re-run of round 0): it still evaluates what was recorded
    theirs = {k: {**r, "score": -r["score"]} for k, r in records.items()}
    assert second.candidates(1, theirs) == mine


def test_the_ledger_refuses_a_foreign_or_damaged_file(tmp_path):
    ledger = Ledger(tmp_path, "f" * 16, "d" * 64)
    ledger.start({"batch_size": 2, "n_startup": 2})
    assert Ledger(tmp_path, "f" * 16, "d" * 64).rounds == Rounds(2, 2)
    ledger.file.write_text(ledger.file.read_text().replace('"f', '"g', 1))
    with pytest.raises(SearchError, match="other settings or images"):
        Ledger(tmp_path, "f" * 16, "d" * 64)
    ledger.file.write_text("{not json")
    with pytest.raises(SearchError, match=r"not a search ledger"):
        Ledger(tmp_path, "f" * 16, "d" * 64)


def test_sweep_file_options_reach_the_search(tmp_path):
    sweep = sweep_of(tmp_path, sampler="cmaes", search={"batch_size": 6, "warm_start": 0},
                     early_stopping={"method": "successive_halving", "eta": 4, "min_images": 2})
    assert sweep.search.batch_size == 6 and sweep.search.warm_start == 0
    assert sweep.early_stopping == Halving(eta=4, min_images=2)
    assert sweep.fingerprint() != sweep_of(tmp_path, sampler="cmaes", search={"batch_size": 6}).fingerprint()
    # raising trials extends a staged search; only the grid's points depend on their number
    assert sweep_of(tmp_path, trials=8).fingerprint() == sweep_of(tmp_path, trials=9).fingerprint()
    halved_grid = {"sampler": "grid", "early_stopping": {"method": "successive_halving"}}
    assert sweep_of(tmp_path, trials=8, **halved_grid).fingerprint() != \
        sweep_of(tmp_path, trials=9, **halved_grid).fingerprint()


STAGED = {"sampler": "tpe", "search": {"batch_size": 4, "n_startup": 4},
          "early_stopping": {"method": "successive_halving", "eta": 2, "min_images": 2}}


def test_the_initial_design_note_waits_for_every_trial(tmp_path):
    sweep = sweep_of(tmp_path, trials=8, **STAGED)
    round0 = [{"trial": f"trial-00{k}", "round": 0, "source": "sobol"} for k in range(4)]
    assert early_stopping_notes(sweep, 6, round0) == []  # a range that ran round 0 only: not yet
    later = [{"trial": f"trial-00{k}", "round": 1, "source": "sobol"} for k in range(4, 8)]
    [note] = early_stopping_notes(sweep, 6, round0 + later)
    assert note.startswith("sampler tpe: all 8 trials are the initial design (round 0 holds 4)")
    assert early_stopping_notes(sweep, 6, round0 + [{**r, "source": "tpe"} for r in later]) == []
    one = sweep_of(tmp_path, trials=1, **STAGED)
    [note] = early_stopping_notes(one, 6, round0[:1])
    assert note.startswith("sampler tpe: the only trial is the initial design (round 0 holds 1)")  # not "all 1 trials"


def test_trials_of_distinct_parameters_need_no_note():
    from types import SimpleNamespace  # (but for grid, the note reads the sampler and early stopping only)


    plain = SimpleNamespace(sampler="random", early_stopping=None)
    assert repeated_trials_note(plain, [{"params": {"k": 3}}, {"params": {"k": 5}}, {"params": None}]) is None


def test_random_trials_that_repeat_say_how_many_they_drew_of_how_many_there_are(tmp_path):
    odd = [{"op": "median_blur", "ksize": {"type": "odd", "low": 3, "high": 7}}]  # 3, 5 or 7
    sweep = sweep_of(tmp_path, trials=4, sampler="random", pipeline=odd)
    drawn = [{"params": {"k": 3, "s": 1.0}}, {"params": {"s": 1.0, "k": 3}}, {"params": {"k": 5, "s": 1.0}}]
    assert repeated_trials_note(sweep, drawn) == (
        "1 of the 3 trials repeats the parameters of an earlier trial (sampler random drew 2 distinct pipelines of "
        "the 3 the search space holds): widen the space, or use sampler grid to try each distinct pipeline once")
    continuous = sweep_of(tmp_path, trials=4, sampler="random",
                          pipeline=[{"op": "gaussian_blur", "sigma": {"type": "float", "low": 0.5, "high": 2.0}}])
    assert "(sampler random drew 2 distinct pipelines): widen" in repeated_trials_note(continuous, drawn)


def test_a_grid_the_trials_do_not_cover_is_said_so(tmp_path):
    from imgtune_assets.core.sampling import sample_point, search_space

    # 12 trials over 3 parameters: a grid of 3 x 3 x 3 = 27 points, of which the trials take the first 12.
    pipeline = [{"op": "gaussian_blur", "ksize": {"type": "odd", "low": 3, "high": 7},
                 "sigma": {"type": "float", "low": 0.5, "high": 2.0}},
                {"op": "canny", "threshold1": {"type": "float", "low": 20, "high": 120}}]
    sweep = sweep_of(tmp_path, trials=12, sampler="grid", pipeline=pipeline)
    def trials(sw, n):
        return [{"params": sample_point(search_space(sw), sw.sampler, sw.seed, k, n)} for k in range(n)]

    note = repeated_trials_note(sweep, trials(sweep, 12))
    dims = [d.name for d in search_space(sweep)]
    assert note == (f"sampler grid: the 12 trials take the first 12 of the 27 points of the grid (3 {dims[0]} x "
                    f"3 {dims[1]} x 3 {dims[2]}), the last parameter varying fastest: {dims[0]} is tried at 2 "
                    f"of its 3 values; set trials to 27 to cover the grid")
    tried = {t["params"][dims[0]] for t in trials(sweep, 12)}
    assert len(tried) == 2  # what the note says
    covered = sweep_of(tmp_path, trials=27, sampler="grid", pipeline=pipeline)
    assert repeated_trials_note(covered, trials(covered, 27)) is None
    assert repeated_trials_note(sweep_of(tmp_path, trials=12, sampler="sobol", pipeline=pipeline),
                                [{"params": {"k": k}} for k in range(12)]) is None
