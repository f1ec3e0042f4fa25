"""<group>_new_images: a changed data folder requests the whole sweep; an unchanged one requests nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from dagster import AssetKey, AssetMaterialization, DagsterRunStatus, build_sensor_context, instance_for_test
from dagster._core.test_utils import create_run_for_test

from imgtune_assets.core import manifest
from imgtune_assets.core.launcher import RUN_PROCESS_TAG, process_tag
from imgtune_assets.core.manifest import (
    PROBE_CACHE_FILE,
    UNDECODABLE_FILE,
    manifest_digest,
    scan_folder,
    skip_undecodable,
    stat_digest,
)
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.jobs import SWEEP_TAG, build_sweep_jobs
from imgtune_assets.defs.resources import SweepResource
from imgtune_assets.defs.sensors import INTERVAL_ENV, build_new_images_sensor
from imgtune_assets_tests.conftest import write_sweep
from imgtune_assets_tests.support.files import age


@pytest.fixture
def folder(tmp_path, denoise_data):
    data = tmp_path / "data"
    shutil.copytree(denoise_data, data)
    return data


@pytest.fixture
def sweep(tmp_path, folder):
    return load_sweep(write_sweep(tmp_path / "tiny.yaml", folder, trials=3))


def new_images_sensor(sweep):
    return build_new_images_sensor(sweep, build_sweep_jobs(sweep))


@pytest.fixture
def sensor(sweep, monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    return new_images_sensor(sweep)


@pytest.fixture
def instance():
    with instance_for_test() as instance:
        yield instance


def tick(instance, sensor, cursor=None, outputs="/nonexistent/imgtune-sensor-test-outputs"):
    """One tick; ``outputs``: the sweeps' output folder (by default one no run wrote: nothing known)."""
    resources = {"imgtune": SweepResource(output_dir=str(outputs))}
    return sensor.evaluate_tick(build_sensor_context(instance=instance, cursor=cursor, resources=resources))


def content_hash(folder) -> str:
    return manifest_digest(scan_folder(folder, needs_target=True))


def test_first_tick_on_never_swept_images_requests_the_whole_sweep(instance, sensor, folder):
    assert sensor.name == "tiny_new_images" and sensor.minimum_interval_seconds == 30
    data = tick(instance, sensor)
    [request] = data.run_requests
    assert request.job_name == "tiny_sweep"
    assert (request.tags["dagster/asset_partition_range_start"], request.tags["dagster/asset_partition_range_end"]) \
        == ("trial-000", "trial-002")
    assert request.tags["imgtune/trigger"] == "new_images"
    # the cursor is the manifest's own content hash (what image_manifest reports as content_hash)
    cursor = json.loads(data.cursor)
    assert cursor == {"stat": stat_digest(folder), "content": content_hash(folder)}
    assert request.tags["imgtune/images_content_hash"] == cursor["content"]
    assert request.run_key == f"images:None->{cursor['content']}@{cursor['stat']}"


def test_the_content_hash_skips_what_a_run_found_undecodable_as_the_manifest_does(tmp_path, instance, sensor, folder):
    rows = scan_folder(folder, needs_target=True)
    known = {rows[0].image_sha256: {"path": str(folder / rows[0].image_path), "reason": "x: not decodable",
                                    "found_at": "2026-12-06T00:00:00Z"}}
    (tmp_path / "outputs" / "tiny").mkdir(parents=True)
    (tmp_path / "outputs" / "tiny" / UNDECODABLE_FILE).write_text(json.dumps(known))
    cursor = json.loads(tick(instance, sensor, outputs=tmp_path / "outputs").cursor)
    assert cursor["content"] == manifest_digest(skip_undecodable(rows, known)) != content_hash(folder)


def test_unchanged_folder_requests_nothing(instance, sensor):
    cursor = tick(instance, sensor).cursor
    again = tick(instance, sensor, cursor)
    assert not again.run_requests
    assert "no change" in again.skip_message


def test_touched_but_identical_files_request_nothing(instance, sensor, folder):
    cursor = tick(instance, sensor).cursor
    image = next((folder / "images").iterdir())
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 5_000_000_000))
    data = tick(instance, sensor, cursor)
    assert not data.run_requests
    assert "content is unchanged" in data.skip_message
    assert json.loads(data.cursor)["stat"] != json.loads(cursor)["stat"]  # remembered: next tick is cheap
    assert json.loads(data.cursor)["content"] == json.loads(cursor)["content"]


