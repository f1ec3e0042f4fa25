"""EXIF orientation, pinned to OpenCV's own: ``cv2.imdecode`` with ``IMREAD_COLOR`` turns JPEG, PNG and
WebP images upright by their orientation tag (a TIFF its own decoder turns, whatever the flags);
``decode_image`` and ``probe_image`` must agree with it for every orientation, for grey and colour,
with alpha."""

import io
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from imgtune_assets.core.imageio import (decode_image, decode_oriented, exif_orientation, format_suffix, orient,
                                         probe_image, unorient, write_png)

# Not square, and not symmetric: every one of the eight orientations gives another array.
STORED = np.random.default_rng(3).integers(0, 256, (12, 20, 3), dtype=np.uint8)
STORED[:4, :6] = 255


def encoded(fmt: str, orientation: int, pixels: np.ndarray = STORED) -> bytes:
    """``pixels`` (BGR or grey, as stored) saved by Pillow as ``fmt`` with an EXIF orientation tag."""
    image = Image.fromarray(pixels[:, :, ::-1] if pixels.ndim == 3 and pixels.shape[2] == 3 else
                            pixels[:, :, [2, 1, 0, 3]] if pixels.ndim == 3 else pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    options = {"TIFF": {"tiffinfo": {274: orientation}}, "JPEG": {"exif": exif, "quality": 100},
               "WEBP": {"exif": exif, "lossless": True}}.get(fmt, {"exif": exif})
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_decoding_turns_the_image_upright_as_opencv_does(fmt, orientation):
    data = encoded(fmt, orientation)
    upright = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    image, alpha, found = decode_oriented(data, f"x.{fmt.lower()}")
    assert found == exif_orientation(data) == orientation and alpha is None
    assert image.shape == upright.shape and np.array_equal(image, upright)
    assert image.flags["C_CONTIGUOUS"]
    width, height, channels, dtype = probe_image(data, f"x.{fmt.lower()}")
    assert (height, width, channels, dtype) == (*upright.shape, "uint8")


def late_exif_png(orientation: int) -> bytes:
    """A PNG whose eXIf chunk comes after its image data (the PNG 1.5 extension allowed it there; Pillow
    finds it only by decoding), written with OpenCV and the chunk inserted before the end chunk."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()
    payload = payload[6:] if payload.startswith(b"Exif\x00\x00") else payload
    chunk = len(payload).to_bytes(4, "big") + b"eXIf" + payload + zlib.crc32(b"eXIf" + payload).to_bytes(4, "big")
    data = cv2.imencode(".png", STORED)[1].tobytes()
    end = data.rfind(b"IEND") - 4
    return data[:end] + chunk + data[end:]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_pngs_exif_after_its_image_data_turns_it_as_opencv_does(orientation):
    data = late_exif_png(orientation)
    upright = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert upright.shape != STORED.shape or orientation == 3  # OpenCV turns it
    image, _, found = decode_oriented(data, "late.png")
    assert found == exif_orientation(data) == orientation and np.array_equal(image, upright)
    width, height, _, _ = probe_image(data, "late.png")
    assert (height, width) == upright.shape[:2]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiff_is_turned_by_opencvs_own_decoder_and_probed_at_that_size(orientation):
    data = encoded("TIFF", orientation)
    image = decode_image(data, "x.tif")
    assert np.array_equal(image, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    assert np.array_equal(image, orient(STORED, orientation))  # libtiff turns it; not turned twice
    assert exif_orientation(data) == 1
    width, height, _, _ = probe_image(data, "x.tif")
    assert (height, width) == image.shape[:2]


def test_alpha_and_grey_turn_with_the_image():
    rgba = np.dstack([STORED, np.arange(240, dtype=np.uint8).reshape(12, 20)])
    image, alpha, orientation = decode_oriented(encoded("PNG", 6, rgba), "x.png")
    assert orientation == 6
    assert image.shape == (20, 12, 3) and alpha.shape == (20, 12)
    assert np.array_equal(alpha, np.rot90(rgba[:, :, 3], k=-1))  # 6: a quarter turn clockwise to display
    grey = STORED[:, :, 0].copy()
    assert np.array_equal(decode_image(encoded("PNG", 8, grey), "x.png"), np.rot90(grey, k=1))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("pixels", [STORED, STORED[:, :, 0]], ids=["colour", "grey"])
def test_unorient_undoes_orient(orientation, pixels):
    upright = orient(pixels, orientation)
    assert np.array_equal(unorient(upright, orientation), pixels)
    assert upright.shape[:2] == (pixels.shape[:2] if orientation <= 4 else pixels.shape[1::-1])


def test_orient_refuses_what_is_not_an_image_or_an_orientation():
    with pytest.raises(ValueError, match=r"2-D \(grey\) or 3-D \(colour\) image array, got \(5,\)"):
        orient(np.zeros(5, np.uint8), 6)
    with pytest.raises(ValueError, match="EXIF orientation must be 1 to 8, got 9"):
        orient(STORED, 9)


@pytest.mark.parametrize("image, words", [
    (np.zeros((4, 4), np.float64), "8-bit or 16-bit image array, got float64"),
    (np.zeros((4, 4, 2), np.uint8), r"grey, BGR or BGRA image, got shape \(4, 4, 2\)"),
    (np.zeros((0, 4), np.uint8), r"got shape \(0, 4\)"),
])
def test_write_png_refuses_what_a_png_cannot_hold_and_writes_nothing(tmp_path, image, words):
    target = tmp_path / "out.png"
    with pytest.raises(ValueError, match=words) as err:
        write_png(target, image)
    assert str(target) in str(err.value) and not target.exists()


def test_write_png_keeps_16_bits_and_alpha(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65536, (6, 7, 4), dtype=np.uint16)
    assert np.array_equal(cv2.imread(str(write_png(tmp_path / "a.png", pixels)), cv2.IMREAD_UNCHANGED), pixels)


def test_damaged_or_missing_exif_means_as_stored():
    plain = io.BytesIO()
    Image.fromarray(STORED).save(plain, "PNG")
    assert exif_orientation(plain.getvalue()) == 1 and exif_orientation(b"not an image") == 1
    for value in (0, 9, 300):  # out of range: as stored, as OpenCV does
        data = encoded("PNG", value)
        assert exif_orientation(data) == 1
        assert np.array_equal(decode_image(data, "x.png"), cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))


def test_a_webp_head_with_exif_is_not_probed_from_its_head():
    """An object is probed from its head; a WebP keeps its Exif after the image data, so the head cannot
    tell a turned size: such a head is refused (the manifest then reads the object whole)."""
    from imgtune_assets.core.imageio import ImageReadError, webp_has_exif

    turned, plain = encoded("WEBP", 6), encoded("WEBP", 1)
    unmarked = io.BytesIO()
    Image.fromarray(STORED).save(unmarked, "WEBP", lossless=True)
    assert webp_has_exif(turned) and not webp_has_exif(unmarked.getvalue())
    with pytest.raises(ImageReadError):
        probe_image(turned[:40], "x.webp", whole=False)
    assert probe_image(unmarked.getvalue()[:40], "x.webp", whole=False)[:2] == (20, 12)
    assert probe_image(turned, "x.webp")[:2] == (12, 20) and probe_image(plain, "x.webp")[:2] == (20, 12)


def test_a_multi_picture_jpeg_is_turned_as_opencv_turns_it():
    """Phones write JPEGs holding further pictures (MPF: gain maps, depth); Pillow calls them MPO."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(STORED[:, :, ::-1]).save(buffer, "MPO", save_all=True, quality=100, exif=exif,
                                             append_images=[Image.fromarray(STORED[:6, :10])])
    data = buffer.getvalue()
    upright = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert upright.shape == (20, 12, 3) and exif_orientation(data) == 6
    assert np.array_equal(decode_image(data, "x.jpg"), upright)
    assert probe_image(data, "x.jpg")[:2] == (12, 20)


