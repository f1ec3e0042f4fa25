"""Scanning a data folder into an image manifest.

Layout: ``DATA/images/<stem>.<ext>`` with optional ground truth in ``DATA/targets/<stem>.<ext>``.
A folder without an ``images/`` sub-folder is read as a flat folder of images (targets, if any, in
``DATA/targets/``). Unusable files become rows with ``status: skipped`` and a ``reason``; the sweep
goes on with the rest. A folder with nothing usable is an error.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgtune_assets.core.imageio import IMAGE_SUFFIXES, ImageReadError, decode_image, read_bytes, read_image


class ManifestError(ValueError):
    """The data folder as a whole cannot be used (missing, empty, nothing usable)."""


@dataclass
class ManifestRow:
    id: str
    image_path: str
    target_path: str | None
    image_sha256: str | None
    target_sha256: str | None
    width: int | None
    height: int | None
    channels: int | None
    dtype: str | None
    status: str  # "ok" | "skipped"
    reason: str | None = None

    @classmethod
    def from_record(cls, record: dict) -> "ManifestRow":
        """A row from a plain record: run_settings' pinned images, or a manifest DataFrame's row (where
        pandas writes NaN for a missing value)."""
        return cls(**{k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()})

    def to_record(self) -> dict:
        return dict(vars(self))


def _read_and_hash(path: Path) -> tuple[bytes, str]:
    """Read a file once: its content hash and its bytes for decoding come from the same read."""
    data = read_bytes(path)
    return data, hashlib.sha256(data).hexdigest()


def _candidate_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def image_folders(data_dir: Path) -> tuple[Path, Path]:
    images = data_dir / "images"
    return (images if images.is_dir() else data_dir), data_dir / "targets"


def scan_folder(data_dir: str | Path, *, needs_target: bool) -> list[ManifestRow]:
    """One row per file in the images folder; decodes each file once to check it."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise ManifestError(f"{data_dir}: data folder does not exist")
    if not data_dir.is_dir():
        raise ManifestError(f"{data_dir}: data_dir is not a folder")
    image_dir, target_dir = image_folders(data_dir)
    files = _candidate_files(image_dir)
    if not files:
        raise ManifestError(f"{image_dir}: no image files in the data folder")
    targets: dict[str, Path] = {}
    if target_dir.is_dir():
        for file in _candidate_files(target_dir):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                targets.setdefault(file.stem, file)

    rows: list[ManifestRow] = []
    seen: set[str] = set()
    for file in files:
        rel = str(file.relative_to(data_dir))
        row = ManifestRow(id=file.stem, image_path=rel, target_path=None, image_sha256=None,
                          target_sha256=None, width=None, height=None, channels=None, dtype=None,
                          status="skipped")
        rows.append(row)
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            row.reason = f"not an image file type ({file.suffix or 'no suffix'}; expected one of {', '.join(IMAGE_SUFFIXES)})"
            continue
        if file.stem in seen:
            row.reason = f"duplicate id {file.stem!r} (another file with the same stem comes first)"
            continue
        seen.add(file.stem)
        try:
            data, row.image_sha256 = _read_and_hash(file)
            image = decode_image(data, file)
        except ImageReadError as exc:
            row.reason = str(exc)
            continue
        row.height, row.width = image.shape[:2]
        row.channels = 1 if image.ndim == 2 else image.shape[2]
        row.dtype = str(image.dtype)
        target = targets.get(file.stem)
        if target is not None:
            row.target_path = str(target.relative_to(data_dir))
            try:
                data, row.target_sha256 = _read_and_hash(target)
                target_image = decode_image(data, target)
            except ImageReadError as exc:
                row.reason = f"target unusable: {exc}"
                continue
            if target_image.shape[:2] != image.shape[:2]:
                row.reason = (f"target {target.name} is {target_image.shape[1]}x{target_image.shape[0]}, "
                              f"image is {image.shape[1]}x{image.shape[0]}")
                continue
        elif needs_target:
            row.reason = f"no target: expected {target_dir.name}/{file.stem}.<png|jpg|tif|bmp>"
            continue
        row.status = "ok"
    return rows


def usable(rows: list[ManifestRow]) -> list[ManifestRow]:
    return [r for r in rows if r.status == "ok"]


def require_usable(rows: list[ManifestRow], data_dir: str | Path) -> list[ManifestRow]:
    ok = usable(rows)
    if not ok:
        reasons = "; ".join(f"{r.image_path}: {r.reason}" for r in rows[:5])
        more = f" (and {len(rows) - 5} more)" if len(rows) > 5 else ""
        raise ManifestError(f"{data_dir}: no usable images among {len(rows)} file(s): {reasons}{more}")
    return ok


def manifest_digest(rows: list[ManifestRow]) -> str:
    """Hash of the (id, content hash) pairs: changes when an image or target is added or changed."""
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r.image_path):
        digest.update(f"{row.id}\0{row.image_path}\0{row.image_sha256}\0{row.target_sha256}\0{row.status}\n".encode())
    return digest.hexdigest()[:16]


def load_images(data_dir: str | Path, rows: list[ManifestRow], *, verify: bool = False
                ) -> tuple[list[str], list[np.ndarray], list[np.ndarray | None]]:
    """Decode usable images (and targets) once; returns ids, images, targets (None when absent).

    With ``verify``, each file's content must still hash to what the manifest recorded (hashed from the
    same read that is decoded): results are saved under the manifest's content hash, so images changed
    since must not be scored as the old ones. A changed file raises ``ManifestError`` naming it.
    """
    data_dir = Path(data_dir)

    def load(relative: str, expected: str | None) -> np.ndarray:
        file = data_dir / relative
        if not verify:
            return read_image(file)
        data, digest = _read_and_hash(file)
        if digest != expected:
            raise ManifestError(f"{file}: changed since the image manifest was made (content hash {digest[:12]}, "
                                f"manifest {str(expected)[:12]}): materialize image_manifest,run_settings again")
        return decode_image(data, file)

    ids, images, targets = [], [], []
    for row in usable(rows):
        ids.append(row.id)
        images.append(load(row.image_path, row.image_sha256))
        targets.append(load(row.target_path, row.target_sha256) if row.target_path else None)
    return ids, images, targets
