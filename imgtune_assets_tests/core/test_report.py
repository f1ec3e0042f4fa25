import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from imgtune_assets.core.report import (
    best_record,
    evaluations,
    fixed_pipeline,
    leaderboard,
    plot_score_vs_params,
    score_vs_params_figure,
    search_progress_figure,
    top_params,
    write_report,
)
from imgtune_assets.core.sampling import trial_settings
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets_tests.conftest import write_sweep


def record(settings, score, status="ok", error=None):
    return {"trial": settings["trial"], "status": status, "score": score, "params": settings["params"],
            "stages": settings["stages"], "seconds": 0.5, "images_scored": 2 if status == "ok" else 1,
            "images_failed": 0 if status == "ok" else 1, "error": error,
            "per_image": [{"id": "a", "score": score, "seconds": 0.2, "error": error},
                          {"id": "b", "score": score, "seconds": 0.3, "error": None}]}


@pytest.fixture
def sweep(tmp_path, denoise_data):
    return load_sweep(write_sweep(tmp_path / "r.yaml", denoise_data, name="r", trials=4))


def test_leaderboard_ranks_completed_trials_and_lists_failed_last(sweep):
    s = [trial_settings(sweep, k) for k in range(4)]
    board = leaderboard(sweep, [record(s[0], 20.0), record(s[1], None, "failed", "boom"), record(s[2], 25.0),
                                record(s[3], 22.5)])
    assert list(board["trial"]) == ["trial-002", "trial-003", "trial-000", "trial-001"]
    assert list(board["rank"][:3]) == [1, 2, 3] and pd.isna(board["rank"].iloc[3])
    assert board["error"].iloc[3] == "boom"
    assert "bilateral_filter.d" in board.columns


def test_lower_is_better_metric_ranks_ascending(tmp_path, denoise_data):
    mae_sweep = load_sweep(write_sweep(tmp_path / "m.yaml", denoise_data, name="m", trials=2, metric="mae"))
    s = [trial_settings(mae_sweep, k) for k in range(2)]
    board = leaderboard(mae_sweep, [record(s[0], 0.2), record(s[1], 0.1)])
    assert list(board["trial"]) == ["trial-001", "trial-000"]


def test_report_files_and_best_pipeline_is_a_valid_fixed_sweep(tmp_path, sweep):
    s = [trial_settings(sweep, k) for k in range(3)]
    image = np.zeros((32, 32), np.uint8)
    records = [record(s[0], 20.0), record(s[1], 26.0), record(s[2], 21.0)]
    best = best_record(records, sweep.higher_is_better)
    assert best["trial"] == "trial-001"
    board, files = write_report(sweep, records, tmp_path / "out", best=best,
                                before_after=[("best", image, image, image), ("worst", image, image, None)])
    best = load_sweep(files.best_pipeline)  # a reusable sweep file: loads, and nothing is searched
    assert best.trials == 1 and all(not stage.searched for stage in best.pipeline)
    assert [[st.op, st.fixed] for st in best.pipeline] == [[op, params] for op, params in s[1]["stages"]]
    for path in files.plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(files.plots) == {"score_vs_params", "best_so_far", "best_trial_images"}
    csv = pd.read_csv(files.leaderboard)
    assert list(csv["trial"]) == ["trial-001", "trial-002", "trial-000"]
    assert len(pd.read_csv(files.per_image)) == 6
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_best_record_follows_the_direction_and_breaks_ties_by_trial_key(sweep):
    s = [trial_settings(sweep, k) for k in range(4)]
    records = [record(s[0], 20.0), record(s[1], None, "failed", "boom"), record(s[2], 25.0), record(s[3], 25.0)]
    assert best_record(records, higher_is_better=True)["trial"] == "trial-002"
    assert best_record(records, higher_is_better=False)["trial"] == "trial-000"
    assert best_record([records[1]], higher_is_better=True) is None
    board = leaderboard(sweep, records)
    assert board.iloc[0]["trial"] == best_record(records, sweep.higher_is_better)["trial"]
    # ties go to the lowest index, not the lowest string: trial-1000 sorts after trial-101
    late, early = dict(records[2], trial="trial-1000"), dict(records[3], trial="trial-101")
    assert best_record([late, early], higher_is_better=True)["trial"] == "trial-101"
    assert list(leaderboard(sweep, [late, early])["trial"]) == ["trial-101", "trial-1000"]


def test_a_report_without_a_winner_leaves_no_earlier_best_pipeline(tmp_path, sweep):
    s = [trial_settings(sweep, k) for k in range(2)]
    image = np.zeros((32, 32), np.uint8)
    good = [record(s[0], 20.0), record(s[1], 26.0)]
    _, files = write_report(sweep, good, tmp_path / "out", best=best_record(good, True),
                            before_after=[("best", image, image, image)])
    assert files.best_pipeline.exists() and "best_trial_images" in files.plots
    failed = [record(s[0], None, "failed", "boom"), record(s[1], None, "failed", "boom")]
    _, files = write_report(sweep, failed, tmp_path / "out", best=best_record(failed, True), before_after=None)
    assert files.best_pipeline is None and not (tmp_path / "out" / "best_pipeline.yaml").exists()
    assert not (tmp_path / "out" / "plots" / "best_trial_images.png").exists()


