"""Sample and reference batches for the evaluator: ADM ``.npz`` files and image folders.

Samples are an ``.npz`` whose ``arr_0`` is uint8 (N, H, W, 3), read in batches straight from
the zip (50,000 samples are never held in memory twice), or a folder of images decoded in a
thread pool, unreadable files skipped and counted. A reference batch is ADM's
``VIRTUAL_imagenet256_labeled.npz`` layout: ``arr_0`` plus, when present, precomputed
``mu``/``sigma`` (pool_3) and ``mu_s``/``sigma_s`` (spatial); references made by dcdit may also
hold ``mu_dinov2``/``sigma_dinov2`` (DINOv2 CLS features, for FD-DINOv2).
"""

from __future__ import annotations

import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from dcdit_cli.common.console import DcditError, load_error_reason

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
POOL_DIM, SPATIAL_DIM = 2048, 17 * 17 * 7  # Inception pool_3 and the sFID spatial features

# -----------------------------------------------------------------------------------------
#                                   Images on disk
# -----------------------------------------------------------------------------------------


def check_images_shape(shape: tuple, dtype: np.dtype, where: str) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        hint = ""
        if len(shape) == 4 and shape[1] == 3:
            hint = "; it looks channels-first: transpose to (N, H, W, 3)"
        elif dtype != np.uint8:
            hint = "; convert with np.clip(127.5 * x + 128, 0, 255).astype(np.uint8)"
        raise DcditError(f"{where} is {dtype} {tuple(shape)}, expected uint8 (N, H, W, 3){hint}")


class NpzImages:
    """uint8 (N, H, W, 3) images stored as one array of an .npz, streamed batch by batch."""

    def __init__(self, path: Path, key: str = "arr_0") -> None:
        self.path, self.key, self.skipped = Path(path), key, []
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(f"{key}.npy") as f:
                self.shape, self.fortran, self.dtype = _read_npy_header(f)
        except (ValueError, SyntaxError, EOFError, OSError, zipfile.BadZipFile) as e:  # numpy's header parser
            raise DcditError(f"{self.path}: {key}.npy has no readable .npy header ({load_error_reason(e)}): "
                             "write it again with np.savez") from None
        check_images_shape(self.shape, self.dtype, f"{self.path}: {key}")
        self.num = self.shape[0]

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        n = self.num if limit is None else min(limit, self.num)
        if self.fortran:  # rare: no row streaming, read it whole
            arr = np.load(self.path)[self.key]
            for i in range(0, n, batch_size):
                yield np.ascontiguousarray(arr[i : min(i + batch_size, n)])
            return
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            _read_npy_header(f)
            for i in range(0, n, batch_size):
                batch = np.empty((min(batch_size, n - i), *self.shape[1:]), np.uint8)
                _read_into(f, batch, self.path)
                yield batch


def _read_npy_header(f) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(f)
    return shape, fortran, dtype


def _read_into(f, out: np.ndarray, path: Path) -> None:
    view, got = memoryview(out).cast("B"), 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise DcditError(f"{path} is truncated: re-create it")
        got += n


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


