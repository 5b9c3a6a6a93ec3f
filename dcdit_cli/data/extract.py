"""Images → VAE latents in shards (docs/reference.md#latent-shards [choice]): both flips, resumable, multi-process.

With ``pixels=True`` (``dcdit extract --pixels``) no VAE runs: the centre crops themselves are stored,
uint8 ``shard-*.pixels.npy`` (N, F, 3, H, W) under a ``dcdit-pixels-v1`` index, for pixel-space
training (``data.kind = "images"``, docs/pixels.md).

Layout of ``--out`` (read by ``data.LatentShardDataset``)::

    index.json                      written last, by rank 0, from the markers
    shard-000000.latents.npy        float16 (N, F, C, h, w); F = 2: [original, flipped]
    shard-000000.labels.npy         int64 (N,)
    shard-000000.done.json          marker: count, skipped files, settings (written last)

The sorted file list is cut into shards of ``shard_size`` files; shard k belongs to rank
k mod W, so any world size writes the same shards, and names never collide. Every file is
written to a temporary name and renamed; the marker comes last, so a killed run never leaves a
shard that looks complete, and rerunning the same command skips the finished shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from accelerate import PartialState

from dcdit_cli.common.atomic import remove_stale_temps, write_json, write_npy
from dcdit_cli.common.console import DcditError, RateMeter, plain_log, print0, progress_bar
from dcdit_cli.config.options import OptionCheck
from dcdit_cli.data.datasets import INDEX_NAME, LATENTS, PIXELS
from dcdit_cli.data.imaging import list_images, load_centre_crop, to_model_range
from dcdit_cli.data.vae import VAE_SCALE, encode, latent_shape, load_vae

FLIP_MODES = ("both", "random", "none")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def shard_name(k: int) -> str:
    return f"shard-{k:06d}"


def _seed_for(*parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing or torn: the shard is redone


def _prefetch(pool: ThreadPoolExecutor, fn, items: Iterable, ahead: int) -> Iterator:
    """``map(fn, items)`` in order, with at most ``ahead`` calls in flight on the pool."""
    queue: deque = deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) >= ahead:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def _process_state():
    """accelerate's ``PartialState``; on a machine without an accelerator it must be told ``cpu=True``
    to form the gloo group under ``torchrun`` / ``accelerate launch`` (else each rank thinks it is alone)."""
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return PartialState(cpu=not has_accelerator)


def _to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(to_model_range(np.stack(arrays))).permute(0, 3, 1, 2)  # (B, 3, H, W) in [-1, 1]


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def extract(
    data_path: str | Path,
    out: str | Path,
    vae,
    image_size: int = 256,
    batch_size: int = 32,
    flip: str = "both",
    mean: bool = False,
    seed: int = 0,
    accelerator=None,
    shard_size: int = 1024,
    num_workers: int = 8,
    pixels: bool = False,
) -> dict:
    """Encode an ImageNet-style folder into latent shards under ``out``; returns the index (rank 0).

    ``vae``: a diffusers ``AutoencoderKL`` or a name for ``vae.load_vae``. ``flip``: "both"
    stores the original and the flipped latent (F = 2); "random" flips each image with
    probability 1/2 (frozen, F = 1); "none" stores the original only. ``mean`` stores the
    posterior mean instead of a sample. Noise and random flips are seeded per shard from
    (seed, shard), so results do not depend on the number of processes. ``batch_size`` counts
    images (the VAE sees twice as many with flip="both"); ``num_workers`` threads decode images.
    ``pixels``: store the uint8 crops, no VAE (``vae`` is not read, ``mean`` is refused).
    """
    check = OptionCheck().choice("--flip", flip, FLIP_MODES).count("--batch-size", batch_size, example=32)
    check.count("--shard-size", shard_size, example=1024).count("--image-size", image_size, example=256)
    check.count("--num-workers", num_workers, least=0, example=8).seed("--seed", seed).output("--out", Path(out), directory=True).done()
    if pixels and mean:
        raise DcditError("--mean picks the VAE posterior's mean, and --pixels runs no VAE: drop one of them")
    state = accelerator if accelerator is not None else _process_state()
    rank, world = state.process_index, state.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if world != launched:  # every process would write every shard
        raise DcditError(
            f"launched with WORLD_SIZE={launched} but accelerate sees {world} process(es): "
            "launch with `accelerate launch --multi_gpu --num_processes N -m dcdit_cli extract ...`"
        )
    root, out = Path(data_path), Path(out)
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise DcditError(f"--out {out} lies inside --data-path {root}: the shards would land among the images; "
                         "write them outside it, e.g. --out features/NAME")
    classes, files = list_images(root)

    fmt = PIXELS if pixels else LATENTS
    if pixels:
        vae = vae_name = vae_id = None
    elif isinstance(vae, (str, os.PathLike)):
        vae_name = str(vae)
        vae_id = str(Path(vae).expanduser().resolve()) if Path(vae).expanduser().is_dir() else vae_name
        vae = load_vae(vae_name, device=state.device)
    else:
        vae_name = vae_id = str(getattr(vae.config, "_name_or_path", "") or type(vae).__name__)
        vae = vae.to(state.device).eval().requires_grad_(False)
    shape = (3, image_size, image_size) if pixels else latent_shape(vae, image_size)
    settings = {
        "image_size": image_size,
        "vae": vae_id,
        fmt.shape_key: list(shape),
        "flips": flip,
        "mean": mean,
        "seed": seed,
        "shard_size": shard_size,
        "files_sha256": hashlib.sha256("\n".join(f"{p}\t{l}" for p, l in files).encode()).hexdigest(),
    }
    num_shards = (len(files) + shard_size - 1) // shard_size
    out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        remove_stale_temps(out)  # what a killed write left behind
    state.wait_for_everyone()

    def marker_ok(k: int) -> bool:
        marker = _read_marker(out / f"{shard_name(k)}.done.json")
        if marker is None:
            return False
        if marker.get("settings") != settings:
            changed = sorted(key for key in settings if marker.get("settings", {}).get(key) != settings[key])
            raise DcditError(
                f"{out} holds shards made with other settings or files ({', '.join(changed)} differ): "
                "use a new --out, or delete that directory to start over"
            )
        return True

    todo = [k for k in range(rank, num_shards, world) if not marker_ok(k)]
    total = sum(len(files[k * shard_size : (k + 1) * shard_size]) for k in todo)
    mine = len(range(rank, num_shards, world))
    print0(
        f"extract: {len(files)} files in {len(classes)} classes → {num_shards} shards of {shard_size}, "
        f"{fmt.suffix} {tuple(shape)}, flips {flip}, {world} process(es); rank 0: {mine - len(todo)} of {mine} shards already done"
    )

    def load(item: tuple[str, int]) -> tuple[str, int, np.ndarray | str]:
        rel, label = item
        return rel, label, load_centre_crop(root / rel, image_size)

    work = (item for k in todo for item in files[k * shard_size : (k + 1) * shard_size])
    meter = RateMeter()
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool, progress_bar("extract") as progress:
        task = progress.add_task(f"extract (rank 0 of {world})" if world > 1 else "extract", total=total, rate="")
        loaded = _prefetch(pool, load, work, ahead=max(4 * batch_size, 2 * num_workers))
        for k in todo:
            count_files = len(files[k * shard_size : (k + 1) * shard_size])
            items = [next(loaded) for _ in range(count_files)]
            _encode_shard(out, k, items, vae, shape, batch_size, flip, mean, seed, settings, fmt)
            rate = f"{meter.update(count_files):.2f} img/s"
            progress.update(task, advance=count_files, rate=rate)
            plain_log(f"extract: {shard_name(k)} done ({count_files} files, {rate} on rank {rank})")

    state.wait_for_everyone()
    index = None
    if state.is_main_process:
        index = _write_index(out, classes, num_shards, settings, vae_name, image_size, shape, flip, mean, fmt)
        print0(f"extract: {index['num_images']} images, {len(index['skipped'])} skipped → {out / INDEX_NAME}")
    state.wait_for_everyone()
    return index if index is not None else json.loads((out / INDEX_NAME).read_text(encoding="utf-8"))


def _latent_shard(arrays: list[np.ndarray], vae, shape, batch_size: int, flip: str, mean: bool, gen) -> np.ndarray:
    """uint8 crops (H, W, 3) → float16 latents (N, F, C, h, w), encoded ``batch_size`` images at a time."""
    num_flips = 2 if flip == "both" else 1
    latents = np.empty((len(arrays), num_flips, *shape), dtype=np.float16)  # (N, F, C, h, w)
    for start in range(0, len(arrays), batch_size):
        x = _to_tensor(arrays[start : start + batch_size])  # (B, 3, H, W)
        b = x.shape[0]
        if flip == "both":
            x = torch.cat([x, x.flip(-1)])  # (2B, 3, H, W): originals, then their mirror images
        elif flip == "random":
            bits = torch.rand(b, generator=gen) < 0.5
            x = torch.where(bits[:, None, None, None], x.flip(-1), x)
        z = encode(vae, x, sample=not mean, generator=gen).float().cpu()  # (F·B, C, h, w)
        latents[start : start + b] = z.reshape(num_flips, b, *shape).transpose(0, 1).numpy()
    return latents


def _pixel_shard(arrays: list[np.ndarray], flip: str, gen: torch.Generator) -> np.ndarray:
    """uint8 crops (H, W, 3) → uint8 (N, F, 3, H, W), flipped as ``flip`` says (no VAE)."""
    x = np.stack(arrays).transpose(0, 3, 1, 2)  # (N, 3, H, W)
    if flip == "both":
        return np.ascontiguousarray(np.stack([x, x[..., ::-1]], axis=1))
    if flip == "random":
        bits = (torch.rand(len(x), generator=gen) < 0.5).numpy()
        x = np.where(bits[:, None, None, None], x[..., ::-1], x)
    return np.ascontiguousarray(x[:, None])


def _encode_shard(out: Path, k: int, items, vae, shape, batch_size, flip, mean, seed, settings, fmt=LATENTS) -> None:
    """Encode one shard's images (or keep their pixels) and write it: samples, labels, then the marker (all atomic)."""
    name = shard_name(k)
    good = [(rel, label, arr) for rel, label, arr in items if not isinstance(arr, str)]
    skipped = [{"path": rel, "reason": arr} for rel, _, arr in items if isinstance(arr, str)]
    gen = torch.Generator().manual_seed(_seed_for("dcdit-extract", seed, k))
    arrays = [arr for _, _, arr in good]
    if not arrays:
        samples = np.empty((0, 2 if flip == "both" else 1, *shape), np.uint8 if fmt is PIXELS else np.float16)
    elif fmt is PIXELS:
        samples = _pixel_shard(arrays, flip, gen)
    else:
        samples = _latent_shard(arrays, vae, shape, batch_size, flip, mean, gen)
    labels = np.asarray([label for _, label, _ in good], dtype=np.int64)
    write_npy(out / f"{name}.{fmt.suffix}.npy", samples)
    write_npy(out / f"{name}.labels.npy", labels)
    marker = {"name": name, "count": len(good), "files": len(items), "skipped": skipped, "settings": settings}
    write_json(out / f"{name}.done.json", marker)


