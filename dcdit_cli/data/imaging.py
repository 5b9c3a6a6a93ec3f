"""Image helpers shared by feature extraction, pixel-space training, reference batches and the FID tools."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dcdit_cli.common.console import DcditError

LAYOUT_HINT = "one subfolder per class with the images inside (DIR/<class>/*.JPEG, as ImageNet's train/)"


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: a square ``image_size`` crop as a uint8 (H, W, 3) array.

    The preprocessing of OpenAI's ADM (guided-diffusion, ``image_datasets.py``), which DiT's
    ``train.py`` and the ADM reference batches use (docs/reference.md#centre-crop): while the short side is at
    least twice ``image_size``, halve the image with a BOX filter (cheap anti-aliasing); then
    resize with BICUBIC so the short side equals ``image_size``; then cut the centre square.
    The image is converted to RGB first (ADM converts on load).
    """
    image = pil_image.convert("RGB")
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = image_size / min(image.size)
    # Python's round, as ADM: the short side lands exactly on image_size.
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    arr = np.asarray(image)  # (H, W, 3) uint8
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top : top + image_size, left : left + image_size])


def list_images(data_path: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path relative to data_path, label)]) in sorted order; hidden entries skipped.

    Every other file is listed: whether it is an image is decided by PIL when it is read, so
    any format PIL opens works and everything else ends up in the index's ``skipped``.
    """
    root = Path(data_path)
    if not root.is_dir():
        raise DcditError(f"data path {root} does not exist: pass --data-path DIR with {LAYOUT_HINT}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DcditError(f"no class folders in {root}: --data-path needs {LAYOUT_HINT}")
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(root)
            files.extend(((rel / f).as_posix(), label) for f in sorted(filenames) if not f.startswith("."))
    if not files:
        raise DcditError(f"the class folders of {root} hold no files: --data-path needs {LAYOUT_HINT}")
    return classes, files


def load_centre_crop(path: Path, image_size: int) -> np.ndarray | str:
    """ADM centre crop (H, W, 3) uint8, or the reason the file is skipped."""
    try:
        with Image.open(path) as image:
            image.load()
            return center_crop_arr(image, image_size)
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"unreadable: {exc}"


def to_model_range(images: np.ndarray) -> "np.ndarray":
    """uint8 images → float32 in [−1, 1] (x / 127.5 − 1, ADM's and DiT's scaling), any layout."""
    return images.astype(np.float32) / 127.5 - 1.0
