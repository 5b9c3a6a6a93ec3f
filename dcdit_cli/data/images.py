"""An image folder read directly for pixel-space training (``data.kind = "images"``, docs/pixels.md).

ImageNet's layout (one subfolder per class), each image cut with ADM's centre crop at
``data.image_size`` when a batch asks for it, decoded in a thread pool, and flipped horizontally
by the loop's flip bits (``data.flip = "random"``). No VAE and no files written: the quick way in.
For a large folder, ``dcdit extract --pixels`` writes the same crops once as uint8 shards
(``datasets.PixelShardDataset``), which skips unreadable files and reads by memory map.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dcdit_cli.common.console import DcditError
from dcdit_cli.data.imaging import list_images, load_centre_crop, to_model_range


class ImageFolderDataset:
    """Centre crops (3, S, S) in [−1, 1] of the images under ``path/<class>/``, labels by sorted class.

    The first image is read when the dataset is made, so a folder of non-images fails before
    training starts; a later unreadable file stops training with its name.
    """

    def __init__(self, path: str | Path, image_size: int, flip: str = "random", num_workers: int = 4) -> None:
        self.root, self.image_size, self.flip = Path(path), image_size, flip
        self.classes, self.files = list_images(self.root)
        self.num_classes = len(self.classes)
        self.sample_shape = (3, image_size, image_size)
        self._labels = np.asarray([label for _, label in self.files], dtype=np.int64)
        self._pool = ThreadPoolExecutor(max_workers=max(1, num_workers))
        first = load_centre_crop(self.root / self.files[0][0], image_size)
        if isinstance(first, str):
            raise DcditError(f"{self.root / self.files[0][0]} is {first}: data.path must hold images in class "
                             "folders; `dcdit extract --pixels` makes shards and skips such files")

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, i: int) -> np.ndarray:
        rel = self.files[i][0]
        crop = load_centre_crop(self.root / rel, self.image_size)
        if isinstance(crop, str):
            raise DcditError(f"{self.root / rel} is {crop}: remove it, or train on `dcdit extract --pixels` shards "
                             "(extraction skips unreadable files)")
        return crop  # (S, S, 3) uint8

    def batch(self, indices, flip_bits=None) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Images (B, 3, S, S) in [−1, 1], labels (B,) int64 and no mask for ``indices``."""
        idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        crops = np.stack(list(self._pool.map(self._read, idx.tolist())))  # (B, S, S, 3) uint8
        images = torch.from_numpy(to_model_range(crops)).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)
        if flip_bits is not None and self.flip == "random":
            flip = torch.as_tensor(flip_bits).cpu().reshape(-1).bool()
            images[flip] = images[flip].flip(-1)
        return images, torch.from_numpy(self._labels[idx]), None
