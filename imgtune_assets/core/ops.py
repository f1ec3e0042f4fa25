"""Registry of OpenCV image-processing stages ("ops") with typed, validated parameters.

Every op takes a uint8 or uint16 image, grey (2-D) or BGR (H, W, 3), and returns the same
dtype and channel layout, except ``to_gray``, ``threshold`` and ``canny`` which return 2-D.

Intensity-like parameters follow one convention so a sweep means the same thing on 8- and
16-bit data: ``bilateral_filter.sigma_color``, ``nl_means.h``, ``threshold.c`` and the
``canny`` thresholds are in 8-bit units (scaled by 257, or applied to an 8-bit copy, for
uint16). ``threshold.thresh`` (fixed method) is the exception: it is in the image's own units,
which is why its range reaches 65535.

OpenCV 5.0 dtype gaps worked around here (checked against opencv-python-headless 5.0.0):
medianBlur is 8-bit only for ksize > 5; bilateralFilter is 8u/32f only; fastNlMeansDenoising
accepts 16-bit only with NORM_L1 and fastNlMeansDenoisingColored is 8UC3 only; CLAHE accepts
8UC1/16UC1 only; Lab conversion has no 16-bit path; Canny, adaptiveThreshold and equalizeHist
are 8-bit only; LUT is 8-bit only. Otsu thresholding does accept 16UC1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

__all__ = [
    "OPS",
    "OpParamError",
    "OpSpec",
    "ParamSpec",
    "apply_pipeline",
    "apply_stage",
    "check_image",
    "validate_stage",
]

_KINDS = ("int", "float", "odd", "choice", "bool")
_DTYPE_MAX = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}


class OpParamError(ValueError):
    """A pipeline stage names an unknown op or parameter, or a parameter value is invalid."""


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _is_real_number(value: Any) -> bool:
    # bool is an int subclass in Python and numpy; a YAML `true` must never pass as 1.
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class ParamSpec:
    """Type, default and allowed range of one op parameter."""

    name: str
    kind: str
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"ParamSpec {self.name!r}: unknown kind {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"ParamSpec {self.name!r}: kind 'choice' needs choices")

    def _fail(self, where: str, problem: str, value: Any) -> OpParamError:
        return OpParamError(f"{_prefix(where)}parameter {self.name!r} {problem}, got {value!r}")

    def _check_range(self, value: float, where: str, original: Any) -> None:
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            raise self._fail(where, f"must be in [{lo}, {hi}]", original)

    def validate(self, value: Any, where: str = "") -> Any:
        """Return ``value`` coerced to this parameter's type, or raise OpParamError."""
        if self.kind == "bool":
            if isinstance(value, (bool, np.bool_)):
                return bool(value)
            raise self._fail(where, "must be a boolean (true/false)", value)

        if self.kind == "choice":
            for choice in self.choices:
                if isinstance(choice, str):
                    if isinstance(value, str) and value == choice:
                        return choice
                elif _is_real_number(value) and _is_real_number(choice) and value == choice:
                    return choice
            allowed = ", ".join(repr(c) for c in self.choices)
            raise self._fail(where, f"must be one of {allowed}", value)

        if not _is_real_number(value):
            expected = "a number" if self.kind == "float" else "an integer"
            raise self._fail(where, f"must be {expected}", value)
        if not math.isfinite(float(value)):
            raise self._fail(where, "must be finite", value)

        if self.kind == "float":
            out: Any = float(value)
        else:
            if float(value) != math.floor(float(value)):
                raise self._fail(where, "must be an integer", value)
            out = int(value)
            if self.kind == "odd" and out % 2 == 0:
                raise self._fail(where, "must be odd", value)
        self._check_range(out, where, value)
        return out


@dataclass(frozen=True)
class OpSpec:
    """One registered op: its parameters and ``fn(image, **validated_params) -> image``."""

    name: str
    params: dict[str, ParamSpec]
    fn: Callable[..., np.ndarray]
    doc: str = ""


