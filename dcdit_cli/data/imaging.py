"""Image helpers shared by feature extraction, reference batches and the FID tools."""

from __future__ import annotations

import numpy as np
from PIL import Image


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
