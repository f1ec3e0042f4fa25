"""One trial's pipeline on images, and the record a trial's result becomes; scores pinned to OpenCV and
scikit-image directly."""

import json
import math

import cv2
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from imgtune_assets.core.evaluate import NAN_SCORE, TrialOutcome, evaluate_chunk, evaluate_image
from imgtune_assets.core.metrics import Objective


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(7)
    clean = cv2.GaussianBlur(rng.integers(0, 256, (48, 64), dtype=np.uint8), (7, 7), 2)
    noisy = np.clip(clean + rng.normal(0, 15, clean.shape), 0, 255).astype(np.uint8)
    return noisy, clean


def test_an_image_is_scored_as_opencv_and_scikit_image_score_it(pair):
    noisy, clean = pair
    stages = [("gaussian_blur", {"ksize": 5, "sigma": 1.2})]
    result = evaluate_image(stages, noisy, clean, Objective("psnr"))
    expected = peak_signal_noise_ratio(clean, cv2.GaussianBlur(noisy, (5, 5), 1.2), data_range=255)
    assert result["error"] is None and result["score"] == pytest.approx(expected, rel=1e-9)
    assert 0 <= result["seconds"] < 60


def test_a_failing_stage_becomes_an_error_entry_not_an_exception(pair):
    noisy, clean = pair
    result = evaluate_image([("gaussian_blur", {"ksize": 4, "sigma": 1.0})], noisy, clean, Objective("psnr"))
    assert math.isnan(result["score"]) and result["error"] and "ksize" in result["error"]


def test_a_nan_metric_is_an_error_of_its_own(pair):
    # imgtune's metrics refuse what could give NaN (float images, say); a metric of the user's might not.
    class NanObjective(Objective):
        def score(self, pred, target):
            return float("nan")

    noisy, clean = pair
    result = evaluate_image([("identity", {})], noisy, clean, NanObjective("psnr"))
    assert result["error"] == NAN_SCORE and math.isnan(result["score"])


def test_a_chunk_is_scored_image_by_image_in_order(pair):
    noisy, clean = pair
    stages = [("gaussian_blur", {"ksize": 3, "sigma": 0.8})]
    results = evaluate_chunk(stages, [noisy, clean], [clean, clean], Objective("psnr"))
    assert [r["score"] for r in results] == [evaluate_image(stages, noisy, clean, Objective("psnr"))["score"],
                                             evaluate_image(stages, clean, clean, Objective("psnr"))["score"]]


def outcome(scores, **kwargs):
    per_image = [{"score": s, "seconds": 0.01, "error": None if not isinstance(s, str) else s} for s in scores]
    for r in per_image:
        if r["error"]:
            r["score"] = float("nan")
    return TrialOutcome(trial="trial-003", params={"a": 1}, stages=[["identity", {}]],
                        image_ids=[f"img{i}" for i in range(len(scores))], per_image=per_image, **kwargs)


def test_a_trial_s_score_is_the_mean_of_its_images_and_any_failed_image_fails_it():
    ok = outcome([10.0, 20.0, 30.0])
    assert ok.status == "ok" and ok.score == 20.0 and ok.images_scored == 3 and ok.first_error is None
    failed = outcome([10.0, "ValueError: bad", 30.0])
    assert failed.status == "failed" and math.isnan(failed.score) and failed.partial_score == 20.0
    assert failed.images_failed == 1 and failed.first_error == "image img1: ValueError: bad"
    assert outcome([]).status == "failed"
    assert outcome([1.0], error="worker died").first_error == "worker died"


def test_a_pruned_trial_has_only_its_partial_mean():
    pruned = outcome([10.0, 14.0], pruned=True, round=2, source="tpe", rung=0, estimated_score=11.5)
    assert pruned.status == "pruned" and math.isnan(pruned.score) and pruned.partial_score == 12.0
    record = pruned.to_record(sweep_name="s", fingerprint="f", metric="psnr", manifest_digest="m")
    assert record["status"] == "pruned" and record["score"] is None and record["partial_score"] == 12.0
    assert (record["round"], record["source"], record["rung"], record["estimated_score"]) == (2, "tpe", 0, 11.5)


def test_a_record_holds_json_values_only():
    record = outcome([10.0, "ValueError: bad"]).to_record(sweep_name="s", fingerprint="f", metric="psnr",
                                                          manifest_digest="m")
    assert record["score"] is None and record["error"] == "image img1: ValueError: bad"
    assert [p["score"] for p in record["per_image"]] == [10.0, None]
    assert "round" not in record  # a plain sampler's trial: no staged-search fields
    assert json.loads(json.dumps(record, allow_nan=False)) == record
