"""Applying a fixed pipeline to a folder (imgtune_assets.core.apply): the pure pieces directly, and
``apply_to_folder`` on a real local Ray — outputs in each input's format, bit depth and channels,
bad inputs skipped with reasons, and the ledger that lets a re-run skip what did not change."""

import hashlib
import json
import os
import re

import cv2
import numpy as np
import pytest

from imgtune_assets.core import apply as apply_module
from imgtune_assets.core.apply import (
    LEDGER_NAME,
    MAX_FILES_PER_TASK,
    _apply_task,
    ApplyError,
    apply_to_folder,
    fixed_stages,
    pipeline_key,
    prepare_output,
    read_ledger,
    task_sizes,
    to_depth,
    unchanged_unread,
)
from imgtune_assets.core.ops import apply_pipeline
from imgtune_assets.core.imageio import jpeg_metadata, webp_is_lossless, with_jpeg_metadata
from imgtune_assets.core.manifest import local_stat
from imgtune_assets.core.sweepfile import fixed_sweep_document, load_sweep
from imgtune_assets_tests.conftest import write_sweep
from imgtune_assets_tests.support.files import age

STAGES = [("gaussian_blur", {"ksize": 5, "sigma": 1.2}), ("median_blur", {"ksize": 3})]
OTHER_STAGES = [("gaussian_blur", {"ksize": 3, "sigma": 0.8})]
IMAGES = ("Scan.JPEG", "colour16.tif", "colour8.png", "grey16.png", "grey8.png", "photo.jpg")
SKIPPED = ("broken.png", "notes.txt")


# ----------------------------------------------------------------------------- pure pieces
def test_to_depth_scales_8_and_16_bit_both_ways():
    eight = np.array([[0, 1, 128, 255]], dtype=np.uint8)
    sixteen = to_depth(eight, np.uint16)
    assert sixteen.dtype == np.uint16
    assert sixteen.tolist() == [[0, 257, 32896, 65535]]
    back = to_depth(np.array([[0, 257, 32896, 65535]], dtype=np.uint16), np.uint8)
    assert back.dtype == np.uint8 and back.tolist() == [[0, 1, 128, 255]]
    # the same depth: the very same array, untouched
    assert to_depth(eight, np.uint8) is eight
    # a colour image keeps its shape
    colour = np.full((2, 3, 3), 200, dtype=np.uint8)
    assert to_depth(colour, np.dtype("uint16")).shape == (2, 3, 3)
    assert (to_depth(colour, np.dtype("uint16")) == 200 * 257).all()


def test_to_depth_rounds_and_clips_other_types():
    floats = np.array([-3.7, 0.4, 1.6, 254.6, 255.4, 300.0, 1e9], dtype=np.float32)
    assert to_depth(floats, np.uint8).tolist() == [0, 0, 2, 255, 255, 255, 255]
    assert to_depth(floats, np.uint8).dtype == np.uint8
    assert to_depth(np.array([-1.2, 1000.6, 70000.0]), np.uint16).tolist() == [0, 1001, 65535]
    wide = np.array([-5, 12, 70000], dtype=np.int32)
    assert to_depth(wide, np.uint16).tolist() == [0, 12, 65535]
    assert to_depth(wide, np.uint8).tolist() == [0, 12, 255]


def test_to_depth_refuses_a_depth_no_image_file_holds_and_a_non_numeric_image():
    with pytest.raises(ValueError, match="8-bit or 16-bit pixels, not float32"):
        to_depth(np.zeros(3, np.uint8), np.float32)
    with pytest.raises(ValueError, match="numeric image array, got <U1"):
        to_depth(np.array(["a"]), np.uint8)


def test_pipeline_key_is_stable_and_order_sensitive():
    a = ("gaussian_blur", {"ksize": 5, "sigma": 1.2})
    b = ("median_blur", {"ksize": 3})
    key = pipeline_key([a, b])
    assert key == pipeline_key([a, b]) == pipeline_key([tuple(a), tuple(b)])
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    # the order of a stage's parameters does not matter; the order of stages does
    assert key == pipeline_key([("gaussian_blur", {"sigma": 1.2, "ksize": 5}), b])
    assert key != pipeline_key([b, a])
    assert key != pipeline_key([("gaussian_blur", {"ksize": 5, "sigma": 1.3}), b])
    assert key != pipeline_key([a])
    # the same pipeline in a fresh interpreter-independent form: a literal hash of its JSON
    expected = hashlib.sha256(json.dumps([[op, p] for op, p in [a, b]], sort_keys=True).encode()).hexdigest()[:16]
    assert key == expected


@pytest.mark.parametrize("n_files, cpus", [(0, 2), (1, 2), (3, 2), (10, 2), (120, 2), (1000, 8), (120, 64)])
def test_task_sizes_cover_every_file_large_first_single_files_last(n_files, cpus):
    sizes = task_sizes(n_files, cpus)
    assert sum(sizes) == n_files
    assert all(1 <= s <= MAX_FILES_PER_TASK for s in sizes)
    assert sizes == sorted(sizes, reverse=True)
    # the end of the folder is single files: one CPU never waits long for another's batch
    assert sizes[-min(len(sizes), cpus):] == [1] * min(len(sizes), cpus)


def test_task_sizes_amortise_many_small_images():
    sizes = task_sizes(1000, 2)
    assert sizes[0] == MAX_FILES_PER_TASK
    assert len(sizes) < 1000 // 4


