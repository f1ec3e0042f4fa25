"""Trial results on disk (current vs stale) and the cached identity baseline."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from imgtune_assets.core.metrics import Objective
from imgtune_assets.core.results import IdentityBaseline, TrialStore, damaged_message, lost_to_ray, trial_record_problem

FINGERPRINT, DIGEST = "f" * 16, "d" * 16


def record(key: str, score: float = 20.0, *, fingerprint: str = FINGERPRINT, digest: str = DIGEST) -> dict:
    return {"trial": key, "fingerprint": fingerprint, "manifest_digest": digest, "status": "ok", "score": score,
            "params": {"gaussian_blur.sigma": 1.0}}


@pytest.fixture
def store(tmp_path):
    return TrialStore(tmp_path / "sweep", FINGERPRINT, DIGEST)


def test_a_saved_result_is_current_and_loads_back(tmp_path, store):
    path = store.save(record("trial-001", 31.5))
    assert path == tmp_path / "sweep" / "trials" / "trial-001.json"
    assert json.loads(path.read_text())["score"] == 31.5
    assert store.load("trial-001") == record("trial-001", 31.5)
    assert store.load("trial-000") is None  # never computed
    assert list(path.parent.iterdir()) == [path]  # written through a temporary file, none left behind


def test_a_killed_runs_unfinished_writes_are_removed_and_a_live_writers_kept(store):
    import os
    import time

    store.save(record("trial-001"))
    store.partial_folder.mkdir(parents=True)
    killed = [store.folder / ".trial-002.json.abcd1234.tmp", store.partial_folder / ".0123abcd.json.efgh5678.tmp"]
    live = store.folder / ".trial-003.json.ijkl9012.tmp"
    for file in [*killed, live]:
        file.write_text("{")
    for file in killed:
        os.utime(file, (time.time() - store.KILLED_WRITE_AGE_SECONDS - 5,) * 2)
    assert sorted(store.remove_killed_writes()) == sorted(killed)
    assert live.exists() and store.load("trial-001") == record("trial-001")


@pytest.mark.parametrize("changed", ["fingerprint", "digest"])
def test_stale_results_are_counted_kept_and_never_reused(tmp_path, store, changed):
    store.save(record("trial-000", 10.0))
    store.save(record("trial-002", 12.0))
    # computed for other settings, or for other images
    other = TrialStore(tmp_path / "sweep", "other" if changed == "fingerprint" else FINGERPRINT,
                       "other" if changed == "digest" else DIGEST)
    stale_file = other.save(record("trial-001", 99.0, fingerprint=other.fingerprint, digest=other.manifest_digest))

    records, stale = store.load_all(["trial-000", "trial-001", "trial-002", "trial-003"])
    assert [r["trial"] for r in records] == ["trial-000", "trial-002"] and stale == 1
    assert store.load("trial-001") is None
    assert stale_file.exists()  # kept on disk
    reused, todo = store.split_finished(["trial-000", "trial-001", "trial-002", "trial-003"], skip_finished=True)
    assert [r["trial"] for r in reused] == ["trial-000", "trial-002"]
    assert todo == ["trial-001", "trial-003"]  # the stale one is computed again, like a missing one
    # and from the other side, the current results are the stale ones
    assert other.load_all(["trial-000", "trial-001", "trial-002"]) == ([other.load("trial-001")], 2)


def test_without_skip_finished_every_trial_is_computed(store):
    store.save(record("trial-000"))
    store.save(record("trial-001"))
    assert store.split_finished(["trial-000", "trial-001", "trial-002"], skip_finished=False) == \
        ([], ["trial-000", "trial-001", "trial-002"])
    reused, todo = store.split_finished(["trial-000", "trial-001", "trial-002"], skip_finished=True)
    assert [r["trial"] for r in reused] == ["trial-000", "trial-001"] and todo == ["trial-002"]


def test_load_all_keeps_the_order_of_the_keys(store):
    for key in ("trial-002", "trial-000", "trial-001"):
        store.save(record(key))
    records, stale = store.load_all(["trial-001", "trial-002", "trial-000"])
    assert [r["trial"] for r in records] == ["trial-001", "trial-002", "trial-000"] and stale == 0


@pytest.mark.parametrize("content, why", [
    ("{not json", "not JSON ("),
    ("[1, 2]", "a JSON list, not an object"),
    ("null", "a JSON NoneType, not an object"),
    ('{"trial": "trial-000"}', "its 'status' is missing or not a str"),
])
def test_a_damaged_result_counts_as_not_computed_and_is_named(store, content, why):
    store.save(record("trial-001"))
    store.path("trial-000").write_text(content)
    records, stale = store.load_all(["trial-000", "trial-001"])
    assert [r["trial"] for r in records] == ["trial-001"] and stale == 0
    assert list(store.damaged) == [store.path("trial-000")] and store.damaged[store.path("trial-000")].startswith(why)
    assert store.split_finished(["trial-000", "trial-001"], skip_finished=True)[1] == ["trial-000"]  # computed again
    assert damaged_message(store.path("trial-000"), "x") == (
        f"{store.path('trial-000')}: not a usable trial result (x): its trial counts as not computed (running it "
        "replaces the file)")


@pytest.mark.parametrize("change, why", [
    ({"status": "done"}, "its status 'done' is not one of ok, failed, pruned"),
    ({"score": "high"}, "its score 'high' is not a number"),
    ({"score": True}, "its score True is not a number"),
    ({"params": None}, "its 'params' is missing or not a dict"),
])
def test_a_result_of_the_wrong_shape_is_named_with_what_is_wrong(change, why):
    assert trial_record_problem(record("trial-000")) is None
    assert trial_record_problem({**record("trial-000"), **change}) == why


def test_results_saved_under_an_earlier_fingerprint_are_current(tmp_path):
    earlier = TrialStore(tmp_path, "old-fingerprint", DIGEST)
    earlier.save(record("trial-000", fingerprint="old-fingerprint"))
    assert TrialStore(tmp_path, "new-fingerprint", DIGEST).load("trial-000") is None
    store = TrialStore(tmp_path, "new-fingerprint", DIGEST, earlier=["old-fingerprint"])
    assert store.load("trial-000")["trial"] == "trial-000"
    assert TrialStore(tmp_path, "new-fingerprint", "other images", earlier=["old-fingerprint"]).load("trial-000") is None


def test_an_identity_cache_that_is_not_an_object_is_recomputed(tmp_path):
    (tmp_path / "identity.json").write_text("[1, 2]")
    assert IdentityBaseline(tmp_path, Objective("psnr"), DIGEST).cached() is None


# ---------------------------------------------------------------------------------- identity baseline


@pytest.fixture(scope="module")
def decoded(denoise_data):
    """The denoise fixture's images and targets, read with OpenCV directly."""
    images = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((denoise_data / "images").iterdir())]
    targets = [cv2.imread(str(denoise_data / "targets" / p.name), cv2.IMREAD_UNCHANGED)
               for p in sorted((denoise_data / "images").iterdir())]
    assert len(images) == 6 and all(i is not None and i.dtype == np.uint8 for i in images + targets)
    return images, targets


