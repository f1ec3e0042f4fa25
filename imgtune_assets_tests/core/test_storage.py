"""Local folders and URLs behind one interface; header probes agree with full decodes."""

import hashlib
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from imgtune_assets.core import storage
from imgtune_assets.core.imageio import ImageReadError, check_png_chunks, decode_image, probe_image

FORMATS = [
    ("grey8.png", np.uint8, None), ("grey16.png", np.uint16, None), ("colour8.png", np.uint8, 3),
    ("colour16.png", np.uint16, 3), ("grey.jpg", np.uint8, None), ("colour.jpg", np.uint8, 3),
    ("grey16.tif", np.uint16, None), ("colour16.tif", np.uint16, 3), ("colour.bmp", np.uint8, 3),
    ("grey.bmp", np.uint8, None), ("colour.webp", np.uint8, 3),
]


def encoded(name, dtype, channels):
    rng = np.random.default_rng(len(name))
    shape = (37, 53) if channels is None else (37, 53, channels)
    image = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    ok, buffer = cv2.imencode("." + name.rsplit(".", 1)[1], image)
    assert ok
    return buffer.tobytes()


@pytest.mark.parametrize("name,dtype,channels", FORMATS)
def test_probe_agrees_with_a_full_decode(name, dtype, channels):
    data = encoded(name, dtype, channels)
    width, height, probed_channels, probed_dtype = probe_image(data, name)
    image = decode_image(data, name)
    assert (height, width) == image.shape[:2] == (37, 53)
    assert probed_channels == (1 if image.ndim == 2 else image.shape[2])
    assert probed_dtype == str(image.dtype)


@pytest.mark.parametrize("dtype, channels", [(np.float32, 3), (np.float32, None), (np.int32, 3), (np.float64, 3)])
def test_a_tiff_of_another_pixel_type_is_named_as_decoding_names_it_not_called_corrupt(dtype, channels):
    shape = (21, 34) if channels is None else (21, 34, channels)
    ok, buffer = cv2.imencode(".tif", np.random.default_rng(1).random(shape).astype(dtype))
    assert ok
    data = buffer.tobytes()
    with pytest.raises(ImageReadError) as probed:
        probe_image(data, "scan.tif")
    with pytest.raises(ImageReadError) as decoded:
        decode_image(data, "scan.tif")
    assert str(probed.value) == str(decoded.value) == \
        f"scan.tif: unsupported pixel type {np.dtype(dtype).name} (need 8-bit or 16-bit)"
    # a damaged TIFF is still said to be one
    with pytest.raises(ImageReadError, match="not a decodable image"):
        probe_image(b"II*\0" + b"\xff" * 20, "broken.tif")


@pytest.mark.parametrize("params", [[cv2.IMWRITE_WEBP_QUALITY, 101], [cv2.IMWRITE_WEBP_QUALITY, 80]])
@pytest.mark.parametrize("channels", [3, 4])
def test_an_objects_head_gives_a_webps_size(params, channels):
    # An object store's probe reads only an object's head; Pillow cannot open a WebP from its head.
    image = np.random.default_rng(channels).integers(0, 255, (301, 517, channels), dtype=np.uint8)
    ok, buffer = cv2.imencode(".webp", image, params)
    data = buffer.tobytes()
    assert probe_image(data[:64], "head.webp", whole=False) == probe_image(data, "whole.webp") == (517, 301, 3, "uint8")