def test_fixed_stages_of_a_best_pipeline_file(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", tmp_path / "data", trials=2, pipeline=[
        {"op": "gaussian_blur", "ksize": {"type": "odd", "low": 3, "high": 7}, "sigma": 1.0}]))
    document = fixed_sweep_document(sweep, [(op, dict(p)) for op, p in STAGES], name="s-best")
    import yaml

    best = tmp_path / "best_pipeline.yaml"
    best.write_text(yaml.safe_dump(document, sort_keys=False))
    stages = fixed_stages(load_sweep(best))
    assert stages == [("gaussian_blur", {"ksize": 5, "sigma": 1.2}), ("median_blur", {"ksize": 3})]
    assert pipeline_key(stages) == pipeline_key(STAGES)


def test_fixed_stages_refuses_searched_parameters(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path / "searching.yaml", tmp_path / "data", trials=2, pipeline=[
        {"op": "median_blur", "ksize": 3},
        {"op": "gaussian_blur", "ksize": {"type": "odd", "low": 3, "high": 7},
         "sigma": {"type": "float", "low": 0.5, "high": 2.0}}]))
    with pytest.raises(ApplyError) as err:
        fixed_stages(sweep)
    message = str(err.value)
    assert str(tmp_path / "searching.yaml") in message
    assert "pipeline[1] (gaussian_blur)" in message and "ksize, sigma" in message
    assert "pipeline[0]" not in message


# ----------------------------------------------------------------------------- a folder, on Ray
def _encode(image, suffix, params=()):
    ok, buffer = cv2.imencode(suffix, image, list(params))
    assert ok
    return buffer.tobytes()


def _decode_file(path):
    return cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)


def _scene(shape, dtype, seed):
    """A smooth scene with noise: blurring changes it, so a wrong output cannot pass as right."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    h, w = shape[:2]
    ramp = np.add.outer(np.linspace(0, 0.6, h), np.linspace(0, 0.3, w))
    if len(shape) == 3:
        ramp = np.stack([ramp, ramp[::-1], ramp[:, ::-1]], axis=2)
    noisy = ramp * top + rng.normal(0, 0.08 * top, size=shape)
    return np.clip(noisy, 0, top).astype(dtype)


def make_folder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "grey8.png").write_bytes(_encode(_scene((40, 52), np.uint8, 1), ".png"))
    (folder / "grey16.png").write_bytes(_encode(_scene((36, 44), np.uint16, 2), ".png"))
    (folder / "colour8.png").write_bytes(_encode(_scene((32, 48, 3), np.uint8, 3), ".png"))
    (folder / "colour16.tif").write_bytes(_encode(_scene((30, 34, 3), np.uint16, 4), ".tif"))
    (folder / "photo.jpg").write_bytes(_encode(_scene((48, 64, 3), np.uint8, 5), ".jpg",
                                               [cv2.IMWRITE_JPEG_QUALITY, 92]))
    (folder / "Scan.JPEG").write_bytes(_encode(_scene((24, 40, 3), np.uint8, 7), ".jpg"))
    (folder / "notes.txt").write_text("not an image\n")
    whole = _encode(_scene((40, 40), np.uint8, 6), ".png")
    (folder / "broken.png").write_bytes(whole[: len(whole) // 2])  # truncated
    return folder


def stamps(folder, names):
    return {n: ((folder / n).stat().st_mtime_ns, (folder / n).stat().st_ino) for n in names}


def by_name(result):
    return {e["input"].rsplit("/", 1)[-1]: e for e in result.entries}


def check_outputs(src, out, stages):
    """Every output: same name, dtype and channels as its input, and the pipeline's result."""
    for name in IMAGES:
        original = _decode_file(src / name)
        written = _decode_file(out / name)
        assert written is not None, name
        expected = apply_pipeline(original, stages)
        assert written.dtype == original.dtype, name
        assert written.shape == original.shape, name
        if name.lower().endswith((".jpg", ".jpeg")):  # lossy: within JPEG's error at quality 95 ...
            diff = np.abs(written.astype(np.int32) - expected.astype(np.int32))
            assert diff.mean() < 2.5 and diff.max() <= 24, (name, diff.mean(), diff.max())
            # ... and far from the unprocessed input (about 9-11 levels away on average)
            assert np.abs(written.astype(np.int32) - original).mean() > 2 * diff.mean() + 3, name
        else:
            assert np.array_equal(written, expected), name
    for name in SKIPPED:
        assert not (out / name).exists(), name


