import os

import pytest

from imgtune_assets.core import files
from imgtune_assets.core.files import atomic_write_bytes, atomic_write_json


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "x.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert target.read_text().strip().startswith("{") and '"a": 2' in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_a_full_disk_is_reported_with_the_file_being_written(tmp_path, monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write and fsync raise it: no file name

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "trials" / "trial-003.json"
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"{}")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert str(err.value) == f"[Errno {errno.ENOSPC}] No space left on device: '{target}'"
    assert not list(target.parent.iterdir())


def test_the_data_is_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: calls.append("replace") or real_replace(src, dst))
    target = atomic_write_bytes(tmp_path / "out.bin", b"payload")
    assert target.read_bytes() == b"payload"
    assert calls == ["fsync", "replace"]


def test_remove_temporaries_takes_only_a_killed_writers_files_of_the_names_given(tmp_path):
    import time

    def killed_writer(name):  # the temporary file atomic_write_bytes makes, left as a SIGKILL leaves it
        fd, path = files.tempfile.mkstemp(prefix=files._temporary_prefix(name), suffix=files.TEMPORARY_SUFFIX,
                                          dir=tmp_path)
        os.close(fd)
        return tmp_path / os.path.basename(path)

    old, fresh, other = killed_writer("a.b.png"), killed_writer("c.png"), killed_writer("other.png")
    os.utime(old, (time.time() - 700, time.time() - 700))
    (tmp_path / "a.b.png").write_bytes(b"the output itself")
    (tmp_path / ".hidden.tmp").write_bytes(b"not one of atomic_write_bytes'")
    assert files.remove_temporaries(tmp_path, {"a.b.png", "c.png"}, older_than_seconds=600) == [old]
    assert fresh.exists() and other.exists() and (tmp_path / "a.b.png").exists()
    assert files.remove_temporaries(tmp_path, {"a.b.png", "c.png"}) == [fresh]
    assert other.exists() and (tmp_path / ".hidden.tmp").exists()
    assert files.remove_temporaries(tmp_path / "missing", {"a.b.png"}) == []


def test_remove_temporaries_leaves_what_mkstemp_did_not_make_and_what_a_run_found(tmp_path):
    import time

    users = tmp_path / ".photo.jpg.old.tmp"  # a user's own file, not mkstemp's 8 characters
    users.write_bytes(b"x")
    folder = tmp_path / ".photo.jpg.abcd1234.tmp"  # a folder of that name
    folder.mkdir()
    earlier = tmp_path / ".photo.jpg.efgh5678.tmp"  # there before this run began
    earlier.write_bytes(b"x")
    os.utime(earlier, (time.time() - 30,) * 2)
    mine = tmp_path / ".photo.jpg.ijkl9012.tmp"
    mine.write_bytes(b"x")
    assert files.remove_temporaries(tmp_path, {"photo.jpg"}, made_since=time.time() - 10) == [mine]
    assert users.exists() and folder.is_dir() and earlier.exists()


def test_a_set_of_files_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from imgtune_assets.core.files import atomic_write_all

    old = {tmp_path / "report.json": b"old report", tmp_path / "plots" / "a.png": b"old plot"}
    atomic_write_all(old, remove=[tmp_path / "never-there"])
    stale = tmp_path / "best_pipeline.yaml"
    stale.write_bytes(b"an earlier best")
    real_fsync, calls = os.fsync, []

    def full_on_the_second(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_on_the_second)
    new = {tmp_path / "report.json": b"new report", tmp_path / "plots" / "a.png": b"new plot"}
    with pytest.raises(OSError) as err:
        atomic_write_all(new, remove=[stale])
    assert err.value.filename == str(tmp_path / "plots" / "a.png")
    assert {p: p.read_bytes() for p in old} == old and stale.exists()  # the earlier set, whole
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "best_pipeline.yaml", "plots", "report.json"]
    monkeypatch.undo()
    atomic_write_all(new, remove=[stale])
    assert {p: p.read_bytes() for p in new} == new and not stale.exists()
