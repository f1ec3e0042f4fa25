"""Sweeps over an object store: moto's standalone S3 server on 127.0.0.1 (``support/s3server.py``), never AWS.

Every test runs with dummy AWS credentials and region in its environment, and every S3 URL is opened with
the test server's endpoint (a sweep file's ``storage: {endpoint_url: ...}``), so nothing can fall back to
real AWS. Checked:

* scanning ``s3://bucket/prefix`` gives the rows a scan of the local copy gives, keyed by the store's ETag
  (whole objects are not read), with a corrupt object a skipped row naming its URL;
* a whole sweep over S3 through the real ``dagster asset materialize`` commands (manifest, every trial,
  report, the winning pipeline applied into the bucket) scores what scikit-image scores on the local copy,
  writes one exact output per input, lists them, and leaves no credential anywhere;
* wrong credentials, a missing bucket, an object deleted between the manifest and a run: the step fails
  with a message naming the URL and the cause, and earlier trial results stay as they were.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import s3fs
import yaml
from dagster import AssetKey, DagsterInstance, materialize
from skimage.metrics import peak_signal_noise_ratio

from imgtune_assets.cli import sweep_commands
from imgtune_assets.core import storage
from imgtune_assets.core.demo_data import make_denoise_set
from imgtune_assets.core.manifest import PROBE_CACHE_FILE, ProbeCache, scan_folder
from imgtune_assets.core.ops import apply_pipeline
from imgtune_assets.core.sampling import trial_keys
from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.factory import build_definitions
from imgtune_assets.defs.keys import asset_key
from imgtune_assets.defs.resources import RayResource
from imgtune_assets_tests.support.dagster_services import run_checked
from imgtune_assets_tests.support.s3server import (
    DUMMY_KEY_ID,
    DUMMY_SECRET,
    SCRUBBED_ENV,
    MotoServer,
    make_bucket,
    s3_environment,
    upload_folder,
)
from imgtune_assets_tests.support.sweeps import DEFAULT_PIPELINE, VENV_BIN, cli_env

ENV_CLEARED = (*SCRUBBED_ENV, "IMGTUNE_RAY_ADDRESS", "IMGTUNE_EXECUTOR", "RAY_ADDRESS", "IMGTUNE_SWEEP",
               "IMGTUNE_SWEEPS_DIR")


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """One moto S3 server for the module (each test uses buckets of its own)."""
    with MotoServer.start(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(autouse=True)
def s3_env(monkeypatch):
    """Dummy credentials and region; nothing that could point a client at AWS or a profile."""
    for name in ENV_CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_environment().items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("denoise64")
    make_denoise_set(folder, count=6, size=64)
    return folder


def uploaded(server: MotoServer, bucket: str, local: Path, prefix: str = "data") -> str:
    """``local`` (images/ and targets/) copied to ``s3://bucket/prefix``; returns that URL."""
    make_bucket(server, bucket)
    upload_folder(server.filesystem(), local, f"{bucket}/{prefix}")
    return f"s3://{bucket}/{prefix}"


