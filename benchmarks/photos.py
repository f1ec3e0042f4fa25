"""Large colour photos for ``sweep_bench.py --large/--apply``, and the plain-multiprocessing floors
that imgtune is compared with there.

The photos are scikit-image's bundled colour photographs (astronaut, chelsea, coffee, rocket, ...)
cropped, flipped and brightened at random (seeded per photo), upscaled to the frame (4:3, e.g.
4000×3000 at 12 MP) with ``cv2.INTER_CUBIC``: that clean picture is the target (``targets/<id>.png``);
the same with Gaussian noise (σ = 20) is the image (``images/<id>.jpg``, quality 90). Generated in
parallel, once: photos are kept in a pool folder per (megapixels, seed) and each set of N photos is a
folder of hard links to the pool's first N, so the 120 and the 240 sets share their first 120 files.

    python benchmarks/photos.py generate --photos 120 --megapixels 12 [--data-cache DIR]
    python benchmarks/photos.py floor SWEEP_YAML RESULT_JSON [--workers N]
    python benchmarks/photos.py apply-floor PIPELINE_YAML INPUT_DIR OUTPUT_DIR [--workers N]

The floors are what a hand-written script costs, run as their own process so that the benchmark
measures them as it measures imgtune's commands (wall from launch to exit, the process's own peak
RSS, its tree's PSS):

* ``floor``: a ``multiprocessing.Pool``; each worker reads one photo and its target once, hashes the
  bytes (sha256: the manifest a script would keep), decodes them and scores every trial of the sweep on
  them (``evaluate_image``, the same stages as imgtune's trials); the parent takes each trial's mean.
* ``apply-floor``: a ``multiprocessing.Pool``; each worker reads a file, applies the stages
  (``apply_pipeline``), encodes in the input's format (``cv2.imencode``; OpenCV's default JPEG
  quality, 95) and writes it under the same name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from imgtune_assets.core.files import atomic_write_bytes, atomic_write_text

# Bumped when the generated pixels change: a cache made by another version is not reused.
GENERATOR_VERSION = 1
SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
           "stereo_motorcycle")
NOISE_SIGMA = 20.0
JPEG_QUALITY = 90
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


# ----------------------------------------------------------------------------- the photos
def frame_size(megapixels: float) -> tuple[int, int]:
    """(width, height) of a 4:3 frame of about ``megapixels``: 12 → 4000×3000."""
    width = int(round(math.sqrt(megapixels * 1e6 * 4 / 3)))
    return width, int(round(width * 3 / 4))


def default_cache() -> Path:
    return Path(tempfile.gettempdir()) / "imgtune-bench-photos"


def photo_id(index: int) -> str:
    return f"photo-{index:04d}"


_sources: list[np.ndarray] = []


def _load_sources() -> None:
    from skimage import data

    cv2.setNumThreads(1)  # one process per core already
    global _sources
    _sources = []
    for name in SOURCES:
        rgb = getattr(data, name)()
        if name == "stereo_motorcycle":  # (left, right, disparity)
            rgb = rgb[0]
        _sources.append(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def make_photo(index: int, seed: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy) BGR uint8 photo number ``index``: depends on (seed, index, size) only."""
    rng = np.random.default_rng([seed, index])
    source = _sources[index % len(_sources)]
    height, width = source.shape[:2]
    frame_w, frame_h = size
    # The largest crop of the frame's shape, shrunk and moved at random: photos of one source differ.
    crop_h = min(height, width * frame_h / frame_w) * rng.uniform(0.7, 1.0)
    crop_w = crop_h * frame_w / frame_h
    crop_h, crop_w = max(2, int(crop_h)), max(2, int(crop_w))
    y = int(rng.integers(0, height - crop_h + 1))
    x = int(rng.integers(0, width - crop_w + 1))
    crop = source[y:y + crop_h, x:x + crop_w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    clean = cv2.resize(np.ascontiguousarray(crop), (frame_w, frame_h), interpolation=cv2.INTER_CUBIC)
    clean = cv2.convertScaleAbs(clean, alpha=float(rng.uniform(0.8, 1.2)))  # brightness, saturating
    noisy = rng.standard_normal(clean.shape, dtype=np.float32)
    noisy *= NOISE_SIGMA
    noisy += clean
    np.rint(noisy, out=noisy)
    np.clip(noisy, 0, 255, out=noisy)
    return clean, noisy.astype(np.uint8)


def _pool_files(pool_dir: Path, index: int) -> tuple[Path, Path]:
    return pool_dir / "images" / f"{photo_id(index)}.jpg", pool_dir / "targets" / f"{photo_id(index)}.png"


def _generate_one(job: tuple[str, int, int, tuple[int, int]]) -> int:
    pool_dir, index, seed, size = job
    clean, noisy = make_photo(index, seed, size)
    image_file, target_file = _pool_files(Path(pool_dir), index)
    ok, jpeg = cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    ok2, png = cv2.imencode(".png", clean)
    if not (ok and ok2):
        raise RuntimeError(f"cannot encode photo {index}")
    # Atomic: an interrupted generation leaves no truncated file that a later run would take as done.
    atomic_write_bytes(target_file, png.tobytes())
    atomic_write_bytes(image_file, jpeg.tobytes())  # last: its presence says the photo is complete
    return index


def photo_set(count: int, megapixels: float = 12, seed: int = 0, cache: str | Path | None = None,
              workers: int | None = None, log=print) -> Path:
    """The folder (``images/`` + ``targets/``) of the first ``count`` photos, generated if not cached."""
    root = Path(cache) if cache else default_cache()
    size = frame_size(megapixels)
    tag = f"{size[0]}x{size[1]}-seed{seed}-v{GENERATOR_VERSION}"
    pool_dir = root / f"pool-{tag}"
    set_dir = root / f"set-{count}-{tag}"
    for sub in ("images", "targets"):
        (pool_dir / sub).mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not all(f.exists() for f in _pool_files(pool_dir, i))]
    if missing:
        workers = max(1, min(workers or os.cpu_count() or 1, len(missing)))
        log(f"generating {len(missing)} of {count} photos ({size[0]}×{size[1]}, colour) in {pool_dir} "
            f"on {workers} processes", flush=True)
        start = time.perf_counter()
        step = max(1, len(missing) // 20)
        # forkserver: the caller may hold threads (a benchmark's samplers), which fork does not copy safely.
        with mp.get_context("forkserver").Pool(workers, initializer=_load_sources) as pool:
            jobs = [(str(pool_dir), i, seed, size) for i in missing]
            for done, _ in enumerate(pool.imap_unordered(_generate_one, jobs), 1):
                if done % step == 0 or done == len(missing):
                    elapsed = time.perf_counter() - start
                    log(f"  {done}/{len(missing)} photos, {elapsed:.0f} s, "
                        f"{elapsed / done * (len(missing) - done):.0f} s left", flush=True)
    for sub in ("images", "targets"):
        (set_dir / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        for pooled in _pool_files(pool_dir, i):
            linked = set_dir / pooled.parent.name / pooled.name
            if not linked.exists():
                try:
                    os.link(pooled, linked)
                except OSError:  # another file system, or no hard links there
                    shutil.copyfile(pooled, linked)
    return set_dir


# ----------------------------------------------------------------------------- the sweep floor
_trials: list = []
_objective = None


def _floor_init(trials: list, objective) -> None:
    cv2.setNumThreads(1)  # one worker per core: OpenCV's own threads would only compete
    global _trials, _objective
    _trials, _objective = trials, objective


def _read_hash_decode(path: str) -> tuple[str, np.ndarray]:
    """One read of the file: its sha256 and its pixels (as imgtune decodes: as stored, BGR)."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: not a decodable image")
    return digest, image


def _floor_photo(job: tuple[str, str, str]) -> tuple[str, str, str, list[float]]:
    from imgtune_assets.core.evaluate import evaluate_image

    stem, image_path, target_path = job
    image_hash, image = _read_hash_decode(image_path)
    target_hash, target = _read_hash_decode(target_path)
    scores = [evaluate_image(stages, image, target, _objective)["score"] for stages in _trials]
    return stem, image_hash, target_hash, scores


def image_pairs(data_dir: Path) -> list[tuple[str, str, str]]:
    """(id, image file, target file) for every image of ``images/`` with a target of the same stem."""
    targets = {p.stem: p for p in sorted((data_dir / "targets").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    return [(p.stem, str(p), str(targets[p.stem])) for p in sorted((data_dir / "images").iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in targets]


def run_floor(sweep_file: Path, workers: int) -> dict:
    from imgtune_assets.core.sampling import trial_settings
    from imgtune_assets.core.sweepfile import load_sweep

    sweep = load_sweep(sweep_file)
    trials = [[tuple(s) for s in trial_settings(sweep, k)["stages"]] for k in range(sweep.trials)]
    pairs = image_pairs(Path(sweep.data_dir))
    # A photo per task: each file is read and decoded once, by the worker that scores it.
    with mp.Pool(workers, initializer=_floor_init, initargs=(trials, sweep.objective)) as pool:
        rows = sorted(pool.imap_unordered(_floor_photo, pairs, chunksize=1))
    per_trial = [[row[3][t] for row in rows] for t in range(len(trials))]
    return {"images": len(rows), "decodes_per_image": 1.0,
            "manifest": {stem: [image_hash, target_hash] for stem, image_hash, target_hash, _ in rows},
            "scores": [float(np.mean(s)) for s in per_trial]}


# ----------------------------------------------------------------------------- the apply floor
_stages: list = []


def _apply_init(stages: list) -> None:
    cv2.setNumThreads(1)
    global _stages
    _stages = stages


def _apply_one(job: tuple[str, str]) -> int:
    from imgtune_assets.core.ops import apply_pipeline

    source, destination = job
    image = cv2.imdecode(np.fromfile(source, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{source}: not a decodable image")
    ok, encoded = cv2.imencode(Path(source).suffix, apply_pipeline(image, _stages))
    if not ok:
        raise ValueError(f"{source}: cannot encode the output")
    Path(destination).write_bytes(encoded.tobytes())
    return len(encoded)


def pipeline_stages(pipeline_yaml: Path) -> list[tuple[str, dict]]:
    """The stages of a fixed sweep document (``best_pipeline.yaml``): every parameter a plain value."""
    doc = yaml.safe_load(Path(pipeline_yaml).read_text())
    return [(stage["op"], {k: v for k, v in stage.items() if k != "op"}) for stage in doc["pipeline"]]


def run_apply_floor(pipeline_yaml: Path, input_dir: Path, output_dir: Path, workers: int) -> dict:
    stages = pipeline_stages(pipeline_yaml)
    output_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(p), str(output_dir / p.name)) for p in sorted(input_dir.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES]
    with mp.Pool(workers, initializer=_apply_init, initargs=(stages,)) as pool:
        written = list(pool.imap_unordered(_apply_one, jobs, chunksize=1))
    return {"files": len(written), "bytes": sum(written)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate (or find cached) a photo set; prints its folder")
    gen.add_argument("--photos", type=int, default=120)
    gen.add_argument("--megapixels", type=float, default=12)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--data-cache", default=None, help=f"default: {default_cache()}")
    gen.add_argument("--workers", type=int, default=os.cpu_count())
    floor = sub.add_parser("floor", help="score every trial of a sweep file on its photos; writes a JSON result")
    floor.add_argument("sweep_file", type=Path)
    floor.add_argument("result", type=Path)
    floor.add_argument("--workers", type=int, default=os.cpu_count())
    apply = sub.add_parser("apply-floor", help="apply a best_pipeline.yaml to every image of a folder")
    apply.add_argument("pipeline", type=Path)
    apply.add_argument("input_dir", type=Path)
    apply.add_argument("output_dir", type=Path)
    apply.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    if args.command == "generate":
        print(photo_set(args.photos, args.megapixels, args.seed, args.data_cache, args.workers))
    elif args.command == "floor":
        result = run_floor(args.sweep_file, args.workers)
        atomic_write_text(args.result, json.dumps(result))
    else:
        result = run_apply_floor(args.pipeline, args.input_dir, args.output_dir, args.workers)
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
