import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from imgtune_assets.core import ops
from imgtune_assets.core.ops import (
    OPS,
    OpParamError,
    ParamSpec,
    apply_pipeline,
    apply_stage,
    check_image,
    validate_stage,
)

RNG = np.random.default_rng(1234)
_BASE8 = RNG.integers(0, 256, (48, 64), dtype=np.uint8)
_BASE8_BGR = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)

IMAGES = {
    "u8_grey": _BASE8,
    "u8_bgr": _BASE8_BGR,
    # Genuine 16-bit content (not just x257), so low bits matter.
    "u16_grey": RNG.integers(0, 65536, (48, 64), dtype=np.uint16),
    "u16_bgr": RNG.integers(0, 65536, (48, 64, 3), dtype=np.uint16),
}
TWO_D_OPS = {"to_gray", "threshold", "canny"}


def _expected_shape(op, image):
    return image.shape[:2] if op in TWO_D_OPS else image.shape


def _check_output(op, image, out):
    assert isinstance(out, np.ndarray)
    assert out.dtype == image.dtype
    assert out.shape == _expected_shape(op, image)
    assert out.flags.c_contiguous


@pytest.mark.parametrize("kind", sorted(IMAGES))
@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_keeps_dtype_and_shape_with_defaults(op, kind):
    image = IMAGES[kind]
    before = image.copy()
    out = apply_stage(image, op, {})
    _check_output(op, image, out)
    np.testing.assert_array_equal(image, before)  # input never modified


def _corner_param_sets(spec):
    """Defaults, then each param pushed to each boundary / choice in turn."""
    yield {}
    for name, p in spec.params.items():
        if p.kind == "choice":
            values = list(p.choices)
        elif p.kind == "bool":
            values = [True, False]
        else:
            values = [p.low, p.high]
        for v in values:
            if p.kind in ("int", "odd"):
                v = int(v)
            yield {name: v}


@pytest.mark.parametrize("kind", sorted(IMAGES))
@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_at_parameter_boundaries(op, kind):
    # Small image keeps the large-kernel corners fast and exercises kernel > image cases.
    image = IMAGES[kind][:20, :24]
    for params in _corner_param_sets(OPS[op]):
        out = apply_stage(image, op, validate_stage(op, params))
        _check_output(op, image, out)


def test_registry_defaults_are_valid_and_names_match():
    for name, spec in OPS.items():
        assert spec.name == name
        for pname, p in spec.params.items():
            assert p.name == pname
            assert p.validate(p.default, "x") == p.default


def test_registry_contains_required_ops():
    required = {
        "gaussian_blur", "median_blur", "bilateral_filter", "nl_means", "clahe",
        "unsharp_mask", "gamma", "threshold", "morphology", "canny", "sobel",
        "laplacian", "to_gray", "identity",
    }
    assert required <= set(OPS)


# --------------------------------------------------------------------------- validation


def test_defaults_filled():
    out = validate_stage("gaussian_blur", {"ksize": 7})
    assert out == {"ksize": 7, "sigma": 0.0}
    assert validate_stage("identity", {}) == {}
    assert validate_stage("identity", None) == {}
    full = validate_stage("threshold", {})
    assert full == {"method": "otsu", "thresh": 127.0, "block_size": 11, "c": 2.0, "invert": False}


def test_coercion():
    out = validate_stage("gaussian_blur", {"ksize": 5.0, "sigma": 2})
    assert out["ksize"] == 5 and type(out["ksize"]) is int
    assert out["sigma"] == 2.0 and type(out["sigma"]) is float
    assert validate_stage("median_blur", {"ksize": np.int64(7)})["ksize"] == 7
    assert validate_stage("canny", {"aperture_size": 5.0})["aperture_size"] == 5
    assert validate_stage("threshold", {"invert": np.bool_(True)})["invert"] is True


def test_validation_is_idempotent():
    for name in OPS:
        once = validate_stage(name, {})
        assert validate_stage(name, once) == once


WHERE = "sweeps/x.yaml: pipeline[1]"