def _write_index(out: Path, classes, num_shards, settings, vae_name, image_size, shape, flip, mean, fmt=LATENTS) -> dict:
    shards, skipped = [], []
    for k in range(num_shards):
        marker = _read_marker(out / f"{shard_name(k)}.done.json")
        if marker is None or marker.get("settings") != settings:
            raise DcditError(
                f"{shard_name(k)} in {out} is unfinished (a process failed or was killed): rerun the same command to finish it"
            )
        skipped.extend(marker["skipped"])
        if marker["count"]:
            shards.append({"name": marker["name"], "count": marker["count"]})
    num_images = sum(s["count"] for s in shards)
    if num_images == 0:
        first = skipped[0]  # one example keeps the message on one line; index.json would list them all
        raise DcditError(f"none of the {len(skipped)} files in --data-path is an image ({first['path']}: {first['reason']}): "
                         "expected DIR/<class>/*.JPEG")
    index = {
        "format": fmt.format,
        "image_size": image_size,
        fmt.shape_key: list(shape),
        "vae": vae_name,
        "scale": VAE_SCALE if fmt is LATENTS else None,
        "flips": flip,
        "mean": mean,
        "classes": classes,
        "shards": shards,
        "skipped": skipped,
        "num_images": num_images,
        "seed": settings["seed"],
        "shard_size": settings["shard_size"],
    }
    write_json(out / INDEX_NAME, index)
    return index
