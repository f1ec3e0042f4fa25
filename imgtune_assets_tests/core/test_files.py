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


def test_the_data_is_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: calls.append("replace") or real_replace(src, dst))
    target = atomic_write_bytes(tmp_path / "out.bin", b"payload")
    assert target.read_bytes() == b"payload"
    assert calls == ["fsync", "replace"]