def test_a_folder_of_mixed_files(local_ray, tmp_path):
    src = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    progress = []
    result = apply_to_folder(STAGES, src, out, on_progress=lambda done, total: progress.append((done, total)))

    entries = by_name(result)
    assert sorted(entries) == sorted(IMAGES + SKIPPED)
    assert [e["input"] for e in result.entries] == sorted(e["input"] for e in result.entries)
    assert result.count("written") == len(IMAGES) and result.count("skipped") == 2 and result.count("unchanged") == 0
    for name in IMAGES:
        assert entries[name]["status"] == "written", entries[name]
        assert entries[name]["reason"] is None
    for name in SKIPPED:
        assert entries[name]["status"] == "skipped"
        assert str(src / name) in entries[name]["reason"], entries[name]["reason"]
    assert "not an image file type" in entries["notes.txt"]["reason"]
    assert "not a decodable image" in entries["broken.png"]["reason"]
    assert progress and progress[-1] == (len(IMAGES) + 1, len(IMAGES) + 1)  # the image-typed files
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)

    assert sorted(p.name for p in out.iterdir()) == sorted([*IMAGES, LEDGER_NAME])  # no temporary files left
    check_outputs(src, out, STAGES)

    assert result.ledger == out / LEDGER_NAME
    ledger = json.loads((out / LEDGER_NAME).read_text())
    assert ledger["pipeline"] == pipeline_key(STAGES)
    assert ledger["stages"] == [[op, params] for op, params in STAGES]
    saved = {e["input"].rsplit("/", 1)[-1]: e for e in ledger["entries"]}
    assert "notes.txt" not in saved  # no output path: not in the ledger
    for name in IMAGES:
        entry = saved[name]
        assert entry["status"] == "written" and entry["pipeline"] == pipeline_key(STAGES)
        assert entry["input"] == str(src / name) and entry["output"] == str(out / name)
        assert entry["input_key"] == hashlib.sha256((src / name).read_bytes()).hexdigest()
        assert entry["output_sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert entry == {**entries[name], "seconds": entry["seconds"]}
    assert saved["broken.png"]["status"] == "skipped" and saved["broken.png"]["output_sha256"] is None


def test_a_task_writes_behind_its_work_and_reports_a_failed_write_with_its_file(tmp_path):
    # In this process (no Ray): the task's writer thread writes every output before the task returns,
    # each with its hash; one output that cannot be written is skipped with its path, the rest written.
    src = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    (tmp_path / "blocker").write_text("a file where a folder should be\n")
    names = ["grey8.png", "colour8.png", "photo.jpg", "grey16.png"]
    targets = [out / n for n in names]
    targets[1] = tmp_path / "blocker" / "colour8.png"
    entries = _apply_task(STAGES, [(src / n, t, None, None, None) for n, t in zip(names, targets)], "key")

    assert [e["input"] for e in entries] == [str(src / n) for n in names]
    assert [e["status"] for e in entries] == ["written", "skipped", "written", "written"]
    assert str(targets[1]) in entries[1]["reason"] and entries[1]["output_sha256"] is None
    for entry, target in zip(entries, targets):
        if entry["status"] == "written":
            assert hashlib.sha256(target.read_bytes()).hexdigest() == entry["output_sha256"]
            assert entry["seconds"] > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(n for n in names if n != "colour8.png")


def test_tasks_of_several_files_cover_the_folder_once(local_ray, tmp_path, monkeypatch):
    src = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    image_typed = len(IMAGES) + 1  # broken.png too; notes.txt is not sent to a task
    sizes = [3, 2, 1, 1][: image_typed]
    sizes += [1] * (image_typed - sum(sizes))
    monkeypatch.setattr(apply_module, "task_sizes", lambda n_files, cpus: list(sizes))
    progress = []
    result = apply_to_folder(STAGES, src, out, on_progress=lambda done, total: progress.append(done))

    assert result.count("written") == len(IMAGES) and result.count("skipped") == 2
    assert sorted(by_name(result)) == sorted(IMAGES + SKIPPED)
    check_outputs(src, out, STAGES)
    assert len(progress) == len(sizes) and progress[-1] == image_typed  # once per task


def test_re_runs_skip_what_did_not_change(local_ray, tmp_path):
    src = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    first = by_name(apply_to_folder(STAGES, src, out))
    before = stamps(out, IMAGES)

    # 1. nothing changed: every image unchanged, no output touched, the ledger still right
    again = apply_to_folder(STAGES, src, out)
    entries = by_name(again)
    assert {n: entries[n]["status"] for n in IMAGES} == {n: "unchanged" for n in IMAGES}
    assert {n: entries[n]["status"] for n in SKIPPED} == {n: "skipped" for n in SKIPPED}
    assert again.count("written") == 0 and again.count("unchanged") == len(IMAGES)
    assert stamps(out, IMAGES) == before
    for name in IMAGES:
        assert entries[name]["output_sha256"] == first[name]["output_sha256"]
        assert entries[name]["input_key"] == first[name]["input_key"]
    ledger = {e["output"]: e for e in json.loads((out / LEDGER_NAME).read_text())["entries"]}
    assert all(ledger[str(out / n)]["status"] == "unchanged" for n in IMAGES)

    # 2. one input's content changed: only that one written
    (src / "grey8.png").write_bytes(_encode(_scene((40, 52), np.uint8, 99), ".png"))
    changed = by_name(apply_to_folder(STAGES, src, out))
    assert {n: changed[n]["status"] for n in IMAGES} == {n: "written" if n == "grey8.png" else "unchanged"
                                                         for n in IMAGES}
    after = stamps(out, IMAGES)
    assert {n for n in IMAGES if after[n] != before[n]} == {"grey8.png"}
    assert changed["grey8.png"]["input_key"] == hashlib.sha256((src / "grey8.png").read_bytes()).hexdigest()
    assert changed["grey8.png"]["output_sha256"] == hashlib.sha256((out / "grey8.png").read_bytes()).hexdigest()
    check_outputs(src, out, STAGES)

    # 3. another pipeline: every image written again, with its result
    before = stamps(out, IMAGES)
    other = apply_to_folder(OTHER_STAGES, src, out)
    assert other.count("written") == len(IMAGES) and other.count("unchanged") == 0
    after = stamps(out, IMAGES)
    assert all(after[n] != before[n] for n in IMAGES)
    check_outputs(src, out, OTHER_STAGES)
    assert json.loads((out / LEDGER_NAME).read_text())["pipeline"] == pipeline_key(OTHER_STAGES)

    # 4. an output deleted: that one written again, the others left alone
    before = stamps(out, IMAGES)
    (out / "colour16.tif").unlink()
    restored = by_name(apply_to_folder(OTHER_STAGES, src, out))
    assert {n: restored[n]["status"] for n in IMAGES} == {n: "written" if n == "colour16.tif" else "unchanged"
                                                          for n in IMAGES}
    after = stamps(out, IMAGES)
    assert {n for n in IMAGES if after[n] != before[n]} == {"colour16.tif"}
    check_outputs(src, out, OTHER_STAGES)

    # 5. a damaged ledger is a lost cache, not an error: everything written again
    (out / LEDGER_NAME).write_text("{not json")
    assert apply_to_folder(OTHER_STAGES, src, out).count("written") == len(IMAGES)


def _same_size_other_bytes(path):
    """Other bytes of the same size and mtime (as `cp -p` of another file would leave): only its inode
    or ctime, or reading it, tells."""
    st, data = path.stat(), bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_third_run_of_an_unchanged_folder_reads_no_file(local_ray, tmp_path):
    src = make_folder(tmp_path / "in")
    for name in (*IMAGES, *SKIPPED):
        age(src / name)  # inputs older than the racy window: their stats are trusted
    out = tmp_path / "out"
    first = by_name(apply_to_folder(STAGES, src, out))
    assert first["broken.png"]["status"] == "skipped" and first["broken.png"]["unusable"] is True
    assert all(first[n]["input_stat"] is not None and first[n].get("output_stat") is None for n in IMAGES)
    for name in IMAGES:
        age(out / name)  # a just-written output's stat is never trusted; read back later, it is
    connected = []
    second = by_name(apply_to_folder(STAGES, src, out, connect=lambda: connected.append("second")))
    assert {n: second[n]["status"] for n in IMAGES} == {n: "unchanged" for n in IMAGES}
    assert all(second[n]["output_stat"] is not None for n in IMAGES)

    # Neither file is read now, and no Ray task runs (the caller need not even connect) ...
    third = by_name(apply_to_folder(STAGES, src, out, connect=lambda: connected.append("third")))
    assert connected == ["second"]
    assert {n: third[n]["status"] for n in IMAGES} == {n: "unchanged" for n in IMAGES}
    # a broken input stays skipped for its recorded reason, unread while its stat is unchanged
    assert third["broken.png"] == first["broken.png"]
    assert third["grey8.png"]["input_key"] == first["grey8.png"]["input_key"]
    # ... but bytes changed behind the same size and mtime change the ctime: both files are read again,
    # the input's new key seen (its damage found), the damaged output rewritten.
    _same_size_other_bytes(src / "grey8.png")
    _same_size_other_bytes(out / "colour8.png")
    fourth = by_name(apply_to_folder(STAGES, src, out))
    assert {n: fourth[n]["status"] for n in IMAGES if fourth[n]["status"] != "unchanged"} == \
        {"grey8.png": "skipped", "colour8.png": "written"}
    assert fourth["grey8.png"]["input_key"] == hashlib.sha256((src / "grey8.png").read_bytes()).hexdigest()
    assert np.array_equal(_decode_file(out / "colour8.png"),
                          apply_pipeline(_decode_file(src / "colour8.png"), STAGES))


def test_a_turned_photo_is_processed_upright_and_stored_back_as_its_input(tmp_path):
    """An x derivative is not the same filter on a photo turned a quarter: the output must be the
    pipeline applied to the upright photo (as it was scored), stored in the input's orientation under
    the input's Exif tag, so that viewers (and cv2.imread) show it upright."""
    from PIL import Image

    photo = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    ramp = np.repeat(np.linspace(20, 220, 50)[None, :], 30, axis=0)  # stored: brighter to the right
    pixels = np.dstack([ramp, ramp * 0.8, ramp * 0.6]).round().astype(np.uint8)
    Image.fromarray(pixels[:, :, ::-1]).save(photo, quality=95, exif=exif)
    stages = [("sobel", {"ksize": 3, "scale": 1.0, "dx": 1, "dy": 0})]  # upright, the ramp runs down: ~0
    _, encoded = prepare_output(stages, photo, tmp_path / "out.jpg", None, "k")
    shown = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)  # turned by its Exif
    stored = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    assert stored.shape == (30, 50, 3) and shown.shape == (50, 30, 3)
    upright = apply_pipeline(cv2.imread(str(photo)), stages)
    as_stored = apply_pipeline(_decode_file(photo), stages)
    right = np.abs(shown.astype(int) - upright).mean()
    assert right < 2.5 and np.abs(np.rot90(as_stored, k=-1).astype(int) - upright).mean() > 10 * right