def test_a_file_replaced_by_one_of_the_same_size_and_mtime_is_looked_at(instance, sensor, folder):
    cursor = tick(instance, sensor).cursor
    first = sorted((folder / "images").iterdir())[0]
    st, data = first.stat(), bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # other bytes of the same size
    replacement = folder / "replacement.tmp"
    replacement.write_bytes(bytes(data))
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    replacement.replace(first)  # as `cp -p` or `tar x` leave it: size and mtime as before
    data = tick(instance, sensor, cursor)
    assert len(data.run_requests) == 1, data.skip_message
    # A broken symbolic link is a change too (the manifest lists it, skipped).
    (folder / "images" / "gone.png").symlink_to(folder / "nowhere.png")
    assert json.loads(tick(instance, sensor, data.cursor).cursor)["stat"] != json.loads(data.cursor)["stat"]


@pytest.mark.parametrize("change", ["add", "modify", "remove", "new_target"])
def test_new_changed_or_removed_images_request_a_sweep(instance, sensor, folder, change):
    cursor = tick(instance, sensor).cursor
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
    data = tick(instance, sensor, cursor)
    [request] = data.run_requests
    old, new = json.loads(cursor)["content"], json.loads(data.cursor)["content"]
    assert old != new == content_hash(folder)
    assert request.run_key == f"images:{old}->{new}@{json.loads(data.cursor)['stat']}"
    assert request.job_name == "tiny_sweep"


def test_first_tick_over_already_swept_images_requests_nothing(instance, sensor, folder):
    # tiny/image_manifest was materialized from exactly these images: starting the sensor requests no sweep
    instance.report_runless_asset_event(
        AssetMaterialization(AssetKey(["tiny", "image_manifest"]), metadata={"content_hash": content_hash(folder)}))
    data = tick(instance, sensor)
    assert not data.run_requests
    assert json.loads(data.cursor)["content"] == content_hash(folder)
    assert "are those the last sweep read (the sensor's first look)" in data.skip_message, data.skip_message


def test_another_sweeps_manifest_is_not_this_sweeps_baseline(instance, sensor, folder):
    # the same images swept by another sweep (its own key) do not count for this one
    instance.report_runless_asset_event(
        AssetMaterialization(AssetKey(["other", "image_manifest"]), metadata={"content_hash": content_hash(folder)}))
    data = tick(instance, sensor)
    [request] = data.run_requests
    assert request.run_key == f"images:None->{content_hash(folder)}@{stat_digest(folder)}"


TINY = {SWEEP_TAG: "tiny"}  # as the sweep's jobs tag their runs


def test_waits_while_a_sweep_is_running(instance, sensor, folder):
    cursor = tick(instance, sensor).cursor
    shutil.copy(sorted((folder / "images").iterdir())[0], folder / "images" / "extra.png")
    run = create_run_for_test(instance, job_name="tiny_sweep", status=DagsterRunStatus.STARTED, tags=TINY)
    data = tick(instance, sensor, cursor)
    assert not data.run_requests and "queued or running" in data.skip_message
    assert data.cursor in (None, cursor)  # unchanged: the change is still pending
    instance.report_run_canceled(run)
    data = tick(instance, sensor, cursor)
    assert len(data.run_requests) == 1


def test_a_change_a_sweep_reported_on_while_the_sensor_waited_requests_nothing(instance, sensor, folder):
    cursor = tick(instance, sensor).cursor
    shutil.copy(sorted((folder / "images").iterdir())[0], folder / "images" / "extra.png")
    run = create_run_for_test(instance, job_name="tiny_sweep", status=DagsterRunStatus.STARTED, tags=TINY)
    assert "queued or running" in tick(instance, sensor, cursor).skip_message
    # That run (the schedule's, say) swept the new images and reported on them.
    instance.report_runless_asset_event(AssetMaterialization(
        asset_key=AssetKey(["tiny", "sweep_report"]), metadata={"content_hash": content_hash(folder)}))
    instance.report_run_failed(run)  # (ended, however it ended: its report stands)
    data = tick(instance, sensor, cursor)
    assert not data.run_requests and "a sweep since has reported on them" in data.skip_message
    assert json.loads(data.cursor)["content"] == content_hash(folder)  # moved on: the next change is new
    # A report on other images holds nothing back.
    shutil.copy(sorted((folder / "images").iterdir())[1], folder / "images" / "extra2.png")
    assert len(tick(instance, sensor, data.cursor).run_requests) == 1