# --------------------------------------------------------------------------- image helpers


def check_image(image: Any) -> None:
    """Raise ValueError unless ``image`` is a non-empty uint8/uint16 grey or BGR ndarray."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy.ndarray, got {type(image).__name__}")
    if image.dtype not in _DTYPE_MAX:
        raise ValueError(f"image dtype must be uint8 or uint16, got {image.dtype}")
    if image.ndim == 2:
        pass
    elif image.ndim == 3 and image.shape[2] == 3:
        pass
    else:
        raise ValueError(
            f"image must be 2-D (grey) or 3-D with 3 channels (BGR), got shape {image.shape}"
        )
    if image.size == 0:
        raise ValueError(f"image must not be empty, got shape {image.shape}")


def _prep(image: Any) -> np.ndarray:
    check_image(image)
    return np.ascontiguousarray(image)


def _finish(out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # OpenCV drops a trailing length-1 channel axis on some paths; normalise regardless.
    if out.ndim == 3 and out.shape[2] == 1:
        out = out[:, :, 0]
    if out.dtype != dtype:
        raise AssertionError(f"internal error: op produced {out.dtype}, expected {dtype}")
    return np.ascontiguousarray(out)


def _from_float(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip float results into ``dtype`` (never wrap around)."""
    return np.clip(np.rint(values), 0, _DTYPE_MAX[dtype]).astype(dtype)