def test_fixed_pipeline_is_the_stages_of_a_sweep_that_searches_nothing(tmp_path, sweep):
    assert fixed_pipeline(sweep) is None  # it searches: the report has best parameters
    s = trial_settings(sweep, 0)
    best = record(s, 20.0)
    _, files = write_report(sweep, [best], tmp_path / "out", best=best)
    # its best_pipeline.yaml, run as a sweep: every value fixed
    assert fixed_pipeline(load_sweep(files.best_pipeline)) == [{"op": op, **params} for op, params in s["stages"]]


def staged(rec, *, round_, rung, status="ok", source="tpe", partial=None, images=2):
    return {**rec, "status": status, "round": round_, "rung": rung, "source": source,
            "score": rec["score"] if status == "ok" else None,
            "partial_score": rec["score"] if partial is None else partial, "per_image": rec["per_image"][:images],
            "round_started_at": 1000.0 + round_, "finished_at": 1001.0 + round_ + rung}


def test_a_staged_leaderboard_ranks_pruned_trials_below_complete_ones(tmp_path, sweep):
    s = [trial_settings(sweep, k) for k in range(4)]
    records = [staged(record(s[0], 20.0), round_=0, rung=1, source="sobol"),
               staged(record(s[1], 26.0), round_=0, rung=0, status="pruned", partial=26.0, images=1),
               staged(record(s[2], 24.0), round_=1, rung=0, status="pruned", partial=24.0, images=1),
               staged(record(s[3], 30.0), round_=1, rung=0, status="failed")]
    board = leaderboard(sweep, records)
    # the complete trial first; pruned ones (a higher partial mean on fewer images is no better) next
    assert list(board["trial"]) == ["trial-000", "trial-001", "trial-002", "trial-003"]
    assert list(board["status"]) == ["ok", "pruned", "pruned", "failed"]
    assert list(board.columns[4:9]) == ["round", "source", "rung", "partial_score", "estimated_score"]
    assert evaluations(records) == 2 + 1 + 1 + 2
    # Warm starts: the complete trial, then pruned ones in the leaderboard's order (a halving sweep has few
    # complete trials); never a failed one.
    assert top_params(records, True, k=5) == [s[0]["params"], s[1]["params"], s[2]["params"]]
    assert top_params(records, True, k=2) == [s[0]["params"], s[1]["params"]]
    assert top_params(records, False, k=5) == [s[0]["params"], s[2]["params"], s[1]["params"]]  # lower is better
    _, files = write_report(sweep, records, tmp_path / "out", best=best_record(records, True))
    assert files.plot_png["search_progress"][:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "plots" / "search_progress.png").exists()
    write_report(sweep, [record(x, 20.0 + k) for k, x in enumerate(s)], tmp_path / "out", best=None)
    assert not (tmp_path / "out" / "plots" / "search_progress.png").exists()  # not a staged sweep any more


def test_score_against_parameters_pictures_pruned_trials_too(sweep):
    s = [trial_settings(sweep, k) for k in range(4)]
    complete = [staged(record(s[0], 20.0), round_=0, rung=1, source="sobol")]
    pruned = [staged(record(x, 22.0 + k), round_=0, rung=0, status="pruned", partial=22.0 + k, images=1)
              for k, x in enumerate(s[1:])]
    alone = plot_score_vs_params(sweep, leaderboard(sweep, complete))
    assert plot_score_vs_params(sweep, leaderboard(sweep, complete + pruned)) != alone


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def test_search_progress_names_only_what_it_draws(sweep):
    import matplotlib.pyplot as plt

    s = [trial_settings(sweep, k) for k in range(4)]
    # A staged search without early stopping: nothing pruned, so no "pruned" entry; cmaes proposed
    # a trial that failed (no point), so no cmaes entry either.
    records = [staged(record(s[0], 20.0), round_=0, rung=0, source="sobol"),
               staged(record(s[1], 22.0), round_=1, rung=0, source="tpe"),
               staged(record(s[2], None, "failed", "boom"), round_=1, rung=0, status="failed", source="cmaes")]
    fig = search_progress_figure(sweep, records)
    try:
        assert sorted(legend_texts(fig.axes[1])) == ["best so far (complete trials)", "proposed by sobol",
                                                     "proposed by tpe"]
    finally:
        plt.close(fig)
    pruned = staged(record(s[3], 21.0), round_=1, rung=0, status="pruned", partial=21.0, images=1)
    fig = search_progress_figure(sweep, records + [pruned])
    try:
        assert "pruned (partial mean)" in legend_texts(fig.axes[1])
    finally:
        plt.close(fig)


