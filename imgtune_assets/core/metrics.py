"""Image-quality metrics that a sweep maximizes or minimizes (numpy + OpenCV only).

Every metric is registered in ``METRICS`` with its direction and the kind of input it
compares; ``score()`` is the entry point used by the rest of the package:

* ``"image"`` metrics (psnr, ssim, mae) compare intensities. If one input is grey and
  the other BGR, ``score()`` converts the BGR one to grey (``cv2.COLOR_BGR2GRAY``).
  If the dtypes differ (e.g. uint8 pred, uint16 target), the raw functions rescale the
  target to the pred's data range, as float64, before comparing; the pred's dtype
  therefore sets the data range ``R``.
* ``"mask"`` metrics (dice, iou, edge_f1) compare binary masks (pixel > 0). Any
  3-channel array is collapsed to 2-D by a max over channels.
* ``"no_reference"`` metrics (sharpness) look at the pred alone.

Inputs must be uint8 or uint16 arrays (float32/float64 in [0, 1] are also accepted for
intensity metrics), 2-D grey or HxWx3; anything else raises ``MetricInputError``.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np

__all__ = [
    "METRICS",
    "MetricInputError",
    "MetricSpec",
    "data_range",
    "dice",
    "edge_f1",
    "iou",
    "mae",
    "metric_options",
    "psnr",
    "score",
    "sharpness",
    "ssim",
]

PSNR_CAP_DB = 100.0
"""PSNR of identical images (and the ceiling for all PSNRs): keeps means and plots finite."""

_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5  # as scipy.ndimage.gaussian_filter used by skimage
_SSIM_RADIUS = int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5)  # 5 -> an 11-tap window
_SSIM_WIN = 2 * _SSIM_RADIUS + 1
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _gaussian_kernel() -> np.ndarray:
    # Built explicitly (not cv2.getGaussianKernel) so the taps are exactly the ones
    # scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5) uses.
    x = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / _SSIM_SIGMA) ** 2)
    return (k / k.sum()).reshape(-1, 1)


_SSIM_KERNEL = _gaussian_kernel()
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))

_INT_RANGES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float64))


class MetricInputError(ValueError):
    """Inputs a metric cannot use; the message names the metric input and the problem."""


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: ``fn(pred, target, **options) -> float`` plus how to read it."""

    name: str
    fn: Callable[..., float]
    higher_is_better: bool
    needs_target: bool
    kind: str  # "image" | "mask" | "no_reference"
    doc: str = ""
    # The smallest width and height it scores: the manifest skips smaller images, with the reason,
    # rather than fail every trial on them.
    min_side: int = 1