def write_s3_sweep(path: Path, server: MotoServer, data_url: str, *, name: str, trials: int, **extra) -> Path:
    doc = {"name": name, "data_dir": data_url, "storage": {"endpoint_url": server.endpoint_url},
           "objective": {"metric": "psnr"}, "trials": trials, "seed": 0, "sampler": "random",
           "pipeline": DEFAULT_PIPELINE, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def read_local(file: Path) -> np.ndarray:
    return cv2.imread(str(file), cv2.IMREAD_UNCHANGED)


def independent_psnr(local: Path, stages) -> float:
    """Mean PSNR of ``stages`` on the local copy: OpenCV decode, imgtune's ops, scikit-image's PSNR."""
    scores = []
    for image_file in sorted((local / "images").iterdir()):
        out = apply_pipeline(read_local(image_file), [tuple(s) for s in stages])
        scores.append(peak_signal_noise_ratio(read_local(local / "targets" / image_file.name), out, data_range=255))
    return float(np.mean(scores))


def step_failures(result) -> str:
    """Every step failure's message, error and description, as one string for assertions."""
    out = []
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        out.append(event.message or "")
        if data.error is not None:
            out.append(data.error.to_string())
        if data.user_failure_data is not None:
            out.append(data.user_failure_data.description or "")
    return "\n".join(out)


def in_process(tmp_path: Path, sweep_file: Path):
    """The project's definitions for the sweep (outputs under tmp_path/outputs). (The tests materialize
    them on the ``instance`` fixture: the project's instance on disk.)"""
    sweep = load_sweep(sweep_file)
    defs = build_definitions([sweep], output_dir=str(tmp_path / "outputs"))
    return sweep, defs


def run_assets(sweep, defs, instance, names, **kwargs):
    return materialize(list(defs.assets), selection=[asset_key(sweep, n) for n in names], instance=instance,
                       resources=defs.resources, raise_on_error=False, **kwargs)


def trial_range(first: str, last: str) -> dict[str, str]:
    return {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}


# ------------------------------------------------------------------------------------------ a. the scan
def test_scanning_a_bucket_matches_the_local_copy_keyed_by_etag(tmp_path, s3_server, local_data):
    local = tmp_path / "local"
    for sub in ("images", "targets"):
        (local / sub).mkdir(parents=True)
        for file in (local_data / sub).iterdir():
            (local / sub / file.name).write_bytes(file.read_bytes())
    # one corrupt image (with a valid target, so the image itself is the reason)
    (local / "images" / "broken.png").write_bytes(b"\x89PNG-not-really" + bytes(range(256)) * 4)
    (local / "targets" / "broken.png").write_bytes((local_data / "targets" / "scene_000.png").read_bytes())
    url = uploaded(s3_server, "scan", local)

    local_rows = scan_folder(local, needs_target=True)
    whole_reads = []

    def spy(name):
        real = getattr(storage, name)

        def wrapper(path, *args, **kwargs):
            whole_reads.append((name, str(path)))
            return real(path, *args, **kwargs)
        return wrapper

    with pytest.MonkeyPatch.context() as patch:  # whole-object reads, counted while the bucket is scanned
        for name in ("read_with_key", "read_bytes"):
            patch.setattr(storage, name, spy(name))
        remote_rows = scan_folder(storage.location(url, endpoint_url=s3_server.endpoint_url), needs_target=True)

    def shape(rows):
        return [(r.id, r.image_path, r.target_path, r.width, r.height, r.channels, r.dtype, r.status) for r in rows]

    assert shape(remote_rows) == shape(local_rows)
    assert [r.id for r in remote_rows] == ["broken", *[f"scene_{k:03d}" for k in range(6)]]
    assert [r.status for r in remote_rows] == ["skipped"] + ["ok"] * 6
    assert all((r.width, r.height) == (64, 64) for r in remote_rows[1:])

    # Keys are the store's tag with the size (for a single PUT the ETag is the MD5 of the bytes), not hashes
    # of whole reads: each object's head is read once (for these small objects, the head is all of it, so
    # even the corrupt one is not read again).
    assert whole_reads == []
    fs = s3_server.filesystem()
    for row in remote_rows[1:]:
        for relative, key in ((row.image_path, row.image_sha256), (row.target_path, row.target_sha256)):
            data = fs.cat_file(f"scan/data/{relative}")
            assert key == f"etag:{hashlib.md5(data).hexdigest()}:{len(data)}", relative
    local_keys = {r.id: r.image_sha256 for r in local_rows}
    assert local_keys["scene_000"] == hashlib.sha256((local / "images" / "scene_000.png").read_bytes()).hexdigest()
    # the image's size (for its detail, which successive halving stratifies by): the listing's, as the file's
    for remote, here in zip(remote_rows[1:], local_rows[1:]):
        assert remote.image_bytes == here.image_bytes == (local / here.image_path).stat().st_size

    broken = remote_rows[0]
    assert broken.reason.startswith(f"{url}/images/broken.png: "), broken.reason
    assert "not a decodable image" in broken.reason
    assert DUMMY_SECRET not in broken.reason


def test_a_probe_cache_reads_no_object_whose_tag_is_unchanged(tmp_path, s3_server, local_data):
    url = uploaded(s3_server, "cached", local_data)
    data = storage.location(url, endpoint_url=s3_server.endpoint_url)
    cache_file = tmp_path / PROBE_CACHE_FILE
    first = ProbeCache.load(cache_file)
    rows = scan_folder(data, needs_target=True, cache=first)
    first.save()
    assert first.read == 12  # six images and six targets: each object's head read once

    heads = []
    real = storage.read_head
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage, "read_head", lambda path, n: heads.append(str(path)) or real(path, n))
        again = ProbeCache.load(cache_file)
        assert [r.to_record() for r in scan_folder(data, needs_target=True, cache=again)] == \
            [r.to_record() for r in rows]
        assert heads == [] and again.reused == 12  # the listing's tags matched: no object read
        # An object written again with other bytes has another tag: read again, alone.
        s3_server.filesystem().pipe_file("cached/data/images/scene_001.png",
                                         (local_data / "images" / "scene_002.png").read_bytes())
        changed = ProbeCache.load(cache_file)
        rescanned = {r.id: r for r in scan_folder(data, needs_target=True, cache=changed)}
    assert heads == [f"{url}/images/scene_001.png"] and changed.read == 1
    assert rescanned["scene_001"].image_sha256 == next(r for r in rows if r.id == "scene_002").image_sha256


