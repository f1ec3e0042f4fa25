"""SweepProgress with a fake clock: when a report is due, the best score in either direction, the
rate and time left counting computed trials only, and the one-line summary."""

import math

import pytest

from imgtune_assets.core.metrics import METRICS, Objective
from imgtune_assets.core.progress import (BOUNDED_BY_ONE, SweepProgress, counted, describe, format_score,
                                          partial_reuse_message, passes_a_tenth, percent, reuse_message)


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ok(k: int, score: float) -> dict:
    return {"trial": f"trial-{k:03d}", "status": "ok", "score": score}


def failed(k: int) -> dict:
    return {"trial": f"trial-{k:03d}", "status": "failed", "score": None}


def make(total=32, images=10, metric="psnr", **kw):
    clock = FakeClock()
    progress = SweepProgress(total, images, Objective(metric), clock=clock, wall_clock=lambda: 1.7e9 + clock.now, **kw)
    return progress, clock


def test_nothing_is_due_at_first():
    progress, clock = make()
    assert progress.report_if_due() is None
    clock.advance(4.9)
    assert progress.report_if_due() is None


def test_due_after_the_interval_even_without_a_finished_trial():
    progress, clock = make()
    clock.advance(5.0)
    snap = progress.report_if_due()
    assert snap is not None and snap["done"] == 0 and snap["eta_seconds"] is None and snap["best"] is None
    assert progress.report_if_due() is None  # just reported
    clock.advance(5.0)
    assert progress.report_if_due() is not None


def test_due_after_a_tenth_of_the_trials():
    progress, clock = make(total=32)
    for k in range(3):  # 3/32 < 10 %
        progress.trial_done(ok(k, 20.0 + k))
        assert progress.report_if_due() is None
    progress.trial_done(ok(3, 21.0))  # 4/32 >= 10 %
    snap = progress.report_if_due()
    assert snap["done"] == 4
    progress.trial_done(ok(4, 21.0))  # counted from the last report again
    assert progress.report_if_due() is None


def test_due_once_when_all_done():
    progress, clock = make(total=3, step_fraction=0.9)
    progress.trial_done(ok(0, 1.0))
    progress.trial_done(ok(1, 1.0))
    assert progress.report_if_due() is None
    progress.trial_done(failed(2))
    snap = progress.report_if_due()
    assert snap["finished"] is True and snap["done"] == 3 and snap["eta_seconds"] == 0
    clock.advance(60)
    assert progress.report_if_due() is None  # the final report is not repeated


def test_best_follows_the_objective_direction_and_skips_failures():
    up, _ = make(metric="psnr")
    down, _ = make(metric="mae")
    forced, _ = make(metric="psnr")
    forced.objective = Objective("psnr", direction="minimize")
    for p in (up, down, forced):
        p.trial_done(ok(0, 0.5))
        p.trial_done(ok(1, 0.2))
        p.trial_done({"trial": "trial-002", "status": "ok", "score": float("nan")})
        p.trial_done(failed(3))
        p.trial_done(ok(4, 0.9))
        p.trial_done(ok(5, 0.9))  # a tie keeps the lower trial
    assert (up.best, up.best_trial) == (0.9, "trial-004")
    late = make(metric="psnr")[0]  # trials finish out of order: a tie still goes to the lower trial
    for k in (6, 5, 1000, 2):
        late.trial_done(ok(k, 0.9))
    assert (late.best, late.best_trial) == (0.9, "trial-002")
    assert (down.best, down.best_trial) == (0.2, "trial-001")
    assert (forced.best, forced.best_trial) == (0.2, "trial-001")
    assert up.snapshot()["failed"] == 1