def _to_u8(image: np.ndarray) -> np.ndarray:
    """16-bit -> 8-bit with rounding; 8-bit passes through."""
    if image.dtype == np.uint8:
        return image
    return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _grey(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def _mask_to_dtype(mask_u8: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A 0/255 uint8 mask -> 0/dtype-max of ``dtype``."""
    if dtype == np.uint8:
        return mask_u8
    return mask_u8.astype(np.uint16) * np.uint16(257)


def _on_luminance(image: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a grey->grey ``fn`` to the image, or to the Lab L channel of a BGR image.

    uint8 uses OpenCV's 8-bit Lab. uint16 has no 16-bit Lab conversion in OpenCV, so it goes
    through float32 Lab with L (0..100) mapped onto the full 0..65535 range for ``fn``.
    """
    if image.ndim == 2:
        return fn(image)
    if image.dtype == np.uint8:
        lab = cv2.cvtColor(image, cv2.COLOR_BGR2Lab)
        lab[:, :, 0] = fn(np.ascontiguousarray(lab[:, :, 0]))
        return cv2.cvtColor(lab, cv2.COLOR_Lab2BGR)
    lab = cv2.cvtColor(image.astype(np.float32) / 65535.0, cv2.COLOR_BGR2Lab)
    l16 = _from_float(lab[:, :, 0] * (65535.0 / 100.0), np.dtype(np.uint16))
    lab[:, :, 0] = fn(l16).astype(np.float32) * (100.0 / 65535.0)
    bgr = cv2.cvtColor(lab, cv2.COLOR_Lab2BGR)
    return _from_float(bgr * 65535.0, np.dtype(np.uint16))


# --------------------------------------------------------------------------- op functions


def _identity(image: np.ndarray) -> np.ndarray:
    img = _prep(image)
    return img.copy()  # a copy so callers mutating the result never touch the source


def _to_gray(image: np.ndarray) -> np.ndarray:
    img = _prep(image)
    return _finish(img.copy() if img.ndim == 2 else _grey(img), img.dtype)


def _gaussian_blur(image: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
    img = _prep(image)
    return _finish(cv2.GaussianBlur(img, (ksize, ksize), sigma), img.dtype)


def _box_blur(image: np.ndarray, ksize: int) -> np.ndarray:
    img = _prep(image)
    return _finish(cv2.blur(img, (ksize, ksize)), img.dtype)


def _median_blur(image: np.ndarray, ksize: int) -> np.ndarray:
    img = _prep(image)
    if img.dtype == np.uint8 or ksize <= 5:
        return _finish(cv2.medianBlur(img, ksize), img.dtype)
    # OpenCV has no 16-bit (or float) median for ksize > 5. scipy's 'nearest' mode is the
    # same border replication OpenCV uses, so the result is exact and consistent.
    size = (ksize, ksize) if img.ndim == 2 else (ksize, ksize, 1)
    from scipy import ndimage  # imported here: it is slow to import and only this path needs it

    return _finish(ndimage.median_filter(img, size=size, mode="nearest"), img.dtype)


def _bilateral_filter(
    image: np.ndarray, d: int, sigma_color: float, sigma_space: float
) -> np.ndarray:
    """sigma_color is in 8-bit units; for uint16 it is scaled by 257 and run in float32."""
    img = _prep(image)
    if img.dtype == np.uint8:
        return _finish(cv2.bilateralFilter(img, d, sigma_color, sigma_space), img.dtype)
    out = cv2.bilateralFilter(img.astype(np.float32), d, sigma_color * 257.0, sigma_space)
    return _finish(_from_float(out, img.dtype), img.dtype)


# The 16-bit (L1) path's h, in 8-bit units, per 8-bit (L2) h: with these a 16-bit image is smoothed as
# much as its 8-bit version (measured on scikit-image's photographs with noise σ 10 and 20, h 6–30, by
# the mean change: grey within 10 %; colour within 2 % from h 20, up to 20 % less below; 1.0 smoothed
# grey up to twice as much).
NL_MEANS_L1_GREY = 0.8
NL_MEANS_L1_COLOUR = 0.9


def _nl_means(
    image: np.ndarray, h: float, template_window_size: int, search_window_size: int
) -> np.ndarray:
    """h is in 8-bit units.

    uint8 grey: standard L2 fastNlMeansDenoising. uint8 BGR: fastNlMeansDenoisingColored with
    hColor = h, which denoises the lightness of OpenCV's linear-BGR Lab alone with ``h`` and its two
    colour channels together with ``hColor``. uint16: OpenCV only supports NORM_L1, with h scaled by
    257 and by ``NL_MEANS_L1_GREY`` or ``NL_MEANS_L1_COLOUR``; BGR uint16 takes
    fastNlMeansDenoisingColored's own steps in 16 bits (``_nl_means_colour_u16``). The same h then
    smooths a 16-bit image about as much as its 8-bit version (see the constants' comment;
    imgtune_assets_tests/core/test_ops.py): a pipeline tuned on 8-bit photos applies to 16-bit ones.
    """
    img = _prep(image)
    tw, sw = template_window_size, search_window_size
    if img.dtype == np.uint8:
        if img.ndim == 2:
            out = cv2.fastNlMeansDenoising(img, None, h, tw, sw)
        else:
            out = cv2.fastNlMeansDenoisingColored(img, None, h, h, tw, sw)
    elif img.ndim == 2:
        out = cv2.fastNlMeansDenoising(
            img, [h * 257.0 * NL_MEANS_L1_GREY], templateWindowSize=tw, searchWindowSize=sw, normType=cv2.NORM_L1
        )
    else:
        out = _nl_means_colour_u16(img, h * NL_MEANS_L1_COLOUR, tw, sw)
    return _finish(out, img.dtype)


def _nl_means_colour_u16(img: np.ndarray, h: float, tw: int, sw: int) -> np.ndarray:
    """fastNlMeansDenoisingColored's steps for a 16-bit BGR image, which it refuses: to Lab from
    linear BGR (its COLOR_LBGR2Lab), lightness denoised alone and the two colour channels together,
    each in 16 bits as its 8-bit Lab holds them (L over the whole range, a and b offset by 128),
    then back. (Denoising B, G and R jointly instead smoothed far less than the 8-bit path.)"""
    lab = cv2.cvtColor(img.astype(np.float32) / 65535.0, cv2.COLOR_LBGR2Lab)
    lightness = _from_float(lab[:, :, 0] * (65535.0 / 100.0), np.dtype(np.uint16))
    colour = _from_float((lab[:, :, 1:] + 128.0) * 257.0, np.dtype(np.uint16))
    options = {"templateWindowSize": tw, "searchWindowSize": sw, "normType": cv2.NORM_L1}
    lightness = cv2.fastNlMeansDenoising(lightness, [h * 257.0], **options)
    colour = cv2.fastNlMeansDenoising(colour, [h * 257.0, h * 257.0], **options)
    lab = np.dstack([lightness.astype(np.float32) * (100.0 / 65535.0), colour.astype(np.float32) / 257.0 - 128.0])
    return _from_float(cv2.cvtColor(lab, cv2.COLOR_Lab2LBGR) * 65535.0, np.dtype(np.uint16))


def _clahe(image: np.ndarray, clip_limit: float, tile_grid_size: int) -> np.ndarray:
    """Colour images are equalised on Lab lightness only, so hues are preserved.

    OpenCV's 16-bit CLAHE divides clip_limit over 65536 histogram bins instead of 256, which
    makes the same clip_limit a near no-op on 16-bit data; it is scaled by 256 so a given
    value behaves comparably on uint8 and uint16.
    """
    img = _prep(image)

    def run(grey: np.ndarray) -> np.ndarray:
        scale = 1.0 if grey.dtype == np.uint8 else 256.0
        clahe = cv2.createCLAHE(clipLimit=clip_limit * scale, tileGridSize=(tile_grid_size,) * 2)
        return clahe.apply(grey)

    return _finish(_on_luminance(img, run), img.dtype)


def _equalize_u16(grey: np.ndarray) -> np.ndarray:
    # Same cdf formula as cv2.equalizeHist (which is 8-bit only), over 65536 bins.
    hist = np.bincount(grey.ravel(), minlength=65536)
    cdf = np.cumsum(hist)
    first = hist[np.flatnonzero(hist)[0]]
    total = grey.size
    if total == first:  # flat image: OpenCV leaves it unchanged too
        return grey.copy()
    lut = np.clip(np.rint((cdf - first) * (65535.0 / (total - first))), 0, 65535)
    return lut.astype(np.uint16)[grey]


def _equalize_hist(image: np.ndarray) -> np.ndarray:
    """Global histogram equalisation, on Lab lightness for colour images."""
    img = _prep(image)

    def run(grey: np.ndarray) -> np.ndarray:
        return cv2.equalizeHist(grey) if grey.dtype == np.uint8 else _equalize_u16(grey)

    return _finish(_on_luminance(img, run), img.dtype)


def _unsharp_mask(image: np.ndarray, ksize: int, sigma: float, amount: float) -> np.ndarray:
    img = _prep(image)
    src = img.astype(np.float32)
    blur = cv2.GaussianBlur(src, (ksize, ksize), sigma)
    return _finish(_from_float(src + amount * (src - blur), img.dtype), img.dtype)


def _gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """out = max * (in / max) ** gamma; gamma < 1 brightens, > 1 darkens."""
    img = _prep(image)
    top = float(_DTYPE_MAX[img.dtype])
    if img.dtype == np.uint8:
        lut = _from_float(top * (np.arange(256) / top) ** gamma, img.dtype)
        return _finish(cv2.LUT(img, lut), img.dtype)
    out = top * (img.astype(np.float64) / top) ** gamma
    return _finish(_from_float(out, img.dtype), img.dtype)


def _threshold(
    image: np.ndarray, method: str, thresh: float, block_size: int, c: float, invert: bool
) -> np.ndarray:
    """Binary 2-D output with values 0 / dtype max.

    fixed: ``thresh`` in the image's own units (pixel > thresh). otsu: native on both depths
    (OpenCV 5 supports 16-bit Otsu). mean/gaussian (adaptive): OpenCV is 8-bit only, so
    uint16 is decided on a rounded 8-bit copy and ``c`` is in 8-bit units.
    """
    img = _prep(image)
    grey = _grey(img)
    top = _DTYPE_MAX[img.dtype]
    kind = cv2.THRESH_BINARY_INV if invert else cv2.THRESH_BINARY
    if method == "fixed":
        out = cv2.threshold(grey, thresh, top, kind)[1]
    elif method == "otsu":
        out = cv2.threshold(grey, 0, top, kind | cv2.THRESH_OTSU)[1]
    else:
        adaptive = cv2.ADAPTIVE_THRESH_MEAN_C if method == "mean" else cv2.ADAPTIVE_THRESH_GAUSSIAN_C
        mask = cv2.adaptiveThreshold(_to_u8(grey), 255, adaptive, kind, block_size, c)
        out = _mask_to_dtype(mask, img.dtype)
    return _finish(out, img.dtype)


_MORPH_OPS = {
    "open": cv2.MORPH_OPEN,
    "close": cv2.MORPH_CLOSE,
    "erode": cv2.MORPH_ERODE,
    "dilate": cv2.MORPH_DILATE,
    "gradient": cv2.MORPH_GRADIENT,
    "tophat": cv2.MORPH_TOPHAT,
    "blackhat": cv2.MORPH_BLACKHAT,
}
_MORPH_SHAPES = {"rect": cv2.MORPH_RECT, "ellipse": cv2.MORPH_ELLIPSE, "cross": cv2.MORPH_CROSS}


def _morphology(
    image: np.ndarray, operation: str, shape: str, ksize: int, iterations: int
) -> np.ndarray:
    img = _prep(image)
    kernel = cv2.getStructuringElement(_MORPH_SHAPES[shape], (ksize, ksize))
    out = cv2.morphologyEx(img, _MORPH_OPS[operation], kernel, iterations=iterations)
    return _finish(out, img.dtype)


def _canny(
    image: np.ndarray, threshold1: float, threshold2: float, aperture_size: int, l2_gradient: bool
) -> np.ndarray:
    """Edges as a 2-D 0/max mask. Canny is 8-bit only: colour -> grey, uint16 -> /257."""
    img = _prep(image)
    grey8 = _to_u8(_grey(img))
    edges = cv2.Canny(grey8, threshold1, threshold2, apertureSize=aperture_size, L2gradient=l2_gradient)
    return _finish(_mask_to_dtype(edges, img.dtype), img.dtype)


def _sobel(image: np.ndarray, ksize: int, scale: float, dx: int = 1, dy: int = 1) -> np.ndarray:
    """Derivative magnitude sqrt(Sobel(dx, 0)^2 + Sobel(0, dy)^2) * scale, per channel, clipped.

    The defaults (dx = dy = 1) give the usual gradient magnitude. dx = dy = 0 asks for no derivative:
    a sweep file that fixes both so is refused when it loads (``check_fixed``); a search that draws
    both 0 gets OpenCV's cv2.error at run time, and that trial is recorded as failed.
    """
    img = _prep(image)
    if dx == 0 and dy == 0:
        magnitude = np.abs(cv2.Sobel(img, cv2.CV_32F, 0, 0, ksize=ksize))  # OpenCV raises: no derivative
    elif dy == 0:
        magnitude = np.abs(cv2.Sobel(img, cv2.CV_32F, dx, 0, ksize=ksize))
    elif dx == 0:
        magnitude = np.abs(cv2.Sobel(img, cv2.CV_32F, 0, dy, ksize=ksize))
    else:
        gx = cv2.Sobel(img, cv2.CV_32F, dx, 0, ksize=ksize)
        gy = cv2.Sobel(img, cv2.CV_32F, 0, dy, ksize=ksize)
        magnitude = cv2.magnitude(gx, gy)
    return _finish(_from_float(magnitude * scale, img.dtype), img.dtype)


def _laplacian(image: np.ndarray, ksize: int, scale: float) -> np.ndarray:
    """|Laplacian| * scale, per channel, clipped to the dtype."""
    img = _prep(image)
    lap = cv2.Laplacian(img, cv2.CV_32F, ksize=ksize, scale=scale)
    return _finish(_from_float(np.abs(lap), img.dtype), img.dtype)


# --------------------------------------------------------------------------- registry


def _p(name: str, kind: str, default: Any, low=None, high=None, choices=(), doc="") -> ParamSpec:
    return ParamSpec(name, kind, default, low, high, tuple(choices), doc)


def _op(name: str, fn: Callable[..., np.ndarray], *params: ParamSpec, doc: str = "") -> OpSpec:
    return OpSpec(name, {p.name: p for p in params}, fn, doc or (fn.__doc__ or "").strip())


_ODD_KSIZES = (1, 3, 5, 7)

OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        _op("identity", _identity, doc="Return the image unchanged (baseline pipeline)."),
        _op("to_gray", _to_gray, doc="BGR -> grey; grey input passes through."),
        _op(
            "gaussian_blur",
            _gaussian_blur,
            _p("ksize", "odd", 5, 1, 99, doc="kernel width and height"),
            _p("sigma", "float", 0.0, 0, 50, doc="0 derives sigma from ksize"),
            doc="cv2.GaussianBlur with a square kernel.",
        ),
        _op("box_blur", _box_blur, _p("ksize", "int", 3, 1, 99), doc="cv2.blur (mean filter)."),
        _op("median_blur", _median_blur, _p("ksize", "odd", 5, 1, 31)),
        _op(
            "bilateral_filter",
            _bilateral_filter,
            _p("d", "int", 9, 1, 25, doc="neighbourhood diameter in pixels"),
            _p("sigma_color", "float", 75.0, 0.1, 500, doc="in 8-bit intensity units"),
            _p("sigma_space", "float", 75.0, 0.1, 100, doc="in pixels"),
        ),
        _op(
            "nl_means",
            _nl_means,
            _p("h", "float", 10.0, 0, 100, doc="filter strength in 8-bit units"),
            _p("template_window_size", "odd", 7, 3, 21),
            _p("search_window_size", "odd", 21, 3, 35),
        ),
        _op(
            "clahe",
            _clahe,
            _p("clip_limit", "float", 2.0, 0, 40, doc="0 disables clipping (plain adaptive HE)"),
            _p("tile_grid_size", "int", 8, 1, 32, doc="tiles per side"),
        ),
        _op("equalize_hist", _equalize_hist),
        _op(
            "unsharp_mask",
            _unsharp_mask,
            _p("ksize", "odd", 5, 1, 51),
            _p("sigma", "float", 1.0, 0, 20, doc="0 derives sigma from ksize"),
            _p("amount", "float", 1.0, 0, 5),
            doc="out = img + amount * (img - gaussian_blur(img)), clipped to the dtype.",
        ),
        _op("gamma", _gamma, _p("gamma", "float", 1.0, 0.05, 10)),
        _op(
            "threshold",
            _threshold,
            _p("method", "choice", "otsu", choices=("fixed", "otsu", "mean", "gaussian")),
            _p("thresh", "float", 127.0, 0, 65535, doc="fixed only; in the image's own units"),
            _p("block_size", "odd", 11, 3, 255, doc="adaptive (mean/gaussian) only"),
            _p("c", "float", 2.0, -255, 255, doc="adaptive only; 8-bit units"),
            _p("invert", "bool", False),
        ),
        _op(
            "morphology",
            _morphology,
            _p("operation", "choice", "open", choices=tuple(_MORPH_OPS)),
            _p("shape", "choice", "ellipse", choices=tuple(_MORPH_SHAPES)),
            _p("ksize", "int", 3, 1, 51),
            _p("iterations", "int", 1, 1, 20),
        ),
        _op(
            "canny",
            _canny,
            # In OpenCV's gradient units, which grow with aperture_size (7's Sobel weighs 640 x 255 per
            # direction): bounds that leave room for 5 and 7, whose thresholds are 10-100x 3's.
            _p("threshold1", "float", 100.0, 0, 1_000_000),
            _p("threshold2", "float", 200.0, 0, 1_000_000),
            _p("aperture_size", "choice", 3, choices=(3, 5, 7)),
            _p("l2_gradient", "bool", False),
        ),
        _op(
            "sobel",
            _sobel,
            _p("ksize", "choice", 3, choices=_ODD_KSIZES),
            _p("scale", "float", 1.0, 0, 100),
            _p("dx", "int", 1, 0, 2, doc="order of the x derivative (0 = none)"),
            _p("dy", "int", 1, 0, 2, doc="order of the y derivative (0 = none)"),
        ),
        _op(
            "laplacian",
            _laplacian,
            _p("ksize", "choice", 3, choices=_ODD_KSIZES),
            _p("scale", "float", 1.0, 0, 100),
        ),
    )
}


def _check_threshold(params: dict[str, Any], where: str) -> None:
    # Already implied by the 'odd' spec with low=3; kept explicit because adaptiveThreshold
    # asserts on it and specs could be loosened later.
    bs = params["block_size"]
    if params["method"] in ("mean", "gaussian") and (bs < 3 or bs % 2 == 0):
        raise OpParamError(f"{where}parameter 'block_size' must be odd and >= 3, got {bs!r}")


_CROSS_CHECKS: dict[str, Callable[[dict[str, Any], str], None]] = {"threshold": _check_threshold}


def _check_sobel_fixed(fixed: Mapping[str, Any], where: str) -> None:
    if fixed.get("dx") == 0 and fixed.get("dy") == 0:
        raise OpParamError(f"{where}dx and dy are both 0: sobel needs a derivative along x or y "
                           "(set dx or dy to 1 or 2, or search one of them)")


# Checks of the values a sweep file fixes, whatever its searched parameters draw: a combination that
# fails every trial is refused at load. (A searched one may still draw it; that trial fails alone.)
_FIXED_CHECKS: dict[str, Callable[[Mapping[str, Any], str], None]] = {"sobel": _check_sobel_fixed}


def check_fixed(op: str, fixed: Mapping[str, Any], where: str = "") -> None:
    """Refuse fixed values (defaults included) that no trial of ``op`` could run with."""
    check = _FIXED_CHECKS.get(op)
    if check is not None:
        check(fixed, _prefix(f"{where}: {op}" if where else op))


def validate_stage(op: str, params: Mapping[str, Any] | None, where: str = "") -> dict[str, Any]:
    """Validate one stage; return a full parameter dict (defaults filled, values coerced)."""
    spec = OPS.get(op) if isinstance(op, str) else None
    if spec is None:
        raise OpParamError(f"{_prefix(where)}unknown op {op!r}; known ops: {', '.join(sorted(OPS))}")
    loc = f"{where}: {op}" if where else op
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise OpParamError(f"{loc}: params must be a mapping, got {params!r}")
    unknown = [k for k in params if k not in spec.params]
    if unknown:
        known = ", ".join(spec.params) or "(none)"
        raise OpParamError(
            f"{loc}: unknown parameter {unknown[0]!r} (value {params[unknown[0]]!r}); "
            f"{op} accepts: {known}"
        )
    out = {
        name: pspec.validate(params[name] if name in params else pspec.default, loc)
        for name, pspec in spec.params.items()
    }
    check = _CROSS_CHECKS.get(op)
    if check is not None:
        check(out, _prefix(loc))
    return out


def apply_stage(image: np.ndarray, op: str, params: Mapping[str, Any]) -> np.ndarray:
    """Run one op. Params are re-validated (cheap, idempotent) so defaults are always filled."""
    validated = validate_stage(op, params)
    return OPS[op].fn(image, **validated)


def apply_pipeline(
    image: np.ndarray, stages: Sequence[tuple[str, Mapping[str, Any]]]
) -> np.ndarray:
    """Run stages in order; an empty pipeline returns a copy of the image."""
    out = _prep(image)
    if not stages:
        return out.copy()
    for i, (op, params) in enumerate(stages):
        validated = validate_stage(op, params, f"pipeline[{i}]")
        out = OPS[op].fn(out, **validated)
    return out
