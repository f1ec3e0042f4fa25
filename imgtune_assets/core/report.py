"""The sweep report: leaderboard, the best pipeline as a reusable sweep file, and plots.

Plain module (no Dagster). Every file is written atomically.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from imgtune_assets.core.files import atomic_write_all
from imgtune_assets.core.sampling import Dimension, search_space, trial_index
from imgtune_assets.core.sweepfile import Sweep, fixed_sweep_document

if TYPE_CHECKING:  # pandas is imported when a report is made, not when the Dagster code loads
    import pandas as pd


_preparing: threading.Thread | None = None


def prepare_in_background() -> threading.Thread:
    """Import what drawing a report needs (pandas, matplotlib with its Agg backend) in a background
    thread, once per process. The sweep's fan-out calls it when its last tasks leave a CPU idle: the
    imports then cost no wall time, instead of coming after the last trial, before the first figure."""
    global _preparing
    if _preparing is None:
        _preparing = threading.Thread(target=_import_plotting, name="imgtune-report-imports", daemon=True)
        _preparing.start()
    return _preparing


def _import_plotting() -> None:
    import matplotlib
    import pandas  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


@dataclass
class ReportFiles:
    leaderboard: Path
    per_image: Path
    best_pipeline: Path | None
    plots: dict[str, Path]
    plot_png: dict[str, bytes]  # the plots' bytes, as written (for embedding without reading them back)


def leaderboard(sweep: Sweep, records: list[dict[str, Any]]) -> pd.DataFrame:
    """Every trial: rank (completed trials only), parameters, score, runtime, status."""
    import pandas as pd

    dims = [d.name for d in search_space(sweep)]
    staged = STAGED_COLUMNS if any(rec.get("round") is not None for rec in records) else []
    rows = []
    for rec in records:
        row = {"trial": rec["trial"], "status": rec["status"], "score": rec["score"]}
        row.update({c: rec.get(c) for c in staged})
        for name in dims:
            row[name] = rec["params"].get(name)
        row.update({"seconds": rec["seconds"], "images_scored": rec["images_scored"],
                    "images_failed": rec["images_failed"], "error": rec.get("error")})
        rows.append(row)
    columns = ["rank", "trial", "status", "score", *staged, *dims, "seconds", "images_scored", "images_failed",
               "error"]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)
    frame["order"] = frame["trial"].map(trial_index)  # trial-1000 after trial-999, not after trial-100
    ok = frame["status"].eq("ok") & frame["score"].notna()
    ranked = frame[ok].sort_values(["score", "order"], ascending=[not sweep.higher_is_better, True])
    ranked.insert(0, "rank", range(1, len(ranked) + 1))
    # Below the complete trials: pruned ones, furthest rung first, then by partial mean; then the failed.
    pruned = frame["status"].eq("pruned") & ~ok
    stopped = frame[pruned].sort_values(["rung", "partial_score", "order"],
                                        ascending=[False, not sweep.higher_is_better, True]) if staged else frame[pruned]
    rest = pd.concat([stopped, frame[~ok & ~pruned].sort_values("order")])
    rest.insert(0, "rank", pd.NA)
    board = pd.concat([ranked, rest], ignore_index=True) if len(rest) else ranked.reset_index(drop=True)
    return board[columns]


# Leaderboard columns of a staged search (core/search.py).
STAGED_COLUMNS = ["round", "source", "rung", "partial_score", "estimated_score"]


def evaluations(records: list[dict[str, Any]]) -> int:
    """Image evaluations the recorded trials cost (a pruned trial's images scored, not all)."""
    return sum(len(rec.get("per_image", [])) for rec in records)


def top_params(records: list[dict[str, Any]], higher_is_better: bool, k: int) -> list[dict[str, Any]]:
    """The parameters of the best ``k`` trials in the leaderboard's order, best first (the next sweep's
    warm starts): complete trials by score, then — where successive halving left fewer than ``k``
    complete — pruned ones, furthest rung first, then by partial mean."""
    sign = -1.0 if higher_is_better else 1.0
    ok = [r for r in records if r["status"] == "ok" and r["score"] is not None]
    pruned = [r for r in records if r["status"] == "pruned" and r.get("partial_score") is not None]
    ranked = (sorted(ok, key=lambda r: (sign * r["score"], trial_index(r["trial"])))
              + sorted(pruned, key=lambda r: (-(r.get("rung") or 0), sign * r["partial_score"],
                                              trial_index(r["trial"]))))
    return [r["params"] for r in ranked[:k]]


def fixed_pipeline(sweep: Sweep) -> list[dict[str, Any]] | None:
    """The stages of a sweep that searches nothing (a best_pipeline.yaml run as a sweep), as the file
    writes them (``{"op": ..., <param>: value}``), for the report to show in place of best parameters
    it has none of; None when the sweep searches a parameter."""
    if any(stage.searched for stage in sweep.pipeline):
        return None
    return [{"op": stage.op, **stage.fixed} for stage in sweep.pipeline]


def best_record(records: list[dict[str, Any]], higher_is_better: bool) -> dict[str, Any] | None:
    """The winning trial: best score among completed trials, ties to the lowest trial index (the
    leaderboard's order). Chosen once per report; everything else reads it."""
    ok = [r for r in records if r["status"] == "ok" and r["score"] is not None]
    if not ok:
        return None
    sign = -1.0 if higher_is_better else 1.0
    return min(ok, key=lambda r: (sign * r["score"], trial_index(r["trial"])))


# Long side of the before/after pictures: twice a picture's width in the figure (10 inches at 90 dpi
# for three columns, ~290 pixels), so that a zoomed-in view stays sharp; a 12 MP photo is shown, not
# stored, and matplotlib's own resampling of larger pictures is what drawing the figure costs.
PANEL_PIXELS = 640


def _shown(image: np.ndarray | None) -> np.ndarray | None:
    import cv2

    if image is None or max(image.shape[:2]) <= PANEL_PIXELS:
        return image
    scale = PANEL_PIXELS / max(image.shape[:2])
    return cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                      interpolation=cv2.INTER_AREA)