# ------------------------------------------------------------------------- b. a whole sweep, the real CLI
def test_whole_sweep_over_s3_through_the_dagster_cli(tmp_path, s3_server, local_data, monkeypatch):
    url = uploaded(s3_server, "sweep-cli", local_data)
    sweep_file = write_s3_sweep(tmp_path / "sweeps" / "s3sweep.yaml", s3_server, url, name="s3sweep", trials=3,
                                apply={"input_dir": f"{url}/images", "output_dir": "s3://sweep-cli/tuned"})
    sweep = load_sweep(sweep_file)
    keys = trial_keys(sweep)
    env = cli_env(tmp_path, sweep_file)  # with the dummy credentials of s3_env: the secret looked for below
    printed = []
    for command in sweep_commands(sweep.name, keys, apply=True):
        result = run_checked(command, env, timeout=300)
        printed.append(result.stdout + result.stderr)

    home, out = Path(env["DAGSTER_HOME"]), tmp_path / "outputs" / sweep.name
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        assert instance.get_materialized_partitions(asset_key(sweep, "experiment_results")) == set(keys)
        [manifest] = instance.fetch_materializations(asset_key(sweep, "image_manifest"), limit=5).records
        [report] = instance.fetch_materializations(asset_key(sweep, "sweep_report"), limit=5).records
        # (keys.asset_key does not know tuned_images: its key is spelled out)
        [tuned] = instance.fetch_materializations(AssetKey([sweep.name, "tuned_images"]), limit=5).records
        manifest_meta = manifest.asset_materialization.metadata
        report_meta = report.asset_materialization.metadata
        tuned_meta = tuned.asset_materialization.metadata
    assert manifest_meta["usable_images"].value == 6 and manifest_meta["data_dir"].value == url
    assert manifest_meta["content_key"].value.startswith("object store tag")

    # The best score is what the same pipelines score on the local copy, computed without the sweep.
    trials = {k: json.loads((out / "trials" / f"{k}.json").read_text()) for k in keys}
    local_scores = {k: independent_psnr(local_data, t["stages"]) for k, t in trials.items()}
    best_trial = report_meta["best_trial"].value
    assert best_trial == max(local_scores, key=local_scores.get)
    assert math.isclose(report_meta["best_score"].value, local_scores[best_trial], rel_tol=1e-9)
    for k, t in trials.items():
        assert t["status"] == "ok" and math.isclose(t["score"], local_scores[k], rel_tol=1e-9), k
    best_stages = [tuple(s) for s in trials[best_trial]["stages"]]

    # One output per input in the bucket, each exactly the best pipeline applied to its local input.
    fs = s3_server.filesystem()
    inputs = sorted(p.name for p in (local_data / "images").iterdir())
    listed = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("sweep-cli/tuned"))
    assert listed == sorted([".imgtune-applied.json", *inputs])
    objects = {name: fs.cat_file(f"sweep-cli/tuned/{name}") for name in inputs}
    for name, data in objects.items():
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        expected = apply_pipeline(read_local(local_data / "images" / name), best_stages)
        assert decoded.dtype == expected.dtype == np.uint8 and np.array_equal(decoded, expected), name

    # tuned_images.json and the asset's metadata list input key, output path and output SHA-256.
    summary = json.loads((out / "tuned_images.json").read_text())
    assert summary["written"] == 6 and summary["skipped"] == 0 and summary["best_trial"] == best_trial
    assert [tuple(s) for s in summary["stages"]] == best_stages
    by_output = {e["output"]: e for e in summary["outputs"]}
    assert sorted(by_output) == [f"s3://sweep-cli/tuned/{name}" for name in inputs]
    etags = {name: fs.info(f"sweep-cli/data/images/{name}")["ETag"].strip('"') for name in inputs}
    for name in inputs:
        entry = by_output[f"s3://sweep-cli/tuned/{name}"]
        assert entry["status"] == "written" and entry["input"] == f"{url}/images/{name}"
        assert entry["output_sha256"] == hashlib.sha256(objects[name]).hexdigest()
        assert entry["input_key"] == f"etag:{etags[name]}:{(local_data / 'images' / name).stat().st_size}"
    table = {r.data["output"]: r.data for r in tuned_meta["outputs"].value.records}
    assert {o: (r["input_key"], r["output_sha256"]) for o, r in table.items()} == \
        {o: (e["input_key"], e["output_sha256"]) for o, e in by_output.items()}
    assert tuned_meta["written"].value == 6

    # No credential anywhere: the instance (event log, compute logs), the outputs, what the CLI printed.
    # (The search does see the runs' records: the data URL is in the event log.)
    assert any(url.encode() in p.read_bytes() for p in home.rglob("*") if p.is_file())
    leaks = [str(p) for folder in (home, tmp_path / "outputs") for p in folder.rglob("*")
             if p.is_file() and DUMMY_SECRET.encode() in p.read_bytes()]
    assert leaks == []
    assert not any(DUMMY_SECRET in text for text in printed)
    for value in [*manifest_meta.values(), *report_meta.values(), *tuned_meta.values()]:
        assert DUMMY_SECRET not in str(value.value)
    assert DUMMY_SECRET.encode() not in fs.cat_file("sweep-cli/tuned/.imgtune-applied.json")


