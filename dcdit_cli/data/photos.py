"""Small crops of real photographs, with a per-pixel detail map as ground truth for the router.

The procedural shapes set has perfectly flat or linear backgrounds, which photographs never
have. ``PhotosDataset`` cuts ``image_size``² crops from four colour photographs that the
scikit-image wheel ships in ``skimage/data/`` (read from disk with Pillow; nothing is imported
from scikit-image and nothing is downloaded):

| class | file | licence (scikit-image's notes) |
| --- | --- | --- |
| 0 | astronaut.png | NASA, public domain |
| 1 | chelsea.png | CC0, Stefan van der Walt |
| 2 | coffee.png | CC0, Rachel Michetti |
| 3 | rocket.jpg | SpaceX, public domain |

Each photo is resized (BOX then BICUBIC, as the ADM crop) to a short side of 4, 6 or 8 ×
``image_size``, so a crop holds whole edges and object parts rather than single textures.
Crops are disjoint between splits: ``train`` draws from the left 3/4 of every resized photo,
``val`` from the right 1/4. Item ``i`` depends only on (seed, split, i).

The detail map is the local gradient energy: squared central differences of the grey image,
summed over both axes and averaged over a 3×3 window. ``batch`` returns as mask the pixels in
the top quarter of their crop's detail (a quarter = the kept share at N = 4), the same
interface as the shapes set's object masks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dcdit_cli.common.console import DcditError

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
PHOTO_CLASSES = ("astronaut", "chelsea", "coffee", "rocket")
SCALES = (4, 6, 8)  # short side of the resized photo, in crop sides
TRAIN_SHARE = 0.75  # left share of every photo's width that the train split crops from
DETAIL_QUANTILE = 0.75  # mask = detail above this quantile of the crop


def photo_dir() -> Path:
    """skimage/data/ of the installed scikit-image wheel, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DcditError("data.kind = 'photos' reads the sample photographs of scikit-image: pip install 'dcdit[photos]'")
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [name for name in PHOTOS if not (root / name).is_file()]
    if missing:
        raise DcditError(f"{root} lacks {', '.join(missing)}: reinstall scikit-image (pip install 'dcdit[photos]')")
    return root


def detail_map(images: torch.Tensor) -> torch.Tensor:
    """Local gradient energy (B, H, W) of images (B, C, H, W): |∇ grey|², 3×3 box average."""
    grey = images.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    energy = F.pad(gx.square() + gy.square(), (1, 1, 1, 1), mode="replicate")
    return F.avg_pool2d(energy, 3, stride=1)[:, 0]  # (B, H, W)


def detail_mask(images: torch.Tensor, quantile: float = DETAIL_QUANTILE) -> torch.Tensor:
    """(B, H, W) bool: pixels whose detail lies above the crop's ``quantile``."""
    detail = detail_map(images).flatten(1)  # (B, L)
    cut = torch.quantile(detail, quantile, dim=1, keepdim=True)
    return (detail > cut).view(images.shape[0], *images.shape[2:])


class PhotosDataset:
    """Class-conditional crops of four photographs (class = photo); see the module docstring."""

    def __init__(self, image_size: int = 16, num_classes: int = 4, seed: int = 0, split: str = "train",
                 length: int = 1_000_000) -> None:
        if num_classes != len(PHOTOS):
            raise DcditError(f"the photos set has {len(PHOTOS)} classes, data.num_classes = {num_classes}: "
                             f"set data.num_classes and model.num_classes to {len(PHOTOS)}")
        if not 8 <= image_size <= 64:
            raise DcditError(f"photos image_size {image_size} is outside 8..64: use 16 or 32")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")

        root = photo_dir()
        self.image_size, self.num_classes, self.seed, self.split, self.length = image_size, num_classes, seed, split, length
        self.classes = list(PHOTO_CLASSES)
        self.sample_shape = (3, image_size, image_size)
        self._pyramid: list[list[np.ndarray]] = []  # [photo][scale] (3, h, w) float32 in [-1, 1]
        for name in PHOTOS:
            with Image.open(root / name) as im:
                im = im.convert("RGB")
                levels = []
                for k in SCALES:
                    short = k * image_size
                    w, h = im.size
                    size = (round(w * short / min(w, h)), round(h * short / min(w, h)))
                    small = im.reduce(max(1, min(w, h) // (2 * short))).resize(size, Image.BICUBIC)
                    arr = np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
                    levels.append(np.clip(arr, -1.0, 1.0))
                self._pyramid.append(levels)

    def __len__(self) -> int:
        return self.length

    def _crop(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} crops")
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
        label = int(rng.integers(len(PHOTOS)))
        photo = self._pyramid[label][int(rng.integers(len(SCALES)))]
        _, h, w = photo.shape
        s = self.image_size
        cut = int(w * TRAIN_SHARE)
        lo, hi = (0, cut - s) if self.split == "train" else (cut, w - s)
        x = int(rng.integers(lo, max(lo, hi) + 1))
        y = int(rng.integers(0, h - s + 1))
        crop = photo[:, y:y + s, x:x + s]
        if rng.random() < 0.5:
            crop = crop[:, :, ::-1]
        return crop, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        crop, label = self._crop(int(index))
        return torch.from_numpy(np.ascontiguousarray(crop)), label

    def batch(self, indices, flip_bits=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crops (B, 3, H, W) in [−1, 1], labels (B,) int64, high-detail masks (B, H, W) bool.

        Crops are flipped at random by their own draw, so ``flip_bits`` are ignored."""
        items = [self._crop(int(i)) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        images = torch.from_numpy(np.stack([np.ascontiguousarray(c) for c, _ in items]))
        labels = torch.tensor([label for _, label in items], dtype=torch.int64)
        return images, labels, detail_mask(images)
