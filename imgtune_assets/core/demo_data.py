"""Deterministic synthetic demo data sets (numpy + OpenCV only; nothing is downloaded).

Two sets, laid out as a sweep expects (``DATA/images/<stem>.png`` and ``DATA/targets/<stem>.png``):

* ``denoise``: 8-bit grey scenes (gradients, textures, shapes, text); the target is the clean
  scene and the image is the scene plus Gaussian noise (and, on every third image, a light
  sprinkle of salt-and-pepper). Stems ``scene_000``, ``scene_001``, ...
* ``segment``: 8-bit grey images of 3-8 blobs, ellipses and polygons (some cut by the border) on
  a textured, unevenly lit, noisy background; the target is the binary object mask (0/255).
  Stems ``cells_000``, ``cells_001``, ...

Every image is drawn from its own random generator seeded with ``(seed, index, set)``, so
the files depend only on those: the same seed gives byte-identical files, and asking for more
images leaves the first ones unchanged.

Command line::

    python -m imgtune_assets.core.demo_data {denoise|segment} OUT_DIR [--count N] [--size S] [--seed K]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from imgtune_assets.core.files import atomic_write_text
from imgtune_assets.core.imageio import IMAGE_SUFFIXES, write_png

__all__ = [
    "DEMO_KINDS",
    "DemoDataError",
    "MAX_SIZE",
    "MIN_SIZE",
    "ensure_demo_data",
    "main",
    "make_denoise_set",
    "make_segment_set",
]

MIN_SIZE = 64
MAX_SIZE = 2048
DEFAULT_COUNT = 24
DEFAULT_SIZE = 256
DEFAULT_SEEDS = {"denoise": 0, "segment": 1}
POLARITIES = ("bright", "dark", "mixed")

# A different stream per set, so the two sets never share noise even with equal seeds.
_STREAM = {"denoise": 0xD3, "segment": 0x5E}

_BACKGROUNDS = ("linear", "radial", "grating", "checker", "smooth_noise", "flat")
_FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_PLAIN,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
)
_WORDS = ("imgtune", "OpenCV", "denoise", "PSNR", "Ray", "Dagster", "sweep", "0123456789", "3.14159")


class DemoDataError(ValueError):
    """A bad argument for the demo data generator; the message names the argument."""


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DemoDataError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise DemoDataError(f"{name} must be {bound}, got {value}")
    return value


def _check_args(count: object, size: object, seed: object) -> tuple[int, int, int]:
    return (
        _check_int("count", count, 1),
        _check_int("size", size, MIN_SIZE, MAX_SIZE),
        _check_int("seed", seed, 0),
    )


def _rng(kind: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, _STREAM[kind]]))


# --------------------------------------------------------------------------- drawing helpers


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(size, dtype=np.float32)
    return axis[None, :], axis[:, None]  # x (1, S), y (S, 1): broadcast to (S, S)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Blurred white noise rescaled to [0, 1] (float32, size x size).

    Wide blurs run on a smaller noise grid that is then enlarged: same look, far less work.
    """
    factor = max(1, int(sigma // 3))
    small = -(-size // factor)
    field = rng.standard_normal((small, small), dtype=np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigmaX=sigma / factor, borderType=cv2.BORDER_REFLECT)
    if factor > 1:
        field = cv2.resize(field, (size, size), interpolation=cv2.INTER_LINEAR)
    low, high = float(field.min()), float(field.max())
    return (field - low) / max(high - low, 1e-6)


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """A float32 background in 0..255 of the given kind."""
    x, y = _coords(size)
    a, b = (float(v) for v in rng.uniform(15.0, 240.0, size=2))
    if abs(a - b) < 60.0:  # keep gradients and textures clearly visible
        b = a + 60.0 if a < 128.0 else a - 60.0
    if kind == "flat":
        return np.full((size, size), a, dtype=np.float32)
    if kind == "linear":
        theta = rng.uniform(0.0, 2.0 * math.pi)
        t = (x - size / 2) * math.cos(theta) + (y - size / 2) * math.sin(theta)
        t = t / (size * 0.75) + 0.5
        return (a + (b - a) * np.clip(t, 0.0, 1.0)).astype(np.float32)
    if kind == "radial":
        cx, cy = rng.uniform(0.2, 0.8, size=2) * size
        radius = rng.uniform(0.5, 0.9) * size
        t = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / radius
        return (a + (b - a) * np.clip(t, 0.0, 1.0)).astype(np.float32)
    if kind == "grating":
        theta = rng.uniform(0.0, math.pi)
        period = rng.uniform(size / 14.0, size / 4.0)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        t = (x * math.cos(theta) + y * math.sin(theta)) * (2.0 * math.pi / period) + phase
        return (0.5 * (a + b) + 0.5 * (b - a) * np.sin(t)).astype(np.float32)
    if kind == "checker":
        cell = int(rng.integers(max(size // 16, 4), max(size // 5, 6)))
        ox, oy = (int(v) for v in rng.integers(0, cell, size=2))
        xi = ((np.arange(size) + ox) // cell)[None, :]
        yi = ((np.arange(size) + oy) // cell)[:, None]
        return np.where((xi + yi) % 2 == 0, a, b).astype(np.float32)
    if kind == "smooth_noise":
        sigma = rng.uniform(size / 40.0, size / 12.0)
        return (a + (b - a) * _smooth_noise(rng, size, sigma)).astype(np.float32)
    raise ValueError(f"unknown background kind {kind!r}")


def _contrasting(rng: np.random.Generator, canvas: np.ndarray, x: float, y: float) -> int:
    """An intensity that stands out from the canvas around (x, y)."""
    size = canvas.shape[0]
    r = max(size // 16, 2)
    xi = int(np.clip(x, 0, size - 1))
    yi = int(np.clip(y, 0, size - 1))
    local = float(canvas[max(yi - r, 0): yi + r + 1, max(xi - r, 0): xi + r + 1].mean())
    return int(rng.integers(0, 80)) if local >= 128.0 else int(rng.integers(176, 256))


def _random_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, corners: int) -> np.ndarray:
    angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=corners))
    radii = radius * rng.uniform(0.55, 1.0, size=corners)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return np.round(pts).astype(np.int32).reshape(-1, 1, 2)


def _blob(rng: np.random.Generator, cx: float, cy: float, radius: float) -> np.ndarray:
    """A smooth star-shaped outline: radius modulated by a few low harmonics."""
    theta = np.linspace(0.0, 2.0 * math.pi, 72, endpoint=False)
    r = np.ones_like(theta)
    for k in (2, 3, 4):
        r += rng.uniform(0.0, 0.22 / (k - 1)) * np.cos(k * theta + rng.uniform(0.0, 2.0 * math.pi))
    r *= radius
    pts = np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)
    return np.round(pts).astype(np.int32).reshape(-1, 1, 2)


def _draw_shape(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Draw one random shape (filled or outlined, anti-aliased) onto a uint8 canvas in place."""
    size = canvas.shape[0]
    cx, cy = (float(v) for v in rng.uniform(0.05, 0.95, size=2) * size)
    radius = float(rng.uniform(0.05, 0.2) * size)
    shape = str(rng.choice(("circle", "rectangle", "polygon", "ellipse", "line", "patch")))
    value = _contrasting(rng, canvas, cx, cy) if rng.random() < 0.75 else int(rng.integers(0, 256))
    filled = bool(rng.random() < 0.55)
    thickness = -1 if filled else int(rng.integers(1, max(2, size // 64) + 2))
    center = (round(cx), round(cy))
    aa = cv2.LINE_AA
    if shape == "circle":
        cv2.circle(canvas, center, round(radius), value, thickness, aa)
    elif shape == "rectangle":
        w, h = (float(v) for v in rng.uniform(0.4, 1.0, size=2) * radius)
        cv2.rectangle(canvas, (round(cx - w), round(cy - h)), (round(cx + w), round(cy + h)), value, thickness, aa)
    elif shape == "ellipse":
        axes = (round(radius), round(radius * rng.uniform(0.3, 0.9)))
        cv2.ellipse(canvas, center, axes, float(rng.uniform(0, 180)), 0.0, 360.0, value, thickness, aa)
    elif shape == "polygon":
        pts = _random_polygon(rng, cx, cy, radius, int(rng.integers(3, 8)))
        if filled:
            cv2.fillPoly(canvas, [pts], value, aa)
        else:
            cv2.polylines(canvas, [pts], True, value, thickness, aa)
    elif shape == "line":
        theta = rng.uniform(0.0, math.pi)
        dx, dy = 1.5 * radius * math.cos(theta), 1.5 * radius * math.sin(theta)
        width = int(rng.integers(1, max(2, size // 48) + 2))
        cv2.line(canvas, (round(cx - dx), round(cy - dy)), (round(cx + dx), round(cy + dy)), value, width, aa)
    else:  # "patch": a polygon filled with a texture of its own
        texture_kind = str(rng.choice(("grating", "checker", "smooth_noise", "linear")))
        texture = np.clip(np.round(_background(rng, size, texture_kind)), 0, 255).astype(np.uint8)
        mask = np.zeros_like(canvas)
        cv2.fillPoly(mask, [_random_polygon(rng, cx, cy, radius * 1.3, int(rng.integers(4, 8)))], 255, aa)
        alpha = mask.astype(np.float32) / 255.0
        blended = canvas.astype(np.float32) * (1.0 - alpha) + texture.astype(np.float32) * alpha
        canvas[...] = np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _draw_text(rng: np.random.Generator, canvas: np.ndarray) -> None:
    size = canvas.shape[0]
    if rng.random() < 0.35:
        word = str(int(rng.integers(0, 100_000)))
    else:
        word = str(rng.choice(_WORDS))
    font = int(rng.choice(_FONTS))
    scale = float(rng.uniform(0.5, 1.8) * size / 256.0)
    if font == cv2.FONT_HERSHEY_PLAIN:
        scale *= 1.8  # the plain font is about half as tall as the others
    thickness = int(rng.integers(1, max(2, round(2 * size / 256)) + 1))
    (w, h), _ = cv2.getTextSize(word, font, scale, thickness)
    x = float(rng.uniform(-0.1 * w, max(size - 0.9 * w, 1.0)))
    y = float(rng.uniform(h, size))
    value = _contrasting(rng, canvas, x + w / 2, y - h / 2)
    cv2.putText(canvas, word, (round(x), round(y)), font, scale, value, thickness, cv2.LINE_AA)


def _clean_scene(rng: np.random.Generator, size: int, index: int) -> np.ndarray:
    kind = _BACKGROUNDS[index % len(_BACKGROUNDS)]  # cycle, so every set mixes kinds
    canvas = np.clip(np.round(_background(rng, size, kind)), 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        _draw_shape(rng, canvas)
    for _ in range(int(rng.integers(1, 4))):
        _draw_text(rng, canvas)
    return canvas


def _noisy(rng: np.random.Generator, clean: np.ndarray, sigma: float, salt_pepper: float) -> np.ndarray:
    noisy = clean.astype(np.float32) + np.float32(sigma) * rng.standard_normal(clean.shape, dtype=np.float32)
    noisy = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    if salt_pepper > 0:
        hits = rng.random(clean.shape) < salt_pepper
        salt = rng.random(clean.shape) < 0.5
        noisy[hits & salt] = 255
        noisy[hits & ~salt] = 0
    return noisy


# --------------------------------------------------------------------------- segmentation scenes


def _illumination(rng: np.random.Generator, size: int) -> np.ndarray:
    """Uneven lighting: a tilted ramp plus a soft radial vignette, float32 around 0."""
    x, y = _coords(size)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    ramp = ((x - size / 2) * math.cos(theta) + (y - size / 2) * math.sin(theta)) / size
    amp = rng.uniform(30.0, 60.0)
    cx, cy = rng.uniform(0.2, 0.8, size=2) * size
    vignette = ((x - cx) ** 2 + (y - cy) ** 2) / float(size * size)
    return (amp * ramp - rng.uniform(5.0, 20.0) * vignette).astype(np.float32)


def _object_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """One object as a 0/255 uint8 mask; about a third of them are pushed onto the border."""
    radius = float(rng.uniform(0.06, 0.15) * size)
    cx, cy = (float(v) for v in rng.uniform(0.1, 0.9, size=2) * size)
    if rng.random() < 0.35:  # cut by a border
        side = int(rng.integers(0, 4))
        offset = float(rng.uniform(-0.3, 0.5) * radius)
        if side == 0:
            cx = offset
        elif side == 1:
            cx = size - 1 - offset
        elif side == 2:
            cy = offset
        else:
            cy = size - 1 - offset
    mask = np.zeros((size, size), dtype=np.uint8)
    shape = str(rng.choice(("blob", "blob", "ellipse", "polygon")))
    if shape == "blob":
        cv2.fillPoly(mask, [_blob(rng, cx, cy, radius)], 255)
    elif shape == "ellipse":
        axes = (round(radius * 1.15), round(radius * rng.uniform(0.45, 0.9)))
        cv2.ellipse(mask, (round(cx), round(cy)), axes, float(rng.uniform(0, 180)), 0.0, 360.0, 255, -1)
    else:
        cv2.fillPoly(mask, [_random_polygon(rng, cx, cy, radius * 1.2, int(rng.integers(4, 8)))], 255)
    return mask


def _cells_scene(rng: np.random.Generator, size: int, polarity: str) -> tuple[np.ndarray, np.ndarray]:
    base = rng.uniform(95.0, 150.0)
    coarse = _smooth_noise(rng, size, size / 24.0) - 0.5
    fine = _smooth_noise(rng, size, 1.2) - 0.5
    background = base + _illumination(rng, size) + rng.uniform(12.0, 24.0) * coarse + rng.uniform(10.0, 20.0) * fine
    sign = 1.0 if polarity == "bright" else -1.0
    if polarity == "mixed":
        sign = 1.0 if rng.random() < 0.5 else -1.0

    shading = 0.85 + 0.3 * _smooth_noise(rng, size, size / 16.0)
    union = np.zeros((size, size), dtype=np.uint8)
    delta = np.zeros((size, size), dtype=np.float32)
    wanted = int(rng.integers(3, 9))
    drawn = 0
    for _ in range(24):  # bounded: stop at the wanted count, or at 8 if still too sparse
        if (drawn >= wanted and (union > 0).mean() >= 0.08) or drawn >= 8:
            break
        mask = _object_mask(rng, size)
        contrast = float(rng.uniform(40.0, 75.0))  # objects of varying brightness
        candidate = cv2.bitwise_or(union, mask)
        if (candidate > 0).mean() > 0.5:
            continue  # too crowded: skip this one
        union = candidate
        inside = mask > 0
        # A slight shading inside each object, on top of its contrast to the background.
        delta[inside] = np.maximum(delta[inside], contrast * shading[inside])
        drawn += 1

    # Soft (not pixel-sharp) object edges, as a camera would see them.
    delta = cv2.GaussianBlur(delta, (0, 0), sigmaX=1.0)
    image = background + sign * delta
    noise_sigma = rng.uniform(6.0, 12.0)
    image = image + np.float32(noise_sigma) * rng.standard_normal((size, size), dtype=np.float32)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image, np.where(union > 0, 255, 0).astype(np.uint8)


# --------------------------------------------------------------------------- public API


def make_denoise_set(
    out_dir: str | Path,
    count: int = DEFAULT_COUNT,
    size: int = DEFAULT_SIZE,
    seed: int = DEFAULT_SEEDS["denoise"],
    noise_sigma: float = 20.0,
) -> list[str]:
    """Write ``count`` noisy/clean pairs of ``size`` x ``size`` grey scenes; return the stems.

    ``images/scene_NNN.png`` is ``targets/scene_NNN.png`` plus Gaussian noise of standard
    deviation ``noise_sigma`` (8-bit units), with 0.5 % salt-and-pepper on every third image.
    Existing files with the same names are overwritten; other files are left alone.
    """
    count, size, seed = _check_args(count, size, seed)
    if isinstance(noise_sigma, bool) or not isinstance(noise_sigma, (int, float, np.floating, np.integer)):
        raise DemoDataError(f"noise_sigma must be a number, got {noise_sigma!r}")
    noise_sigma = float(noise_sigma)
    if not (0.0 <= noise_sigma <= 128.0):
        raise DemoDataError(f"noise_sigma must be in 0..128, got {noise_sigma}")
    out = Path(out_dir)
    stems = []
    for index in range(count):
        rng = _rng("denoise", seed, index)
        clean = _clean_scene(rng, size, index)
        noisy = _noisy(rng, clean, noise_sigma, 0.005 if index % 3 == 2 else 0.0)
        stem = f"scene_{index:03d}"
        write_png(out / "targets" / f"{stem}.png", clean)
        write_png(out / "images" / f"{stem}.png", noisy)
        stems.append(stem)
    return stems


def make_segment_set(
    out_dir: str | Path,
    count: int = DEFAULT_COUNT,
    size: int = DEFAULT_SIZE,
    seed: int = DEFAULT_SEEDS["segment"],
    *,
    polarity: str = "bright",
) -> list[str]:
    """Write ``count`` grey images of objects on an unevenly lit, textured, noisy background,
    with their 0/255 object masks as targets; return the stems (``cells_NNN``).

    ``polarity``: ``"bright"`` (default: objects brighter than the background around them,
    so one thresholding pipeline fits the whole set), ``"dark"``, or ``"mixed"`` (each image
    picks one). Because of the lighting ramp, a bright object on the dark side can still be
    darker than the background on the bright side, so a single global threshold is imperfect.
    """
    count, size, seed = _check_args(count, size, seed)
    if polarity not in POLARITIES:
        raise DemoDataError(f"polarity must be one of {', '.join(POLARITIES)}, got {polarity!r}")
    out = Path(out_dir)
    stems = []
    for index in range(count):
        rng = _rng("segment", seed, index)
        image, mask = _cells_scene(rng, size, polarity)
        stem = f"cells_{index:03d}"
        write_png(out / "targets" / f"{stem}.png", mask)
        write_png(out / "images" / f"{stem}.png", image)
        stems.append(stem)
    return stems


_MAKERS: dict[str, Callable[..., list[str]]] = {"denoise": make_denoise_set, "segment": make_segment_set}
# The registry of demo sets: the sweep file's `demo_data:` and the command line take these names.
DEMO_KINDS = tuple(_MAKERS)


def _write_readme(out: Path, kind: str, count: int, size: int, seed: int) -> None:
    what = {
        "denoise": "images/ are noisy grey scenes; targets/ are the clean scenes.",
        "segment": "images/ are grey objects on an unevenly lit, noisy background; targets/ are 0/255 masks.",
    }[kind]
    atomic_write_text(
        out / "README.txt",
        f"Synthetic '{kind}' demo data, generated by imgtune_assets.core.demo_data (numpy + OpenCV).\n"
        f"{count} image{'' if count == 1 else 's'} of {size}x{size} px, seed {seed}. {what}\n"
        f"Regenerate with:\n"
        f"  python -m imgtune_assets.core.demo_data {kind} OUT_DIR --count {count} --size {size} --seed {seed}\n",
    )


def _has_images(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    return any(
        entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_SUFFIXES
        for entry in folder.iterdir()
    )


def ensure_demo_data(out_dir: str | Path, kind: str) -> Path:
    """Generate the ``kind`` demo set into ``out_dir`` unless ``out_dir/images`` already holds
    images; return ``out_dir``. A second call writes nothing."""
    if kind not in DEMO_KINDS:
        raise DemoDataError(f"kind must be one of {', '.join(DEMO_KINDS)}, got {kind!r}")
    out = Path(out_dir)
    if _has_images(out / "images"):
        return out
    seed = DEFAULT_SEEDS[kind]
    _MAKERS[kind](out, count=DEFAULT_COUNT, size=DEFAULT_SIZE, seed=seed)
    _write_readme(out, kind, DEFAULT_COUNT, DEFAULT_SIZE, seed)
    return out


# --------------------------------------------------------------------------- command line


def _arg_int(name: str, low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        try:
            return _check_int(name, value, low, high)
        except DemoDataError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m imgtune_assets.core.demo_data",
        description="Generate a deterministic synthetic demo data set (images/ and targets/).",
    )
    parser.add_argument("kind", choices=DEMO_KINDS, help="which demo set")
    parser.add_argument("out_dir", type=Path, help="folder to write images/ and targets/ into")
    parser.add_argument("--count", type=_arg_int("count", 1), default=DEFAULT_COUNT,
                        help=f"number of images (default {DEFAULT_COUNT})")
    parser.add_argument("--size", type=_arg_int("size", MIN_SIZE, MAX_SIZE), default=DEFAULT_SIZE,
                        help=f"image side in pixels, {MIN_SIZE}..{MAX_SIZE} (default {DEFAULT_SIZE})")
    parser.add_argument("--seed", type=_arg_int("seed", 0), default=None,
                        help="random seed, >= 0 (default: 0 for denoise, 1 for segment)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the error (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    seed = DEFAULT_SEEDS[args.kind] if args.seed is None else args.seed
    try:
        stems = _MAKERS[args.kind](args.out_dir, count=args.count, size=args.size, seed=seed)
        _write_readme(args.out_dir, args.kind, args.count, args.size, seed)
    except (DemoDataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pairs = "pair" if len(stems) == 1 else "pairs"
    print(f"wrote {len(stems)} {args.kind} image/target {pairs} ({args.size}x{args.size}) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