def before_after_panels(best: dict[str, Any], rows: list, data_dir, higher_is_better: bool
                        ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """The best trial's best- and worst-scored images: (label, before, after, target), decoding only
    those two (``data_dir`` a local folder or an object-store location); the pipeline runs on the
    full image, the pictures are scaled down to ``PANEL_PIXELS``."""
    from imgtune_assets.core.imageio import read_image
    from imgtune_assets.core.ops import apply_pipeline

    scored = [p for p in best["per_image"] if p["score"] is not None]
    if not scored:
        return []
    ordered = sorted(scored, key=lambda p: p["score"], reverse=higher_is_better)
    picks = [("best image " + ordered[0]["id"], ordered[0]["id"])]
    if len(ordered) > 1:
        picks.append(("worst image " + ordered[-1]["id"], ordered[-1]["id"]))
    stages = [(op, params) for op, params in best["stages"]]
    by_id = {r.id: r for r in rows}

    def panel(pick: tuple[str, str]) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None]:
        label, image_id = pick
        row = by_id[image_id]
        image = read_image(data_dir / row.image_path)
        target = read_image(data_dir / row.target_path) if row.target_path else None
        return label, _shown(image), _shown(apply_pipeline(image, stages)), _shown(target)

    # The two pictures side by side: decoding and the pipeline run in OpenCV, outside the GIL.
    with ThreadPoolExecutor(max_workers=len(picks), thread_name_prefix="imgtune-panel") as pool:
        return list(pool.map(panel, picks))


def _png(fig, compress_level: int | None = None) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt  # (after the figure's matplotlib.use("Agg"))

    buffer = io.BytesIO()
    # Every figure is laid out by matplotlib's constrained layout: bbox_inches="tight" would only draw
    # it a second time to find the same box.
    extra = {"pil_kwargs": {"compress_level": compress_level}} if compress_level is not None else {}
    try:
        fig.savefig(buffer, format="png", dpi=90, **extra)
    finally:
        plt.close(fig)
    return buffer.getvalue()


