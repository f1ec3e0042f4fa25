"""Metrics pinned to independent references (scikit-image, scipy, plain Python) on real
photographs bundled with scikit-image, with seeded noise and blur."""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage import data as skdata
from skimage import metrics as skm

from imgtune_assets.core import metrics as M
from imgtune_assets.core.metrics import METRICS, MetricInputError, score

# ------------------------------------------------------------------------------ inputs


@functools.cache
def photo(name: str) -> np.ndarray:
    """A bundled photo; astronaut is RGB, flipped to BGR as OpenCV would read it."""
    img = getattr(skdata, name)()
    if img.ndim == 3:
        img = np.ascontiguousarray(img[:, :, ::-1])
    img.setflags(write=False)
    return img


def noisy(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = img.astype(np.float64) + rng.normal(0.0, sigma, img.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def blurred(img: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigma)


def to16(img: np.ndarray) -> np.ndarray:
    return img.astype(np.uint16) * 257


def pair(name: str, degrade: str, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(pred, target): a degraded photo and the clean photo, at 8 or 16 bit."""
    target = photo(name)
    pred = noisy(target, 12.0, seed=len(name)) if degrade == "noise" else blurred(target)
    if depth == 16:
        return to16(pred), to16(target)
    return pred, target


CASES = [
    (name, degrade, depth)
    for name in ("camera", "astronaut", "brick", "moon")
    for degrade in ("noise", "blur")
    for depth in (8, 16)
]


def case_id(case) -> str:
    return "-".join(map(str, case))


# ------------------------------------------------------------------------ image metrics


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_psnr_matches_skimage(case):
    pred, target = pair(*case)
    want = skm.peak_signal_noise_ratio(target, pred, data_range=M.data_range(pred.dtype))
    assert M.psnr(pred, target) == pytest.approx(want, abs=1e-6)
    assert score("psnr", pred, target) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ssim_matches_skimage(case):
    pred, target = pair(*case)
    want = skm.structural_similarity(
        target,
        pred,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=M.data_range(pred.dtype),
        channel_axis=-1 if pred.ndim == 3 else None,
    )
    assert M.ssim(pred, target) == pytest.approx(want, abs=1e-4)


def test_ssim_matches_skimage_on_odd_small_float_crop():
    # Odd size and float64 input exercise the crop and the data range of 1.0.
    target = photo("coins")[100:131, 40:77].astype(np.float64) / 255.0
    pred = noisy(photo("coins"), 20.0)[100:131, 40:77].astype(np.float64) / 255.0
    want = skm.structural_similarity(
        target, pred, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0,
    )
    assert M.ssim(pred, target) == pytest.approx(want, abs=1e-4)


def test_float_psnr_matches_skimage():
    target = photo("camera").astype(np.float64) / 255.0
    pred = noisy(photo("camera"), 8.0).astype(np.float64) / 255.0
    want = skm.peak_signal_noise_ratio(target, pred, data_range=1.0)
    assert M.psnr(pred, target) == pytest.approx(want, abs=1e-6)
    # skimage stays in float32 for float32 pairs; ours accumulates in double.
    got32 = M.psnr(pred.astype(np.float32), target.astype(np.float32))
    assert got32 == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("case", CASES[:8], ids=case_id)
def test_mae_matches_integer_reference(case):
    pred, target = pair(*case)
    diff = np.abs(pred.astype(np.int64) - target.astype(np.int64))
    want = diff.sum() / diff.size / np.iinfo(pred.dtype).max
    assert M.mae(pred, target) == pytest.approx(want, rel=1e-12)
    assert 0.0 <= M.mae(pred, target) <= 1.0


def test_data_range_sets_the_peak_as_skimage_takes_it():
    # 12-bit data stored in 16 bits: the images' own range, not the dtype's, as skimage's data_range
    target = (photo("camera").astype(np.uint16) * 16)
    pred = np.clip(target.astype(np.float64) + np.random.default_rng(4).normal(0, 60, target.shape), 0,
                   4095).astype(np.uint16)
    assert score("psnr", pred, target, data_range=4095) == pytest.approx(
        skm.peak_signal_noise_ratio(target, pred, data_range=4095), abs=1e-6)
    assert score("ssim", pred, target, data_range=4095) == pytest.approx(skm.structural_similarity(
        target, pred, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=4095), abs=1e-4)
    diff = np.abs(pred.astype(np.int64) - target.astype(np.int64))
    assert score("mae", pred, target, data_range=4095) == pytest.approx(diff.mean() / 4095, rel=1e-12)
    # the dtype's range makes SSIM's constants swamp these variances: the scores differ a lot
    assert score("ssim", pred, target) > score("ssim", pred, target, data_range=4095) + 0.05
    with pytest.raises(MetricInputError, match=r"data_range 4095 is not within 0 < data_range <= 255 .*uint8"):
        score("psnr", (pred >> 4).astype(np.uint8), (target >> 4).astype(np.uint8), data_range=4095)


def test_mixed_bit_depth_rescales_target_to_pred_range():
    pred8 = noisy(photo("camera"), 10.0)
    target16 = to16(photo("camera"))
    target_in_8bit = target16.astype(np.float64) / 257.0
    want = skm.peak_signal_noise_ratio(target_in_8bit, pred8.astype(np.float64), data_range=255)
    assert score("psnr", pred8, target16) == pytest.approx(want, abs=1e-6)
    assert score("ssim", pred8, target16) == pytest.approx(
        M.ssim(pred8, photo("camera")), abs=1e-9
    )
    assert score("mae", pred8, target16) == pytest.approx(M.mae(pred8, photo("camera")), abs=1e-12)


def test_psnr_identical_is_capped_at_100():
    for img in (photo("camera"), to16(photo("moon")), photo("astronaut")):
        assert M.psnr(img, img.copy()) == 100.0
    # One grey level off in one pixel of a 512x512 image would exceed 100 dB uncapped.
    near = photo("camera").copy()
    near[0, 0] ^= 1
    assert M.psnr(near, photo("camera")) == 100.0


def test_psnr_decreases_as_noise_increases():
    target = photo("brick")
    values = [M.psnr(noisy(target, s), target) for s in (1, 3, 6, 12, 25, 50)]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_ssim_of_image_with_itself_is_one():
    for img in (photo("camera"), photo("astronaut"), to16(photo("coins"))):
        assert M.ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    assert M.ssim(noisy(photo("camera"), 20.0), photo("camera")) < 0.9


def test_score_converts_bgr_to_grey_for_image_metrics():
    bgr = photo("astronaut")
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    pred = noisy(grey, 10.0)
    for name in ("psnr", "ssim", "mae"):
        fn = METRICS[name].fn
        assert score(name, pred, bgr) == pytest.approx(fn(pred, grey), abs=1e-12)
        assert score(name, bgr, pred) == pytest.approx(fn(grey, pred), abs=1e-12)
    with pytest.raises(MetricInputError, match="shape"):
        M.psnr(pred, bgr)  # the raw function does not adapt channels


def test_score_converts_float64_bgr_to_grey():
    bgr = photo("astronaut").astype(np.float64) / 255.0
    grey = cv2.cvtColor(bgr.astype(np.float32), cv2.COLOR_BGR2GRAY).astype(np.float64)
    pred = noisy(photo("camera"), 1.0).astype(np.float64) / 255.0
    assert score("psnr", pred, bgr) == pytest.approx(M.psnr(pred, grey), abs=1e-4)


# ------------------------------------------------------------------------- mask metrics


@functools.cache
def coin_mask() -> np.ndarray:
    return (photo("coins") > 110).astype(np.uint8) * 255


def perturbed_masks() -> dict[str, np.ndarray]:
    mask = coin_mask() > 0
    rng = np.random.default_rng(3)
    speckled = mask ^ (rng.random(mask.shape) < 0.02)
    return {
        "shifted": np.roll(mask, (3, -2), axis=(0, 1)),
        "eroded": ndi.binary_erosion(mask, iterations=2),
        "dilated_noisy": ndi.binary_dilation(speckled),
        "otsu_of_blur": blurred(photo("coins"), 3.0) > 90,
    }


def coord_set(mask: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(*np.nonzero(mask)))


@pytest.mark.parametrize("variant", sorted(perturbed_masks()))
def test_dice_and_iou_match_set_reference(variant):
    target = coin_mask()
    pred = perturbed_masks()[variant].astype(np.uint16) * 1000
    a, b = coord_set(pred), coord_set(target)
    assert M.dice(pred, target) == pytest.approx(2 * len(a & b) / (len(a) + len(b)), rel=1e-12)
    assert M.iou(pred, target) == pytest.approx(len(a & b) / len(a | b), rel=1e-12)


def test_mask_metrics_collapse_channels_by_max():
    target = coin_mask()
    pred = perturbed_masks()["shifted"].astype(np.uint8) * 255
    bgr = np.zeros((*pred.shape, 3), np.uint8)
    bgr[:, :, 2] = pred  # only one channel set: max over channels keeps it
    for name in ("dice", "iou", "edge_f1"):
        assert score(name, bgr, target) == METRICS[name].fn(pred, target)
        assert score(name, target, bgr) == METRICS[name].fn(target, pred)


def test_dice_iou_edge_cases():
    empty = np.zeros((20, 30), np.uint8)
    left = empty.copy()
    left[:, :10] = 1
    right = empty.copy()
    right[:, 20:] = 7
    assert M.dice(empty, empty) == M.iou(empty, empty) == 1.0
    assert M.dice(left, right) == M.iou(left, right) == 0.0
    assert M.dice(left, left * 200) == M.iou(left, left) == 1.0


CROSS = ndi.generate_binary_structure(2, 1)


def ref_edge_f1(pred: np.ndarray, target: np.ndarray, tol: float) -> float:
    """Brute force: scipy erosion for the boundary, k-d tree for nearest distances."""
    pe = pred > 0
    fg = target > 0
    # border_value=1: outside the image counts as foreground, so no edge along the border.
    te = fg & ~ndi.binary_erosion(fg, structure=CROSS, border_value=1)
    p, t = np.argwhere(pe), np.argwhere(te)
    if len(p) == 0 and len(t) == 0:
        return 1.0
    if len(p) == 0 or len(t) == 0:
        return 0.0
    d_p, _ = cKDTree(t).query(p)
    d_t, _ = cKDTree(p).query(t)
    precision = np.mean(d_p <= tol)
    recall = np.mean(d_t <= tol)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def edge_preds() -> dict[str, np.ndarray]:
    coins = photo("coins")
    out = {"canny": cv2.Canny(blurred(coins, 1.5), 50, 150)}
    for name, m in perturbed_masks().items():
        m = m.astype(np.uint8)
        out[f"boundary_{name}"] = m - cv2.erode(m, None)  # 8-neighbour boundary, thicker
    return out


@pytest.mark.parametrize("tol", [0.0, 1.0, 2.0, 3.5, math.sqrt(2), math.sqrt(5), 2.236])
@pytest.mark.parametrize("source", sorted(edge_preds()))
def test_edge_f1_matches_brute_force(source, tol):
    pred = edge_preds()[source]
    target = coin_mask()
    want = ref_edge_f1(pred, target, tol)
    assert M.edge_f1(pred, target, tolerance=tol) == pytest.approx(want, abs=1e-12)
    assert 0.0 <= want < 1.0  # non-trivial inputs


def test_edge_f1_tolerance_is_inclusive_and_exact_at_sqrt5():
    # Boundary of a mask eroded twice sits at distances 2, sqrt(5), ...: float32
    # distances must not push sqrt(5) past tolerance sqrt(5), nor under 2.236.
    pred = edge_preds()["boundary_eroded"]
    target = coin_mask()
    at, below = M.edge_f1(pred, target, math.sqrt(5)), M.edge_f1(pred, target, 2.236)
    assert at > below + 0.1


def test_edge_f1_thin_edge_map_is_its_own_target():
    edges = np.zeros((64, 80), np.uint8)
    cv2.circle(edges, (40, 32), 20, 255, 1)
    cv2.line(edges, (2, 60), (70, 3), 255, 1)
    assert M.edge_f1(edges, edges, tolerance=0) == 1.0
    shifted = np.roll(edges, 1, axis=1)
    assert M.edge_f1(shifted, edges, tolerance=0) < 0.5
    assert M.edge_f1(shifted, edges, tolerance=1) == 1.0


def test_edge_f1_image_border_makes_no_edge():
    full = np.full((40, 50), 255, np.uint8)
    empty = np.zeros_like(full)
    assert M.edge_f1(empty, full) == 1.0  # no edges on either side
    half = full.copy()
    half[:, 25:] = 0
    expected = np.zeros_like(full)
    expected[:, 24] = 1  # only the interior split, not the image frame
    assert M.edge_f1(expected, half, tolerance=0) == 1.0
    assert M.edge_f1(empty, half) == 0.0
    assert M.edge_f1(expected, empty) == 0.0


# ----------------------------------------------------------------- no-reference metrics


def ref_sharpness(img: np.ndarray) -> float:
    x = img.astype(np.float64) / np.iinfo(img.dtype).max
    # 'mirror' is cv2's default BORDER_REFLECT_101; per channel, since ndi.laplace on a
    # 3-D array would also differentiate across channels.
    planes = x[:, :, None] if x.ndim == 2 else x
    lap = np.stack([ndi.laplace(planes[:, :, c], mode="mirror") for c in range(planes.shape[2])])
    return float(lap.var())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sharpness_matches_scipy_laplace(case):
    pred, _ = pair(*case)
    assert M.sharpness(pred) == pytest.approx(ref_sharpness(pred), rel=1e-6)
    assert score("sharpness", pred, None) == M.sharpness(pred)


def test_sharpness_drops_with_blur_and_ignores_target():
    img = photo("brick")
    values = [M.sharpness(img)] + [M.sharpness(blurred(img, s)) for s in (0.7, 1.5, 3.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert M.sharpness(to16(img)) == pytest.approx(M.sharpness(img), rel=1e-9)
    assert score("sharpness", img, photo("camera")) == M.sharpness(img)


# ------------------------------------------------------------------------------- errors


def test_shape_mismatch_names_both_shapes():
    a, b = photo("camera"), photo("coins")
    for name in METRICS:
        if METRICS[name].needs_target:
            with pytest.raises(MetricInputError, match=r"\(512, 512\).*\(303, 384\)"):
                score(name, a, b)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.int8, np.float16])
def test_wrong_dtype_is_named(dtype):
    bad = photo("camera").astype(dtype)
    for name in METRICS:
        with pytest.raises(MetricInputError, match=np.dtype(dtype).name):
            score(name, bad, photo("camera"))
        if METRICS[name].needs_target:
            with pytest.raises(MetricInputError, match="target.*" + np.dtype(dtype).name):
                score(name, photo("camera"), bad)


def test_four_channels_and_bad_ndim_are_rejected():
    bgra = cv2.cvtColor(photo("astronaut"), cv2.COLOR_BGR2BGRA)
    with pytest.raises(MetricInputError, match="4 channels"):
        score("psnr", bgra, photo("astronaut"))
    with pytest.raises(MetricInputError, match="4 channels"):
        score("dice", photo("camera"), bgra)
    with pytest.raises(MetricInputError, match="1-D"):
        score("sharpness", np.zeros(100, np.uint8), None)
    with pytest.raises(MetricInputError, match="empty"):
        score("mae", np.zeros((0, 5), np.uint8), np.zeros((0, 5), np.uint8))
    with pytest.raises(MetricInputError, match="numpy array"):
        score("psnr", [[1, 2], [3, 4]], np.zeros((2, 2), np.uint8))


def test_ssim_too_small():
    small = photo("camera")[:10, :40]
    with pytest.raises(MetricInputError, match="11x11"):
        score("ssim", small, small)
    assert M.ssim(photo("camera")[:11, :11], photo("camera")[:11, :11]) == pytest.approx(1.0)


def test_unknown_metric_lists_known_ones():
    with pytest.raises(MetricInputError, match="'psnrr'.*edge_f1.*psnr.*ssim"):
        score("psnrr", photo("camera"), photo("camera"))


def test_other_bad_inputs():
    cam = photo("camera")
    with pytest.raises(MetricInputError, match="needs a target"):
        score("psnr", cam, None)
    with pytest.raises(MetricInputError, match="float64"):
        score("iou", cam.astype(np.float64), cam)  # masks must be integer
    with pytest.raises(MetricInputError, match="NaN"):
        score("psnr", np.full(cam.shape, np.nan, np.float32), cam.astype(np.float32))
    with pytest.raises(MetricInputError, match="tolerance"):
        score("edge_f1", cam, cam, tolerance=-1)
    with pytest.raises(MetricInputError, match="tolerance"):
        score("edge_f1", cam, cam, tolerance=float("nan"))
    with pytest.raises(MetricInputError, match="unknown option.*tol"):
        score("edge_f1", cam, cam, tol=2)
    with pytest.raises(MetricInputError, match="unsupported pixel type"):
        M.data_range(np.int16)


# ----------------------------------------------------------------------------- registry


def test_registry_directions_and_kinds():
    expected = {
        "psnr": (True, "image"),
        "ssim": (True, "image"),
        "mae": (False, "image"),
        "dice": (True, "mask"),
        "iou": (True, "mask"),
        "edge_f1": (True, "mask"),
        "sharpness": (True, "no_reference"),
    }
    assert {n: (s.higher_is_better, s.kind) for n, s in METRICS.items()} == expected
    assert all(s.needs_target == (n != "sharpness") for n, s in METRICS.items())
    assert all(s.name == n and s.doc for n, s in METRICS.items())
    assert (M.data_range(np.uint8), M.data_range(np.uint16), M.data_range(np.float32)) == (
        255.0, 65535.0, 1.0,
    )


def test_results_are_python_floats():
    pred, target = pair("camera", "noise", 8)
    for name in METRICS:
        assert type(score(name, pred, target)) is float


def test_improvement_is_positive_when_better_whichever_way_the_metric_goes():
    assert M.improvement(31.5, 28.0, higher_is_better=True) == pytest.approx(3.5)
    assert M.improvement(0.01, 0.25, higher_is_better=False) == pytest.approx(0.24)
    assert M.improvement(0.30, 0.25, higher_is_better=False) == pytest.approx(-0.05)


def test_each_metric_scores_images_of_its_minimum_side_and_refuses_smaller_ones():
    rng = np.random.default_rng(5)
    for name, spec in METRICS.items():
        if not spec.needs_target:
            continue
        side = spec.min_side
        a, b = (rng.integers(0, 256, (side, side + 3), dtype=np.uint8) for _ in range(2))
        assert np.isfinite(score(name, a, b)), name
        if side > 1:
            with pytest.raises(MetricInputError, match=f"at least {side}x{side}"):
                score(name, a[: side - 1], b[: side - 1])


def test_ssim_in_bands_is_ssim_of_the_whole_plane():
    # bands of 7 rows over a 67-row image: every band edge inside, one short last band
    target = photo("camera")[:67, :90]
    pred = noisy(photo("camera"), 15.0)[:67, :90]
    x, y = pred.astype(np.float64), target.astype(np.float64)
    whole = M._ssim_plane(x, y, 255.0)[5:62, 5:85].sum(dtype=np.float64)
    for rows in (1, 7, 56, 57, 1000):
        assert M._ssim_plane_mean(pred, target, 255.0, band_rows=rows) == pytest.approx(whole, rel=1e-12)