@pytest.mark.parametrize("name", ["grey8.png", "colour16.png", "colour.jpg", "colour.bmp", "colour.webp"])
def test_probe_catches_truncated_files(name):
    spec = next(f for f in FORMATS if f[0] == name)
    data = encoded(*spec)
    with pytest.raises(ImageReadError, match=name):
        probe_image(data[: len(data) * 2 // 3], name)


def _pillow_verifies(data: bytes) -> bool:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (SyntaxError, OSError, ValueError, EOFError):
        return False
    return True


def test_png_chunk_check_agrees_with_pillows_verify():
    """check_png_chunks (the manifest's fast PNG structure check) against Pillow's verify, the
    independent reference: whole files, truncations at every chunk boundary and inside chunks, and
    a flipped bit in each chunk, in several PNGs (many IDAT chunks in the large one)."""
    rng = np.random.default_rng(3)
    pngs = [encoded(name, dtype, channels) for name, dtype, channels in FORMATS if name.endswith(".png")]
    big = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    pngs.append(cv2.imencode(".png", big, [cv2.IMWRITE_PNG_COMPRESSION, 0])[1].tobytes())
    cases = 0
    for data in pngs:
        assert _pillow_verifies(data)
        check_png_chunks(data)
        variants = [data[:cut] for cut in (9, 20, 33, 34, 100, len(data) // 2, len(data) - 13, len(data) - 10)]
        for pos in (20, 40, len(data) // 2, len(data) - 6):  # IHDR, early data, the middle, IEND's name
            flipped = bytearray(data)
            flipped[pos] ^= 0x10
            variants.append(bytes(flipped))
        for variant in variants:
            ours = True
            try:
                check_png_chunks(variant)
            except SyntaxError:
                ours = False
            assert ours == _pillow_verifies(variant) == False, len(variant)  # noqa: E712 - both must refuse
            cases += 1
    assert cases == 12 * len(pngs)


def test_jpeg_without_end_marker_after_its_scan_is_truncated():
    data = encoded("colour.jpg", np.uint8, 3)
    assert data.endswith(b"\xff\xd9")
    probe_image(data + b"appended video" * 100, "photo.jpg")  # trailing data after the end marker is fine
    with pytest.raises(ImageReadError, match="truncated JPEG"):
        probe_image(data[:-2], "photo.jpg")


def test_probe_refuses_empty_and_foreign_bytes():
    with pytest.raises(ImageReadError, match="x.png: empty file"):
        probe_image(b"", "x.png")
    with pytest.raises(ImageReadError, match="notes.png: not a decodable image"):
        probe_image(b"just some text\n" * 10, "notes.png")


def test_local_locations_resolve_against_the_base_folder(tmp_path):
    assert storage.location("data", base_dir=tmp_path) == (tmp_path / "data").resolve()
    assert storage.location(tmp_path / "x") == tmp_path / "x"
    assert not storage.is_remote(tmp_path) and storage.is_remote("s3://bucket/prefix")


def test_a_url_keeps_only_the_endpoint_option():
    where = storage.location("s3://bucket/data", endpoint_url="http://127.0.0.1:9")
    assert str(where) == "s3://bucket/data"
    assert where.storage_options == {"endpoint_url": "http://127.0.0.1:9"}
    assert storage.location("memory://x/y", endpoint_url="http://127.0.0.1:9").storage_options == {}


def test_read_with_key_hashes_local_files_and_names_missing_ones(tmp_path):
    file = tmp_path / "a b.png"
    file.write_bytes(b"abc")
    data, key = storage.read_with_key(file)
    assert data == b"abc" and key == hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(storage.StorageError, match=r"missing\.png: not found"):
        storage.read_with_key(tmp_path / "missing.png")


def test_objects_are_keyed_by_their_tag_and_size():
    assert storage.content_key_of_info({"ETag": '"abc"', "size": 5}) == "etag:abc:5"
    assert storage.content_key_of_info({"md5Hash": "xyz", "size": 7}) == "md5hash:xyz:7"
    # Another tag or size is another key: a rewritten object is seen as changed.
    assert storage.content_key_of_info({"ETag": '"abd"', "size": 5}) != storage.content_key_of_info(
        {"ETag": '"abc"', "size": 5})


def test_memory_filesystem_urls_list_read_and_write():
    # fsspec's in-memory store: the remote code path without a server.
    root = storage.location("memory://imgtune-test/data")
    storage.write_bytes_atomic(root / "images" / "b.png", b"2")
    storage.write_bytes_atomic(root / "images" / "a.png", b"1")
    storage.write_bytes_atomic(root / "images" / ".hidden", b"0")
    listed = storage.list_files(root / "images")
    assert [f.name for f, _ in listed] == ["a.png", "b.png"]
    assert storage.read_bytes(root / "images" / "b.png") == b"2"
    assert storage.read_head(root / "images" / "a.png", 10) == b"1"
    storage.write_bytes_atomic(root / "images" / "c.png", b"0123456789")
    assert storage.read_range(root / "images" / "c.png", 7, 20) == b"789"
    assert storage.read_range(Path(__file__), 0, 3) == b'"""'  # a local file the same way
    with pytest.raises(storage.StorageError, match="memory://imgtune-test/data/images/zzz.png"):
        storage.read_bytes(root / "images" / "zzz.png")


def test_a_jpeg_with_data_after_its_end_marker_is_whole():
    # Phones append a video (or other data) after a photo's end-of-image marker: still a usable JPEG.
    data = encoded("colour.jpg", np.uint8, 3) + b"\0\1\2ftypmp42" * 1000
    assert probe_image(data, "motion.jpg")[:2] == (53, 37)
    assert decode_image(data, "motion.jpg").shape == (37, 53, 3)


# ----------------------------------------------------------------------------- prefetch
needs_fadvise = pytest.mark.skipif(not hasattr(storage.os, "posix_fadvise"), reason="no posix_fadvise here")


@needs_fadvise
def test_prefetch_asks_for_files_in_order_within_the_budget(tmp_path, monkeypatch):
    files = []
    for name, size in (("a.png", 10), ("b.png", 20), ("c.png", 30), ("d.png", 1)):
        (tmp_path / name).write_bytes(b"x" * size)
        files.append(tmp_path / name)
    advised = []
    real = storage.os.posix_fadvise
    monkeypatch.setattr(storage.os, "posix_fadvise", lambda fd, offset, length, advice: advised.append(
        (os.fstat(fd).st_size, offset, length, advice)) or real(fd, offset, length, advice))
    missing = tmp_path / "gone.png"
    remote = storage.location("memory://bucket/d.png")
    # in order, and it stops at the first file past the budget (the reader's order: what comes later is read later)
    assert storage.prefetch([files[0], missing, remote, files[1], files[2], files[3]], budget_bytes=35) == 30
    assert advised == [(10, 0, 10, storage.os.POSIX_FADV_WILLNEED), (20, 0, 20, storage.os.POSIX_FADV_WILLNEED)]
    advised.clear()
    assert storage.prefetch(files) == 61  # the default budget: a share of the memory available
    assert [size for size, _, _, _ in advised] == [10, 20, 30, 1]


@needs_fadvise
def test_prefetch_advises_a_large_file_piece_by_piece(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "PREFETCH_CHUNK_BYTES", 4096)
    big = tmp_path / "big.tif"
    big.write_bytes(b"x" * (3 * 4096 + 100))
    advised = []
    real = storage.os.posix_fadvise
    monkeypatch.setattr(storage.os, "posix_fadvise", lambda fd, offset, length, advice: advised.append(
        (offset, length)) or real(fd, offset, length, advice))
    assert storage.prefetch([big], budget_bytes=10**6) == 3 * 4096 + 100
    assert advised == [(0, 4096), (4096, 4096), (8192, 4096), (12288, 100)]  # Linux caps what one call reads


@needs_fadvise
def test_prefetch_passes_over_a_file_the_system_refuses_to_advise(tmp_path, monkeypatch):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x" * 10)
    real = storage.os.posix_fadvise
    opened_before = len(os.listdir("/proc/self/fd"))

    def refuse_a(fd, offset, length, advice):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == "a.png":
            raise OSError(22, "Invalid argument")
        return real(fd, offset, length, advice)

    monkeypatch.setattr(storage.os, "posix_fadvise", refuse_a)
    assert storage.prefetch([tmp_path / "a.png", tmp_path / "b.png"], budget_bytes=100) == 10
    assert len(os.listdir("/proc/self/fd")) == opened_before  # every file closed again


def test_prefetch_does_nothing_without_the_system_call(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"x" * 10)
    monkeypatch.delattr(storage.os, "posix_fadvise", raising=False)
    assert storage.prefetch([tmp_path / "a.png"], budget_bytes=100) == 0


def test_an_output_folder_is_checked_before_any_work_and_nothing_is_made(tmp_path):
    storage.require_output_folder(tmp_path)  # there
    storage.require_output_folder(tmp_path / "new" / "deeper")  # not yet: the first write makes it
    assert list(tmp_path.iterdir()) == []  # the check made nothing
    (tmp_path / "taken").write_text("a file where the folder would go")
    with pytest.raises(storage.StorageError) as err:
        storage.require_output_folder(tmp_path / "taken")
    assert str(err.value).startswith(f"{tmp_path / 'taken'}: not a folder"), err.value
    with pytest.raises(storage.StorageError) as err:  # a file above it: the folder cannot be made
        storage.require_output_folder(tmp_path / "taken" / "out")
    assert str(err.value).startswith(f"{tmp_path / 'taken' / 'out'}: not a folder ({tmp_path / 'taken'} is not"), \
        err.value
    # a store without buckets (fsspec's in-memory one): a folder not there yet is made by the first write
    storage.require_output_folder(storage.location("memory://imgtune-output-check/new"))
    # an object where the folder would be: outputs would sit beside it under the same name
    taken = storage.location("memory://imgtune-output-check/an-object")
    taken.write_bytes(b"not a folder")
    with pytest.raises(storage.StorageError, match="an-object: not a folder \\(an object of that name is there"):
        storage.require_output_folder(taken)


def test_an_output_folder_under_a_folder_that_refuses_writes_is_refused(tmp_path, monkeypatch):
    # (the tests may run as root, whom the permission bits do not stop: the system's answer is replaced)
    refused = tmp_path / "read-only"
    refused.mkdir()
    monkeypatch.setattr(storage.os, "access", lambda path, mode: os.fspath(path) != os.fspath(refused))
    storage.require_output_folder(tmp_path / "elsewhere")
    with pytest.raises(storage.StorageError) as err:
        storage.require_output_folder(refused / "out")
    assert err.value.kind == "denied" and str(err.value) == \
        f"{refused / 'out'}: access denied (cannot write into {refused})"


@pytest.mark.parametrize("url", ["s3://AKIAEXAMPLE:s3cr3t@photos/set", "gs://someone@bucket/images"])
def test_a_url_with_credentials_is_refused_without_showing_them(url):
    with pytest.raises(storage.StorageError) as refused:
        storage.location(url)
    message = str(refused.value)
    assert "s3cr3t" not in message and "AKIAEXAMPLE" not in message and "someone" not in message
    assert message.startswith(url.split("://")[0] + "://***@") and "credentials in a URL are refused" in message
    assert not storage.has_credentials("s3://bucket/a@b/c.png")  # an @ in a key is no user
