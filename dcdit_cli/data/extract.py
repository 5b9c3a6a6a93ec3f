"""Images → VAE latents in shards (docs/reference.md#latent-shards [choice]): both flips, resumable, multi-process.

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
from PIL import Image, UnidentifiedImageError

from dcdit_cli.common.atomic import remove_stale_temps, write_json, write_npy
from dcdit_cli.common.console import DcditError, RateMeter, plain_log, print0, progress_bar
from dcdit_cli.config.options import OptionCheck
from dcdit_cli.data.datasets import INDEX_NAME, LATENT_FORMAT
from dcdit_cli.data.imaging import center_crop_arr
from dcdit_cli.data.vae import VAE_SCALE, encode, latent_shape, load_vae

FLIP_MODES = ("both", "random", "none")
_LAYOUT_HINT = "one subfolder per class with the images inside (DIR/<class>/*.JPEG, as ImageNet's train/)"


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def list_images(data_path: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path relative to data_path, label)]) in sorted order; hidden entries skipped.

    Every other file is listed: whether it is an image is decided by PIL when it is read, so
    any format PIL opens works and everything else ends up in the index's ``skipped``.
    """
    root = Path(data_path)
    if not root.is_dir():
        raise DcditError(f"data path {root} does not exist: pass --data-path DIR with {_LAYOUT_HINT}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DcditError(f"no class folders in {root}: --data-path needs {_LAYOUT_HINT}")
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(root)
            files.extend(((rel / f).as_posix(), label) for f in sorted(filenames) if not f.startswith("."))
    if not files:
        raise DcditError(f"the class folders of {root} hold no files: --data-path needs {_LAYOUT_HINT}")
    return classes, files


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


def _load_image(path: Path, image_size: int) -> np.ndarray | str:
    """ADM centre crop (H, W, 3) uint8, or the reason the file is skipped."""
    try:
        with Image.open(path) as image:
            image.load()
            return center_crop_arr(image, image_size)
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"unreadable: {exc}"


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
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    return x.float() / 127.5 - 1.0  # [-1, 1]


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
) -> dict:
    """Encode an ImageNet-style folder into latent shards under ``out``; returns the index (rank 0).

    ``vae``: a diffusers ``AutoencoderKL`` or a name for ``vae.load_vae``. ``flip``: "both"
    stores the original and the flipped latent (F = 2); "random" flips each image with
    probability 1/2 (frozen, F = 1); "none" stores the original only. ``mean`` stores the
    posterior mean instead of a sample. Noise and random flips are seeded per shard from
    (seed, shard), so results do not depend on the number of processes. ``batch_size`` counts
    images (the VAE sees twice as many with flip="both"); ``num_workers`` threads decode images.
    """
    check = OptionCheck().choice("--flip", flip, FLIP_MODES).count("--batch-size", batch_size, example=32)
    check.count("--shard-size", shard_size, example=1024).count("--image-size", image_size, example=256)
    check.count("--num-workers", num_workers, least=0, example=8).seed("--seed", seed).output("--out", Path(out), directory=True).done()
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

    if isinstance(vae, (str, os.PathLike)):
        vae_name = str(vae)
        vae_id = str(Path(vae).expanduser().resolve()) if Path(vae).expanduser().is_dir() else vae_name
        vae = load_vae(vae_name, device=state.device)
    else:
        vae_name = vae_id = str(getattr(vae.config, "_name_or_path", "") or type(vae).__name__)
        vae = vae.to(state.device).eval().requires_grad_(False)
    shape = latent_shape(vae, image_size)
    settings = {
        "image_size": image_size,
        "vae": vae_id,
        "latent_shape": list(shape),
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
        f"latents {tuple(shape)}, flips {flip}, {world} process(es); rank 0: {mine - len(todo)} of {mine} shards already done"
    )

    def load(item: tuple[str, int]) -> tuple[str, int, np.ndarray | str]:
        rel, label = item
        return rel, label, _load_image(root / rel, image_size)

    work = (item for k in todo for item in files[k * shard_size : (k + 1) * shard_size])
    meter = RateMeter()
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool, progress_bar("extract") as progress:
        task = progress.add_task(f"extract (rank 0 of {world})" if world > 1 else "extract", total=total, rate="")
        loaded = _prefetch(pool, load, work, ahead=max(4 * batch_size, 2 * num_workers))
        for k in todo:
            count_files = len(files[k * shard_size : (k + 1) * shard_size])
            items = [next(loaded) for _ in range(count_files)]
            _encode_shard(out, k, items, vae, shape, batch_size, flip, mean, seed, settings)
            rate = f"{meter.update(count_files):.2f} img/s"
            progress.update(task, advance=count_files, rate=rate)
            plain_log(f"extract: {shard_name(k)} done ({count_files} files, {rate} on rank {rank})")

    state.wait_for_everyone()
    index = None
    if state.is_main_process:
        index = _write_index(out, classes, num_shards, settings, vae_name, image_size, shape, flip, mean)
        print0(f"extract: {index['num_images']} images, {len(index['skipped'])} skipped → {out / INDEX_NAME}")
    state.wait_for_everyone()
    return index if index is not None else json.loads((out / INDEX_NAME).read_text(encoding="utf-8"))


def _encode_shard(out: Path, k: int, items, vae, shape, batch_size, flip, mean, seed, settings) -> None:
    """Encode one shard's images and write it: latents, labels, then the marker (all atomic)."""
    name = shard_name(k)
    good = [(rel, label, arr) for rel, label, arr in items if not isinstance(arr, str)]
    skipped = [{"path": rel, "reason": arr} for rel, _, arr in items if isinstance(arr, str)]
    gen = torch.Generator().manual_seed(_seed_for("dcdit-extract", seed, k))
    num_flips = 2 if flip == "both" else 1
    latents = np.empty((len(good), num_flips, *shape), dtype=np.float16)  # (N, F, C, h, w)
    for start in range(0, len(good), batch_size):
        x = _to_tensor([arr for _, _, arr in good[start : start + batch_size]])  # (B, 3, H, W)
        b = x.shape[0]
        if flip == "both":
            x = torch.cat([x, x.flip(-1)])  # (2B, 3, H, W): originals, then their mirror images
        elif flip == "random":
            bits = torch.rand(b, generator=gen) < 0.5
            x = torch.where(bits[:, None, None, None], x.flip(-1), x)
        z = encode(vae, x, sample=not mean, generator=gen).float().cpu()  # (F·B, C, h, w)
        latents[start : start + b] = z.reshape(num_flips, b, *shape).transpose(0, 1).numpy()
    labels = np.asarray([label for _, label, _ in good], dtype=np.int64)
    write_npy(out / f"{name}.latents.npy", latents)
    write_npy(out / f"{name}.labels.npy", labels)
    marker = {"name": name, "count": len(good), "files": len(items), "skipped": skipped, "settings": settings}
    write_json(out / f"{name}.done.json", marker)


def _write_index(out: Path, classes, num_shards, settings, vae_name, image_size, shape, flip, mean) -> dict:
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
        "format": LATENT_FORMAT,
        "image_size": image_size,
        "latent_shape": list(shape),
        "vae": vae_name,
        "scale": VAE_SCALE,
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