def test_a_photo_keeps_its_exif_orientation_and_colour_profile(tmp_path):
    import io

    from PIL import Image, ImageCms

    photo = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    exif[0x010F] = "imgtune-test-camera"  # Make
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels = _scene((30, 50, 3), np.uint8, 11)
    Image.fromarray(pixels[:, :, ::-1]).save(photo, quality=92, exif=exif, icc_profile=icc)
    entry, encoded = prepare_output(STAGES, photo, tmp_path / "out.jpg", None, "k")
    assert encoded is not None and entry["input_key"] == hashlib.sha256(photo.read_bytes()).hexdigest()
    with Image.open(io.BytesIO(encoded)) as out:
        assert out.getexif()[0x0112] == 6 and out.getexif()[0x010F] == "imgtune-test-camera"
        assert out.info["icc_profile"] == icc
        assert out.size == (50, 30)  # the stored pixels, as the input's: the tag still rotates them to display
    written = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    expected = apply_pipeline(_decode_file(photo), STAGES)
    assert np.abs(written.astype(int) - expected).mean() < 2.5
    # a grey output of it keeps the Exif, not the colour (RGB) profile
    _, grey = prepare_output([("to_gray", {})], photo, tmp_path / "grey.jpg", None, "k")
    with Image.open(io.BytesIO(grey)) as out:
        assert out.mode == "L" and out.getexif()[0x0112] == 6 and "icc_profile" not in out.info
    # a photo holding a second image (MPF: an MPO, a gain or depth map) comes out as one image, without the
    # index (or XMP) that would point at what is not there
    mpo = tmp_path / "pair.jpg"
    Image.fromarray(pixels[:, :, ::-1]).save(mpo, format="MPO", save_all=True, quality=90,
                                            append_images=[Image.fromarray(pixels[:15, :25])])
    assert b"MPF\x00" in mpo.read_bytes()[:4096]
    _, single = prepare_output(STAGES, mpo, tmp_path / "pair-out.jpg", None, "k")
    assert b"MPF\x00" not in single[:4096]
    with Image.open(io.BytesIO(single)) as out:
        assert getattr(out, "n_frames", 1) == 1
    # a JPEG without such segments is written as OpenCV encodes it; a PNG keeps no JPEG segments
    plain = tmp_path / "plain.jpg"
    plain.write_bytes(_encode(pixels, ".jpg"))
    assert jpeg_metadata(plain.read_bytes(), 3) == []
    assert jpeg_metadata(b"\x89PNG\r\n", 3) == [] and with_jpeg_metadata(b"not a jpeg", [b"x"]) == b"not a jpeg"