def data_range(dtype) -> float:
    """Full-scale value of a pixel type: 255 (uint8), 65535 (uint16), 1.0 (float)."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise MetricInputError(f"not a pixel type: {dtype!r}") from exc
    if dt in _INT_RANGES:
        return _INT_RANGES[dt]
    if dt in _FLOAT_TYPES:
        return 1.0
    raise MetricInputError(
        f"unsupported pixel type {dt} (need uint8 or uint16, or float32/float64 in [0, 1])"
    )


# ----------------------------------------------------------------------------- checks


def _check_array(a, role: str, *, allow_float: bool) -> np.ndarray:
    """Check one input's type, dtype and shape; return it unchanged."""
    if not isinstance(a, np.ndarray):
        raise MetricInputError(f"{role} must be a numpy array, got {type(a).__name__}")
    dt = a.dtype
    if dt not in _INT_RANGES and not (allow_float and dt in _FLOAT_TYPES):
        allowed = "uint8 or uint16" + (" (or float32/float64 in [0, 1])" if allow_float else "")
        raise MetricInputError(f"{role} has unsupported dtype {dt}; need {allowed}")
    if a.ndim == 3:
        if a.shape[2] != 3:
            raise MetricInputError(
                f"{role} has {a.shape[2]} channels (shape {a.shape}); "
                "need 2-D grey or HxWx3 BGR"
            )
    elif a.ndim != 2:
        raise MetricInputError(
            f"{role} must be 2-D grey or HxWx3 BGR, got {a.ndim}-D shape {a.shape}"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise MetricInputError(f"{role} is empty (shape {a.shape})")
    if dt in _FLOAT_TYPES and not np.isfinite(a).all():
        # NaN/inf would silently poison the score and the optimizer's comparisons.
        raise MetricInputError(f"{role} contains NaN or infinite values")
    return a


def _check_same_hw(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape[:2] != target.shape[:2]:
        raise MetricInputError(
            f"pred and target differ in size: pred shape {pred.shape}, "
            f"target shape {target.shape} (need the same height and width)"
        )


def _image_pair(pred, target, peak: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Validate an intensity pair; return (pred, target in pred's units, R): R is pred's dtype's full
    scale, or ``peak`` (the metric's ``data_range`` option, in pred's units) when given."""
    _check_array(pred, "pred", allow_float=True)
    _check_array(target, "target", allow_float=True)
    if pred.shape != target.shape:
        raise MetricInputError(
            f"pred and target differ in shape: pred shape {pred.shape}, "
            f"target shape {target.shape} (score() adapts grey vs BGR)"
        )
    r = data_range(pred.dtype)
    if target.dtype != pred.dtype:
        # Mixed bit depths: express target in pred's units so R is unambiguous.
        target = target.astype(np.float64) * (r / data_range(target.dtype))
    if peak is not None:
        if not 0 < peak <= r:
            raise MetricInputError(f"the objective's data_range {peak!r} is not within 0 < data_range <= {r:g} "
                                   f"(the full scale of this {pred.dtype} image)")
        r = float(peak)
    return pred, target, r


def _collapse(mask: np.ndarray) -> np.ndarray:
    # A mask is per pixel: a pixel is set if any channel is.
    return mask.max(axis=2) if mask.ndim == 3 else mask


def _mask_pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    """Validate a mask pair; return both binarized (> 0) as 2-D bool arrays."""
    _check_array(pred, "pred", allow_float=False)
    _check_array(target, "target", allow_float=False)
    _check_same_hw(pred, target)
    return _collapse(pred) > 0, _collapse(target) > 0


# ---------------------------------------------------------------------- image metrics


def psnr(pred, target, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, ``10*log10(R^2/MSE)`` with R from pred's dtype, or
    ``data_range`` (e.g. 4095 for 12-bit data stored in 16-bit files).

    Colour MSE is over all channels. Capped at ``PSNR_CAP_DB`` (100 dB), which is also
    the value for identical images, so results stay finite and identical always ranks
    at least as high as near-identical.
    """
    pred, target, r = _image_pair(pred, target, data_range)
    if pred.dtype != target.dtype:
        pred = pred.astype(np.float64)
    # cv2.norm accumulates in double (exact for integer pixels) without temporaries.
    mse = cv2.norm(pred, target, cv2.NORM_L2SQR) / pred.size
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(r * r / mse))


def _blur(a: np.ndarray) -> np.ndarray:
    # BORDER_REFLECT == scipy 'reflect' (d c b a | a b c d) as in skimage; it only
    # touches the cropped border, but keeps the full map equal to skimage's too.
    return cv2.sepFilter2D(
        a, cv2.CV_64F, _SSIM_KERNEL, _SSIM_KERNEL, borderType=cv2.BORDER_REFLECT
    )


def _ssim_plane(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """SSIM map of two contiguous 2-D float64 planes.

    One plane at a time: single-channel filtering over contiguous temporaries is faster than
    filtering a stacked multi-channel array.
    """
    ux, uy = _blur(x), _blur(y)
    uxx, uyy, uxy = _blur(x * x), _blur(y * y), _blur(x * y)
    uxuy, ux2, uy2 = ux * uy, ux * ux, uy * uy
    c1 = (_SSIM_K1 * r) ** 2
    c2 = (_SSIM_K2 * r) ** 2
    # Population covariances (Wang et al. 2004): E[xy] - E[x]E[y].
    num = (2.0 * uxuy + c1) * (2.0 * (uxy - uxuy) + c2)
    den = (ux2 + uy2 + c1) * ((uxx - ux2) + (uyy - uy2) + c2)
    return num / den


def ssim(pred, target, data_range: float | None = None) -> float:
    """Mean structural similarity (Wang et al. 2004), Gaussian window sigma 1.5 (11x11).

    K1=0.01, K2=0.03, L = pred's data range, population covariances; the mean excludes
    a 5-pixel border. Colour is the mean of per-channel SSIM. Matches
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=L)``. Needs images of at least 11x11. ``data_range``
    sets L (e.g. 4095 for 12-bit data stored in 16-bit files: with 65535 the constants C1 and C2 swamp
    such images' variances, and SSIM ranks a smoothing pipeline below the identity).
    """
    pred, target, r = _image_pair(pred, target, data_range)
    h, w = pred.shape[:2]
    if h < _SSIM_WIN or w < _SSIM_WIN:
        raise MetricInputError(
            f"ssim needs images of at least {_SSIM_WIN}x{_SSIM_WIN} pixels, "
            f"got pred shape {pred.shape}"
        )
    p = _SSIM_RADIUS
    if pred.ndim == 2:
        pred, target = pred[:, :, None], target[:, :, None]
    channels = pred.shape[2]
    total = 0.0
    for c in range(channels):
        total += _ssim_plane_mean(pred[:, :, c], target[:, :, c], r) / ((h - 2 * p) * (w - 2 * p))
    return total / channels


# Rows of a plane scored at once: the SSIM map's float64 temporaries (a dozen, each the size of the
# band) stay a few hundred MB on the widest photos, instead of a dozen copies of the whole plane.
SSIM_BAND_ROWS = 256


def _ssim_plane_mean(pred: np.ndarray, target: np.ndarray, r: float, band_rows: int = SSIM_BAND_ROWS) -> float:
    """The sum of the SSIM map over the plane without its ``_SSIM_RADIUS`` border, band by band: each band
    with the window's reach of rows above and below it, so every kept value is the whole plane's."""
    h, w = pred.shape[:2]
    p = _SSIM_RADIUS
    total = 0.0
    for top in range(p, h - p, band_rows):
        bottom = min(top + band_rows, h - p)
        first, last = top - p, min(h, bottom + p)
        x = np.ascontiguousarray(pred[first:last], dtype=np.float64)
        y = np.ascontiguousarray(target[first:last], dtype=np.float64)
        total += float(_ssim_plane(x, y, r)[top - first : bottom - first, p : w - p].sum(dtype=np.float64))
    return total


def mae(pred, target, data_range: float | None = None) -> float:
    """Mean absolute error divided by the data range (pred's dtype's full scale, or ``data_range``);
    lower is better."""
    pred, target, r = _image_pair(pred, target, data_range)
    if pred.dtype != target.dtype:
        pred = pred.astype(np.float64)
    return cv2.norm(pred, target, cv2.NORM_L1) / (pred.size * r)


# ----------------------------------------------------------------------- mask metrics


def dice(pred, target) -> float:
    """Dice coefficient ``2|A∩B| / (|A|+|B|)`` of the masks ``pred > 0``, ``target > 0``.

    Both empty -> 1.0 (they agree perfectly).
    """
    a, b = _mask_pair(pred, target)
    na, nb = np.count_nonzero(a), np.count_nonzero(b)
    if na + nb == 0:
        return 1.0
    return 2.0 * np.count_nonzero(a & b) / (na + nb)


def iou(pred, target) -> float:
    """Intersection over union ``|A∩B| / |A∪B|`` of the binarized masks; both empty -> 1.0."""
    a, b = _mask_pair(pred, target)
    union = np.count_nonzero(a | b)
    if union == 0:
        return 1.0
    return np.count_nonzero(a & b) / union


def _inner_boundary(fg: np.ndarray) -> np.ndarray:
    """Foreground pixels with a background 4-neighbour.

    cv2.erode's default border value never erodes, so the image border does not
    create edges: a region touching the border has no edge along it.
    """
    u8 = fg.view(np.uint8)
    eroded = cv2.erode(u8, _CROSS)
    return fg & (eroded == 0)


def _within(points: np.ndarray, edges: np.ndarray, tol: float) -> int:
    """How many ``points`` pixels lie within ``tol`` (Euclidean, <=) of an ``edges`` pixel."""
    # distanceTransform measures from each nonzero pixel to the nearest zero pixel,
    # so the edges are the zeros.
    src = np.where(edges, np.uint8(0), np.uint8(1))
    dist = cv2.distanceTransform(src, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # The precise transform returns float32 sqrt of integer squared distances; the
    # slack absorbs float32 rounding (e.g. sqrt(5)) but is far below the gap between
    # distinct pixel distances.
    return int(np.count_nonzero(dist[points] <= tol + 1e-6 * max(1.0, tol)))


def edge_f1(pred, target, tolerance: float = 2.0) -> float:
    """Boundary F-measure with a pixel ``tolerance`` (Euclidean distance, inclusive).

    Pred edges are the nonzero pixels of pred. Target edges are the inner boundary of
    ``target > 0`` (foreground pixels with a background 4-neighbour; the image border
    is not background), so a 1-pixel-wide edge map is its own boundary, except pixels
    whose four neighbours are all edges (e.g. the centre of a "+" crossing).
    Precision/recall count pred/target edge pixels within tolerance of the other set.
    Both sets empty -> 1.0; exactly one empty -> 0.0.
    """
    try:
        tol = float(tolerance)
    except (TypeError, ValueError) as exc:
        raise MetricInputError(f"edge_f1 tolerance must be a number, got {tolerance!r}") from exc
    if not math.isfinite(tol) or tol < 0:
        raise MetricInputError(f"edge_f1 tolerance must be finite and >= 0, got {tolerance!r}")
    pe, fg = _mask_pair(pred, target)
    te = _inner_boundary(fg)
    n_pred, n_target = np.count_nonzero(pe), np.count_nonzero(te)
    if n_pred == 0 and n_target == 0:
        return 1.0
    if n_pred == 0 or n_target == 0:
        return 0.0
    precision = _within(pe, te, tol) / n_pred
    recall = _within(te, pe, tol) / n_target
    if precision + recall == 0.0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- no-reference metrics


def sharpness(pred, target=None) -> float:
    """Variance of the Laplacian of pred scaled to [0, 1] by its data range; higher is sharper.

    Laplacian kernel [0,1,0;1,-4,1;0,1,0] (cv2 ksize=1) with cv2's default
    BORDER_REFLECT_101. Colour: the variance pools the Laplacians of all channels.
    ``target`` is ignored.
    """
    _check_array(pred, "pred", allow_float=True)
    r = data_range(pred.dtype)
    # The Laplacian is linear, so scale the variance by 1/R^2 instead of the image by
    # 1/R; for integer pixels the Laplacian is then exact.
    lap = cv2.Laplacian(pred, cv2.CV_64F, ksize=1)
    return float(lap.var()) / (r * r)


# --------------------------------------------------------------------------- registry

METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        MetricSpec("psnr", psnr, True, True, "image", "peak signal-to-noise ratio, dB (cap 100)"),
        MetricSpec("ssim", ssim, True, True, "image", "structural similarity, Gaussian 11x11", min_side=_SSIM_WIN),
        MetricSpec("mae", mae, False, True, "image", "mean absolute error / data range"),
        MetricSpec("dice", dice, True, True, "mask", "Dice overlap of pixel > 0 masks"),
        MetricSpec("iou", iou, True, True, "mask", "intersection over union of pixel > 0 masks"),
        MetricSpec("edge_f1", edge_f1, True, True, "mask", "boundary F1 within a pixel tolerance"),
        MetricSpec(
            "sharpness", sharpness, True, False, "no_reference", "variance of the Laplacian"
        ),
    )
}


def _to_grey(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.float64:
        # cvtColor has no float64 path; same BT.601 weights without a float32 round trip.
        return image @ np.array([0.114, 0.587, 0.299])
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


@functools.lru_cache(maxsize=None)
def _option_names(fn: Callable[..., float]) -> frozenset[str]:
    params = list(inspect.signature(fn).parameters.values())[2:]
    return frozenset(p.name for p in params)


def metric_options(name: str) -> frozenset[str]:
    """The keyword options metric ``name`` takes (its function's parameters after pred, target)."""
    return _option_names(METRICS[name].fn)


def score(metric: str, pred: np.ndarray, target: np.ndarray | None, **options) -> float:
    """Compute ``metric`` for pred (against target), adapting channels to the metric kind."""
    spec = METRICS.get(metric)
    if spec is None:
        raise MetricInputError(
            f"unknown metric {metric!r}; known metrics: {', '.join(sorted(METRICS))}"
        )
    unknown = set(options) - _option_names(spec.fn)
    if unknown:
        allowed = ", ".join(sorted(_option_names(spec.fn))) or "none"
        raise MetricInputError(
            f"metric {metric!r} got unknown option(s) {', '.join(sorted(unknown))}; "
            f"allowed: {allowed}"
        )
    is_mask = spec.kind == "mask"
    _check_array(pred, "pred", allow_float=not is_mask)
    if not spec.needs_target:
        return float(spec.fn(pred, None, **options))
    if target is None:
        raise MetricInputError(f"metric {metric!r} needs a target image, got None")
    _check_array(target, "target", allow_float=not is_mask)
    _check_same_hw(pred, target)
    if is_mask:
        pred, target = _collapse(pred), _collapse(target)
    elif pred.ndim != target.ndim:
        if pred.ndim == 3:
            pred = _to_grey(pred)
        else:
            target = _to_grey(target)
    return float(spec.fn(pred, target, **options))


def improves(a: float, b: float, higher_is_better: bool) -> bool:
    """Whether score ``a`` is better than ``b`` in the metric's direction (a tie is not)."""
    return a > b if higher_is_better else a < b


def improvement(score: float, baseline: float, higher_is_better: bool) -> float:
    """How much better ``score`` is than ``baseline``, in the metric's units: positive when better,
    whichever way the metric goes (an MAE down from 0.25 to 0.01 is an improvement of 0.24)."""
    return score - baseline if higher_is_better else baseline - score


@dataclass(frozen=True)
class Objective:
    """What a sweep optimizes: a registered metric, its options (``tolerance`` for edge_f1) and the
    direction (the metric's own unless ``direction`` overrides it). One value, passed whole to every
    place that scores, ranks or labels."""

    metric: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    direction: str | None = None  # "maximize" | "minimize"; None: the metric's natural direction

    @property
    def spec(self) -> MetricSpec:
        return METRICS[self.metric]

    @property
    def higher_is_better(self) -> bool:
        if self.direction:
            return self.direction == "maximize"
        return self.spec.higher_is_better

    @property
    def needs_target(self) -> bool:
        return self.spec.needs_target

    def score(self, pred: np.ndarray, target: np.ndarray | None) -> float:
        return score(self.metric, pred, target, **self.options)

    def better(self, a: float, b: float | None) -> bool:
        """Whether score ``a`` beats ``b`` (``None``: nothing yet)."""
        return b is None or improves(a, b, self.higher_is_better)

    def to_dict(self) -> dict[str, Any]:
        """As written in a sweep file's ``objective:`` (also the identity baseline's cache key)."""
        return {"metric": self.metric, **({"direction": self.direction} if self.direction else {}), **self.options}
