"""The sweep's own IO manager: values round-trip, writes are atomic, a missing value is named."""

import pytest
from dagster import AssetKey, build_input_context, build_output_context

from imgtune_assets.core import files
from imgtune_assets.defs.resources import SweepStorageIOManager


def test_round_trip_and_atomic_write(tmp_path, monkeypatch):
    manager = SweepStorageIOManager(base_dir=str(tmp_path / "storage"))
    out = build_output_context(asset_key=AssetKey("run_settings"))
    manager.handle_output(out, {"trials": [1, 2]})
    assert manager.load_input(build_input_context(asset_key=AssetKey("run_settings"))) == {"trials": [1, 2]}

    def broken_replace(src, dst):
        raise OSError("killed mid-write")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError):
        manager.handle_output(build_output_context(asset_key=AssetKey("run_settings")), {"trials": [3]})
    monkeypatch.undo()
    # The earlier value is intact and no temporary file is left beside it.
    assert manager.load_input(build_input_context(asset_key=AssetKey("run_settings"))) == {"trials": [1, 2]}
    assert [p.name for p in (tmp_path / "storage").iterdir()] == ["run_settings"]


def test_missing_value_is_named(tmp_path):
    manager = SweepStorageIOManager(base_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no stored value of image_manifest for this sweep; materialize it first"):
        manager.load_input(build_input_context(asset_key=AssetKey("image_manifest")))
