"""Tests for the synthetic demo data sets (imgtune_assets.core.demo_data)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from imgtune_assets.core import demo_data
from imgtune_assets.core.demo_data import (
    DemoDataError,
    ensure_demo_data,
    main,
    make_denoise_set,
    make_segment_set,
)
from imgtune_assets.core.imageio import read_image

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def _pairs(root: Path, stems: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(read_image(root / "images" / f"{s}.png"), read_image(root / "targets" / f"{s}.png")) for s in stems]


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def denoise_set(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("denoise")
    return root, make_denoise_set(root)


@pytest.fixture(scope="module")
def segment_set(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("segment")
    return root, make_segment_set(root)


# --------------------------------------------------------------------------- layout and types


@pytest.mark.parametrize("which, prefix", [("denoise_set", "scene_"), ("segment_set", "cells_")])
def test_layout_stems_and_types(request, which, prefix):
    root, stems = request.getfixturevalue(which)
    assert len(stems) == 24
    assert stems == [f"{prefix}{i:03d}" for i in range(24)]
    assert sorted(p.stem for p in (root / "images").glob("*.png")) == stems
    assert sorted(p.stem for p in (root / "targets").glob("*.png")) == stems
    for image, target in _pairs(root, stems):
        for array in (image, target):
            assert array.dtype == np.uint8
            assert array.shape == (256, 256)  # single-channel grey


def test_size_and_count_parameters(tmp_path):
    stems = make_denoise_set(tmp_path / "d", count=2, size=96)
    assert stems == ["scene_000", "scene_001"]
    for image, target in _pairs(tmp_path / "d", stems):
        assert image.shape == target.shape == (96, 96)
    stems = make_segment_set(tmp_path / "s", count=1, size=300)
    image, mask = _pairs(tmp_path / "s", stems)[0]
    assert image.shape == mask.shape == (300, 300)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("maker", [make_denoise_set, make_segment_set])
def test_same_seed_gives_identical_bytes(tmp_path, maker):
    maker(tmp_path / "a", count=6)
    maker(tmp_path / "b", count=6)
    first, second = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert len(first) == 12
    assert first == second


@pytest.mark.parametrize("maker", [make_denoise_set, make_segment_set])
def test_other_seed_gives_other_images(tmp_path, maker):
    maker(tmp_path / "a", count=3, seed=5)
    maker(tmp_path / "b", count=3, seed=6)
    first, second = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert all(first[name] != second[name] for name in first)


@pytest.mark.parametrize("maker", [make_denoise_set, make_segment_set])
def test_more_images_keep_the_first_ones(tmp_path, maker):
    short = maker(tmp_path / "short", count=24)
    long = maker(tmp_path / "long", count=26)
    assert long[:24] == short and len(long) == 26
    first, second = _file_bytes(tmp_path / "short"), _file_bytes(tmp_path / "long")
    assert set(first) < set(second)
    assert all(second[name] == data for name, data in first.items())


# --------------------------------------------------------------------------- denoise content


def test_denoise_targets_are_varied(denoise_set):
    root, stems = denoise_set
    targets = [target for _, target in _pairs(root, stems)]
    stds = np.array([t.std() for t in targets])
    assert stds.min() > 10.0  # every scene has real content
    assert stds.max() - stds.min() > 15.0
    # No two scenes share a histogram.
    hists = {np.bincount(t.ravel(), minlength=256).tobytes() for t in targets}
    assert len(hists) == len(targets)
    # Background kinds differ: some scenes are mostly one flat grey, others are smooth
    # gradients/textures where no single grey level dominates.
    mode_share = np.array([np.bincount(t.ravel(), minlength=256).max() / t.size for t in targets])
    assert (mode_share > 0.3).any()
    assert (mode_share < 0.08).sum() >= 6


def test_denoise_images_are_noisy_targets_and_blur_helps(denoise_set):
    root, stems = denoise_set
    noisy_db, blurred_db = [], []
    for image, target in _pairs(root, stems):
        noisy_db.append(_psnr(image, target))
        blurred_db.append(_psnr(cv2.GaussianBlur(image, (5, 5), 0), target))
    noisy_db, blurred_db = np.array(noisy_db), np.array(blurred_db)
    assert ((noisy_db > 20.0) & (noisy_db < 30.0)).all(), noisy_db
    gain = blurred_db - noisy_db
    assert (gain > 0).mean() >= 0.75, gain
    assert gain.mean() >= 3.0, gain


def test_denoise_salt_and_pepper_on_some_images(denoise_set):
    root, stems = denoise_set
    # Gaussian noise of sigma 20 essentially never moves a pixel by more than 120;
    # salt-and-pepper does, on about 0.5 % of the pixels (less where clean is already ~0/255).
    shares = np.array([
        (np.abs(image.astype(np.int16) - target.astype(np.int16)) > 120).mean()
        for image, target in _pairs(root, stems)
    ])
    sprinkled = shares > 0.001
    assert 4 <= sprinkled.sum() <= 12, shares
    assert (shares[~sprinkled] < 0.0002).all()


def test_noise_sigma_controls_the_noise(tmp_path):
    make_denoise_set(tmp_path / "none", count=3, noise_sigma=0.0)
    make_denoise_set(tmp_path / "light", count=3, noise_sigma=5.0)
    make_denoise_set(tmp_path / "heavy", count=3, noise_sigma=40.0)
    stems = ["scene_000", "scene_001"]  # scene_002 also gets salt-and-pepper
    for image, target in _pairs(tmp_path / "none", stems):
        assert np.array_equal(image, target)
    light = [_psnr(i, t) for i, t in _pairs(tmp_path / "light", stems)]
    heavy = [_psnr(i, t) for i, t in _pairs(tmp_path / "heavy", stems)]
    assert min(light) > max(heavy) + 10.0
    # The clean scenes do not depend on the noise level.
    assert _file_bytes(tmp_path / "none").keys() == _file_bytes(tmp_path / "heavy").keys()
    for stem in stems:
        path = Path("targets") / f"{stem}.png"
        assert (tmp_path / "none" / path).read_bytes() == (tmp_path / "heavy" / path).read_bytes()


# --------------------------------------------------------------------------- segmentation content


def test_segment_masks_are_binary_with_sane_foreground(segment_set):
    root, stems = segment_set
    touching = 0
    for image, mask in _pairs(root, stems):
        assert set(np.unique(mask).tolist()) == {0, 255}
        share = (mask > 0).mean()
        assert 0.05 <= share <= 0.60, share
        n_labels, _ = cv2.connectedComponents((mask > 0).astype(np.uint8))
        assert 1 <= n_labels - 1 <= 8
        border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        touching += bool(border.any())
    assert 4 <= touching <= 23  # some objects are cut by the border, not in every image


def test_segment_images_are_noisy_and_unevenly_lit(segment_set):
    root, stems = segment_set
    for image, mask in _pairs(root, stems):
        residual = image.astype(np.float32) - cv2.GaussianBlur(image, (5, 5), 0).astype(np.float32)
        assert residual.std() > 3.0  # noise is in the image ...
        background = image[mask == 0].astype(np.float32)
        assert np.percentile(background, 95) - np.percentile(background, 5) > 30  # ... shading too
        assert image[mask > 0].mean() > background.mean() + 20  # objects brighter by default


def test_segment_global_otsu_imperfect_local_threshold_good(segment_set):
    root, stems = segment_set
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    otsu, local = [], []
    for image, mask in _pairs(root, stems):
        _, global_mask = cv2.threshold(image, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        otsu.append(_dice(global_mask, mask))
        smooth = cv2.GaussianBlur(image, (7, 7), 0)
        found = cv2.adaptiveThreshold(smooth, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, 129, -10)
        found = cv2.morphologyEx(found, cv2.MORPH_OPEN, kernel)
        found = cv2.morphologyEx(found, cv2.MORPH_CLOSE, kernel)
        local.append(_dice(found, mask))
    assert np.mean(local) > 0.9, local
    assert np.mean(otsu) < np.mean(local) - 0.1, (otsu, local)


def test_segment_polarity(tmp_path):
    make_segment_set(tmp_path / "dark", count=4, polarity="dark")
    for image, mask in _pairs(tmp_path / "dark", [f"cells_{i:03d}" for i in range(4)]):
        assert image[mask > 0].mean() < image[mask == 0].mean() - 20
    make_segment_set(tmp_path / "mixed", count=12, polarity="mixed")
    signs = {
        bool(image[mask > 0].mean() > image[mask == 0].mean())
        for image, mask in _pairs(tmp_path / "mixed", [f"cells_{i:03d}" for i in range(12)])
    }
    assert signs == {True, False}
    with pytest.raises(ValueError, match="polarity"):
        make_segment_set(tmp_path / "bad", count=1, polarity="sideways")


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("maker", [make_denoise_set, make_segment_set])
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"size": 10}, "size"),
        ({"size": 63}, "size"),
        ({"size": 2049}, "size"),
        ({"size": 128.0}, "size"),
        ({"size": True}, "size"),
        ({"count": 0}, "count"),
        ({"count": -3}, "count"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, maker, kwargs, name):
    with pytest.raises(DemoDataError, match=rf"^{name}\b"):
        maker(tmp_path, **kwargs)
    assert not (tmp_path / "images").exists()  # checked before anything is written


@pytest.mark.parametrize("sigma", [-1.0, 500.0, float("nan"), "20"])
def test_bad_noise_sigma(tmp_path, sigma):
    with pytest.raises(DemoDataError, match="noise_sigma"):
        make_denoise_set(tmp_path, count=1, noise_sigma=sigma)


def test_size_bounds_are_inclusive(tmp_path):
    assert make_denoise_set(tmp_path, count=1, size=64) == ["scene_000"]
    assert read_image(tmp_path / "images" / "scene_000.png").shape == (64, 64)


# --------------------------------------------------------------------------- ensure_demo_data


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind, prefix", [("denoise", "scene_"), ("segment", "cells_")])
def test_ensure_demo_data_generates_once(tmp_path, kind, prefix):
    out = tmp_path / "data dir"  # spaces are fine
    assert ensure_demo_data(out, kind) == out
    images = sorted(p.stem for p in (out / "images").glob("*.png"))
    assert images == [f"{prefix}{i:03d}" for i in range(24)]
    assert sorted(p.stem for p in (out / "targets").glob("*.png")) == images
    readme = (out / "README.txt").read_text(encoding="utf-8")
    assert "generated" in readme and "imgtune_assets.core.demo_data" in readme and kind in readme

    before = _snapshot(out)
    assert ensure_demo_data(str(out), kind) == out
    assert _snapshot(out) == before  # nothing rewritten, nothing added


def test_ensure_demo_data_matches_make_functions(tmp_path):
    ensure_demo_data(tmp_path / "ensured", "segment")
    make_segment_set(tmp_path / "made")
    assert _file_bytes(tmp_path / "ensured") == _file_bytes(tmp_path / "made")


def test_ensure_demo_data_fills_an_empty_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / ".DS_Store").write_bytes(b"")
    ensure_demo_data(tmp_path, "denoise")
    assert len(list((tmp_path / "images").glob("*.png"))) == 24


def test_ensure_demo_data_leaves_existing_data_alone(tmp_path):
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "mine.png"), np.zeros((8, 8), np.uint8))
    before = _snapshot(tmp_path)
    ensure_demo_data(tmp_path, "segment")
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "targets").exists()
    assert not (tmp_path / "README.txt").exists()


def test_ensure_demo_data_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        ensure_demo_data(tmp_path, "deblur")
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- command line


def test_cli_writes_a_set(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["segment", str(out), "--count", "3", "--size", "64", "--seed", "7"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["cells_000.png", "cells_001.png", "cells_002.png"]
    assert read_image(out / "targets" / "cells_002.png").shape == (64, 64)
    assert "3" in capsys.readouterr().out
    assert "--seed 7" in (out / "README.txt").read_text(encoding="utf-8")
    # Same as the library call with the same arguments.
    make_segment_set(tmp_path / "lib", count=3, size=64, seed=7)
    assert _file_bytes(out) == _file_bytes(tmp_path / "lib")


def test_cli_default_seed_matches_library_default(tmp_path):
    assert main(["denoise", str(tmp_path / "cli"), "--count", "2", "--size", "64"]) == 0
    make_denoise_set(tmp_path / "lib", count=2, size=64)
    assert _file_bytes(tmp_path / "cli") == _file_bytes(tmp_path / "lib")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["denoise", "OUT", "--size", "10"], "--size"),
        (["denoise", "OUT", "--size", "big"], "--size"),
        (["segment", "OUT", "--count", "0"], "--count"),
        (["segment", "OUT", "--seed", "-2"], "--seed"),
        (["deblur", "OUT"], "kind"),
        (["denoise"], "out_dir"),
        ([], "kind"),
    ],
)
def test_cli_bad_arguments(tmp_path, capsys, argv, needle):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert needle in err
    assert not (tmp_path / "out").exists()


def test_cli_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "denoise" in capsys.readouterr().out


def test_module_runs_as_script(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "imgtune_assets.core.demo_data", "denoise", str(tmp_path / "x"),
         "--count", "1", "--size", "64"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "x" / "images" / "scene_000.png").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "imgtune_assets.core.demo_data", "segment", str(tmp_path / "y"), "--size", "10"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0
    assert "--size" in bad.stderr


# --------------------------------------------------------------------------- dependencies


def test_module_imports_only_numpy_and_opencv():
    tree = ast.parse(Path(demo_data.__file__).read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert roots.isdisjoint({"dagster", "ray", "skimage", "scipy", "PIL", "requests", "urllib"}), roots
    third_party = roots - set(sys.stdlib_module_names) - {"imgtune_assets"}
    assert third_party == {"cv2", "numpy"}