def test_applying_again_over_s3_needs_only_the_listings(tmp_path, local_data):
    from imgtune_assets.core.apply import apply_to_folder, pipeline_key, unchanged_unread

    with MotoServer.start(tmp_path / "moto", record=True) as s3_server:
        url = uploaded(s3_server, "reapply", local_data)
        source = storage.location(f"{url}/images", endpoint_url=s3_server.endpoint_url)
        target = storage.location("s3://reapply/tuned", endpoint_url=s3_server.endpoint_url)
        stages = [("gaussian_blur", {"ksize": 3, "sigma": 0.8})]
        ray_cluster = RayResource(num_cpus=2)
        ray_cluster.connect()
        try:
            runs = [{Path(e["input"]).name: e for e in apply_to_folder(stages, source, target).entries}
                    for _ in range(2)]
            with s3_server.recorded() as requests:
                runs.append({Path(e["input"]).name: e for e in apply_to_folder(stages, source, target).entries})
        finally:
            ray_cluster.teardown_after_execution(None)
        in_tags = {f.name: storage.content_key_of_info(info) for f, info in storage.list_files(source)}
        out_tags = {f.name: storage.content_key_of_info(info) for f, info in storage.list_files(target)}
    # the third run read no image object, in or out: listings, the ledger, and the new ledger's upload
    objects = [(method, u) for method, u in requests if method in ("GET", "HEAD") and u.split("?")[0].endswith(".png")]
    assert requests and objects == [], objects
    assert [sorted({e["status"] for e in run.values()}) for run in runs] == [["written"], ["unchanged"], ["unchanged"]]
    assert len(in_tags) == len(out_tags) == 6
    for name, entry in runs[2].items():
        # the key of a whole read is the listing's tag, and the second run recorded the output's: the
        # third decided from the two listings alone
        assert entry["input_key"] == in_tags[name] and entry["output_tag"] == out_tags[name]
        assert unchanged_unread(entry, pipeline_key(stages), source / name, target / name, in_tags[name], out_tags[name])