def test_integer_parameters_get_whole_number_ticks(sweep):
    import matplotlib.pyplot as plt

    # d (int 3..7) tried at 3 and 4 only, ksize (odd 3..7) at 3 and 5: matplotlib's own ticks would
    # be 3.0, 3.2, ... and 3.0, 3.5, ...
    s = [trial_settings(sweep, k) for k in range(2)]
    records = [record(s[0], 20.0), record(s[1], 22.0)]
    for rec, d, ksize in zip(records, (3, 4), (3, 5)):
        rec["params"] = {**rec["params"], "bilateral_filter.d": d, "gaussian_blur.ksize": ksize}
    fig = score_vs_params_figure(sweep, leaderboard(sweep, records))
    try:
        by_name = {ax.get_xlabel(): ax for ax in fig.axes}
        fig.canvas.draw()
        for name in ("bilateral_filter.d", "gaussian_blur.ksize"):
            low, high = by_name[name].get_xlim()
            shown = [t for t in by_name[name].get_xticks() if low <= t <= high]
            assert len(shown) >= 2 and all(t == int(t) for t in shown), (name, shown)
            assert all(label.get_text().isdigit() for label in by_name[name].get_xticklabels()), name
        assert list(by_name["gaussian_blur.ksize"].get_xticks()) == [3, 5, 7]  # the odd range's values
        assert legend_texts(fig.axes[0]) == []  # nothing pruned: no legend, as before
    finally:
        plt.close(fig)


def test_score_against_parameters_names_only_what_it_draws(sweep):
    import matplotlib.pyplot as plt

    s = [trial_settings(sweep, k) for k in range(2)]
    # every trial pruned: no complete trial, no best, so neither has an entry
    pruned = [staged(record(x, 22.0 + k), round_=0, rung=0, status="pruned", partial=22.0 + k, images=1)
              for k, x in enumerate(s)]
    fig = score_vs_params_figure(sweep, leaderboard(sweep, pruned))
    try:
        assert legend_texts(fig.axes[0]) == ["pruned (partial mean)"]
    finally:
        plt.close(fig)


def test_before_after_panels_picture_the_best_and_worst_image_scaled_down(tmp_path):
    import cv2

    from imgtune_assets.core.manifest import scan_folder
    from imgtune_assets.core.ops import apply_pipeline
    from imgtune_assets.core.report import PANEL_PIXELS, before_after_panels

    rng = np.random.default_rng(3)
    (tmp_path / "images").mkdir()
    (tmp_path / "targets").mkdir()
    pictures = {}
    for name, shape in (("big", (PANEL_PIXELS * 2, PANEL_PIXELS + 80, 3)), ("small", (40, 30, 3))):
        pictures[name] = rng.integers(0, 256, shape, dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "images" / f"{name}.png"), pictures[name])
        cv2.imwrite(str(tmp_path / "targets" / f"{name}.png"), 255 - pictures[name])
    rows = scan_folder(tmp_path, needs_target=True)
    stages = [("gaussian_blur", {"ksize": 5, "sigma": 1.5})]
    best = {"stages": stages, "per_image": [{"id": "small", "score": 30.0}, {"id": "big", "score": 20.0}]}

    panels = before_after_panels(best, rows, tmp_path, higher_is_better=True)

    assert [label for label, *_ in panels] == ["best image small", "worst image big"]
    _, before, after, target = panels[0]  # small enough to be shown as it is
    assert np.array_equal(before, pictures["small"]) and np.array_equal(target, 255 - pictures["small"])
    assert np.array_equal(after, apply_pipeline(pictures["small"], stages))
    _, before, after, target = panels[1]  # the pipeline runs on the whole photo; the picture is scaled
    assert before.shape == after.shape == target.shape == (PANEL_PIXELS, (PANEL_PIXELS + 80) // 2, 3)
    expected = cv2.resize(apply_pipeline(pictures["big"], stages), before.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.array_equal(after, expected)


def test_the_reports_imports_are_prepared_once_in_a_background_thread():
    """In a fresh process (this one has matplotlib loaded already): the thread imports pandas and
    matplotlib with the Agg backend, and a second call returns the same thread."""
    code = textwrap.dedent("""
        import sys
        from imgtune_assets.core import report
        assert "matplotlib" not in sys.modules and "pandas" not in sys.modules
        thread = report.prepare_in_background()
        assert thread.daemon and report.prepare_in_background() is thread
        thread.join(timeout=60)
        import matplotlib
        print(not thread.is_alive(), "matplotlib.pyplot" in sys.modules, "pandas" in sys.modules,
              matplotlib.get_backend().lower())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True", "agg"], out.stdout


def test_sixteen_bit_pictures_that_fill_part_of_their_range_are_shown_to_their_own_white():
    from imgtune_assets.core.report import display_white

    twelve_bit = np.random.default_rng(2).integers(0, 4096, (64, 64), dtype=np.uint16)
    white = display_white(twelve_bit, twelve_bit // 2, None)
    assert white == pytest.approx(np.percentile(twelve_bit[::4, ::4], 99.9))  # the row's brightest decides
    assert 3900 < white <= 4095
    full = twelve_bit * 16
    assert display_white(full, None, None) == 65535.0  # data that fills the 16 bits is shown as it is
    assert display_white(np.zeros((8, 8), np.uint8), None, None) == 65535.0  # (8-bit pictures: not its concern)
