"""Training data: latent shards, the procedural shapes set, deterministic batch sampling.

Three datasets share one small interface, which is all the training loop reads:

- ``.batch(indices, flip_bits) -> (x (B, C, H, W) float32, labels (B,) int64, mask)``, where
  ``mask`` is the per-pixel ground truth (B, H, W) bool of the pixel-space sets (the shapes'
  silhouettes, the photographs' detail) and None for latents, which have none;
- ``.num_classes``, ``.sample_shape`` (C, H, W), ``len(dataset)``

``LatentShardDataset`` reads the shards that ``dcdit extract`` writes (docs/reference.md#latent-shards [choice]:
many latents per file, both flips stored, an ``index.json``); ``PixelShardDataset`` the uint8 pixel
shards of ``dcdit extract --pixels``, and ``images.ImageFolderDataset`` an image folder directly
(``data.kind = "images"``, pixel-space DC-DiT, docs/pixels.md). ``ShapesDataset`` draws coloured,
textured shapes from (seed, index) alone: no files, for the ``toy`` and ``tiny`` recipes.
``PhotosDataset`` (``photos.py``) crops real photographs shipped by scikit-image.

``batch_indices(seed, step, rank, ...)`` is the only source of data order: a pure function of
its arguments, so resuming at step k sees exactly the batches a straight run would.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dcdit_cli.common.console import DcditError
from dcdit_cli.data.images import ImageFolderDataset
from dcdit_cli.data.imaging import to_model_range
from dcdit_cli.data.photos import PhotosDataset

INDEX_NAME = "index.json"


@dataclass(frozen=True)
class ShardFormat:
    """What one kind of shard directory holds: ``index.json`` says ``format``; each shard's samples are
    ``<shard>.<suffix>.npy``; the per-sample shape is under ``shape_key``; ``data_kind`` reads it."""

    format: str
    suffix: str
    shape_key: str
    data_kind: str
    flags: str  # what `dcdit extract` needs to write it

    @property
    def command(self) -> str:
        return f"`dcdit extract --data-path DIR{self.flags} --out FEATURES`"

    @property
    def hint(self) -> str:
        return f"{self.command} makes the shards"


LATENTS = ShardFormat("dcdit-latents-v1", "latents", "latent_shape", "latents", "")
PIXELS = ShardFormat("dcdit-pixels-v1", "pixels", "sample_shape", "images", " --pixels")
SHARD_FORMATS = (LATENTS, PIXELS)


# ---------------------------------------------------------------------------------------------
# Deterministic sampling
# ---------------------------------------------------------------------------------------------


def batch_indices(seed: int, step: int, rank: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (batch,) int64 drawn uniformly with replacement from [0, length), and flip bits (batch,) bool.

    A pure function of (seed, step, rank): the generator is seeded from a SHA-256 of the three,
    so neighbouring steps and ranks get unrelated streams and resume is exact (DESIGN "Runs").
    """
    if length <= 0:
        raise ValueError(f"batch_indices: length must be positive, got {length}")
    digest = hashlib.sha256(f"dcdit-batch:{seed}:{step}:{rank}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    indices = torch.randint(0, length, (batch,), generator=gen, dtype=torch.int64)
    flip_bits = torch.randint(0, 2, (batch,), generator=gen).bool()
    return indices, flip_bits


# ---------------------------------------------------------------------------------------------
# Latent shards (written by extract.py)
# ---------------------------------------------------------------------------------------------


def read_index(path: str | Path, fmt: ShardFormat = LATENTS) -> dict:
    """The validated ``index.json`` of a shard directory in format ``fmt``, or a DcditError naming the fix."""
    root = Path(path)
    what, hint, cmd = f"{fmt.suffix[:-1]} shards", fmt.hint, fmt.command
    if not str(path):
        raise DcditError(f"data.path is empty: set it to a directory of {what} ({hint})")
    if root.is_file():
        raise DcditError(f"data.path {root} is a file: point it at the directory of {what} ({hint})")
    if not root.is_dir():
        raise DcditError(f"{fmt.suffix[:-1]} directory {root} does not exist: {hint}")
    index_path = root / INDEX_NAME
    if not index_path.is_file():
        raise DcditError(f"{index_path} is missing (an unfinished or foreign directory?): {hint}")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DcditError(f"{index_path} is not readable JSON ({exc}): rerun {cmd}") from exc
    if not isinstance(index, dict) or index.get("format") != fmt.format:
        other = next((f for f in SHARD_FORMATS if isinstance(index, dict) and index.get("format") == f.format), None)
        if other is not None:
            raise DcditError(f"{root} holds {other.suffix[:-1]} shards ({other.format}), not {what}: "
                             f"set data.kind = '{other.data_kind}', or {hint}")
        raise DcditError(f"{index_path} is not a {fmt.format} index: {hint}")
    for key in (fmt.shape_key, "shards", "image_size"):
        if key not in index:
            raise DcditError(f"{index_path} lacks '{key}': {hint}")
    shards_ok = isinstance(index["shards"], list) and all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("count"), int) and s["count"] >= 0
        for s in index["shards"]
    )
    shape = index[fmt.shape_key]
    if not shards_ok or not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise DcditError(f"{index_path} has malformed 'shards' or '{fmt.shape_key}' entries: rerun {cmd}")
    if not isinstance(index["image_size"], int) or index["image_size"] < 1:
        raise DcditError(f"{index_path} has image_size {index['image_size']!r}, not a positive integer: rerun {cmd}")
    classes = index.get("classes", [])
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise DcditError(f"{index_path} has 'classes' {classes!r}, not a list of class names: rerun {cmd}")
    if sum(s["count"] for s in index["shards"]) == 0:
        raise DcditError(f"{root} holds zero images: {hint} from a folder of class subfolders")
    return index