class Loader:
    """Counts how often the baseline asks for the decoded images."""

    def __init__(self, decoded):
        self.decoded, self.calls = decoded, 0

    def __call__(self):
        self.calls += 1
        return zip(*self.decoded)  # (image, target) pairs, as the report streams them


def test_identity_psnr_matches_an_independent_computation(tmp_path, decoded):
    images, targets = decoded
    expected = float(np.mean([peak_signal_noise_ratio(t, i, data_range=255) for i, t in zip(images, targets)]))
    assert 10 < expected < 60  # noisy images: a real, finite PSNR
    score = IdentityBaseline(tmp_path, Objective("psnr"), DIGEST).compute(zip(images, targets))
    assert math.isclose(score, expected, rel_tol=1e-9)
    saved = json.loads((tmp_path / "identity.json").read_text())
    assert saved == {"manifest_digest": DIGEST, "objective": {"metric": "psnr"}, "score": pytest.approx(expected)}


def test_identity_is_computed_once_then_read_from_the_cache(tmp_path, decoded):
    load = Loader(decoded)
    first = IdentityBaseline(tmp_path, Objective("psnr"), DIGEST).score(load)
    assert load.calls == 1
    again = IdentityBaseline(tmp_path, Objective("psnr"), DIGEST)
    assert again.cached() == first
    assert again.score(load) == first and load.calls == 1  # no decoding the second time


