"""The sweeps' IO manager: each sweep's values under its own folder, round trips, atomic writes, a missing
value named."""

import pickle

import pytest
from dagster import AssetKey, build_init_resource_context, build_input_context, build_output_context

from imgtune_assets.core import files
from imgtune_assets.defs.io_manager import SweepStorageIOManager
from imgtune_assets.defs.resources import SweepResource

SETTINGS = AssetKey(["tiny", "run_settings"])


@pytest.fixture
def manager(tmp_path):
    factory = SweepStorageIOManager(imgtune=SweepResource(output_dir=str(tmp_path / "out")))
    return factory.create_io_manager(build_init_resource_context())


def store(manager, key, value):
    manager.handle_output(build_output_context(asset_key=key), value)


def load(manager, key):
    return manager.load_input(build_input_context(asset_key=key))


def test_round_trip_under_the_sweeps_own_storage_folder(tmp_path, manager):
    store(manager, SETTINGS, {"trials": [1, 2]})
    assert load(manager, SETTINGS) == {"trials": [1, 2]}
    path = tmp_path / "out" / "tiny" / "storage" / "run_settings"
    assert pickle.loads(path.read_bytes()) == {"trials": [1, 2]}


def test_two_sweeps_with_the_same_asset_names_do_not_share_values(tmp_path, manager):
    store(manager, AssetKey(["a", "run_settings"]), "settings of a")
    store(manager, AssetKey(["b", "run_settings"]), "settings of b")
    assert load(manager, AssetKey(["a", "run_settings"])) == "settings of a"
    assert load(manager, AssetKey(["b", "run_settings"])) == "settings of b"
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()) \
        == ["a/storage/run_settings", "b/storage/run_settings"]


def test_a_write_killed_midway_leaves_the_earlier_value_whole(tmp_path, manager, monkeypatch):
    store(manager, SETTINGS, {"trials": [1, 2]})

    def broken_replace(src, dst):
        raise OSError("killed mid-write")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="killed mid-write"):
        store(manager, SETTINGS, {"trials": [3]})
    monkeypatch.undo()
    # The earlier value is intact and no temporary file is left beside it.
    assert load(manager, SETTINGS) == {"trials": [1, 2]}
    assert [p.name for p in (tmp_path / "out" / "tiny" / "storage").iterdir()] == ["run_settings"]


def test_none_is_not_stored(tmp_path, manager):
    # experiment_results writes its per-trial results itself and returns None
    store(manager, AssetKey(["tiny", "experiment_results"]), None)
    assert not (tmp_path / "out").exists()


def test_a_missing_value_is_named(tmp_path, manager):
    path = tmp_path / "out" / "tiny" / "storage" / "image_manifest"
    with pytest.raises(FileNotFoundError) as err:
        load(manager, AssetKey(["tiny", "image_manifest"]))
    assert str(err.value) == f"{path}: no stored value of tiny/image_manifest; materialize it first"


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2], lambda data: b"not a pickle"])
def test_a_damaged_value_is_named_with_the_way_out(tmp_path, manager, damage):
    store(manager, SETTINGS, {"trials": list(range(100))})
    path = tmp_path / "out" / "tiny" / "storage" / "run_settings"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError) as err:
        load(manager, SETTINGS)
    assert str(err.value).startswith(f"{path}: the stored value of tiny/run_settings cannot be read (")
    assert str(err.value).endswith("); materialize it again")


def test_a_key_without_a_sweep_prefix_is_refused_naming_it(tmp_path):
    manager = SweepStorageIOManager(imgtune=SweepResource(output_dir=str(tmp_path))).create_io_manager(None)
    with pytest.raises(ValueError, match="lonely: not a sweep asset"):
        manager.handle_output(build_output_context(asset_key=AssetKey("lonely")), {"x": 1})
    assert not list(tmp_path.iterdir())


def test_an_object_store_output_folder_is_refused_naming_it():
    with pytest.raises(ValueError, match="output_dir 's3://bucket/x': a local folder is required"):
        SweepResource(output_dir="s3://bucket/x").sweep_dir("tiny")