def test_a_run_whose_tied_run_process_is_gone_is_failed_and_holds_back_nothing(instance, sensor, folder):
    cursor = tick(instance, sensor).cursor
    shutil.copy(sorted((folder / "images").iterdir())[0], folder / "images" / "extra.png")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # the run's process
    try:
        tags = {RUN_PROCESS_TAG: process_tag(process.pid)}
        run = create_run_for_test(instance, job_name="tiny_sweep", status=DagsterRunStatus.STARTED,
                                  tags={**TINY, **tags})
        # untied (another executor's, the daemon's): never taken for gone
        other = create_run_for_test(instance, job_name="tiny_sweep", status=DagsterRunStatus.STARTED, tags=TINY)
        data = tick(instance, sensor, cursor)  # its process is alive: the run may be working
        assert not data.run_requests and "queued or running" in data.skip_message
        instance.report_run_canceled(other)
    finally:
        process.kill()  # as a power cut or the OOM killer would
        process.wait()
    data = tick(instance, sensor, cursor)
    assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
    [request] = data.run_requests
    assert request.job_name == "tiny_sweep"


def test_another_sweeps_run_does_not_hold_this_one_back(instance, sensor, folder):
    cursor = tick(instance, sensor).cursor
    shutil.copy(sorted((folder / "images").iterdir())[0], folder / "images" / "extra.png")
    create_run_for_test(instance, job_name="other_sweep", status=DagsterRunStatus.STARTED, tags={SWEEP_TAG: "other"})
    data = tick(instance, sensor, cursor)
    [request] = data.run_requests
    assert request.job_name == "tiny_sweep"


def test_missing_or_empty_folder_is_a_skip_not_an_error(instance, sensor, folder):
    shutil.rmtree(folder / "images")
    (folder / "images").mkdir()
    shutil.rmtree(folder / "targets")
    data = tick(instance, sensor)
    assert not data.run_requests and "no image files" in data.skip_message
    shutil.rmtree(folder)
    data = tick(instance, sensor)
    assert not data.run_requests and "does not exist" in data.skip_message


def test_interval_comes_from_the_environment(monkeypatch, sweep):
    monkeypatch.setenv(INTERVAL_ENV, "5")
    assert new_images_sensor(sweep).minimum_interval_seconds == 5
    monkeypatch.setenv(INTERVAL_ENV, "0")
    with pytest.raises(ValueError, match=f"{INTERVAL_ENV}: expected a whole number of seconds >= 1, got '0'"):
        new_images_sensor(sweep)


def test_images_changing_back_and_forth_request_a_sweep_each_time(instance, sensor, folder):
    # A -> B -> A -> B: the same content pair twice must not reuse a run key (Dagster drops a repeated key)
    image = sorted((folder / "images").iterdir())[0]
    original = image.read_bytes()
    altered = sorted((folder / "images").iterdir())[1].read_bytes()
    first = tick(instance, sensor)
    keys, cursor = [first.run_requests[0].run_key], first.cursor
    for content in (altered, original, altered):
        image.write_bytes(content)
        stamp = os.stat(image).st_mtime_ns + len(keys) * 1_000_000_000  # a later mtime, as a real edit has
        os.utime(image, ns=(stamp, stamp))
        data = tick(instance, sensor, cursor)
        [request] = data.run_requests
        keys.append(request.run_key)
        cursor = data.cursor
    assert len(set(keys)) == len(keys) == 4


def test_a_tick_after_images_were_added_reads_only_the_new_files(tmp_path, instance, sensor, sweep, folder,
                                                                   monkeypatch):
    for path in [*(folder / "images").iterdir(), *(folder / "targets").iterdir()]:
        age(path)  # older than the racy window: their probes are kept
    outputs = tmp_path / "outputs"
    (outputs / sweep.name).mkdir(parents=True)  # a run made the sweep's folder
    cursor = tick(instance, sensor, outputs=outputs).cursor
    assert (outputs / sweep.name / PROBE_CACHE_FILE).exists()
    first = sorted((folder / "images").iterdir())[0]
    shutil.copy(first, folder / "images" / "extra.png")
    shutil.copy(folder / "targets" / first.name, folder / "targets" / "extra.png")
    probed = []
    real = manifest._probe
    monkeypatch.setattr(manifest, "_probe", lambda file, info: probed.append(str(file)) or real(file, info))
    data = tick(instance, sensor, cursor, outputs=outputs)
    assert len(data.run_requests) == 1
    assert sorted(probed) == sorted([str(folder / "images" / "extra.png"), str(folder / "targets" / "extra.png")])
    assert json.loads(data.cursor)["content"] == content_hash(folder)