# Explicit ticks at every odd value of an odd range up to this many values; beyond, whole numbers.
MAX_ODD_TICKS = 10


def whole_number_ticks(ax, dim: Dimension) -> None:
    """Ticks at whole numbers only on the x axis of an ``int`` or ``odd`` parameter (left alone for the
    others, and on a log axis, whose ticks are powers of ten): matplotlib's default ticks fall between
    the values, at 3.5 or 4.5 of a parameter that is 3, 5 or 7. A short odd range is ticked at its
    values; a longer one, or an int range, at whole numbers matplotlib picks."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if dim.range.type not in ("int", "odd") or dim.range.log:
        return
    start, step, count = dim.integer_grid()
    if dim.range.type == "odd" and count <= MAX_ODD_TICKS:
        ax.xaxis.set_major_locator(FixedLocator([start + step * k for k in range(count)]))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_score_vs_params(sweep: Sweep, board: pd.DataFrame) -> bytes:
    return _png(score_vs_params_figure(sweep, board))


def score_vs_params_figure(sweep: Sweep, board: pd.DataFrame):
    """The figure of ``score_vs_params.png``: the score against each searched parameter (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = search_space(sweep)
    ok = board[board["status"].eq("ok")]
    pruned = board[board["status"].eq("pruned")] if "partial_score" in board else board.iloc[:0]
    n = max(1, len(dims))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    # At most 1,000 px wide at 90 dpi: the UI's metadata dialog shows about 1,100 without scrolling.
    fig, axes = plt.subplots(rows, cols, figsize=(3.7 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    best = ok.iloc[0] if len(ok) else None
    for ax, dim in zip(axes.flat, dims):
        values = ok[dim.name]
        if dim.range.type == "choice":
            labels = [str(v) for v in dim.range.values]
            xs = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels)
        else:
            xs = values.astype(float)
            if dim.range.log:
                from matplotlib.ticker import NullFormatter, ScalarFormatter

                ax.set_xscale("log")
                # Plain numbers, and no crowded minor labels, on a log axis.
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_formatter(NullFormatter())
        if len(ok):  # no empty series: its legend entry would show a trial that does not exist
            ax.scatter(xs, ok["score"], s=18, alpha=0.75, color="#4f6bed", label="complete")
        if len(pruned):  # at their partial mean: over their first images only, so not ranked with the others
            px = ([[str(v) for v in dim.range.values].index(str(v)) for v in pruned[dim.name]]
                  if dim.range.type == "choice" else pruned[dim.name].astype(float))
            ax.scatter(px, pruned["partial_score"].astype(float), s=14, alpha=0.6, facecolors="none",
                       edgecolors="#868e96", label="pruned (partial mean)")
        if best is not None:
            bx = str(best[dim.name]) if dim.range.type == "choice" else float(best[dim.name])
            if dim.range.type == "choice":
                bx = [str(v) for v in dim.range.values].index(bx)
            ax.scatter([bx], [best["score"]], s=80, marker="*", color="#e8590c", label="best")
        whole_number_ticks(ax, dim)
        ax.set_xlabel(dim.name)
        ax.set_ylabel(sweep.objective.metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(dims):]:
        ax.axis("off")
    if not dims:
        axes.flat[0].text(0.5, 0.5, "no searched parameters", ha="center")
    elif len(pruned):
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{sweep.name}: {sweep.objective.metric} against each searched parameter")
    return fig


def plot_best_so_far(sweep: Sweep, records: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(records, key=lambda r: trial_index(r["trial"]))
    xs, ys, best_xs, best_ys = [], [], [], []
    best = None
    for i, rec in enumerate(ordered):
        if rec["status"] != "ok" or rec["score"] is None:
            continue
        xs.append(i)
        ys.append(rec["score"])
        if best is None or (rec["score"] > best if sweep.higher_is_better else rec["score"] < best):
            best = rec["score"]
        best_xs.append(i)
        best_ys.append(best)
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 3.4), layout="constrained")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are whole numbers
    ax.scatter(xs, ys, s=14, alpha=0.6, color="#4f6bed", label="trial score")
    ax.step(best_xs, best_ys, where="post", color="#e8590c", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(sweep.objective.metric)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")  # (a fixed corner hid the points that reached it)
    ax.set_title(f"{sweep.name}: best {sweep.objective.metric} so far")
    return _png(fig)


def plot_search_progress(sweep: Sweep, records: list[dict[str, Any]]) -> bytes:
    """A staged search: best complete score so far against image evaluations and against wall time,
    each trial shown where it settled, coloured by what proposed it, hollow when pruned."""
    return _png(search_progress_figure(sweep, records))


def search_progress_figure(sweep: Sweep, records: list[dict[str, Any]]):
    """The figure of ``search_progress.png`` (the caller closes it). The legend lists only what is
    drawn: no "pruned" entry for a search that pruned nothing (no early stopping), no source whose
    trials all failed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(records, key=lambda r: (r.get("finished_at") or 0.0, trial_index(r["trial"])))
    # From the start of the first round on record (a resumed search includes the time it was stopped).
    start = min((r.get("round_started_at") or r["finished_at"] for r in ordered if r.get("finished_at")), default=0.0)
    evals, spent = 0, []
    for rec in ordered:
        evals += len(rec.get("per_image", []))
        spent.append((evals, (rec.get("finished_at") or start) - start))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained", sharey=True)
    sources = sorted({rec.get("source") or "?" for rec in ordered})
    colours = dict(zip(sources, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    drawn, any_pruned = set(), False
    for ax, axis, label in ((axes[0], 0, "image evaluations"), (axes[1], 1, "wall time (s)")):
        best, xs, ys = None, [], []
        for rec, point in zip(ordered, spent):
            value = rec["score"] if rec["status"] == "ok" else rec.get("partial_score")
            if value is None:
                continue
            pruned = rec["status"] != "ok"
            drawn.add(rec.get("source") or "?")
            any_pruned = any_pruned or pruned
            ax.scatter([point[axis]], [value], s=16, alpha=0.7, marker="o",
                       facecolors="none" if pruned else colours[rec.get("source") or "?"],
                       edgecolors=colours[rec.get("source") or "?"])
            if not pruned and (best is None or (value > best if sweep.higher_is_better else value < best)):
                best = value
            if best is not None:
                xs.append(point[axis])
                ys.append(best)
        ax.step(xs, ys, where="post", color="#e8590c", label="best so far (complete trials)" if xs else None)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    for source, colour in colours.items():
        if source in drawn:
            axes[1].scatter([], [], color=colour, s=16, label=f"proposed by {source}")
    if any_pruned:
        axes[1].scatter([], [], facecolors="none", edgecolors="grey", s=16, label="pruned (partial mean)")
    axes[0].set_ylabel(sweep.objective.metric)
    if drawn:  # (nothing to name when no trial has a score)
        axes[1].legend(loc="lower right" if sweep.higher_is_better else "upper right", fontsize=7)
    fig.suptitle(f"{sweep.name}: how the search went")
    return fig


def display_white(*images: np.ndarray | None) -> float:
    """The value shown as white for a row of 16-bit pictures: 65535, unless they fill only part of the 16
    bits (a 12-bit camera's or a microscope's data), which would show nearly black — then their 99.9th
    percentile, one for the row so that before, after and target stay comparable."""
    sixteen = [image[::4, ::4] for image in images if image is not None and image.dtype == np.uint16]
    if not sixteen:
        return 65535.0
    top = max(float(np.percentile(image, 99.9)) for image in sixteen)
    return 65535.0 if top >= 65535 / 4 else max(top, 1.0)


def plot_before_after(panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]) -> bytes:
    """Rows of (label, before, after, target) images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 3, figsize=(10, 3.4 * len(panels)), squeeze=False, layout="constrained")
    for row, (label, before, after, target) in zip(axes, panels):
        white = display_white(before, after, target)
        for ax, title, image in zip(row, ("before", "after", "target"), (before, after, target)):
            ax.axis("off")
            if image is None:
                ax.set_title(f"{title}: none")
                continue
            shown = image.astype(np.float32) / (white if image.dtype == np.uint16 else 255.0)
            if shown.ndim == 3:
                ax.imshow(shown[:, :, ::-1].clip(0, 1))
            else:
                ax.imshow(shown, cmap="gray", vmin=0, vmax=1)
            stretched = f" (shown 0–{white:.0f})" if image.dtype == np.uint16 and white < 65535 else ""
            ax.set_title(f"{label} — {title}{stretched}", fontsize=9)
    # Photographs deflate slowly and little: zlib's fastest level costs a sixth more bytes, not a third
    # of the figure's drawing time.
    return _png(fig, compress_level=1)


def write_report(
    sweep: Sweep,
    records: list[dict[str, Any]],
    out_dir: Path,
    *,
    best: dict[str, Any] | None,
    before_after: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]] | Future | None = None,
    board: pd.DataFrame | None = None,
    also: Mapping[Path, bytes] | None = None,
) -> tuple[pd.DataFrame, ReportFiles]:
    """Write the report files; ``best`` is ``best_record(...)``, ``board`` is ``leaderboard(sweep, records)``
    when the caller has it. ``before_after`` (``before_after_panels``) may still be being computed, as a
    ``Future``: it is waited for last, after the other plots. The files (with ``also``: the caller's
    ``report.json``) are written as one set (``files.atomic_write_all``): a full disk leaves the last
    report whole, not part of it replaced; files an earlier report had and this one has not go with it."""
    import pandas as pd

    out_dir = Path(out_dir)
    if board is None:
        board = leaderboard(sweep, records)
    leaderboard_path, per_image_path = out_dir / "leaderboard.csv", out_dir / "per_image_scores.csv"
    per_image_rows = [
        {"trial": rec["trial"], "image": r["id"], "score": r["score"], "seconds": r["seconds"], "error": r["error"]}
        for rec in records for r in rec["per_image"]
    ]
    contents: dict[Path, bytes] = {
        leaderboard_path: board.to_csv(index=False).encode(),
        per_image_path: pd.DataFrame(per_image_rows, columns=["trial", "image", "score", "seconds", "error"])
        .to_csv(index=False).encode(),
    }
    gone: list[Path] = []
    best_path = out_dir / "best_pipeline.yaml" if best is not None else None
    if best is not None:
        doc = fixed_sweep_document(sweep, [(op, params) for op, params in best["stages"]], name=f"{sweep.name}-best")
        header = (f"# Best pipeline of sweep {sweep.name!r}: {best['trial']}, "
                  f"{sweep.objective.metric} = {best['score']:.6g}.\n# Every parameter is fixed; run it as a sweep "
                  "file (IMGTUNE_SWEEP) or read the stages.\n")
        contents[best_path] = (header + yaml.safe_dump(doc, sort_keys=False)).encode()
    else:  # no winner this time: an earlier report's best pipeline must not be read as this one's
        gone.append(out_dir / "best_pipeline.yaml")
    png = {"score_vs_params": plot_score_vs_params(sweep, board), "best_so_far": plot_best_so_far(sweep, records)}
    if any(rec.get("round") is not None for rec in records):
        png["search_progress"] = plot_search_progress(sweep, records)
    else:
        gone.append(out_dir / "plots" / "search_progress.png")
    if isinstance(before_after, Future):
        before_after = before_after.result()
    if before_after:
        png["best_trial_images"] = plot_before_after(before_after)
    else:
        gone.append(out_dir / "plots" / "best_trial_images.png")
    plots = {name: out_dir / "plots" / f"{name}.png" for name in png}
    contents.update({plots[name]: data for name, data in png.items()})
    atomic_write_all({**contents, **(also or {})}, remove=gone)
    return board, ReportFiles(leaderboard=leaderboard_path, per_image=per_image_path, best_pipeline=best_path,
                              plots=plots, plot_png=png)