def test_unchanged_unread_compares_stats_of_files_and_listing_tags_of_objects(tmp_path):
    from imgtune_assets.core import storage

    src, out = tmp_path / "a.png", tmp_path / "b.png"
    src.write_bytes(b"in")
    out.write_bytes(b"out")
    entry = {"status": "written", "pipeline": "k", "input": str(src), "input_stat": local_stat(src),
             "output_stat": local_stat(out)}
    assert unchanged_unread(entry, "k", src, out)
    assert not unchanged_unread(entry, "other pipeline", src, out)
    assert not unchanged_unread({**entry, "output_stat": None}, "k", src, out)  # never read back yet
    assert not unchanged_unread({**entry, "status": "skipped"}, "k", src, out)
    assert not unchanged_unread(None, "k", src, out)
    other = tmp_path / "other-folder" / "a.png"  # another input folder's file of that name, same size and mtime
    other.parent.mkdir()
    other.write_bytes(b"IN")
    os.utime(other, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns))
    assert not unchanged_unread(entry, "k", other, out)
    # The input replaced by a file of the same size and mtime (`cp -p`, `tar x`, `rsync -t`): read again.
    replacement = tmp_path / "replacement.png"
    replacement.write_bytes(b"IN")
    os.utime(replacement, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns))
    replacement.replace(src)
    assert (src.stat().st_size, src.stat().st_mtime_ns) == tuple(int(x) for x in entry["input_stat"].split(":")[:2])
    assert not unchanged_unread(entry, "k", src, out)
    entry["input_stat"] = local_stat(src)
    age(out, 1)
    assert not unchanged_unread(entry, "k", src, out)
    remote_in = storage.location("memory://bucket/in/a.png")
    remote_out = storage.location("memory://bucket/out/a.png")
    tags = {"status": "unchanged", "pipeline": "k", "input": str(remote_in), "input_key": "etag:1:2",
            "output_tag": "etag:3:4"}
    assert unchanged_unread(tags, "k", remote_in, remote_out, "etag:1:2", "etag:3:4")
    assert not unchanged_unread(tags, "k", remote_in, remote_out, "etag:1:2", None)  # not in the listing
    assert not unchanged_unread(tags, "k", remote_in, remote_out, "etag:9:2", "etag:3:4")


def test_folders_that_cannot_be_used(local_ray, tmp_path):
    src = make_folder(tmp_path / "in")
    with pytest.raises(ApplyError) as err:
        apply_to_folder(STAGES, src, src)
    assert str(src) in str(err.value) and "must differ" in str(err.value)
    assert sorted(p.name for p in src.iterdir()) == sorted(IMAGES + SKIPPED)  # nothing written in it

    missing = tmp_path / "no such folder"
    with pytest.raises(ApplyError) as err:
        apply_to_folder(STAGES, missing, tmp_path / "out")
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    assert not (tmp_path / "out").exists()

    with pytest.raises(ApplyError) as err:  # a file, not a folder
        apply_to_folder(STAGES, src / "grey8.png", tmp_path / "out")
    assert str(src / "grey8.png") in str(err.value)


def test_an_output_folder_that_cannot_be_made_is_refused_before_any_file_is_read(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "in")
    (tmp_path / "taken").write_text("a file where the output folder would go")
    read = []
    monkeypatch.setattr(apply_module.storage, "list_entries", lambda folder: read.append(folder) or ([], []))
    with pytest.raises(ApplyError) as err:
        apply_to_folder(STAGES, src, tmp_path / "taken" / "out", connect=lambda: pytest.fail("Ray was to start"))
    assert str(err.value).startswith(f"{tmp_path / 'taken' / 'out'}: not a folder"), err.value
    assert read == []  # refused before the input was listed
    assert (tmp_path / "taken").read_text() == "a file where the output folder would go"