# ------------------------------------------------------------------------------------------ c-e. failures
def test_wrong_credentials_fail_the_manifest_naming_the_url(tmp_path, local_data, monkeypatch, instance):
    with MotoServer.start(tmp_path / "moto", enforce_auth_after=3) as server:
        key = server.create_access_key()  # the 3 requests moto accepts without credentials
        make_bucket(server, "private", key.key_id, key.secret)
        upload_folder(server.filesystem(key.key_id, key.secret), local_data, "private/data")
        url = "s3://private/data"
        # the valid keys can read it: enforcement is on, and only the credentials differ below
        assert len(server.filesystem(key.key_id, key.secret).ls("private/data/images")) == 6
        with pytest.raises(PermissionError):
            server.filesystem(DUMMY_KEY_ID, DUMMY_SECRET).ls("private/data/images")

        wrong_secret = "wrong-secret-5e1d0c7a"
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key.key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
        sweep, defs = in_process(tmp_path, write_s3_sweep(tmp_path / "priv.yaml", server, url, name="priv",
                                                          trials=2))
        result = run_assets(sweep, defs, instance, ["image_manifest"])
    assert not result.success
    message = step_failures(result)
    assert f"{url}: access denied" in message, message
    assert "AWS_ACCESS_KEY_ID" in message  # says where credentials come from
    assert wrong_secret not in message and key.secret not in message
    assert not instance.fetch_materializations(asset_key(sweep, "image_manifest"), limit=1).records


@pytest.mark.parametrize("wrong", ["key", "secret"])
def test_credentials_the_store_does_not_know_are_refused_before_any_output(tmp_path, wrong, monkeypatch):
    with MotoServer.start(tmp_path / "moto", enforce_auth_after=3) as server:
        key = server.create_access_key()  # the 3 requests moto accepts without credentials
        make_bucket(server, "outputs", key.key_id, key.secret)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key.key_id if wrong == "secret" else "AKIAUNKNOWN0000000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-5e1d0c7a" if wrong == "secret" else key.secret)
        out = storage.location("s3://outputs/tuned", endpoint_url=server.endpoint_url)
        with pytest.raises(storage.StorageError) as err:
            storage.require_output_folder(out)
        code = "SignatureDoesNotMatch" if wrong == "secret" else "InvalidAccessKeyId"
        assert str(err.value).startswith(f"s3://outputs/tuned: the store refused the credentials ({code}"), err.value
        assert "AWS_ACCESS_KEY_ID" in str(err.value) and key.secret not in str(err.value)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key.key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key.secret)
        s3fs.S3FileSystem.clear_instance_cache()  # (s3fs keeps a file system per endpoint, credentials and all)
        storage.require_output_folder(storage.location("s3://outputs/tuned", endpoint_url=server.endpoint_url))


def test_missing_bucket_fails_the_manifest_saying_so(tmp_path, s3_server, instance):
    url = "s3://no-such-bucket-here/data"
    sweep, defs = in_process(tmp_path, write_s3_sweep(tmp_path / "nob.yaml", s3_server, url, name="nobucket",
                                                      trials=2))
    result = run_assets(sweep, defs, instance, ["image_manifest"])
    assert not result.success
    message = step_failures(result)
    assert url in message, message
    assert "bucket does not exist" in message.lower(), message