@pytest.mark.parametrize("data, suffix", [
    (b"\xff\xd8\xff\xe0rest", ".jpg"), (b"\x89PNG\r\n\x1a\nrest", ".png"), (b"II*\x00rest", ".tiff"),
    (b"MM\x00*rest", ".tiff"), (b"RIFF\x10\x00\x00\x00WEBPVP8 ", ".webp"), (b"BM\x00\x00", ".bmp"),
    (b"GIF89a...", ".gif"), (b"RIFF\x10\x00\x00\x00WAVE", None), (b"plain text", None), (b"", None)])
def test_format_suffix_reads_the_files_signature(data, suffix):
    assert format_suffix(data) == suffix


def _tiff(pages: np.ndarray, **options) -> bytes:
    import tifffile  # (scikit-image's dependency: a second TIFF writer beside OpenCV's and Pillow's)

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pages, photometric="minisblack", **options)
    return buffer.getvalue()


STACK = np.random.default_rng(5).integers(100, 4100, (5, 24, 32), dtype=np.uint16)


@pytest.mark.parametrize("options", [{}, {"imagej": True, "metadata": {"axes": "ZYX"}}], ids=["pages", "imagej"])
def test_a_multi_page_tiff_is_refused_not_read_as_its_first_page(options):
    data = _tiff(STACK, **options)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).shape == (24, 32)  # what OpenCV does
    for read in (lambda: probe_image(data, "stack.tif"), lambda: decode_image(data, "stack.tif")):
        with pytest.raises(ValueError, match=r"^stack\.tif: a multi-page TIFF \(5 pages\)"):
            read()


def test_a_tiff_with_a_thumbnail_is_one_image():
    import tifffile

    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        writer.write(STACK[0], photometric="minisblack")
        writer.write(STACK[0][::4, ::4], photometric="minisblack", subfiletype=1)  # reduced resolution
    data = buffer.getvalue()
    assert probe_image(data, "thumb.tif") == (32, 24, 1, "uint16")
    assert np.array_equal(decode_image(data, "thumb.tif"), STACK[0])


@pytest.mark.parametrize("options", [{}, {"compression": "zlib", "tile": (16, 16)}], ids=["strips", "tiles"])
def test_a_tiff_cut_short_is_refused_by_its_header(options):
    data = _tiff(STACK[0], **options)
    assert probe_image(data, "whole.tif") == (32, 24, 1, "uint16")
    cut = data[: len(data) - 64]
    with pytest.raises(ValueError, match=r"^cut\.tif: not a decodable image \(truncated TIFF: its image data ends"):
        probe_image(cut, "cut.tif")
    # an object's head is no whole file: not checked until it is read whole
    assert probe_image(cut, "cut.tif", whole=False) == (32, 24, 1, "uint16")