class LatentShardDataset:
    """Latents and labels from the shards of ``dcdit extract`` (memory-mapped ``.npy``).

    Per shard ``<name>.latents.npy`` float16 (N, F, C, h, w), F = 2 when both flips are stored
    (0 original, 1 flipped), and ``<name>.labels.npy`` int64 (N,). ``flip`` is the recipe's
    ``data.flip``: with "random", a flip bit of 1 picks the stored flipped copy (F = 2) or flips
    the latent horizontally on the fly (F = 1); with "none" the original is always used.
    ``__getitem__`` returns the unflipped latent; training reads ``batch``.
    """

    FORMAT = LATENTS

    def __init__(self, path: str | Path, flip: str = "random") -> None:
        if flip not in ("random", "none"):
            raise DcditError(f"data.flip must be 'random' or 'none', got {flip!r}")
        fmt, cmd = self.FORMAT, self.FORMAT.command
        self.root = Path(path)
        self.index = read_index(self.root, fmt)
        self.flip = flip
        self.classes: list[str] = list(self.index.get("classes", []))
        self.image_size = int(self.index["image_size"])
        self.sample_shape = tuple(int(v) for v in self.index[fmt.shape_key])
        self._latents: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        counts = []
        for shard in self.index["shards"]:
            if int(shard["count"]) == 0:
                continue
            lat_path = self.root / f"{shard['name']}.{fmt.suffix}.npy"
            lab_path = self.root / f"{shard['name']}.labels.npy"
            try:
                latents = np.load(lat_path, mmap_mode="r")
                labels = np.load(lab_path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DcditError(f"shard {shard['name']} in {self.root} is unreadable ({exc}): rerun {cmd}") from exc
            n = int(shard["count"])
            if latents.ndim != 5 or latents.shape[0] != n or latents.shape[1] not in (1, 2) or labels.shape != (n,) or tuple(latents.shape[2:]) != self.sample_shape:
                raise DcditError(
                    f"shard {shard['name']} in {self.root} has {fmt.suffix} {latents.shape} / labels {labels.shape}, "
                    f"index says {n} × {self.sample_shape}: rerun {cmd}"
                )
            self._latents.append(latents)
            self._labels.append(labels)
            counts.append(n)
        self.num_flips = self._latents[0].shape[1]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (S+1,)
        low, high = min(int(l.min()) for l in self._labels), max(int(l.max()) for l in self._labels)
        if low < 0:
            raise DcditError(f"{self.root} holds a negative class label ({low}): rerun {cmd}")
        self.num_classes = max(len(self.classes), high + 1)  # labels the model must be able to embed

    @staticmethod
    def to_model(stored: np.ndarray) -> np.ndarray:
        """Stored samples → model space float32 (latents are stored in it)."""
        return stored.astype(np.float32)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} latents")
        shard = np.searchsorted(self._starts, indices, side="right") - 1  # (B,)
        return shard, indices - self._starts[shard]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        (s,), (j,) = self._locate(np.asarray([i], dtype=np.int64))
        latent = torch.from_numpy(self.to_model(np.asarray(self._latents[s][j, 0])))  # (C, h, w)
        return latent, int(self._labels[s][j])

    def batch(self, indices, flip_bits=None) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Latents (B, C, h, w) float32, labels (B,) int64 and no mask for global ``indices``."""
        idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        if flip_bits is None or self.flip == "none":
            bits = np.zeros(idx.shape, dtype=bool)
        else:
            bits = np.asarray(torch.as_tensor(flip_bits).cpu(), dtype=bool).reshape(-1)
        shard, local = self._locate(idx)
        out = np.empty((idx.size, *self.sample_shape), dtype=np.float32)
        labels = np.empty(idx.size, dtype=np.int64)
        stored = self.num_flips == 2
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            order = sel[np.argsort(local[sel], kind="stable")]  # sorted reads are kinder to the page cache
            rows = local[order]
            which = bits[order].astype(np.int64) if stored else np.zeros(rows.size, dtype=np.int64)
            out[order] = self.to_model(self._latents[s][rows, which])  # (n, C, h, w) float32
            labels[order] = self._labels[s][rows]
        latents = torch.from_numpy(out)
        if not stored and bits.any():
            flip = torch.from_numpy(bits)
            latents[flip] = latents[flip].flip(-1)  # horizontal flip on the fly (F = 1)
        return latents, torch.from_numpy(labels), None


class PixelShardDataset(LatentShardDataset):
    """Images and labels from the uint8 shards of ``dcdit extract --pixels`` (no VAE): per shard
    ``<name>.pixels.npy`` uint8 (N, F, 3, H, W) in ADM's centre crop, read as x / 127.5 − 1."""

    FORMAT = PIXELS

    @staticmethod
    def to_model(stored: np.ndarray) -> np.ndarray:
        return to_model_range(stored)


