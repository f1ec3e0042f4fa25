"""Manifest scanning over real-looking folders with bad files mixed in."""

import json
import os
import time
from dataclasses import replace

import numpy as np
import pytest
import cv2

from imgtune_assets.core.manifest import (
    PROBE_CACHE_FILE,
    UNDECODABLE_FILE,
    ManifestError,
    ManifestRow,
    ProbeAhead,
    ProbeCache,
    load_images,
    locked_probe_cache,
    manifest_digest,
    read_undecodable,
    record_undecodable,
    require_usable,
    save_probe_cache,
    scan_folder,
    skip_too_small,
    skip_undecodable,
    sweep_rows,
    unreadable_advice,
)
from imgtune_assets_tests.support.files import age
from imgtune_assets_tests.support.waiting import wait_for


def png(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", image)
    assert ok
    path.write_bytes(buf.tobytes())


@pytest.fixture
def messy(tmp_path):
    rng = np.random.default_rng(0)
    grey = (rng.random((40, 50)) * 255).astype(np.uint8)
    colour = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    deep = (rng.random((40, 50)) * 65535).astype(np.uint16)
    images, targets = tmp_path / "images", tmp_path / "targets"
    png(images / "good.png", grey)
    png(targets / "good.png", grey)
    png(images / "colour photo.png", colour)
    png(targets / "colour photo.png", colour)
    png(images / "tiefe_ÄÖÜ_16bit.png", deep)
    png(targets / "tiefe_ÄÖÜ_16bit.png", deep)
    full = cv2.imencode(".png", grey)[1].tobytes()
    (images / "truncated.png").write_bytes(full[: len(full) // 2])
    png(targets / "truncated.png", grey)
    (images / "empty.png").write_bytes(b"")
    (images / "notes.png").write_text("this is not an image\n")
    png(images / "no_target.png", grey)
    png(images / "IMG_0001.png", grey)
    png(targets / "img_0001.png", grey)  # differs in case only
    png(images / "wrong_size.png", grey)
    png(targets / "wrong_size.png", grey[:20])
    (images / "readme.txt").write_text("hello")
    return tmp_path


def test_bad_files_become_rows_with_reasons(messy):
    rows = {r.image_path.split("/")[-1]: r for r in scan_folder(messy, needs_target=True)}
    ok = {name for name, r in rows.items() if r.status == "ok"}
    assert ok == {"good.png", "colour photo.png", "tiefe_ÄÖÜ_16bit.png"}
    assert "not a decodable image" in rows["truncated.png"].reason
    assert "empty file" in rows["empty.png"].reason
    assert "not a decodable image" in rows["notes.png"].reason
    assert "no target" in rows["no_target.png"].reason and "case" not in rows["no_target.png"].reason
    assert rows["IMG_0001.png"].reason.startswith("no target: expected targets/IMG_0001.<") and \
        rows["IMG_0001.png"].reason.endswith("(targets/img_0001.png differs in case only: rename one to match)")
    assert "target wrong_size.png is 50x20, image is 50x40" in rows["wrong_size.png"].reason
    assert "EXIF" not in rows["wrong_size.png"].reason  # not a quarter turn
    assert "not an image file type (.txt" in rows["readme.txt"].reason
    assert rows["colour photo.png"].channels == 3 and rows["tiefe_ÄÖÜ_16bit.png"].dtype == "uint16"
    for name, row in rows.items():
        if row.status != "ok":
            assert str(messy / "images" / name) in row.reason or "no target" in row.reason or "target " in row.reason \
                or "not an image file type" in row.reason


@pytest.mark.parametrize("needs_target", [True, False])
def test_an_image_with_two_targets_of_its_stem_is_skipped_naming_them(messy, needs_target):
    """``targets/good.png`` and ``targets/good.jpg``: which is the ground truth is not the listing
    order's to decide (an ``apply`` into ``targets/`` once left such pairs, and the sweep scored against
    the outputs)."""
    grey = cv2.imread(str(messy / "targets" / "good.png"), cv2.IMREAD_UNCHANGED)
    (messy / "targets" / "good.jpg").write_bytes(cv2.imencode(".jpg", grey)[1].tobytes())
    rows = {r.id: r for r in scan_folder(messy, needs_target=needs_target)}
    good = rows["good"]
    assert good.status == "skipped" and good.target_path is None and good.image_sha256 is None
    assert "2 targets of the same stem (good.jpg, good.png): keep one" in good.reason
    assert rows["colour photo"].status == "ok"  # the other images are not affected


def test_without_target_requirement_targetless_images_are_ok(messy):
    rows = {r.id: r for r in scan_folder(messy, needs_target=False)}
    assert rows["no_target"].status == "ok" and rows["no_target"].target_path is None


def test_load_images_decodes_usable_rows_once(messy):
    rows = scan_folder(messy, needs_target=True)
    ids, images, targets = load_images(messy, rows)
    assert sorted(ids) == ["colour photo", "good", "tiefe_ÄÖÜ_16bit"]
    shapes = {i: (im.shape, im.dtype) for i, im in zip(ids, images)}
    assert shapes["colour photo"] == ((40, 50, 3), np.uint8)
    assert shapes["tiefe_ÄÖÜ_16bit"] == ((40, 50), np.uint16)
    assert all(t is not None for t in targets)


def test_rows_through_a_data_frame_keep_whole_numbers_whole(messy):
    """pandas stores a column with a missing value as floats (a skipped file has no size): the rows read
    back from the manifest's frame, which run_settings.json records, have ints again."""
    import pandas as pd

    rows = scan_folder(messy, needs_target=True)
    assert any(r.width is None for r in rows) and any(r.width is not None for r in rows)
    back = [ManifestRow.from_record(rec) for rec in pd.DataFrame([r.to_record() for r in rows]).to_dict("records")]
    assert back == rows
    assert all(type(r.width) is int and type(r.image_bytes) is int for r in back if r.status == "ok")


def test_two_images_of_one_stem_name_the_one_kept(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "a.jpg", "b.png"):
        cv2.imwrite(str(tmp_path / "images" / name), np.full((8, 8), 100, np.uint8))
    rows = scan_folder(tmp_path, needs_target=False)
    kept = [r for r in rows if r.id == "a" and r.status == "ok"]
    [dropped] = [r for r in rows if r.status == "skipped"]
    assert len(kept) == 1 and {kept[0].image_path, dropped.image_path} == {"images/a.png", "images/a.jpg"}
    assert dropped.reason == f"duplicate id 'a': {kept[0].image_path.split('/')[-1]} has the same stem and comes first"


def test_a_phone_photo_is_scored_upright_against_an_upright_target(tmp_path):
    """A portrait photo stored landscape with EXIF orientation 6 (as phones store them), its target drawn
    upright (as labelling tools and cv2.imread show the photo): the sizes agree, and the image is decoded
    as cv2.imread gives it; a target in stored orientation is refused, the reason giving both sizes."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "targets").mkdir()
    stored = np.random.default_rng(5).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    for name in ("upright", "stored"):
        Image.fromarray(stored[:, :, ::-1]).save(tmp_path / "images" / f"{name}.jpg", quality=95, exif=exif)
    shown = cv2.imread(str(tmp_path / "images" / "upright.jpg"))  # OpenCV's default read turns it
    assert shown.shape == (40, 30, 3)
    cv2.imwrite(str(tmp_path / "targets" / "upright.png"), shown)
    cv2.imwrite(str(tmp_path / "targets" / "stored.png"), stored)
    rows = {r.id: r for r in scan_folder(tmp_path, needs_target=True)}
    assert rows["upright"].status == "ok" and (rows["upright"].width, rows["upright"].height) == (30, 40)
    assert rows["stored"].status == "skipped" and "stored.png is 40x30, image is 30x40" in rows["stored"].reason
    assert "EXIF orientation tag turns it when it is read" in rows["stored"].reason, rows["stored"].reason
    ids, images, targets = load_images(tmp_path, [rows["upright"]])
    assert np.array_equal(images[0], shown) and np.array_equal(targets[0], shown)


def test_verified_load_refuses_a_file_changed_since_the_manifest(messy):
    rows = scan_folder(messy, needs_target=True)
    ids, images, _ = load_images(messy, rows, verify=True)
    assert len(ids) == 3 and all(im is not None for im in images)
    png(messy / "targets" / "good.png", np.full((40, 50), 7, np.uint8))  # same size, new content
    with pytest.raises(ManifestError, match=r"good\.png: changed since the image manifest was made"):
        load_images(messy, rows, verify=True)
    assert len(load_images(messy, rows)[0]) == 3  # unverified, the changed file is simply decoded


def test_a_file_whose_size_and_mtime_are_unchanged_is_not_hashed_again(messy):
    """rsync's quick check: a run trusts a local file's size and mtime as they were when the manifest
    hashed it, and hashes it again only when they differ."""
    for path in (messy / "images").iterdir():
        age(path, 60)
    rows = scan_folder(messy, needs_target=True)
    good = next(r for r in rows if r.id == "good")
    st = (messy / 'images' / 'good.png').stat()
    assert good.image_stat == f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"
    good.image_sha256 = "0" * 64  # a key the file does not have: only hashing it again would notice
    ids, images, _ = load_images(messy, rows, verify=True)
    assert "good" in ids
    age(messy / "images" / "good.png", 1)  # same bytes, another mtime: hashed again, and refused
    with pytest.raises(ManifestError, match=r"good\.png: changed since the image manifest was made"):
        load_images(messy, rows, verify=True)


def test_a_file_modified_just_before_it_was_hashed_has_no_trusted_stat(messy):
    """A file written less than RACY_NS before the manifest read it may be written again within the
    same clock tick, size and mtime unchanged: it is hashed again by every run."""
    rows = {r.id: r for r in scan_folder(messy, needs_target=True)}
    assert rows["good"].image_stat is None and rows["good"].target_stat is None  # the fixture just wrote them
    rows["good"].image_sha256 = "0" * 64
    with pytest.raises(ManifestError, match=r"good\.png: changed since the image manifest was made"):
        load_images(messy, list(rows.values()), verify=True)


def test_digest_changes_when_an_image_changes(messy):
    before = manifest_digest(scan_folder(messy, needs_target=True))
    png(messy / "images" / "good.png", np.zeros((40, 50), np.uint8))
    after = manifest_digest(scan_folder(messy, needs_target=True))
    assert before != after
    assert manifest_digest(scan_folder(messy, needs_target=True)) == after


def test_flat_folder_without_images_subfolder(tmp_path):
    png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    rows = scan_folder(tmp_path, needs_target=False)
    assert [r.id for r in rows] == ["a"] and rows[0].status == "ok"


def test_missing_empty_and_unusable_folders_are_errors(tmp_path):
    with pytest.raises(ManifestError, match="data folder does not exist"):
        scan_folder(tmp_path / "nope", needs_target=False)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(ManifestError, match="no image files"):
        scan_folder(tmp_path / "empty", needs_target=False)
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "images" / "x.png").write_bytes(b"")
    rows = scan_folder(bad, needs_target=False)
    with pytest.raises(ManifestError, match=r"no usable images among 1 file\(s\): images/x.png: .*empty file"):
        require_usable(rows, bad)


def test_files_found_undecodable_are_recorded_by_key_and_skipped_by_the_next_manifest(tmp_path):
    assert read_undecodable(tmp_path) == {}
    message = record_undecodable(tmp_path, "/d/images/a.png", "key-a", "/d/images/a.png: not a decodable image")
    assert str(tmp_path / UNDECODABLE_FILE) in message and "trials are run again" in message
    record_undecodable(tmp_path, "/d/targets/b.png", "key-b", "/d/targets/b.png: not a decodable image")
    known = read_undecodable(tmp_path)
    assert set(known) == {"key-a", "key-b"}  # the second finding did not replace the first

    def row(name, image_key, target_key, status="ok"):
        return ManifestRow(id=name, image_path=f"images/{name}.png", target_path=f"targets/{name}.png",
                           image_sha256=image_key, target_sha256=target_key, width=4, height=4, channels=1,
                           dtype="uint8", status=status)

    rows = skip_undecodable([row("a", "key-a", "t-a"), row("b", "i-b", "key-b"), row("c", "i-c", "t-c")], known)
    assert [r.status for r in rows] == ["skipped", "skipped", "ok"]
    assert "does not decode" in rows[0].reason and "/d/images/a.png" in rows[0].reason
    assert "/d/targets/b.png" in rows[1].reason  # its target is the undecodable file
    assert manifest_digest(rows) != manifest_digest([row("a", "key-a", "t-a"), row("b", "i-b", "key-b"),
                                                     row("c", "i-c", "t-c")])

    (tmp_path / UNDECODABLE_FILE).write_text("[]")
    with pytest.raises(ManifestError, match=UNDECODABLE_FILE):
        read_undecodable(tmp_path)


def _aged_folder(messy):
    for folder in ("images", "targets"):
        for path in (messy / folder).iterdir():
            age(path, 60)
    return messy


def test_a_probe_cache_reads_only_files_changed_since_the_last_scan(tmp_path, messy):
    data = _aged_folder(messy)
    cache_file = tmp_path / "out" / PROBE_CACHE_FILE
    first_cache = ProbeCache.load(cache_file)
    first = scan_folder(data, needs_target=True, cache=first_cache)
    first_cache.save()
    assert first_cache.reused == 0 and first_cache.read > 0
    assert [r.to_record() for r in first] == [r.to_record() for r in scan_folder(data, needs_target=True)]

    again = ProbeCache.load(cache_file)
    rows = scan_folder(data, needs_target=True, cache=again)
    # nothing read but the three files found unreadable (no verdict of theirs is kept): every probe was kept
    unreadable = {"truncated", "empty", "notes"}
    assert {r.id for r in first if r.status != "ok" and r.image_sha256 is None} >= unreadable
    assert again.read == len(unreadable) and again.reused == first_cache.read - len(unreadable)
    assert [r.to_record() for r in rows] == [r.to_record() for r in first]

    # Bytes replaced with their size and mtime kept (cp -p, tar x) are seen: the ctime moved.
    good = data / "images" / "good.png"
    st = good.stat()
    png(good, np.full((40, 50), 7, np.uint8))
    good.write_bytes(good.read_bytes()[: st.st_size].ljust(st.st_size, b"\0"))
    os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns))
    copied = ProbeCache.load(cache_file)
    kept = scan_folder(data, needs_target=True, cache=copied)
    assert copied.read == 1 + len(unreadable)
    assert next(r for r in kept if r.id == "good").image_sha256 != next(r for r in first if r.id == "good").image_sha256
    # ...and any other mtime has the file read again (its new key seen), the others still kept.
    age(good, 1)
    changed_cache = ProbeCache.load(cache_file)
    changed = {r.id: r for r in scan_folder(data, needs_target=True, cache=changed_cache)}
    assert changed_cache.read == 1 + len(unreadable)
    assert changed["good"].image_sha256 not in (None, next(r for r in first if r.id == "good").image_sha256)
    assert {k: r.to_record() for k, r in changed.items() if k != "good"} == \
        {r.id: r.to_record() for r in first if r.id != "good"}

    # A vanished file drops out of the saved cache; a damaged cache file is an empty cache.
    (data / "images" / "colour photo.png").unlink()
    changed_cache = ProbeCache.load(cache_file)
    scan_folder(data, needs_target=True, cache=changed_cache)
    changed_cache.save()
    assert not any("colour photo" in name and "/images/" in name for name in ProbeCache.load(cache_file).known)
    saved = json.loads(cache_file.read_text())
    name = str(data / "images" / "good.png")
    saved["files"][name] = {"identity": saved["files"][name]["identity"], "key": "0" * 64}  # no header
    cache_file.write_text(json.dumps(saved))
    partial = ProbeCache.load(cache_file)
    assert {r.id: r.image_sha256 for r in scan_folder(data, needs_target=True, cache=partial)}["good"] != "0" * 64
    assert partial.read == 1 + len(unreadable)  # that entry probed again (and the unreadable), the others kept
    cache_file.write_text("{not json")
    damaged = ProbeCache.load(cache_file)
    assert damaged.known == {}
    assert manifest_digest(scan_folder(data, needs_target=True, cache=damaged)) == \
        manifest_digest(scan_folder(data, needs_target=True))


def test_a_probe_cache_keeps_no_file_modified_just_before_it_was_read(tmp_path, messy):
    cache = ProbeCache.load(tmp_path / PROBE_CACHE_FILE)
    scan_folder(messy, needs_target=True, cache=cache)  # the fixture just wrote every file: racy stats
    cache.save()
    again = ProbeCache.load(tmp_path / PROBE_CACHE_FILE)
    scan_folder(messy, needs_target=True, cache=again)
    assert again.reused == 0 and again.read == cache.read


def test_an_unwritable_probe_cache_is_a_warning_not_a_failure(tmp_path, messy):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the cache's folder would be")
    warnings = []

    class Log:
        def warning(self, message):
            warnings.append(message)

    with locked_probe_cache(blocker / PROBE_CACHE_FILE) as cache:  # no folder, no lock: a scan without it
        rows = scan_folder(_aged_folder(messy), needs_target=True, cache=cache)
        save_probe_cache(cache, Log())
    assert cache.read > 0 and manifest_digest(rows) == manifest_digest(scan_folder(messy, needs_target=True))
    assert len(warnings) == 1 and str(blocker / PROBE_CACHE_FILE) in warnings[0] and "cannot be used" in warnings[0]
    unsaved = ProbeCache.load(blocker / PROBE_CACHE_FILE)  # loaded (empty), then the write fails: said too
    save_probe_cache(unsaved, Log())
    assert len(warnings) == 2 and "could not save" in warnings[1]


def test_a_probe_cache_of_another_version_is_not_used(tmp_path, messy):
    cache_file = tmp_path / PROBE_CACHE_FILE
    cache = ProbeCache.load(cache_file)
    scan_folder(_aged_folder(messy), needs_target=True, cache=cache)
    cache.save()
    assert ProbeCache.load(cache_file).known
    saved = json.loads(cache_file.read_text())
    cache_file.write_text(json.dumps({**saved, "version": saved["version"] + 1}))
    assert ProbeCache.load(cache_file).known == {}


def test_a_scan_ahead_is_waited_for_and_leaves_nothing_to_read(tmp_path, messy, monkeypatch):
    from imgtune_assets.core import manifest, storage

    data = _aged_folder(messy)
    cache_file = tmp_path / "out" / PROBE_CACHE_FILE
    real = manifest._probe
    monkeypatch.setattr(manifest, "_probe", lambda file, info: time.sleep(0.05) or real(file, info))
    ahead = ProbeAhead(data, True, cache_file)
    assert ahead.thread.is_alive()  # still reading (each file takes 50 ms here)
    waited = []
    with locked_probe_cache(cache_file, on_wait=lambda: waited.append(1)) as cache:  # waits for it: loaded
        rows = scan_folder(data, needs_target=True, cache=cache)                    # complete, nothing to read
    # nothing to read but the three files found unreadable (whose verdict is not kept)
    assert cache.read == 3 and cache.reused > 0 and waited == [1]
    ahead.wait()
    assert ahead.error is None
    monkeypatch.undo()
    assert [r.to_record() for r in rows] == [r.to_record() for r in scan_folder(data, needs_target=True)]

    # a scan that fails (no such folder) keeps its error and lets the next one have the lock
    failed = ProbeAhead(tmp_path / "missing", True, cache_file)
    failed.wait()
    assert isinstance(failed.error, ManifestError)
    with locked_probe_cache(cache_file, on_wait=lambda: waited.append(2)) as cache:
        assert cache.known  # the earlier scan's entries are still there
    assert waited == [1]  # the lock was free: no wait to announce
    assert ProbeAhead(storage.location("memory://bucket/data"), True, cache_file).thread is None  # objects: none


def test_a_scan_that_must_not_wait_uses_the_cache_unsaved_while_another_holds_it(tmp_path, messy):
    cache_file = tmp_path / PROBE_CACHE_FILE
    with locked_probe_cache(cache_file) as held:
        scan_folder(_aged_folder(messy), needs_target=True, cache=held)
        held.save()
        with locked_probe_cache(cache_file, wait=False) as other:  # would deadlock if it waited
            assert other.file is None and other.known == held.seen
        assert ProbeAhead(messy, True, cache_file).thread is None  # the scan holding the lock serves
    with locked_probe_cache(cache_file, wait=False) as free:
        assert free.file == cache_file


def test_a_run_that_cannot_read_a_manifest_file_advises_by_the_cause(messy, monkeypatch):
    import pickle

    from imgtune_assets.core import storage

    rows = [r for r in scan_folder(messy, needs_target=True) if r.status == "ok"]
    (messy / rows[0].image_path).unlink()
    with pytest.raises(ManifestError, match=r"not found .*deleted or moved since \(then materialize image_manifest"):
        load_images(messy, rows[:1])
    refused = storage.StorageError("s3://b/images/good.png: access denied (cannot read it)", "denied")
    assert pickle.loads(pickle.dumps(refused)).kind == "denied"  # as Ray passes it on

    def deny(path):
        raise refused

    monkeypatch.setattr(storage, "read_with_key", deny)
    with pytest.raises(ManifestError) as err:
        load_images(messy, rows[1:2])
    assert "access denied" in str(err.value) and "permissions or owner changed" in str(err.value)
    assert "materialize" not in str(err.value)  # a new manifest would not mend it
    assert "other credentials" in unreadable_advice("denied", remote=True)  # an object: the reader's credentials
    assert "endpoint" in unreadable_advice("missing", remote=True)


def test_images_in_sub_folders_are_rows_that_say_they_are_not_read(tmp_path, messy):
    before = manifest_digest(scan_folder(messy, needs_target=True))
    png(messy / "images" / "batch2" / "later.png", np.zeros((8, 8), np.uint8))
    (messy / "images" / "@eaDir").mkdir()
    rows = {r.id: r for r in scan_folder(messy, needs_target=True)}
    assert "@eaDir/" in rows
    assert manifest_digest(list(rows.values())) == before  # no image changed: no trial runs again
    folder = rows["batch2/"]
    assert folder.status == "skipped" and folder.image_path == "images/batch2/"
    assert str(messy / "images" / "batch2") in folder.reason and "not read" in folder.reason
    assert "later" not in rows
    # a flat folder's targets/ is its targets, not a skipped sub-folder; an images-only one says why it is empty
    flat = tmp_path / "flat"
    png(flat / "a.png", np.zeros((8, 8), np.uint8))
    png(flat / "targets" / "a.png", np.zeros((8, 8), np.uint8))
    assert [(r.id, r.status) for r in scan_folder(flat, needs_target=True)] == [("a", "ok")]
    nested = tmp_path / "nested"
    png(nested / "images" / "2024" / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ManifestError, match=r"no image files in the data folder \(1 sub-folder\(s\) not read"):
        scan_folder(nested, needs_target=False)


def test_a_cancelled_scan_ahead_stops_reading_and_saves_nothing(tmp_path, messy, monkeypatch):
    from imgtune_assets.core import manifest

    data = _aged_folder(messy)
    cache_file = tmp_path / PROBE_CACHE_FILE
    probed = []
    real = manifest._probe
    # Two seconds a file: reading the whole folder (a dozen files) would take 12 s or more, even on two threads.
    monkeypatch.setattr(manifest, "_probe", lambda file, info: probed.append(file) or time.sleep(2.0)
                        or real(file, info))
    ahead = ProbeAhead(data, True, cache_file)
    wait_for(lambda: probed, 60, interval=0.01, what="the scan ahead to start reading files")
    ahead.cancel()  # e.g. the run failed before its manifest: the command must not wait for every file
    started = time.perf_counter()
    ahead.wait()
    # The files being read are finished (up to two seconds), not the rest of the folder: generous for a
    # busy machine, still well short of the whole folder.
    assert time.perf_counter() - started < 8.0
    assert 0 < len(probed) <= 4  # the files being read (two threads, image then target) were finished
    assert not cache_file.exists()  # a partial scan would drop the entries it did not reach


def test_images_too_small_for_the_metric_are_skipped_naming_the_metric(tmp_path):
    rows = [ManifestRow(id=i, image_path=f"images/{i}.png", target_path=f"targets/{i}.png", image_sha256=i,
                        target_sha256=i, width=w, height=h, channels=1, dtype="uint8", status="ok")
            for i, (w, h) in {"big": (64, 48), "narrow": (10, 48), "edge": (11, 11)}.items()]
    rows.append(replace(rows[0], id="gone", image_path="images/gone.png", status="skipped", reason="unreadable",
                        width=None, height=None))
    kept = {r.id: r for r in skip_too_small(rows, "ssim", 11)}
    assert [kept[i].status for i in ("big", "narrow", "edge", "gone")] == ["ok", "skipped", "ok", "skipped"]
    assert kept["narrow"].reason == "10x48 pixels: ssim needs images of at least 11x11"
    assert kept["gone"].reason == "unreadable"
    # What the manifest and the new-images sensor both compute: earlier runs' undecodable files too.
    record_undecodable(tmp_path, "images/big.png", "big", "does not decode")
    assert [r.status for r in sweep_rows(rows, tmp_path, "ssim", 11)] == ["skipped", "skipped", "ok", "skipped"]
    assert [r.status for r in sweep_rows(rows, tmp_path / "none", "psnr", 1)] == ["ok", "ok", "ok", "skipped"]


def test_an_object_truncated_beyond_its_head_is_skipped_by_the_manifest_not_failed_by_the_run():
    """An object larger than the head the manifest reads: its end is checked (a ranged read), so a
    truncated PNG or JPEG is skipped with its reason, as a local one is, and a JPEG with data after its
    end marker (a phone's motion photo) is still usable."""
    from imgtune_assets.core import storage
    from imgtune_assets.core.manifest import HEAD_BYTES

    noise = np.random.default_rng(9).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    png = cv2.imencode(".png", noise)[1].tobytes()
    jpeg = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 98])[1].tobytes()
    assert len(png) > 2 * HEAD_BYTES and len(jpeg) > 2 * HEAD_BYTES
    root = storage.location("memory://imgtune-truncated/data")
    files = {"whole.png": png, "cut.png": png[: len(png) * 3 // 4], "whole-photo.jpg": jpeg,
             "cut-photo.jpg": jpeg[: len(jpeg) * 3 // 4], "motion.jpg": jpeg + b"\0\1ftypmp42" * 9000}
    for name, data in files.items():
        storage.write_bytes_atomic(root / "images" / name, data)
    rows = {r.image_path: r for r in scan_folder(root, needs_target=False)}
    assert {r.image_path: r.status for r in rows.values()} == {
            "images/cut-photo.jpg": "skipped", "images/cut.png": "skipped", "images/motion.jpg": "ok",
            "images/whole-photo.jpg": "ok", "images/whole.png": "ok"}
    reasons = {r.image_path: r.reason for r in rows.values() if r.status != "ok"}
    assert "truncated" in reasons["images/cut.png"] and "truncated JPEG" in reasons["images/cut-photo.jpg"], reasons


def test_a_broken_symbolic_link_is_a_skipped_row_saying_so(tmp_path):
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((20, 20), np.uint8))
    (tmp_path / "images" / "b.png").symlink_to(tmp_path / "gone" / "b.png")
    rows = {r.image_path: r for r in scan_folder(tmp_path, needs_target=False)}
    assert rows["images/a.png"].status == "ok" and rows["images/b.png"].status == "skipped"
    assert rows["images/b.png"].reason == (f"{tmp_path / 'images' / 'b.png'}: a broken symbolic link (to "
                                           f"{tmp_path / 'gone' / 'b.png'}; cannot read it)")


def test_a_file_that_begins_as_no_image_is_not_read_whole(tmp_path, monkeypatch):
    from imgtune_assets.core import manifest

    png(tmp_path / "images" / "ok.png", np.zeros((16, 16), np.uint8))
    with open(tmp_path / "images" / "huge.png", "wb") as sparse:
        sparse.truncate(256 * 2**20)  # zeros: no image format begins so
    read = []
    real = manifest.read_with_stat
    monkeypatch.setattr(manifest, "read_with_stat", lambda file: read.append(file.name) or real(file))
    rows = {r.image_path.split("/")[-1]: r for r in scan_folder(tmp_path, needs_target=False)}
    assert rows["ok.png"].status == "ok"
    assert rows["huge.png"].status == "skipped" and "no known image format" in rows["huge.png"].reason
    assert read == ["ok.png"]
