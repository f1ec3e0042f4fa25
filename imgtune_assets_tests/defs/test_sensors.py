"""new_images: a changed data folder requests the whole sweep; an unchanged one requests nothing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from dagster import AssetMaterialization, DagsterRunStatus, build_sensor_context, instance_for_test
from dagster._core.test_utils import create_run_for_test

from imgtune_assets.core.manifest import manifest_digest, scan_folder
from imgtune_assets.defs.partitions import trial_partitions
from imgtune_assets.defs.resources import SweepResource
from imgtune_assets.defs.sensors import new_images, stat_digest
from imgtune_assets_tests.conftest import write_sweep


@pytest.fixture
def folder(tmp_path, denoise_data):
    data = tmp_path / "data"
    shutil.copytree(denoise_data, data)
    return data


@pytest.fixture
def resources(tmp_path, folder):
    sweep = write_sweep(tmp_path / "tiny.yaml", folder)
    return {"imgtune": SweepResource(sweep_path=str(sweep), output_dir=str(tmp_path / "outputs"))}


@pytest.fixture
def instance():
    with instance_for_test() as instance:
        yield instance


def tick(instance, resources, cursor=None):
    return new_images.evaluate_tick(build_sensor_context(instance=instance, cursor=cursor, resources=resources))


def content_hash(folder) -> str:
    return manifest_digest(scan_folder(folder, needs_target=True))


def test_first_tick_on_never_swept_images_requests_the_whole_sweep(instance, resources, folder):
    data = tick(instance, resources)
    [request] = data.run_requests
    keys = trial_partitions.get_partition_keys()
    assert request.job_name == "imgtune_sweep"
    assert (request.tags["dagster/asset_partition_range_start"], request.tags["dagster/asset_partition_range_end"]) \
        == (keys[0], keys[-1])
    assert request.tags["imgtune/trigger"] == "new_images"
    # the cursor is the manifest's own content hash (what image_manifest reports as content_hash)
    cursor = json.loads(data.cursor)
    assert cursor == {"stat": stat_digest(folder), "content": content_hash(folder)}
    assert request.tags["imgtune/images_content_hash"] == cursor["content"]
    assert request.run_key == f"images:None->{cursor['content']}"


def test_unchanged_folder_requests_nothing(instance, resources):
    cursor = tick(instance, resources).cursor
    again = tick(instance, resources, cursor)
    assert not again.run_requests
    assert "no change" in again.skip_message


def test_touched_but_identical_files_request_nothing(instance, resources, folder):
    cursor = tick(instance, resources).cursor
    image = next((folder / "images").iterdir())
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 5_000_000_000))
    data = tick(instance, resources, cursor)
    assert not data.run_requests
    assert "content is unchanged" in data.skip_message
    assert json.loads(data.cursor)["stat"] != json.loads(cursor)["stat"]  # remembered: next tick is cheap
    assert json.loads(data.cursor)["content"] == json.loads(cursor)["content"]


@pytest.mark.parametrize("change", ["add", "modify", "remove", "new_target"])
def test_new_changed_or_removed_images_request_a_sweep(instance, resources, folder, change):
    cursor = tick(instance, resources).cursor
    images, targets = folder / "images", folder / "targets"
    first = sorted(images.iterdir())[0]
    if change == "add":
        shutil.copy(first, images / "extra.png")
        shutil.copy(targets / first.name, targets / "extra.png")
    elif change == "modify":
        shutil.copy(sorted(images.iterdir())[1], first)  # another valid PNG, same size
    elif change == "remove":
        first.unlink()
    else:
        shutil.copy(sorted(targets.iterdir())[1], targets / first.name)
    data = tick(instance, resources, cursor)
    [request] = data.run_requests
    old, new = json.loads(cursor)["content"], json.loads(data.cursor)["content"]
    assert old != new == content_hash(folder)
    assert request.run_key == f"images:{old}->{new}"


def test_first_tick_over_already_swept_images_requests_nothing(instance, resources, folder):
    # image_manifest was materialized from exactly these images: starting the sensor requests no sweep
    instance.report_runless_asset_event(
        AssetMaterialization("image_manifest", metadata={"content_hash": content_hash(folder)}))
    data = tick(instance, resources)
    assert not data.run_requests
    assert json.loads(data.cursor)["content"] == content_hash(folder)


def test_waits_while_a_sweep_is_running(instance, resources, folder):
    cursor = tick(instance, resources).cursor
    shutil.copy(sorted((folder / "images").iterdir())[0], folder / "images" / "extra.png")
    run = create_run_for_test(instance, job_name="imgtune_sweep", status=DagsterRunStatus.STARTED)
    data = tick(instance, resources, cursor)
    assert not data.run_requests and "queued or running" in data.skip_message
    assert data.cursor in (None, cursor)  # unchanged: the change is still pending
    instance.report_run_canceled(run)
    data = tick(instance, resources, cursor)
    assert len(data.run_requests) == 1


def test_missing_or_empty_folder_is_a_skip_not_an_error(instance, resources, folder):
    shutil.rmtree(folder / "images")
    (folder / "images").mkdir()
    shutil.rmtree(folder / "targets")
    data = tick(instance, resources)
    assert not data.run_requests and "no image files" in data.skip_message
    shutil.rmtree(folder)
    data = tick(instance, resources)
    assert not data.run_requests and "does not exist" in data.skip_message