class FolderImages:
    """The images of a folder (recursive, sorted), decoded in a thread pool; files that cannot
    be read are skipped and listed in ``skipped``. ``transform`` maps a PIL image to uint8
    (H, W, 3); every result must have the same size."""

    def __init__(self, root: Path, files: list[Path], transform: Callable[[Image.Image], np.ndarray] = _to_rgb_array):
        self.path, self.files, self.transform = Path(root), files, transform
        self.num, self.skipped = len(files), []

    def _load(self, path: Path) -> np.ndarray | None:
        """uint8 (H, W, 3), or None for a file PIL cannot read."""
        try:
            with Image.open(path) as im:
                return self.transform(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        self.skipped = []
        remaining = self.num if limit is None else limit
        first_shape = None
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for i in range(0, self.num, batch_size):
                if remaining <= 0:
                    return
                chunk = self.files[i : i + batch_size]
                images = []
                for path, img in zip(chunk, pool.map(self._load, chunk)):
                    if img is None:
                        self.skipped.append(path)
                        continue
                    first_shape = first_shape or (img.shape, path)
                    if img.shape != first_shape[0]:
                        raise DcditError(
                            f"{path} is {img.shape[1]}×{img.shape[0]} but {first_shape[1]} is "
                            f"{first_shape[0][1]}×{first_shape[0][0]}: all samples must share one size"
                        )
                    images.append(img)
                images = images[:remaining]
                if images:
                    remaining -= len(images)
                    yield np.stack(images)


def load_samples(path: str | Path) -> NpzImages | FolderImages:
    """Generated samples: an .npz with ``arr_0`` uint8 (N, H, W, 3), or a folder of PNG/JPG."""
    path = Path(path)
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise DcditError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}: point --samples at the sample folder or .npz")
        return FolderImages(path, files)
    if not path.is_file():
        raise DcditError(f"samples not found: {path} (write them with `dcdit sample --npz PATH`, or pass a folder of images)")
    if "arr_0" not in _npz_members(path, "samples"):
        raise DcditError(f"{path} has no arr_0: save samples with np.savez(path, arr_0=images_uint8_nhwc)")
    return NpzImages(path, "arr_0")


def _npz_members(path: Path, role: str) -> set[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return {name[: -len(".npy")] for name in zf.namelist() if name.endswith(".npy")}
    except (zipfile.BadZipFile, OSError) as e:
        raise DcditError(f"{role} file {path} is not a readable .npz ({e}): save it with np.savez") from None


@dataclass
class Reference:
    """An ADM reference batch: precomputed statistics and / or the images (``arr_0``)."""

    path: Path
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    mu_dinov2: np.ndarray | None = None
    sigma_dinov2: np.ndarray | None = None
    images: NpzImages | None = None

    @property
    def has_stats(self) -> bool:
        return self.mu is not None and self.mu_s is not None


def load_reference(path: str | Path) -> Reference:
    """An ADM reference .npz (e.g. ``VIRTUAL_imagenet256_labeled.npz``): ``mu``, ``sigma`` (pool_3),
    ``mu_s``, ``sigma_s`` (spatial) and ``arr_0`` images. Statistics missing from the file are
    computed from ``arr_0``; precision / recall always need ``arr_0``. ``mu_dinov2``/``sigma_dinov2``
    (any width D: D and D × D) are read when present."""
    path = Path(path)
    if not path.is_file():
        raise DcditError(
            f"reference batch not found: {path} (download ADM's VIRTUAL_imagenet256_labeled.npz, or build one "
            "from real images with `dcdit fid --make-ref DIR --out REF.npz`)"
        )
    members = _npz_members(path, "reference")
    ref = Reference(path, images=NpzImages(path, "arr_0") if "arr_0" in members else None)
    with np.load(path) as npz:
        for name, dim in (("mu", POOL_DIM), ("mu_s", SPATIAL_DIM), ("mu_dinov2", None)):
            cov = name.replace("mu", "sigma")
            if name not in members and cov not in members:
                continue
            if name not in members or cov not in members:
                raise DcditError(f"{path} has only one of {name}/{cov}: re-create the reference batch")
            try:
                mu, sigma = np.asarray(npz[name], np.float64), np.asarray(npz[cov], np.float64)
            except (ValueError, TypeError, OSError, zipfile.BadZipFile) as e:  # object arrays need pickle: refused
                raise DcditError(f"{path}: {name}/{cov} are not numeric arrays ({e}): re-create the reference batch") from None
            d = dim or (mu.shape[0] if mu.ndim == 1 else -1)
            if mu.shape != (d,) or sigma.shape != (d, d):
                what = f"{dim}-d Inception statistics" if dim else "a mean and covariance of one width"
                raise DcditError(f"{path}: {name} {mu.shape} / {cov} {sigma.shape} are not {what}: "
                                 "use an ADM reference batch or one made by dcdit")
            setattr(ref, name, mu)
            setattr(ref, cov, sigma)
    if ref.images is None and not ref.has_stats:
        raise DcditError(f"{path} has neither arr_0 nor mu/sigma/mu_s/sigma_s: it is not an ADM reference batch")
    return ref