# ---------------------------------------------------------------------------------------------
# The procedural shapes set
# ---------------------------------------------------------------------------------------------

SHAPE_CLASSES = ("disc", "square", "triangle", "ring", "cross", "diamond")
TEXTURES = ("stripes", "checker", "noise")


def _shape_sdf(kind: int, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (negative inside) of a shape of radius ``r`` centred at the origin."""
    name = SHAPE_CLASSES[kind]
    if name == "disc":
        return np.hypot(x, y) - r
    if name == "square":
        return _box_sdf(x, y, 0.82 * r, 0.82 * r)
    if name == "triangle":
        # Equilateral, apex up, bounding box centred (Inigo Quilez's exact 2-D SDF of the triangle).
        k = math.sqrt(3.0)
        s = 1.05 * r  # half the side length
        px = np.abs(x) - s
        py = (-y + s / (2.0 * k)) + s / k  # y-up, shifted so the box (height k*s) is centred
        fold = px + k * py > 0.0
        px, py = np.where(fold, (px - k * py) / 2.0, px), np.where(fold, (-k * px - py) / 2.0, py)
        px = px - np.clip(px, -2.0 * s, 0.0)
        return -np.hypot(px, py) * np.sign(py)
    if name == "ring":
        return np.abs(np.hypot(x, y) - 0.7 * r) - 0.3 * r
    if name == "cross":
        return np.minimum(_box_sdf(x, y, r, 0.32 * r), _box_sdf(x, y, 0.32 * r, r))
    if name == "diamond":
        return (np.abs(x) + np.abs(y) - r) / math.sqrt(2.0)
    raise ValueError(kind)


def _box_sdf(x: np.ndarray, y: np.ndarray, hx: float, hy: float) -> np.ndarray:
    dx, dy = np.abs(x) - hx, np.abs(y) - hy
    outside = np.hypot(np.maximum(dx, 0.0), np.maximum(dy, 0.0))
    return outside + np.minimum(np.maximum(dx, dy), 0.0)


def _contrasting_colour(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """A colour at least 0.3 away from ``colour`` in every channel (shifted by 0.3–0.7, wrapped)."""
    return (colour + rng.uniform(0.3, 0.7, 3)) % 1.0


class ShapesDataset:
    """Class-conditional procedural images: one textured shape on a flat or graded background.

    Item ``i`` depends only on (seed, i): its parameters are drawn from
    ``np.random.default_rng([seed, i])`` and rendered with numpy over the pixel grid. The shape
    spans 35–70 % of the side, sits mostly inside the frame, is rotated at most ±12°, and is
    filled with stripes, a checkerboard or noise. Every class is mirror-symmetric, so ``batch``
    ignores the flip bits (a flip would not add variety).

    ``variety = "fixed"`` (``data.shapes``, the README demo) draws every shape of a class the same:
    light grey, flat, upright, 60 % of the side, at the centre, on dark grey, so only the background's
    slope varies. A model small enough to train in minutes on a CPU learns this set's layout in its
    budget and the varied set's not (docs/router-study.md#the-readme-demo). The fixed draws replace
    fields of the varied ones, so both sets share the labels and backgrounds of each (seed, i).
    """

    VARIETIES = ("varied", "fixed")

    def __init__(self, image_size: int = 32, num_classes: int = 6, seed: int = 0, length: int = 1_000_000,
                 variety: str = "varied") -> None:
        if not 1 <= num_classes <= len(SHAPE_CLASSES):
            raise DcditError(
                f"the shapes set has {len(SHAPE_CLASSES)} classes ({', '.join(SHAPE_CLASSES)}), "
                f"data.num_classes = {num_classes}: set data.num_classes (and model.num_classes) to 1..6"
            )
        if image_size < 8:
            raise DcditError(f"shapes image_size {image_size} is too small to draw on: use 8 or more (16, 32 are typical)")
        if variety not in self.VARIETIES:
            raise DcditError(f"unknown shapes variety {variety!r}: set data.shapes to one of {', '.join(self.VARIETIES)}")
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.variety = variety
        self.length = length
        self.classes = list(SHAPE_CLASSES[:num_classes])
        self.sample_shape = (3, image_size, image_size)
        centres = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size  # pixel centres in (0, 1)
        self._y, self._x = np.meshgrid(centres, centres, indexing="ij")  # (H, W) each

    def __len__(self) -> int:
        return self.length

    def _params(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} shapes")
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(self.num_classes))
        r = rng.uniform(0.35, 0.70) / 2.0  # radius as a fraction of the side
        margin = 0.85 * r  # centre range: fully or mostly inside
        fg = rng.uniform(0.05, 0.95, 3)
        params = {
            "label": label,
            "r": r,
            "cx": rng.uniform(margin, 1.0 - margin),
            "cy": rng.uniform(margin, 1.0 - margin),
            "angle": rng.uniform(-12.0, 12.0) * math.pi / 180.0,
            "fg": fg,
            "bg": _contrasting_colour(rng, fg),
            "bg_slope": rng.uniform(0.0, 0.35) if rng.random() < 0.5 else 0.0,
            "bg_dir": rng.uniform(0.0, 2.0 * math.pi),
            "texture": int(rng.integers(len(TEXTURES))),
            "tex_amp": rng.uniform(0.12, 0.25),
            "tex_angle": rng.uniform(0.0, math.pi),
            "tex_period": rng.uniform(0.15, 0.3),
            "tex_cell": rng.uniform(0.1, 0.2),
            "noise_seed": int(rng.integers(2**31)),
        }
        if self.variety == "fixed":
            params.update(r=0.3, cx=0.5, cy=0.5, angle=0.0, fg=np.full(3, 0.85), bg=np.full(3, 0.15), tex_amp=0.0)
        return params

    def _render(self, p: dict) -> tuple[np.ndarray, np.ndarray]:
        """(image (3, H, W) float32 in [0, 1], mask (H, W) bool) from drawn parameters."""
        x, y = self._x - p["cx"], self._y - p["cy"]  # (H, W)
        c, s = math.cos(p["angle"]), math.sin(p["angle"])
        xr, yr = c * x + s * y, -s * x + c * y  # shape's own frame
        sdf = _shape_sdf(p["label"], xr, yr, p["r"])  # (H, W), in units of the side
        cover = np.clip(0.5 - sdf * self.image_size, 0.0, 1.0)  # anti-aliased coverage, 1 px ramp

        texture = TEXTURES[p["texture"]]
        if texture == "stripes":
            u = self._x * math.cos(p["tex_angle"]) + self._y * math.sin(p["tex_angle"])
            t = np.sign(np.sin(2.0 * math.pi * u / p["tex_period"]))  # (H, W) in {-1, 1}
        elif texture == "checker":
            cell = p["tex_cell"]
            t = ((np.floor(xr / cell) + np.floor(yr / cell)) % 2.0) * 2.0 - 1.0
        else:
            t = np.random.default_rng(p["noise_seed"]).uniform(-1.0, 1.0, x.shape)
        fill = p["fg"][:, None, None] + p["tex_amp"] * t[None]  # (3, H, W)

        ramp = (self._x - 0.5) * math.cos(p["bg_dir"]) + (self._y - 0.5) * math.sin(p["bg_dir"])
        back = p["bg"][:, None, None] + p["bg_slope"] * ramp[None]  # (3, H, W), linear gradient
        image = cover[None] * fill + (1.0 - cover[None]) * back
        return np.clip(image, 0.0, 1.0).astype(np.float32), cover > 0.5

    def item_with_mask(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(image (3, H, W) float32 in [-1, 1], label, mask (H, W) bool)."""
        p = self._params(int(index))
        image, mask = self._render(p)
        return torch.from_numpy(image * 2.0 - 1.0), p["label"], torch.from_numpy(mask)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label, _ = self.item_with_mask(index)
        return image, label

    def batch(self, indices, flip_bits=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1], labels (B,) int64, masks (B, H, W) bool. Flip bits are ignored."""
        idx = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        size = self.image_size
        images = np.empty((len(idx), 3, size, size), dtype=np.float32)
        masks = np.empty((len(idx), size, size), dtype=bool)
        labels = np.empty(len(idx), dtype=np.int64)
        for k, i in enumerate(idx):
            p = self._params(i)
            images[k], masks[k] = self._render(p)
            labels[k] = p["label"]
        return torch.from_numpy(images * 2.0 - 1.0), torch.from_numpy(labels), torch.from_numpy(masks)


# ---------------------------------------------------------------------------------------------
# From a recipe
# ---------------------------------------------------------------------------------------------


def check_fits_model(dataset, model_cfg):
    """``dataset`` when its samples are what the model takes, (in_channels, input_size, input_size);
    otherwise a DcditError naming both sides, before any training starts."""
    want = (model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size)
    got = tuple(int(v) for v in dataset.sample_shape)
    if got != want:
        source = getattr(dataset, "root", "the data")
        raise DcditError(
            f"{source} holds samples of shape {got} (C, H, W) but the model takes {want}: set model.in_channels="
            f"{got[0]} and model.input_size={got[1]}, or point data.path at data made for this model"
        )
    return dataset


def _image_dataset(data_cfg):
    """``data.kind = "images"``: pixel shards when data.path holds an index.json, else an image folder."""
    root = Path(data_cfg.path)
    folder = "a folder of class subfolders of images, or the shards of " + PIXELS.command
    if not data_cfg.path:
        raise DcditError(f"data.kind = 'images' but data.path is empty: pass --set data.path=DIR ({folder})")
    if not root.is_dir():
        raise DcditError(f"data.path {root} is {'a file' if root.exists() else 'missing'}: point it at {folder}")
    if (root / INDEX_NAME).exists():
        return PixelShardDataset(root, flip=data_cfg.flip)
    return ImageFolderDataset(root, data_cfg.image_size, flip=data_cfg.flip)


def make_dataset(data_cfg, seed: int = 0):
    """The dataset a recipe's ``[data]`` section names (``DataConfig``)."""
    if data_cfg.kind == "shapes":
        variety = getattr(data_cfg, "shapes", "varied")  # a [data] table from before data.shapes: the varied set
        return ShapesDataset(image_size=data_cfg.image_size, num_classes=data_cfg.num_classes, seed=seed, variety=variety)
    if data_cfg.kind == "photos":
        return PhotosDataset(image_size=data_cfg.image_size, num_classes=data_cfg.num_classes, seed=seed)
    if data_cfg.kind == "images":
        dataset = _image_dataset(data_cfg)
    elif data_cfg.kind == "latents":
        if not data_cfg.path:
            raise DcditError(f"data.kind = 'latents' but data.path is empty: pass --set data.path=FEATURES ({LATENTS.hint})")
        dataset = LatentShardDataset(data_cfg.path, flip=data_cfg.flip)
    else:
        raise DcditError(f"data.kind must be 'latents', 'images', 'shapes' or 'photos', got {data_cfg.kind!r}")
    if dataset.num_classes > data_cfg.num_classes:
        raise DcditError(
            f"the data in {data_cfg.path} have {dataset.num_classes} classes but data.num_classes = "
            f"{data_cfg.num_classes}: set data.num_classes and model.num_classes to {dataset.num_classes}"
        )
    if dataset.image_size != data_cfg.image_size:
        flag = dataset.FORMAT.flags
        raise DcditError(
            f"the shards in {data_cfg.path} were extracted at {dataset.image_size} px but data.image_size = "
            f"{data_cfg.image_size}: set data.image_size={dataset.image_size} or extract{flag} at --image-size {data_cfg.image_size}"
        )
    return dataset
