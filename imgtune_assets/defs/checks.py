"""Asset checks of a sweep: the data is usable, scores are numbers, tuning helped, the report is complete,
and (with ``apply:``) every image of the folder got its tuned output."""


import math

from dagster import AssetCheckResult, AssetCheckSeverity, AssetChecksDefinition, asset_check

from imgtune_assets.core.metrics import improves
from imgtune_assets.defs.assets import SweepAssets


def build_sweep_checks(assets: SweepAssets) -> list[AssetChecksDefinition]:
    @asset_check(asset=assets.image_manifest, blocking=True,
                 description="At least one image is usable (with its target when the metric needs one).")
    def manifest_has_usable_images(image_manifest) -> AssetCheckResult:
        usable = image_manifest[image_manifest["status"] == "ok"]
        return AssetCheckResult(passed=len(usable) > 0, metadata={"usable_images": len(usable)})

    @asset_check(asset=assets.image_manifest,
                 description="Every file in the data folder is usable; skipped files are listed with a reason.")
    def manifest_all_files_usable(image_manifest) -> AssetCheckResult:
        skipped = image_manifest[image_manifest["status"] != "ok"]
        return AssetCheckResult(
            passed=len(skipped) == 0,
            severity=AssetCheckSeverity.WARN,
            metadata={"skipped_files": len(skipped),
                      "reasons": "\n".join(f"{p}: {r}" for p, r in zip(skipped["image_path"], skipped["reason"]))[:4000]},
        )

    @asset_check(asset=assets.sweep_report,
                 description="No image's metric came out NaN (such trials are failed, not ranked).")
    def scores_are_numbers(sweep_report: dict) -> AssetCheckResult:
        return AssetCheckResult(passed=sweep_report["nan_scores"] == 0,
                                metadata={"nan_scores": sweep_report["nan_scores"]})

    @asset_check(asset=assets.sweep_report, description="The best trial beats the identity pipeline (tuning helped).")
    def tuning_beats_identity(sweep_report: dict) -> AssetCheckResult:
        best, identity = sweep_report["best_score"], sweep_report["identity_score"]
        # The report holds NaN where there is no score; None (a report of an older version) fails alike.
        known = {name: float(value) for name, value in (("best_score", best), ("identity_score", identity))
                 if value is not None}
        passed = len(known) == 2 and not any(map(math.isnan, known.values())) and improves(
            known["best_score"], known["identity_score"], sweep_report["higher_is_better"])
        return AssetCheckResult(passed=passed, severity=AssetCheckSeverity.WARN, metadata=known)

    @asset_check(asset=assets.sweep_report,
                 description="Every trial of the sweep completed or was stopped by early stopping; failed and "
                             "missing trials are listed.")
    def report_complete(sweep_report: dict) -> AssetCheckResult:
        failed, missing = sweep_report["failed_trials"], sweep_report["missing_trials"]
        settled = sweep_report["completed_trials"] + sweep_report.get("pruned_trials", 0)
        return AssetCheckResult(
            passed=not failed and not missing and settled == sweep_report["total_trials"],
            severity=AssetCheckSeverity.WARN,
            metadata={"completed_trials": sweep_report["completed_trials"],
                      "pruned_trials": sweep_report.get("pruned_trials", 0),
                      "total_trials": sweep_report["total_trials"],
                      "failed_trials": ", ".join(failed) or "none", "missing_trials": ", ".join(missing[:50]) or "none"},
        )

    checks = [manifest_has_usable_images, manifest_all_files_usable, scores_are_numbers, tuning_beats_identity,
              report_complete]
    if assets.tuned_images is not None:
        @asset_check(asset=assets.tuned_images,
                     description="Every image of the apply folder has its tuned output; skipped inputs are listed "
                                 "with a reason.")
        def tuned_images_complete(tuned_images: dict) -> AssetCheckResult:
            skipped = tuned_images.get("skipped_inputs", [])
            return AssetCheckResult(
                passed=tuned_images["skipped"] == 0,
                severity=AssetCheckSeverity.WARN,
                metadata={"skipped": tuned_images["skipped"],
                          "reasons": "\n".join(reason for _, reason in skipped)[:4000]},
            )

        checks.append(tuned_images_complete)
    return checks