@pytest.mark.parametrize(
    "op, params, fragments",
    [
        ("gaussian_blur", {"ksize": 4}, ["ksize", "4", "must be odd"]),
        ("gaussian_blur", {"ksize": 101}, ["ksize", "101"]),
        ("gaussian_blur", {"sigma": -1.0}, ["sigma", "-1.0"]),
        ("morphology", {"ksize": "abc"}, ["ksize", "'abc'"]),
        ("morphology", {"ksize": 3.5}, ["ksize", "3.5"]),
        ("morphology", {"iterations": True}, ["iterations", "True"]),
        ("morphology", {"operation": "smooth"}, ["operation", "'smooth'", "'open'"]),
        ("canny", {"aperture_size": 4}, ["aperture_size", "4"]),
        ("canny", {"aperture_size": True}, ["aperture_size", "True"]),
        ("canny", {"l2_gradient": 1}, ["l2_gradient", "1"]),
        ("gamma", {"gamma": float("nan")}, ["gamma", "nan"]),
        ("gamma", {"gamma": 0.0}, ["gamma", "0.0"]),
        ("gamma", {"gamma": "1.0"}, ["gamma", "'1.0'"]),
        ("threshold", {"block_size": 1}, ["block_size", "1"]),
        ("threshold", {"block_size": 12}, ["block_size", "12", "must be odd"]),
    ],
)
def test_bad_param_values(op, params, fragments):
    with pytest.raises(OpParamError) as exc:
        validate_stage(op, params, WHERE)
    msg = str(exc.value)
    assert msg.startswith(WHERE)
    for frag in fragments:
        assert frag in msg


def test_unknown_op_lists_known_ops():
    with pytest.raises(OpParamError) as exc:
        validate_stage("gausian_blur", {}, WHERE)
    msg = str(exc.value)
    assert msg.startswith(WHERE) and "'gausian_blur'" in msg
    assert "gaussian_blur" in msg and "median_blur" in msg


def test_unknown_param_lists_op_params():
    with pytest.raises(OpParamError) as exc:
        validate_stage("gaussian_blur", {"ksize": 5, "sigmaX": 3}, WHERE)
    msg = str(exc.value)
    assert msg.startswith(WHERE) and "'sigmaX'" in msg and "3" in msg
    assert "ksize" in msg and "sigma" in msg


def test_param_error_is_value_error_and_params_must_be_mapping():
    assert issubclass(OpParamError, ValueError)
    with pytest.raises(OpParamError, match="mapping"):
        validate_stage("gaussian_blur", [("ksize", 5)], WHERE)


def test_paramspec_without_where_has_no_prefix():
    spec = ParamSpec("k", "odd", 3, 1, 9)
    with pytest.raises(OpParamError) as exc:
        spec.validate(2, "")
    assert str(exc.value).startswith("parameter 'k'")


def test_pipeline_errors_name_the_stage():
    with pytest.raises(OpParamError, match=r"pipeline\[1\]: median_blur.*ksize"):
        apply_pipeline(_BASE8, [("identity", {}), ("median_blur", {"ksize": 2})])
    with pytest.raises(OpParamError, match=r"pipeline\[0\].*nope"):
        apply_pipeline(_BASE8, [("nope", {})])


# --------------------------------------------------------------------------- check_image


@pytest.mark.parametrize(
    "bad",
    [
        [[1, 2], [3, 4]],
        np.zeros((4, 4), np.float32),
        np.zeros((4, 4), np.int16),
        np.zeros((4, 4, 1), np.uint8),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((4,), np.uint8),
        np.zeros((0, 4), np.uint8),
    ],
)
def test_check_image_rejects(bad):
    with pytest.raises(ValueError):
        check_image(bad)
    with pytest.raises(ValueError):
        apply_stage(bad, "gaussian_blur", {})


def test_non_contiguous_input_is_accepted():
    view = _BASE8_BGR[:, ::2]
    out = apply_stage(view, "gaussian_blur", {})
    assert out.shape == view.shape and out.flags.c_contiguous


# --------------------------------------------------------------------------- behaviour


def test_identity_and_empty_pipeline_return_equal_copy():
    for image in IMAGES.values():
        out = apply_stage(image, "identity", {})
        np.testing.assert_array_equal(out, image)
        assert not np.shares_memory(out, image)
        np.testing.assert_array_equal(apply_pipeline(image, []), image)


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_gamma_one_is_identity(kind):
    np.testing.assert_array_equal(apply_stage(IMAGES[kind], "gamma", {"gamma": 1.0}), IMAGES[kind])