def test_pruned_trials_are_counted_apart_and_never_best():
    progress, _ = make(total=4)
    progress.trial_done(ok(0, 20.0))
    progress.trial_done({"trial": "trial-001", "status": "pruned", "score": None, "partial_score": 35.0})
    progress.trial_done(failed(2))
    snap = progress.snapshot()
    assert (snap["pruned"], snap["failed"], snap["best"]) == (1, 1, 20.0)
    assert "1 failed, 1 pruned" in describe(snap)


def test_pruned_trials_count_the_images_they_were_scored_on():
    """Successive halving stops most trials after a few images: the evaluations done, the most still to
    do and the rate count those, not every image of every trial."""
    progress, clock = make(total=4, images=10)
    images = lambda n: [{"id": f"i{k}", "score": 1.0} for k in range(n)]  # noqa: E731
    progress.start_computing()
    clock.advance(2.0)
    progress.trial_done({**ok(0, 20.0), "per_image": images(10)})
    progress.trial_done({"trial": "trial-001", "status": "pruned", "score": None, "per_image": images(3)})
    progress.trial_done({"trial": "trial-002", "status": "pruned", "score": None, "per_image": images(3)})
    snap = progress.snapshot()
    assert (snap["evaluations_done"], snap["evaluations_total"], snap["evaluations_full"]) == (16, 26, 40)
    progress.chunk_done({"trial-003": 4})  # the last trial under way: the line gives the share of images
    assert "3/4 trials, 77% of image evaluations" in describe(progress.snapshot())  # 20 of at most 26
    assert snap["evaluations_per_second"] == pytest.approx(16 / 2.0)
    assert snap["eta_seconds"] == pytest.approx(10 / 8.0)
    progress.trial_done({"trial": "trial-003", "status": "failed", "score": None, "per_image": [],
                         "error": "the pipeline raised before any image"})
    snap = progress.snapshot()
    assert (snap["evaluations_done"], snap["evaluations_total"]) == (16, 16)  # done: 100 %
    assert snap["eta_seconds"] == 0.0


def test_under_halving_the_unfinished_trials_count_the_images_they_are_expected_to_be_scored_on():
    progress, clock = make(total=9, images=17)
    progress.expect_images_per_trial(5.0)
    images = lambda n: [{"id": f"i{k}", "score": 1.0} for k in range(n)]  # noqa: E731
    progress.start_computing()
    assert progress.snapshot()["evaluations_total"] == 45  # 9 × 5, not 9 × 17
    clock.advance(2.0)
    progress.trial_done({"trial": "trial-000", "status": "pruned", "score": None, "per_image": images(3)})
    snap = progress.snapshot()
    assert (snap["evaluations_done"], snap["evaluations_total"], snap["evaluations_full"]) == (3, 43, 153)
    assert snap["eta_seconds"] == pytest.approx(40 / (3 / 2.0), abs=1e-3)  # (rounded to ms)
    progress.expect_images_per_trial(40.0)  # (never more than every image)
    assert progress.snapshot()["evaluations_total"] == 3 + 8 * 17


def test_rate_and_eta_count_computed_trials_only():
    progress, clock = make(total=10, images=20)
    for k in range(4):  # reused from an earlier run: instant, not in the rate
        progress.trial_done(ok(k, 10.0), reused=True)
    assert progress.snapshot()["evaluations_per_second"] is None
    assert progress.snapshot()["eta_seconds"] is None
    clock.advance(3.0)  # decoding, starting Ray
    progress.start_computing()
    clock.advance(2.0)
    progress.trial_done(ok(4, 11.0))
    progress.trial_done(ok(5, 12.0))
    snap = progress.snapshot()
    # 2 computed trials × 20 images in 2 s since computing started
    assert snap["evaluations_per_second"] == pytest.approx(20.0)
    # 4 trials left × 20 images at 20 evaluations/s
    assert snap["eta_seconds"] == pytest.approx(4.0)
    assert snap["elapsed_seconds"] == pytest.approx(5.0)
    assert snap["done"] == 6 and snap["reused"] == 4 and snap["total"] == 10
    assert snap["updated_at"] == pytest.approx(1.7e9 + clock.now)


