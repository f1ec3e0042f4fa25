"""A sweep's asset group in process, for tests that ``materialize`` it (defs/test_assets.py,
defs/test_search_run.py): its assets built from a sweep file, the resources every sweep shares, op
names, and scores computed without imgtune's code to check the group's against.

* ``built(sweep_file)`` → ``(sweep, assets)``; ``resources(out_dir)``; ``node(assets_def)``;
* ``data_files(sweep)``: (image, target) paths of the sweep's data folder;
* ``independent_denoise_psnr(sweep, stages)``: bilateral filter then Gaussian blur with OpenCV
  directly, scored with scikit-image.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.metrics import peak_signal_noise_ratio

from imgtune_assets.core.sweepfile import load_sweep
from imgtune_assets.defs.assets import build_sweep_assets
from imgtune_assets.defs.io_manager import SweepStorageIOManager
from imgtune_assets.defs.partitions import trial_partitions
from imgtune_assets.defs.resources import RayResource, SweepResource


def resources(out_dir):
    """The resources every sweep shares (as definitions.py sets them), writing under ``out_dir``."""
    imgtune = SweepResource(output_dir=str(out_dir))
    return {"imgtune": imgtune, "ray_cluster": RayResource(), "io_manager": SweepStorageIOManager(imgtune=imgtune)}


def built(sweep_file):
    sweep = load_sweep(sweep_file)
    return sweep, build_sweep_assets(sweep, trial_partitions(sweep))


def node(assets_def) -> str:
    return assets_def.op.name


def data_files(sweep):
    images = sorted((sweep.data_dir / "images").iterdir())
    return [(p, sweep.data_dir / "targets" / p.name) for p in images]


def independent_denoise_psnr(sweep, stages) -> float:
    """Bilateral filter then Gaussian blur with OpenCV directly, scored with skimage: no imgtune code."""
    (op1, bilateral), (op2, blur) = stages
    assert (op1, op2) == ("bilateral_filter", "gaussian_blur")
    scores = []
    for image_file, target_file in data_files(sweep):
        image = cv2.imread(str(image_file), cv2.IMREAD_UNCHANGED)
        out = cv2.bilateralFilter(image, bilateral["d"], bilateral["sigma_color"], bilateral["sigma_space"])
        out = cv2.GaussianBlur(out, (blur["ksize"], blur["ksize"]), blur["sigma"])
        scores.append(peak_signal_noise_ratio(cv2.imread(str(target_file), cv2.IMREAD_UNCHANGED), out,
                                              data_range=255))
    return float(np.mean(scores))