def test_identity_is_recomputed_when_the_objective_or_the_images_change(tmp_path, decoded):
    load = Loader(decoded)
    psnr = IdentityBaseline(tmp_path, Objective("psnr"), DIGEST).score(load)
    mae = IdentityBaseline(tmp_path, Objective("mae"), DIGEST).score(load)
    assert load.calls == 2 and mae != psnr
    images, targets = decoded
    assert math.isclose(mae, np.mean([np.abs(i.astype(float) - t).mean() / 255 for i, t in zip(images, targets)]),
                        rel_tol=1e-9)
    # the cache now holds mae: psnr is not served from it
    assert IdentityBaseline(tmp_path, Objective("psnr"), DIGEST).cached() is None
    # same metric, other direction: another objective
    assert IdentityBaseline(tmp_path, Objective("mae", direction="maximize"), DIGEST).cached() is None
    # other images (manifest digest)
    assert IdentityBaseline(tmp_path, Objective("mae"), "e" * 16).cached() is None
    changed = IdentityBaseline(tmp_path, Objective("mae"), "e" * 16).score(load)
    assert load.calls == 3 and changed == mae
    assert IdentityBaseline(tmp_path, Objective("mae"), DIGEST).cached() is None  # replaced


def test_an_identity_that_scores_nothing_is_nan_and_not_cached(tmp_path, decoded):
    images, _ = decoded
    baseline = IdentityBaseline(tmp_path, Objective("psnr"), DIGEST)
    assert math.isnan(baseline.compute(zip(images, [None] * len(images))))  # psnr without targets fails per image
    assert baseline.cached() is None


def test_a_damaged_identity_cache_is_recomputed_and_rewritten(tmp_path, decoded):
    load = Loader(decoded)
    first = IdentityBaseline(tmp_path, Objective("psnr"), DIGEST).score(load)
    (tmp_path / "identity.json").write_text('{"manifest_digest": ')  # e.g. edited by hand
    again = IdentityBaseline(tmp_path, Objective("psnr"), DIGEST)
    assert again.cached() is None
    assert again.score(load) == pytest.approx(first) and load.calls == 2
    assert json.loads((tmp_path / "identity.json").read_text())["score"] == pytest.approx(first)


def test_chunk_progress_round_trips_and_ignores_other_settings(tmp_path):
    store = TrialStore(tmp_path, "f" * 16, DIGEST)
    ok = {"score": 31.5, "seconds": 0.1, "error": None}
    bad = {"score": float("nan"), "seconds": 0.0, "error": "boom"}
    store.save_chunk(["a", "b"], {"trial-000": [ok, bad]}, [ok, ok])
    store.save_chunk(["c"], {"trial-000": [ok], "trial-001": [ok]}, None)
    TrialStore(tmp_path, "0" * 16, DIGEST).save_chunk(["d"], {"trial-000": [ok]}, None)  # other settings
    (store.partial_folder / "damaged.json").write_text("{")
    known, identity = store.load_chunks()
    assert sorted(known) == ["trial-000", "trial-001"]
    assert sorted(known["trial-000"]) == ["a", "b", "c"] and list(known["trial-001"]) == ["c"]
    assert known["trial-000"]["a"] == ok
    assert known["trial-000"]["b"]["error"] == "boom" and math.isnan(known["trial-000"]["b"]["score"])
    assert identity == {"a": ok, "b": ok}
    assert store.save_chunk(["e"], {}, None) is None  # nothing to keep: no file
    store.clear_chunks()
    assert store.load_chunks() == ({}, {})