def test_an_output_bucket_that_does_not_exist_is_refused_before_any_work(tmp_path, s3_server, local_data):
    from imgtune_assets.core.apply import ApplyError, apply_to_folder

    url = uploaded(s3_server, "apply-in", local_data)
    client = s3_server.client()
    buckets = sorted(b["Name"] for b in client.list_buckets()["Buckets"])
    assert "apply-in" in buckets and "apply-nobucket" not in buckets

    def at(spec):
        return storage.location(spec, endpoint_url=s3_server.endpoint_url)

    for out in ("s3://apply-nobucket/tuned", "s3://apply-nobucket"):  # (the second is named s3://apply-nobucket/)
        with pytest.raises(storage.StorageError) as err:
            storage.require_output_folder(at(out))
        assert err.value.kind == "missing" and str(err.value).startswith(
            f"{at(out)}: the bucket 'apply-nobucket' does not exist (cannot write into it"), err.value
    # an existing bucket: a prefix not there yet is made by the first upload
    storage.require_output_folder(at("s3://apply-in/not-yet"))
    storage.require_output_folder(at("s3://apply-in"))
    # an object where the output folder would be: refused, as a local file is
    client.put_object(Bucket="apply-in", Key="an-object", Body=b"not a folder")
    with pytest.raises(storage.StorageError, match="^s3://apply-in/an-object: not a folder \\(an object"):
        storage.require_output_folder(at("s3://apply-in/an-object"))
    # the path the tuned_images asset takes: refused before Ray is asked for
    with pytest.raises(ApplyError, match="^s3://apply-nobucket/x: the bucket 'apply-nobucket' does not exist"):
        apply_to_folder([("gaussian_blur", {"ksize": 3, "sigma": 0.8})], at(f"{url}/images"),
                        at("s3://apply-nobucket/x"), connect=lambda: pytest.fail("Ray was to be started"))

    # The command: exit 2 and the URL, before its Ray starts (no session folder) and before any output.
    pipeline = write_s3_sweep(tmp_path / "best.yaml", s3_server, url, name="best", trials=1,
                              pipeline=[{"op": "gaussian_blur", "ksize": 3, "sigma": 0.8}])
    ray_root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    try:
        result = subprocess.run([str(VENV_BIN / "python"), "-m", "imgtune_assets.cli", "apply", str(pipeline),
                                 f"{url}/images", "s3://apply-nobucket/x"],
                                cwd=tmp_path, env={**cli_env(tmp_path, pipeline), "RAY_TMPDIR": str(ray_root)},
                                capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
        assert list(ray_root.iterdir()) == []
    finally:
        shutil.rmtree(ray_root, ignore_errors=True)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: s3://apply-nobucket/x: the bucket 'apply-nobucket' does not exist"), \
        result.stderr
    assert " written, " not in result.stdout and "Traceback" not in result.stderr
    assert sorted(b["Name"] for b in client.list_buckets()["Buckets"]) == buckets  # no bucket was created


@pytest.mark.parametrize("budget_mb", [None, 0.001], ids=["chunks in the object store", "streamed, fused tasks"])
def test_object_deleted_between_manifest_and_run(tmp_path, s3_server, local_data, budget_mb, instance):
    # (a budget smaller than one image on 2 CPUs: the images stream, 6 chunks of one, each read, decoded and
    # scored by one task)
    bucket = "vanish" if budget_mb is None else "vanish-fused"
    url = uploaded(s3_server, bucket, local_data)
    sweep, defs = in_process(tmp_path, write_s3_sweep(tmp_path / "van.yaml", s3_server, url, name="vanish",
                                                      trials=4))
    if budget_mb is not None:
        defs = SimpleNamespace(assets=defs.assets, resources={
            **defs.resources, "ray_cluster": RayResource(object_store_budget_mb=budget_mb, num_cpus=2)})
    keys = trial_keys(sweep)
    first = run_assets(sweep, defs, instance, ["image_manifest", "run_settings"])
    assert first.success, step_failures(first)
    early = run_assets(sweep, defs, instance, ["experiment_results"], tags=trial_range(keys[0], keys[1]))
    assert early.success, step_failures(early)
    stats = json.loads((tmp_path / "outputs" / "vanish" / "last_experiment_run.json").read_text())
    assert stats["fused"] is (budget_mb is not None)
    trials_dir = tmp_path / "outputs" / "vanish" / "trials"
    before = {k: ((trials_dir / f"{k}.json").read_bytes(), (trials_dir / f"{k}.json").stat().st_mtime_ns)
              for k in keys[:2]}
    assert all(json.loads(data)["status"] == "ok" for data, _ in before.values())

    s3_server.filesystem().rm_file(f"{bucket}/data/images/scene_003.png")
    late = run_assets(sweep, defs, instance, ["experiment_results"], tags=trial_range(keys[2], keys[3]))
    assert not late.success
    message = step_failures(late)
    assert f"{url}/images/scene_003.png: not found" in message, message
    assert "materialize image_manifest,run_settings again" in message
    after = {k: ((trials_dir / f"{k}.json").read_bytes(), (trials_dir / f"{k}.json").stat().st_mtime_ns)
             for k in keys[:2]}
    assert after == before
    assert not any((trials_dir / f"{k}.json").exists() for k in keys[2:])
    assert instance.get_materialized_partitions(asset_key(sweep, "experiment_results")) == set(keys[:2])


def test_the_new_images_sensor_watches_a_bucket(tmp_path, s3_server, local_data):
    from dagster import build_sensor_context, instance_for_test

    from imgtune_assets.defs.resources import SweepResource
    from imgtune_assets.defs.sensors import sensor_name

    url = uploaded(s3_server, "watched", local_data)
    sweep, defs = in_process(tmp_path, write_s3_sweep(tmp_path / "w.yaml", s3_server, url, name="watched",
                                                      trials=2))
    sensor = defs.get_sensor_def(sensor_name(sweep))
    resources = {"imgtune": SweepResource(output_dir=str(tmp_path / "outputs"))}
    with instance_for_test() as instance:
        first = sensor.evaluate_tick(build_sensor_context(instance=instance, resources=resources))
        assert len(first.run_requests) == 1  # never swept: the whole sweep is requested
        quiet = sensor.evaluate_tick(build_sensor_context(instance=instance, cursor=first.cursor, resources=resources))
        assert quiet.run_requests == [] and "no change" in quiet.skip_message
        # A new photo and its target land in the bucket: one listing shows it, another sweep is requested.
        fs = s3_server.filesystem()
        fs.pipe_file("watched/data/images/zz_new.png", (local_data / "images" / "scene_000.png").read_bytes())
        fs.pipe_file("watched/data/targets/zz_new.png", (local_data / "targets" / "scene_000.png").read_bytes())
        changed = sensor.evaluate_tick(build_sensor_context(instance=instance, cursor=quiet.cursor or first.cursor, resources=resources))
        assert len(changed.run_requests) == 1
        assert changed.run_requests[0].tags["imgtune/images_content_hash"] != first.run_requests[0].tags[
            "imgtune/images_content_hash"]
        # Folder markers (the S3 console's "Create folder") are no files: nothing to sweep again.
        fs.pipe_file("watched/data/images/", b"")
        fs.pipe_file("watched/data/targets/", b"")
        marked = sensor.evaluate_tick(build_sensor_context(instance=instance, cursor=changed.cursor, resources=resources))
        assert marked.run_requests == [], marked.run_requests
        listed = [p.name for p, _ in storage.list_files(storage.location(url + "/images",
                                                                         endpoint_url=s3_server.endpoint_url))]
        assert listed and "images" not in listed and "" not in listed, listed


def test_the_new_images_sensor_names_a_missing_bucket(tmp_path, s3_server):
    from dagster import build_sensor_context, instance_for_test

    from imgtune_assets.defs.resources import SweepResource
    from imgtune_assets.defs.sensors import sensor_name

    url = "s3://no-such-bucket-here/data"
    sweep, defs = in_process(tmp_path, write_s3_sweep(tmp_path / "nob.yaml", s3_server, url, name="nobucket",
                                                      trials=2))
    with instance_for_test() as instance:
        tick = defs.get_sensor_def(sensor_name(sweep)).evaluate_tick(build_sensor_context(
            instance=instance, resources={"imgtune": SweepResource(output_dir=str(tmp_path / "outputs"))}))
    assert tick.run_requests == [] and url in tick.skip_message, tick.skip_message
    assert "bucket does not exist" in tick.skip_message.lower() and "does not exist yet" not in tick.skip_message