def test_gamma_direction_and_16bit_consistency():
    ramp8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    bright = apply_stage(ramp8, "gamma", {"gamma": 0.5})
    assert (bright >= ramp8).all() and bright[8, 0] > ramp8[8, 0]
    ramp16 = ramp8.astype(np.uint16) * 257
    bright16 = apply_stage(ramp16, "gamma", {"gamma": 0.5})
    # Same curve on both depths: 16-bit result / 257 within rounding of the 8-bit LUT.
    assert np.abs(bright16 / 257.0 - bright).max() <= 0.5 + 1e-9


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535)])
def test_gaussian_blur_reduces_noise_variance(dtype, top):
    rng = np.random.default_rng(0)
    flat = np.full((64, 64), top // 2, np.float64) + rng.normal(0, top * 0.05, (64, 64))
    noisy = np.clip(np.rint(flat), 0, top).astype(dtype)
    out = apply_stage(noisy, "gaussian_blur", {"ksize": 5})
    assert out.var() < noisy.var() / 4
    assert abs(out.mean() - noisy.mean()) < top * 0.01


def _bimodal(dtype, top, bgr=False):
    img = np.full((40, 40), int(top * 0.2), dtype)
    img[10:30, 5:25] = int(top * 0.7)
    rng = np.random.default_rng(3)
    noise = rng.integers(-int(top * 0.03), int(top * 0.03) + 1, img.shape)
    img = np.clip(img.astype(np.int64) + noise, 0, top).astype(dtype)
    truth = np.zeros((40, 40), bool)
    truth[10:30, 5:25] = True
    return (np.dstack([img] * 3) if bgr else img), truth


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535)])
@pytest.mark.parametrize("bgr", [False, True])
def test_threshold_otsu_on_bimodal_image(dtype, top, bgr):
    img, truth = _bimodal(dtype, top, bgr)
    out = apply_stage(img, "threshold", {"method": "otsu"})
    assert out.shape == truth.shape and out.dtype == dtype
    assert set(np.unique(out)) == {0, top}
    np.testing.assert_array_equal(out == top, truth)
    inv = apply_stage(img, "threshold", {"method": "otsu", "invert": True})
    np.testing.assert_array_equal(inv == top, ~truth)


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535)])
def test_threshold_fixed_and_adaptive(dtype, top):
    img, truth = _bimodal(dtype, top)
    fixed = apply_stage(img, "threshold", {"method": "fixed", "thresh": top * 0.45})
    np.testing.assert_array_equal(fixed == top, truth)
    # Adaptive: a small bright dot on a flat background is found, the background is not.
    flat = np.full((31, 31), top // 4, dtype)
    flat[15, 15] = top
    for method in ("mean", "gaussian"):
        # pixel > local_mean - c, so a negative c keeps the flat background black.
        out = apply_stage(flat, "threshold", {"method": method, "block_size": 7, "c": -5})
        assert out.dtype == dtype and set(np.unique(out)) == {0, top}
        assert out[15, 15] == top and (out == top).sum() == 1


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535)])
def test_morphology_open_removes_isolated_pixel(dtype, top):
    img = np.zeros((30, 30), dtype)
    img[5, 5] = top
    img[15:25, 15:25] = top
    out = apply_stage(img, "morphology", {"operation": "open", "shape": "rect", "ksize": 3})
    assert out[5, 5] == 0
    np.testing.assert_array_equal(out[15:25, 15:25], top)
    dil = apply_stage(img, "morphology", {"operation": "dilate", "shape": "rect", "ksize": 3})
    assert (dil[4:7, 4:7] == top).all()


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535)])
@pytest.mark.parametrize("bgr", [False, True])
def test_canny_square_and_flat(dtype, top, bgr):
    img = np.full((60, 60), top // 5, dtype)
    img[20:40, 20:40] = top * 4 // 5
    if bgr:
        img = np.dstack([img] * 3)
    edges = apply_stage(img, "canny", {})
    assert edges.shape == (60, 60) and edges.dtype == dtype
    assert set(np.unique(edges)) == {0, top}
    ys, xs = np.nonzero(edges)
    assert len(ys) > 60
    # All edge pixels lie on the square's boundary (within a pixel).
    assert ys.min() >= 18 and ys.max() <= 41 and xs.min() >= 18 and xs.max() <= 41
    assert not edges[23:37, 23:37].any()
    flat = np.full_like(img, top // 2)
    assert not apply_stage(flat, "canny", {}).any()


@pytest.mark.parametrize("bgr", [False, True])
def test_bilateral_16bit_matches_8bit(bgr):
    # Piecewise-flat noisy image, upscaled exactly to 16 bit (x257).
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:64, 0:64]
    img8 = np.clip(90 + 80 * ((x // 16 + y // 16) % 2) + rng.normal(0, 8, x.shape), 0, 255)
    img8 = img8.astype(np.uint8)
    if bgr:
        img8 = np.dstack([img8, 255 - img8, img8 // 2])
    img16 = img8.astype(np.uint16) * 257
    params = {"d": 9, "sigma_color": 40.0, "sigma_space": 5.0}
    out8 = apply_stage(img8, "bilateral_filter", params).astype(np.float64)
    out16 = apply_stage(img16, "bilateral_filter", params).astype(np.float64)
    # The 8-bit path rounds to whole 8-bit levels (<= 0.5 level error) and uses a slightly
    # different weight LUT than the float path; one 8-bit level (257) covers both.
    assert np.abs(out16 - 257 * out8).max() <= 257
    # Sanity: the filter actually did something (so the comparison is not trivial).
    assert np.abs(out8 - img8).mean() > 1


def test_median_blur_uint16_large_kernel():
    img16 = IMAGES["u16_grey"]
    out = apply_stage(img16, "median_blur", {"ksize": 7})
    # Independent reference away from the borders: brute-force window medians.
    ref = np.median(sliding_window_view(img16, (7, 7)), axis=(-2, -1))
    np.testing.assert_array_equal(out[3:-3, 3:-3], ref.astype(np.uint16))
    np.testing.assert_array_equal(out, ndimage.median_filter(img16, size=7, mode="nearest"))


@pytest.mark.parametrize("ksize", [3, 5, 7, 9])
@pytest.mark.parametrize("bgr", [False, True])
def test_median_blur_16bit_equals_257_times_8bit(ksize, bgr):
    # Median commutes with x257, so this checks our uint16 path against OpenCV's own 8-bit
    # medianBlur, borders included (both replicate the edge).
    img8 = _BASE8_BGR if bgr else _BASE8
    out8 = apply_stage(img8, "median_blur", {"ksize": ksize})
    out16 = apply_stage(img8.astype(np.uint16) * 257, "median_blur", {"ksize": ksize})
    np.testing.assert_array_equal(out16, out8.astype(np.uint16) * 257)


def test_unsharp_mask_sharpens_and_clips():
    img = np.full((20, 20), 100, np.uint8)
    img[:, 10:] = 200
    out = apply_stage(img, "unsharp_mask", {"ksize": 5, "sigma": 1.0, "amount": 3.0})
    assert out[10, 9] < 100 and out[10, 10] > 200  # overshoot on both sides of the step
    np.testing.assert_array_equal(out[:, :5], 100)
    hi = apply_stage(img, "unsharp_mask", {"ksize": 5, "sigma": 1.0, "amount": 5.0})
    assert hi.max() == 255 and hi.min() == 0  # amount 5 clips both sides of the step
    np.testing.assert_array_equal(apply_stage(img, "unsharp_mask", {"amount": 0.0}), img)


def test_sobel_and_laplacian_zero_on_flat_and_positive_on_edge():
    for dtype, top in [(np.uint8, 255), (np.uint16, 65535)]:
        flat = np.full((20, 20), top // 3, dtype)
        assert not apply_stage(flat, "sobel", {}).any()
        assert not apply_stage(flat, "laplacian", {}).any()
        step = flat.copy()
        step[:, 10:] = top // 3 * 2
        sob = apply_stage(step, "sobel", {"scale": 0.25})
        assert sob[10, 9] > 0 and sob[10, 2] == 0
        lap = apply_stage(step, "laplacian", {})
        assert lap[10, 9] > 0 and lap[10, 10] > 0 and lap[10, 2] == 0


def test_to_gray():
    grey = apply_stage(_BASE8_BGR, "to_gray", {})
    assert grey.shape == _BASE8_BGR.shape[:2]
    same = np.dstack([_BASE8] * 3)
    np.testing.assert_array_equal(apply_stage(same, "to_gray", {}), _BASE8)
    np.testing.assert_array_equal(apply_stage(_BASE8, "to_gray", {}), _BASE8)


@pytest.mark.parametrize("op", ["clahe", "equalize_hist"])
def test_contrast_ops_stretch_low_contrast_and_keep_grey_colour_grey(op):
    rng = np.random.default_rng(5)
    low = rng.integers(100, 140, (64, 64)).astype(np.uint8)
    for img in (low, low.astype(np.uint16) * 257):
        out = apply_stage(img, op, {})
        assert out.astype(float).std() > 2 * img.astype(float).std()
    # A neutral-grey colour image stays (nearly) neutral: only lightness is changed.
    colour = np.dstack([low] * 3)
    for img in (colour, colour.astype(np.uint16) * 257):
        out = apply_stage(img, op, {}).astype(float)
        top = 255 if img.dtype == np.uint8 else 65535
        assert np.abs(out[..., 0] - out[..., 2]).max() <= 0.02 * top


def test_clahe_16bit_comparable_to_8bit():
    # clip_limit is rescaled for 16-bit so the same value gives similar contrast. Tiles are
    # kept >= 32x32 px: on tiny tiles OpenCV's integer redistribution of clipped counts
    # differs between 256 and 65536 bins, and the two depths drift apart.
    rng = np.random.default_rng(2)
    y, x = np.mgrid[0:256, 0:256]
    img8 = np.clip(60 + 0.15 * x + 30 * np.sin(y / 40) + rng.normal(0, 6, x.shape), 0, 255)
    img8 = img8.astype(np.uint8)
    for clip in (1.0, 2.0, 4.0, 8.0):
        out8 = apply_stage(img8, "clahe", {"clip_limit": clip})
        out16 = apply_stage(img8.astype(np.uint16) * 257, "clahe", {"clip_limit": clip})
        assert out16.std() / 257 == pytest.approx(out8.std(), rel=0.1)
        assert np.abs(out16 / 257.0 - out8).mean() < 5


@pytest.mark.parametrize("bgr", [False, True], ids=["grey", "bgr"])
@pytest.mark.parametrize("h", [12.0, 20.0])
def test_nl_means_smooths_a_16_bit_image_as_its_8_bit_version(bgr, h):
    """h is in 8-bit units: a pipeline tuned on 8-bit photos, applied to the same photos in 16 bits,
    must denoise them about as much (OpenCV has an 8-bit L2 path and a 16-bit L1 one)."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:96, 0:96]
    scene = [80 + 60 * np.sin(x / 9.0) * np.cos(y / 13.0), 120 + 0.8 * x - 0.5 * y, 150 - 40 * np.sin((x + y) / 17.0)]
    clean = np.dstack(scene) if bgr else scene[0]
    img8 = np.clip(np.rint(clean + rng.normal(0, 20, clean.shape)), 0, 255).astype(np.uint8)
    out8 = apply_stage(img8, "nl_means", {"h": h}).astype(float)
    out16 = apply_stage(img8.astype(np.uint16) * 257, "nl_means", {"h": h}) / 257.0
    change8, change16 = np.abs(out8 - img8).mean(), np.abs(out16 - img8).mean()
    assert change8 > 5  # it denoises at all
    assert change16 == pytest.approx(change8, rel=0.15)
    assert np.abs(out16 - out8).mean() < 0.3 * change8


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_nl_means_denoises(kind):
    top = 255 if "u8" in kind else 65535
    dtype = np.uint8 if "u8" in kind else np.uint16
    rng = np.random.default_rng(4)
    shape = (48, 48, 3) if "bgr" in kind else (48, 48)
    noisy = np.clip(np.rint(top * 0.5 + rng.normal(0, top * 0.04, shape)), 0, top).astype(dtype)
    out = apply_stage(noisy, "nl_means", {"h": 15.0})
    assert out.dtype == dtype and out.shape == shape
    assert out.astype(float).std() < 0.5 * noisy.astype(float).std()


def test_pipeline_applies_in_order():
    img, truth = _bimodal(np.uint16, 65535, bgr=True)
    out = apply_pipeline(
        img,
        [
            ("gaussian_blur", {"ksize": 3}),
            ("to_gray", {}),
            ("threshold", {"method": "otsu"}),
            ("morphology", {"operation": "open", "ksize": 3}),
        ],
    )
    assert out.dtype == np.uint16 and out.shape == truth.shape
    assert (out[12:28, 7:23] == 65535).all() and (out[:8] == 0).all()


def test_module_does_not_import_dagster_or_ray():
    src = open(ops.__file__).read()
    assert "import dagster" not in src and "import ray" not in src
    assert "setNumThreads" not in src