def test_a_result_saved_under_a_key_padded_to_the_trial_count_loads_under_todays_key(tmp_path, store):
    # A sweep of over 1,000 trials, before keys kept 3 digits, whose folder also holds a stale
    # trial-007.json from when it had fewer trials (other settings).
    legacy = store.folder / "trial-0007.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps(record("trial-0007", 30.5)))
    stale = TrialStore(tmp_path / "sweep", "old settings", DIGEST)
    stale.save(record("trial-007", 12.0, fingerprint="old settings"))
    assert store.load("trial-007") == record("trial-007", 30.5)
    assert json.loads(store.path("trial-007").read_text()) == record("trial-007", 30.5)  # saved under today's key
    assert store.split_finished(["trial-007", "trial-008"], skip_finished=True) == \
        ([record("trial-007", 30.5)], ["trial-008"])
    store.save(record("trial-007", 31.0))  # a result saved since wins over the old name
    assert store.load("trial-007")["score"] == 31.0
    assert store.load_all(["trial-007"]) == ([record("trial-007", 31.0)], 0)


def failed(key: str, *errors: str | None, trial_error: str | None = None) -> dict:
    """A failed record as ``TrialOutcome.to_record`` writes it: per-image errors, the first one repeated."""
    per_image = [{"id": f"ph_{i:02d}", "score": None if e else 30.0, "seconds": 0.1, "error": e}
                 for i, e in enumerate(errors)]
    first = trial_error or next((f"image {p['id']}: {p['error']}" for p in per_image if p["error"]), None)
    return {**record(key), "status": "failed", "score": None, "error": first, "per_image": per_image}


RAYLET_DIED = "LocalRayletDiedError: The task's local raylet died. Check raylet.out for more information."
OPENCV = "error: OpenCV(4.10.0) /io/opencv/modules/imgproc/src/deriv.cpp:792: error: (-215:Assertion failed) dx >= 0"


def test_a_trial_that_ray_lost_is_computed_again_and_a_failed_one_is_reused(store):
    # as an older imgtune wrote them: the trials in flight when Ray's node died, blaming an image
    store.save(failed("trial-000", RAYLET_DIED, RAYLET_DIED))
    store.save(failed("trial-001", None, "OwnerDiedError: Failed to retrieve object 00ff. The object's owner has exited."))
    # genuine failures: OpenCV refusing the parameters; a worker that died on every retry (the trial's doing)
    store.save(failed("trial-002", OPENCV, OPENCV))
    store.save(failed("trial-003", None, "WorkerCrashedError: The worker died unexpectedly while executing this task."))
    store.save(failed("trial-004", trial_error="parameters refused: d must be odd"))
    store.save(failed("trial-005", "ValueError: no LocalRayletDiedError: here", None))  # named, but not as the error
    store.save(record("trial-006", 31.0))
    keys = [f"trial-{k:03d}" for k in range(8)]

    assert [lost_to_ray(store._read(k)) for k in keys[:7]] == [True, True, False, False, False, False, False]
    reused, todo = store.split_finished(keys, skip_finished=True)
    assert [r["trial"] for r in reused] == ["trial-002", "trial-003", "trial-004", "trial-005", "trial-006"]
    assert todo == ["trial-000", "trial-001", "trial-007"]
    assert store.load("trial-000") is None and store.load("trial-002")["status"] == "failed"
    # nor reported: its trial is missing (not stale), until computed again
    records, stale = store.load_all(keys)
    assert [r["trial"] for r in records] == ["trial-002", "trial-003", "trial-004", "trial-005", "trial-006"]
    assert stale == 0
    assert (store.folder / "trial-000.json").exists()  # left on disk, overwritten when computed again
    store.save(record("trial-000", 29.5))
    assert store.load("trial-000")["score"] == 29.5


def test_only_a_failed_record_can_be_lost_to_ray():
    ok = {**failed("trial-000", RAYLET_DIED), "status": "ok"}
    assert not lost_to_ray(ok) and not lost_to_ray({}) and not lost_to_ray(failed("trial-001", None, None))
    assert lost_to_ray(failed("trial-002", trial_error="NodeDiedError: node 12 died"))
    # as ray.get raises a task's error whose cause is Ray's: a class named after that cause
    assert lost_to_ray(failed("trial-003", trial_error="RayTaskError(OwnerDiedError): the owner died"))
    assert not lost_to_ray(failed("trial-004", trial_error="RayTaskError(ValueError): bad ksize"))