def test_chunks_of_unfinished_trials_count_as_image_evaluations():
    # 4 trials that finish together at the end (a streamed data set): their chunks show the progress.
    progress, clock = make(total=4, images=30)
    progress.start_computing()
    clock.advance(1.0)
    progress.chunk_done({f"trial-{k:03d}": 2 for k in range(4)})
    assert progress.report_if_due() is None  # 8 of 120 evaluations: less than a tenth
    progress.chunk_done({f"trial-{k:03d}": 4 for k in range(4)})
    assert progress.report_if_due()["evaluations_done"] == 24  # a tenth and more since the last report
    clock.advance(5.0)
    progress.chunk_done({f"trial-{k:03d}": 6 for k in range(4)})
    snap = progress.snapshot()
    assert snap["done"] == 0 and snap["evaluations_done"] == 48 and snap["evaluations_total"] == 120
    assert snap["evaluations_per_second"] == pytest.approx(8.0)  # 48 evaluations in 6 s
    assert snap["eta_seconds"] == pytest.approx(9.0)  # 72 left at 8/s
    assert progress.line() == "0/4 trials, 40% of image evaluations, 8.0 evaluations/s, about 9 s left"
    # a finished trial's images are counted once, as the trial's
    progress.trial_done(ok(0, 30.0))
    assert progress.snapshot()["evaluations_done"] == 30 + 36
    for k in range(1, 4):
        progress.trial_done(ok(k, 29.0))
    assert progress.snapshot()["evaluations_done"] == 120 and progress.line().startswith("4/4 trials (100%)")


def test_rate_from_construction_without_start_computing():
    progress, clock = make(total=4, images=5)
    clock.advance(10.0)
    progress.trial_done(ok(0, 1.0))
    assert progress.snapshot()["evaluations_per_second"] == pytest.approx(0.5)
    assert progress.snapshot()["eta_seconds"] == pytest.approx(30.0)


def test_snapshot_fields():
    progress, clock = make()
    snap = progress.snapshot()
    for field in ("done", "total", "failed", "best", "best_trial", "evaluations_per_second", "eta_seconds",
                  "elapsed_seconds", "finished", "updated_at"):
        assert field in snap
    assert snap["finished"] is False


def test_line():
    progress, clock = make(total=32, images=8)
    for k in range(12):
        clock.advance(1.0)
        if k == 3:
            progress.trial_done(failed(k))
        else:
            progress.trial_done(ok(k, 28.41 if k == 7 else 20.0 + k / 10))
    line = progress.line()
    # 12 trials × 8 images in 12 s = 8 evaluations/s; 20 trials left × 8 images = 20 s
    assert line == "12/32 trials (38%), 1 failed, best psnr 28.41 (trial-007), 8.0 evaluations/s, about 20 s left"


def test_line_when_finished_and_before_anything():
    progress, clock = make(total=2, images=1)
    assert progress.line() == "0/2 trials (0%)"
    clock.advance(120)
    progress.trial_done(ok(0, 0.5))
    progress.trial_done(ok(1, 0.75))
    assert progress.line().startswith("2/2 trials (100%), best psnr 0.75 (trial-001), ")
    assert progress.line().endswith("done in 2 min")


def test_a_single_trial_is_one_trial():
    # A fixed pipeline (trials: 1, a best_pipeline.yaml run as a sweep) is one trial, not "1 trials".
    progress, clock = make(total=1, images=1)
    assert progress.line() == "0/1 trial (0%)"
    progress.trial_done(ok(0, 0.5))
    assert progress.line().startswith("1/1 trial (100%), best psnr 0.5 (trial-000), ")
    assert counted(0, "trial") == "0 trials" and counted(2, "file") == "2 files"
    assert counted(1, "image/target pair", "image/target pairs") == "1 image/target pair"