def test_an_empty_folder_writes_an_empty_ledger(local_ray, tmp_path):
    (tmp_path / "in").mkdir()
    result = apply_to_folder(STAGES, tmp_path / "in", tmp_path / "out")
    assert result.entries == []
    assert json.loads((tmp_path / "out" / LEDGER_NAME).read_text())["entries"] == []


def test_transparency_is_kept_and_a_damaged_output_is_rewritten(local_ray, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
    (src / "logo.png").write_bytes(_encode(rgba, ".png"))
    first = apply_to_folder(STAGES, src, out)
    assert [e["status"] for e in first.entries] == ["written"]
    written = _decode_file(out / "logo.png")
    assert written.shape == (24, 32, 4)
    assert np.array_equal(written[:, :, 3], rgba[:, :, 3])  # the alpha channel, untouched
    assert np.array_equal(written[:, :, :3], apply_pipeline(np.ascontiguousarray(rgba[:, :, :3]), STAGES))
    (out / "logo.png").write_bytes(b"garbage")  # edited or damaged since
    again = apply_to_folder(STAGES, src, out)
    assert [e["status"] for e in again.entries] == ["written"]
    assert np.array_equal(_decode_file(out / "logo.png"), written)


def test_webp_is_written_lossless_or_lossy_as_its_input_was(local_ray, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    scene = _scene((36, 52, 3), np.uint8, 8)
    (src / "lossless.webp").write_bytes(_encode(scene, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]))
    (src / "lossy.webp").write_bytes(_encode(scene, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]))
    whole = (src / "lossless.webp").read_bytes()
    (src / "cut.webp").write_bytes(whole[: len(whole) // 2])
    assert webp_is_lossless((src / "lossless.webp").read_bytes())
    assert not webp_is_lossless((src / "lossy.webp").read_bytes())

    entries = by_name(apply_to_folder(STAGES, src, out))
    assert {n: e["status"] for n, e in entries.items()} == {
        "lossless.webp": "written", "lossy.webp": "written", "cut.webp": "skipped"}
    assert "not a decodable image" in entries["cut.webp"]["reason"]
    lossless = (out / "lossless.webp").read_bytes()
    assert webp_is_lossless(lossless)
    assert np.array_equal(_decode_file(out / "lossless.webp"), apply_pipeline(_decode_file(src / "lossless.webp"), STAGES))
    lossy = (out / "lossy.webp").read_bytes()
    assert not webp_is_lossless(lossy)  # a lossy input stays lossy (smaller), at high quality
    expected = apply_pipeline(_decode_file(src / "lossy.webp"), STAGES).astype(np.int32)
    diff = np.abs(_decode_file(out / "lossy.webp").astype(np.int32) - expected)
    assert 0 < diff.mean() < 2.5, diff.mean()


def test_the_input_folder_spelled_another_way_is_still_refused(local_ray, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(_encode(np.zeros((8, 8), np.uint8), ".png"))
    with pytest.raises(ApplyError, match="must differ from the input folder"):
        apply_to_folder(STAGES, src, src / ".." / "in")
    assert sorted(p.name for p in src.iterdir()) == ["a.png"]


def test_an_output_that_could_not_be_written_is_tried_again_and_a_broken_input_is_not(local_ray, tmp_path):
    src = make_folder(tmp_path / "in")
    for name in (*IMAGES, *SKIPPED):
        age(src / name)
    out = tmp_path / "out"
    (out / "grey8.png").mkdir(parents=True)  # where the output would go: it cannot be written
    first = by_name(apply_to_folder(STAGES, src, out))
    assert first["grey8.png"]["status"] == "skipped" and not first["grey8.png"].get("unusable")
    assert str(out / "grey8.png") in first["grey8.png"]["reason"]
    (out / "grey8.png").rmdir()
    connected = []
    second = by_name(apply_to_folder(STAGES, src, out, connect=lambda: connected.append(1)))
    assert second["grey8.png"]["status"] == "written" and connected == [1]
    assert second["broken.png"]["status"] == "skipped" and second["broken.png"]["reason"] == first["broken.png"]["reason"]


def folder_with_an_earlier_ledger(tmp_path):
    """An input folder, and an output folder whose ledger holds an earlier run's entry for photo.jpg (made
    with another pipeline): (input, output, that entry, the plan of applying STAGES)."""
    from imgtune_assets.core import apply

    src = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    earlier = {"input": str(src / "photo.jpg"), "output": str(out / "photo.jpg"), "status": "written",
               "pipeline": "older", "input_key": "k", "output_sha256": "s"}
    out.mkdir()
    (out / LEDGER_NAME).write_text(json.dumps({"entries": [earlier]}))
    return src, out, earlier, apply.plan_apply(STAGES, src, out)


def test_a_run_that_fails_midway_keeps_the_ledger_of_what_it_did(tmp_path, monkeypatch):
    # Ray's part replaced: the first task's files are done, then a task is lost beyond its retries.
    from imgtune_assets.core import apply

    src, out, earlier, plan = folder_with_an_earlier_ledger(tmp_path)

    def half_then_lost(plan, max_retries, on_progress, entries, checkpoint=None):
        entries.append({"input": str(src / "grey8.png"), "output": str(out / "grey8.png"), "status": "written",
                        "pipeline": plan.key, "output_sha256": "x"})
        raise RuntimeError("task lost beyond its retries")

    monkeypatch.setattr(apply, "_run_tasks", half_then_lost)
    with pytest.raises(RuntimeError, match="lost"):
        apply.run_plan(plan)
    kept = {e["input"].rsplit("/", 1)[-1]: e for e in json.loads((out / LEDGER_NAME).read_text())["entries"]}
    assert kept["grey8.png"]["status"] == "written"  # done before the loss
    assert kept["photo.jpg"] == earlier  # not reached: the earlier run's entry stays
    assert "notes.txt" not in kept  # not an image: no output, not in the ledger


def test_the_ledger_written_while_tasks_run_lists_what_came_back_and_keeps_what_was_not_reached(tmp_path,
                                                                                                monkeypatch):
    # Ray's part replaced: one file back, a checkpoint, then the command killed outright (no final ledger).
    from imgtune_assets.core import apply

    src, out, earlier, plan = folder_with_an_earlier_ledger(tmp_path)
    seen = {}

    class Killed(BaseException):  # what no clean-up catches
        pass

    def one_back_then_killed(plan, max_retries, on_progress, entries, checkpoint=None):
        entries.append({"input": str(src / "grey8.png"), "output": str(out / "grey8.png"), "status": "written",
                        "pipeline": plan.key, "output_sha256": "x"})
        checkpoint()
        seen.update({e["input"].rsplit("/", 1)[-1]: e for e in json.loads((out / LEDGER_NAME).read_text())["entries"]})
        raise Killed

    monkeypatch.setattr(apply, "_run_tasks", one_back_then_killed)
    with pytest.raises(Killed):
        apply.run_plan(plan)
    assert seen["grey8.png"]["status"] == "written" and seen["photo.jpg"] == earlier and len(seen) == 2


def test_a_failing_checkpoint_is_tried_again_and_does_not_stop_the_tasks(local_ray, tmp_path, monkeypatch):
    from imgtune_assets.core import apply, storage

    src = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    plan = apply.plan_apply(STAGES, src, out)
    calls = []

    def checkpoint():  # a store's passing refusal, the first time
        calls.append(1)
        if len(calls) == 1:
            raise storage.StorageError(f"{out / LEDGER_NAME}: cannot write it (SlowDown)")

    monkeypatch.setattr(apply, "LEDGER_CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every task back
    entries = []
    apply._run_tasks(plan, 0, None, entries, checkpoint=checkpoint)
    assert sorted(e["input"] for e in entries) == sorted(str(item[0]) for item in plan.items)
    assert len(plan.items) >= 3 and len(calls) >= 2  # tried again after the failure, and the tasks went on


def test_sub_folders_are_skipped_with_a_reason_and_an_output_folder_inside_is_not_one(local_ray, tmp_path):
    src = make_folder(tmp_path / "in")
    make_folder(src / "holiday")  # images one level down: not read, but said
    out = src / "tuned"
    result = apply_to_folder(STAGES, src, out)
    sub = [e for e in result.entries if e["input"].endswith("/")]
    assert [e["input"] for e in sub] == [f"{src / 'holiday'}/"]
    assert sub[0]["status"] == "skipped" and f"{src / 'holiday'}: a sub-folder" in sub[0]["reason"]
    assert result.count("written") == len(IMAGES) and not (out / "holiday").exists()
    assert all(e["input"] != f"{out}/" for e in result.entries)  # the output folder is no input
    assert all(not e["input"].endswith("/") for e in json.loads((out / LEDGER_NAME).read_text())["entries"])
    again = apply_to_folder(STAGES, src, out)  # a re-run: the same, and its own output folder still no input
    assert [e["input"] for e in again.entries if e["input"].endswith("/")] == [f"{src / 'holiday'}/"]


@pytest.mark.parametrize("layout", ["images/ and targets/", "flat"])
def test_a_data_folders_targets_are_never_the_output(tmp_path, layout):
    """A sweep's data folder given as the input: its targets/ (or a folder inside it) as the output would
    have its ground truth overwritten by the outputs; refused before anything is written."""
    data = tmp_path / "data"
    make_folder(data / "images" if layout != "flat" else data)
    targets = make_folder(data / "targets")
    before = {p.name: p.read_bytes() for p in targets.iterdir() if p.is_file()}
    for out in (targets, targets / "tuned"):
        with pytest.raises(ApplyError) as err:
            apply_module.plan_apply(STAGES, data, out)
        assert str(out) in str(err.value) and "targets" in str(err.value) and "overwrite" in str(err.value)
    assert {p.name: p.read_bytes() for p in targets.iterdir() if p.is_file()} == before
    assert not (targets / "tuned").exists()
    plan = apply_module.plan_apply(STAGES, data, data / "tuned")  # beside them is fine
    assert sorted(item[0].name for item in plan.items) == sorted([*IMAGES, "broken.png"])
    if layout != "flat":  # the images/ folder given itself: its sibling targets/ is refused too
        with pytest.raises(ApplyError, match="targets"):
            apply_module.plan_apply(STAGES, data / "images", targets)


def test_a_data_folder_without_targets_yet_does_not_get_them_from_apply(tmp_path):
    """No targets/ yet (a metric without ground truth): outputs written there would become the next
    sweep's targets; refused, and nothing is created."""
    data = make_folder(tmp_path / "flat")
    with pytest.raises(ApplyError, match="become the targets"):
        apply_module.plan_apply(STAGES, data, data / "targets")
    assert not (data / "targets").exists()


def test_a_flat_data_folders_targets_are_not_a_sub_folder_to_report(tmp_path):
    data = make_folder(tmp_path / "flat")
    make_folder(data / "targets")  # the data folder's targets (images directly in it)
    make_folder(data / "extra")
    plan = apply_module.plan_apply(STAGES, data, tmp_path / "out")
    assert [e["input"] for e in plan.settled if e["input"].endswith("/")] == [f"{data / 'extra'}/"]
    # a folder with images/: every sub-folder of images/ is reported, a "targets" one too
    make_folder(tmp_path / "set" / "images" / "targets")
    plan = apply_module.plan_apply(STAGES, tmp_path / "set", tmp_path / "out2")
    assert [e["input"] for e in plan.settled if e["input"].endswith("/")] == [f"{tmp_path / 'set' / 'images' / 'targets'}/"]


def test_plan_apply_removes_a_killed_writers_old_temporary_files_of_its_outputs(tmp_path):
    import time

    from imgtune_assets.core.files import TEMPORARY_SUFFIX, _temporary_prefix

    src = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f"{_temporary_prefix('grey8.png')}abcd1234{TEMPORARY_SUFFIX}"
    live = out / f"{_temporary_prefix('photo.jpg')}efgh5678{TEMPORARY_SUFFIX}"
    for file in (stale, live):
        file.write_bytes(b"half an image")
    os.utime(stale, (time.time() - 2 * apply_module.STALE_TEMPORARY_SECONDS,) * 2)
    apply_module.plan_apply(STAGES, src, out)
    assert not stale.exists() and live.exists()  # a live writer's (seconds old) is left alone


def test_a_ctrl_c_landing_in_the_ledger_write_still_leaves_the_whole_ledger(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    plan = apply_module.plan_apply(STAGES, src, out)

    def all_done(plan, max_retries, on_progress, entries, checkpoint=None):
        entries.extend({"input": str(item[0]), "output": str(item[1]), "status": "written", "pipeline": plan.key,
                        "output_sha256": "x"} for item in plan.items)

    real_write, calls = apply_module.storage.write_bytes_atomic, []

    def interrupted_once(path, data):
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as the signal handler raises it in the middle of the write
        return real_write(path, data)

    monkeypatch.setattr(apply_module, "_run_tasks", all_done)
    monkeypatch.setattr(apply_module.storage, "write_bytes_atomic", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        apply_module.run_plan(plan)
    assert calls == [out / LEDGER_NAME] * 2
    assert len(json.loads((out / LEDGER_NAME).read_text())["entries"]) == len(plan.items)


def test_an_output_is_written_in_the_format_its_input_is_in_whatever_its_name(tmp_path):
    """A 16-bit PNG named .jpg (a renamed or mislabelled file): encoding it as its name says would write
    an 8-bit JPEG, its 16-bit values clipped to white. It is written as what it is, under its name."""
    deep = _scene((30, 40), np.uint16, 11)
    misnamed = tmp_path / "scan.jpg"
    misnamed.write_bytes(_encode(deep, ".png"))
    entry, encoded = prepare_output(STAGES, misnamed, tmp_path / "out" / "scan.jpg", None, "k")
    assert encoded.startswith(b"\x89PNG") and entry["output"].endswith("scan.jpg")
    written = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    assert written.dtype == np.uint16 and np.array_equal(written, apply_pipeline(deep, STAGES))
    jpeg_as_png = tmp_path / "photo.png"
    jpeg_as_png.write_bytes(_encode(_scene((30, 40, 3), np.uint8, 12), ".jpg"))
    _, encoded = prepare_output(STAGES, jpeg_as_png, tmp_path / "out" / "photo.png", None, "k")
    assert encoded.startswith(b"\xff\xd8\xff")



@pytest.mark.parametrize("raised, unusable", [(ValueError("refused"), True), (cv2.error("refused"), True),
                                              (TypeError("a defect"), None), (MemoryError(), None)])
def test_only_the_contents_fault_keeps_an_input_skipped_unread(tmp_path, monkeypatch, raised, unusable):
    """An input the pipeline refuses (a ValueError, OpenCV's error) stays skipped while unchanged; any
    other error (a defect, this machine's memory) is reported and the file tried again next run."""
    source = tmp_path / "a.png"
    source.write_bytes(_encode(_scene((30, 40), np.uint8, 3), ".png"))
    age(source)

    def refuse(image, stages):
        raise raised

    monkeypatch.setattr("imgtune_assets.core.ops.apply_pipeline", refuse)
    entry, encoded = prepare_output(STAGES, source, tmp_path / "out" / "a.png", None, "k")
    assert encoded is None and entry["status"] == "skipped" and entry.get("unusable") is unusable
    assert entry["reason"].startswith(f"{source}: {type(raised).__name__}")
    assert unchanged_unread(entry, "k", source, tmp_path / "out" / "a.png") is bool(unusable)


@pytest.mark.parametrize("content", ["[]", "null", '{"entries": 5}', '{"entries": [1, {"output": 3}]}', "{not json"])
def test_a_ledger_that_is_not_one_means_none(tmp_path, content):
    (tmp_path / LEDGER_NAME).write_text(content)  # foreign, hand-edited or damaged: every file is done again
    assert read_ledger(tmp_path) == {}
    (tmp_path / LEDGER_NAME).write_text(json.dumps({"entries": [{"output": "o.png", "status": "written"}, 7]}))
    assert read_ledger(tmp_path) == {"o.png": {"output": "o.png", "status": "written"}}