def test_percent_is_never_100_before_the_end():
    assert percent(31, 32) == 97
    assert percent(999, 1000) == 99
    assert percent(1000, 1000) == 100
    assert percent(0, 0) == 100


def test_describe_reads_a_progress_file_snapshot():
    snap = {"done": 5, "total": 10, "failed": 0, "best": 0.912345, "best_trial": "trial-004", "metric": "dice",
            "evaluations_per_second": None, "eta_seconds": 80.0, "finished": False}
    assert describe(snap) == "5/10 trials (50%), best dice 0.912345 (trial-004), about 80 s left"
    assert describe({**snap, "eta_seconds": 150.0}).endswith("about 2 min left")
    assert describe({**snap, "eta_seconds": 3 * 3600.0}).endswith("about 3.0 h left")
    # A run of some of the sweep's trials (a backfill, one trial from the UI): its best is its own.
    assert "best of this run dice 0.912345 (trial-004)" in describe({**snap, "sweep_trials": 32})
    assert "best dice" in describe({**snap, "sweep_trials": 10})


def test_a_run_of_part_of_a_sweep_says_its_best_is_its_own():
    from imgtune_assets.core.metrics import Objective

    part = SweepProgress(3, 4, Objective("psnr"), sweep_trials=12)
    whole = SweepProgress(12, 4, Objective("psnr"))
    assert (part.snapshot()["sweep_trials"], whole.snapshot()["sweep_trials"]) == (12, 12)


def test_refuses_negative_sizes():
    with pytest.raises(ValueError):
        SweepProgress(-1, 3, Objective("psnr"))


def test_no_images_still_gives_a_finite_rate():
    progress, clock = make(total=2, images=0)
    clock.advance(1.0)
    progress.trial_done(failed(0))
    assert math.isfinite(progress.snapshot()["eta_seconds"])


@pytest.mark.parametrize("steps, total", [([8, 8, 8, 7, 6, 5, 4, 3, 2, 2, 2, 1, 1, 1], 58), ([1] * 25, 25), ([3], 3)])
def test_a_tenth_is_logged_once_whatever_the_steps(steps, total):
    assert sum(steps) == total
    logged, before, done = [], 0, 0
    for step in steps:
        done += step
        if passes_a_tenth(before, done, total):
            logged.append(done)
            before = done
    tenths = [d * 10 // total for d in logged]
    assert logged[-1] == total
    assert tenths == sorted(set(tenths))  # never twice in one tenth
    # every tenth the counts passed through shows up (steps never jump more than a tenth here)
    if max(steps) <= total / 10:
        assert len(logged) == 10


def test_no_tenths_of_nothing():
    assert not passes_a_tenth(0, 0, 0)


def test_scores_of_metrics_bounded_by_one_have_six_decimals():
    for metric in BOUNDED_BY_ONE:
        assert metric in METRICS, metric  # a renamed metric would fall back to 4 digits unnoticed
    assert format_score(0.96112345, "ssim") == "0.961123" and format_score(0.5, "dice") == "0.500000"
    assert format_score(0.0, "iou") == "0.000000" and format_score(0.0000234567, "mae") == "2.346e-05"
    assert format_score(28.4123, "psnr") == "28.41" and format_score(0.96112345) == "0.9611"  # as before
    assert format_score(123456.7, "sharpness") == "123457"


def test_saved_chunks_are_counted_for_the_unfinished_trials_only():
    known = {"trial-000": {"a": {}, "b": {}}, "trial-001": {"a": {}}, "trial-002": {}}
    assert partial_reuse_message(known, ["trial-001", "trial-002", "trial-003"]) == \
        "reusing 1 saved image evaluation(s) of 1 unfinished trial(s) (skip_finished)"
    assert partial_reuse_message(known, ["trial-002", "trial-003"]) is None
    assert reuse_message(3, 8) == "reusing 3 finished trial(s) (skip_finished), computing 5 of 8"
