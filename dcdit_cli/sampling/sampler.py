"""Sampling: elastic budgets (tail dropping), CFG and Lite-CFG, PNG grids and ADM .npz files.

Every image has its own generator seeded from (seed, global image index), and its class is
drawn from the same stream, so an image depends only on (checkpoint, seed, index, class,
budgets): the same alone, in a batch of 8, or on another rank of a multi-process run.

CFG follows DiT (docs/reference.md#classifier-free-guidance): the conditional and unconditional halves run as one batched
forward; Lite-CFG gives the unconditional half its own tail-dropping budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image

from dcdit_cli.common.atomic import atomic_path, remove_stale_temps, write_json, write_npz, write_png
from dcdit_cli.common.console import DcditError, print0, progress_bar
from dcdit_cli.config.options import OptionCheck
from dcdit_cli.config.recipe import SampleConfig
from dcdit_cli.data.image_batches import load_samples
from dcdit_cli.data.vae import decode, load_vae
from dcdit_cli.diffusion.gaussian import make_diffusion, randn_like_per_sample
from dcdit_cli.diffusion.guidance import KeptLog, guided_model_fn
from dcdit_cli.diffusion.schedulers import ADM_METHODS, METHODS, make_scheduler, scheduler_sample_loop
from dcdit_cli.models.flops import per_image_flops, tflops_per_image
from dcdit_cli.training.checkpoint import load_weights


@dataclass(frozen=True)
class SampleOptions(SampleConfig):
    """How to sample: the recipe's ``[sample]`` keys (same names, same conventions: uncond_budget
    −1 = as budget, guided_channels 0 = all) plus the sampler's steps and the seed."""

    steps: int = 250
    """Respaced sampler steps (default: the recipe's diffusion.sampling_steps)."""
    seed: int = 0
    """Seed of the per-image noise and classes."""

    @classmethod
    def from_recipe(cls, recipe, **flags) -> "SampleOptions":
        """The recipe's defaults with the flags that were given (None: not given) on top."""
        values = {**dataclasses.asdict(recipe.sample), "steps": recipe.diffusion.sampling_steps}
        values.update({k: v for k, v in flags.items() if v is not None})
        check_sample_options(values)
        if values["steps"] > recipe.diffusion.num_timesteps:
            raise DcditError(f"--steps {values['steps']} exceeds the model's {recipe.diffusion.num_timesteps} diffusion "
                             f"steps (diffusion.num_timesteps): pass --steps between 1 and {recipe.diffusion.num_timesteps}")
        return cls(**values)

    @property
    def uncond(self) -> float:
        """The unconditional half's budget."""
        return self.budget if self.uncond_budget < 0 else self.uncond_budget


def check_sample_options(options: dict, num: int | None = None, batch_size: int | None = None,
                         out: Path | None = None, npz: Path | None = None) -> None:
    """Every problem with the sampling options at once, as one DcditError, before any work:
    ``options`` holds :class:`SampleOptions` fields (None: not given, the recipe's default is
    used and checked when the options are built)."""
    o = {k: options.get(k) for k in ("steps", "cfg_scale", "budget", "uncond_budget", "seed", "method", "guided_channels")}
    check = OptionCheck().count("--num", num).count("--batch-size", batch_size).count("--steps", o["steps"], example=250)
    check.cfg_scale("--cfg-scale", o["cfg_scale"]).fraction("--budget", o["budget"])
    check.fraction("--uncond-budget", None if o["uncond_budget"] == -1.0 else o["uncond_budget"],
                   hint="a fraction such as 0.9 (Lite-CFG), or -1 for the same as --budget")
    check.seed("--seed", o["seed"]).count("sample.guided_channels", o["guided_channels"], least=0, example=3)
    if o["method"] is not None:
        check.choice("--scheduler", o["method"], METHODS)
    check.output("--out", None if npz is not None else out, (".png",)).output("--npz", npz, (".npz",)).done()


def image_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"sample:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def classes_for(indices, num_classes: int, seed: int, classes: list[int] | None) -> torch.Tensor:
    """Given classes cycle over the images; otherwise each image draws its own from its seed."""
    if classes:
        for c in classes:
            if not 0 <= c < num_classes:
                raise DcditError(f"class {c} is outside [0, {num_classes}): pass --classes between 0 and {num_classes - 1}")
        return torch.tensor([classes[i % len(classes)] for i in indices])
    gens = [torch.Generator().manual_seed(image_seed(seed, i) ^ 0x5A5A) for i in indices]
    return torch.stack([torch.randint(num_classes, (1,), generator=g)[0] for g in gens])


def make_model_fn(model, y: torch.Tensor, opts: SampleOptions, log: KeptLog):
    """The sampler's model function for these options (diffusion/guidance.py)."""
    return guided_model_fn(model, y, cfg_scale=opts.cfg_scale, budget=opts.budget, uncond_budget=opts.uncond,
                           guided_channels=opts.guided_channels, log=log)


@torch.no_grad()
def sample_batch(model, recipe, indices: list[int], opts: SampleOptions, classes=None, device="cpu", on_step=None):
    """Samples the images with the given global indices → (x0 (B, C, H, W) in model space, labels, KeptLog)."""
    y = classes_for(indices, recipe.model.num_classes, opts.seed, classes).to(device)
    gens = [torch.Generator().manual_seed(image_seed(opts.seed, i)) for i in indices]
    # Pixel-space runs (shapes, photos) clamp x_0 to [−1, 1] as ADM does; latents are not clamped (DiT).
    clip, T = recipe.data.kind != "latents", recipe.diffusion.num_timesteps
    log = KeptLog()
    model_fn = make_model_fn(model, y, opts, log)
    shape = (len(indices), model.config.in_channels, model.config.input_size, model.config.input_size)
    if opts.method in ADM_METHODS:  # the paper's sampler, dcdit's own
        diffusion = make_diffusion(respacing=str(opts.steps), num_timesteps=T, clip_denoised=clip)
        x0 = diffusion.sample_loop(model_fn, shape, method=opts.method, generator=gens, device=device, on_step=on_step)
    else:  # a diffusers scheduler on the same diffusion and the same per-image noise
        noise = randn_like_per_sample(shape, gens, device)
        x0 = scheduler_sample_loop(make_scheduler(opts.method, T, clip_sample=clip), model_fn, noise, opts.steps,
                                   generator=gens, on_step=on_step)
    return x0, y.cpu(), log


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, 3, H, W) → uint8 (B, H, W, 3) with the ADM convention clamp(127.5·x + 128)."""
    return (127.5 * images + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class ToPixels:
    """Model space → pixels: the VAE for latent runs, identity for pixel-space runs (images, shapes, photos)."""

    def __init__(self, recipe, vae: str | None, device):
        self.vae = None
        if recipe.data.kind == "latents":
            self.vae = load_vae(vae or "stabilityai/sd-vae-ft-ema", device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x

        return decode(self.vae, x)


def save_grid(images_uint8: np.ndarray, path: Path, nrow: int | None = None) -> Path:
    n, h, w, _ = images_uint8.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pad = 2
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images_uint8):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, 256 // max(h, w))  # small (shapes) images are upscaled for a readable grid
    return write_png(path, Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST))


@dataclass
class SampleReport:
    images: int
    kept_tokens: float
    compression: float
    tflops_per_img: float
    """TFLOPs actually spent per image (every sampler step, the CFG halves that ran)."""
    table1_tflops: float
    """The same kept tokens in paper Table 1's convention (× 2 CFG halves × (steps − 1) forwards)."""
    seconds: float
    """Sampling seconds (for a resumed .npz: the parts' own times, summed over processes)."""
    skipped_tflops: float = 0.0
    """TFLOPs per image that DyDiT's gates skipped (net of their routers), already left out of tflops_per_img."""


def summarise(recipe, kept_parts, images: int, seconds: float, saved_parts=None) -> SampleReport:
    """``kept_parts``: (steps, images, halves) kept-token counts, one array per batch of images
    (an iterable, so 50,000 images' counts need not be held at once); ``saved_parts``: what
    DyDiT's gates skipped, the same shapes (None: nothing)."""
    per_image, skipped, kept_sum, kept_n = [], [], 0.0, 0
    for kept, saved in zip(kept_parts, saved_parts or itertools.repeat(None)):
        per_image.append(per_image_flops(recipe.model, kept, saved))
        if saved is not None and np.size(saved):
            skipped.append(np.asarray(saved).sum(axis=(0, 2)))
        kept_sum, kept_n, (steps, _, halves) = kept_sum + float(kept.sum()), kept_n + kept.size, kept.shape
    flops = np.concatenate(per_image)
    kept_mean = kept_sum / kept_n
    table1 = tflops_per_image(float(flops.mean()) / (steps * halves), steps)
    skipped_tflops = float(np.concatenate(skipped).mean()) / 1e12 if skipped else 0.0
    return SampleReport(images, kept_mean, recipe.model.input_size**2 / kept_mean, float(flops.mean()) / 1e12, table1,
                        seconds, skipped_tflops)


def print_report(r: SampleReport) -> None:
    print0(
        f"{r.images} images in {r.seconds:.1f}s ({r.images / max(r.seconds, 1e-9):.2f} img/s): "
        f"average kept tokens {r.kept_tokens:.1f}, compression {r.compression:.2f}, "
        f"{r.tflops_per_img:.4g} TFLOPs spent per image ({r.table1_tflops:.4g} in paper Table 1's convention)"
        + (f" (DyDiT gates skipped {r.skipped_tflops:.4g}, net of their routers)" if r.skipped_tflops else "")
    )


def run_sample(ckpt, num: int, flags: dict | None = None, classes=None, out: Path | None = None,
               npz: Path | None = None, batch_size: int = 16, vae: str | None = None) -> SampleReport:
    """What `dcdit sample` does: a PNG grid, or an ADM .npz sharded over processes. ``flags``:
    the sampling options given on the command line (see :meth:`SampleOptions.from_recipe`)."""
    check_sample_options(flags or {}, num, batch_size, Path(out or "sample.png"), npz)
    if npz is not None:
        return sample_npz(ckpt, num, flags, classes, npz, batch_size, vae)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, recipe, step = load_weights(ckpt, device)
    opts = SampleOptions.from_recipe(recipe, **(flags or {}))
    decoder = ToPixels(recipe, vae, device)
    start, images, kept_all, saved_all = time.perf_counter(), [], [], []
    with progress_bar("sample") as progress:
        task = progress.add_task("sample", total=num * opts.steps, rate="")
        for lo in range(0, num, batch_size):
            idx = list(range(lo, min(num, lo + batch_size)))

            def on_step(done, total, lo=lo, n=len(idx)):
                progress.update(task, advance=n, rate=_img_rate(start, lo, n, done, total))

            x0, _, log = sample_batch(model, recipe, idx, opts, classes, device, on_step)
            images.append(to_uint8(decoder(x0)))
            kept_all.append(log.as_array())
            saved_all.append(log.saved_array())
    report = summarise(recipe, kept_all, num, time.perf_counter() - start, saved_all)
    grid = save_grid(np.concatenate(images), Path(out or "sample.png"))
    print0(f"wrote {grid} (weights at step {step})")
    print_report(report)
    return report


def _img_rate(start: float, done_before: int, n: int, step: int, total: int) -> str:
    images = done_before + n * step / total
    return f"{images / max(time.perf_counter() - start, 1e-9):.2f} img/s"


def _check_parts_stamp(parts_dir: Path, stamp: dict) -> None:
    """Parts are reused only by a rerun of the same sampling: other options → one clear error."""
    path = parts_dir / "options.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != stamp:
            diff = ", ".join(f"{k}: {old.get(k)!r} → {v!r}" for k, v in stamp.items() if old.get(k) != v)
            raise DcditError(f"{parts_dir} holds parts sampled with other settings ({diff}): delete it or write elsewhere (sample: another --npz; eval: another --out)")
    else:
        path.write_text(json.dumps(stamp, indent=1))


def _write_npz_streaming(npz: Path, part_files: list[Path], num: int) -> tuple:
    """ADM's layout (``arr_0`` uint8 (N, H, W, 3), ``arr_1`` labels) written part by part into the
    zip, so the N images are never in memory (not even once). Returns arr_0's shape."""
    with np.load(part_files[0]) as first:
        shape, labels = (num, *first["images"].shape[1:]), []
    with atomic_path(npz) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            left = num
            for part in part_files:
                with np.load(part) as p:
                    images = p["images"][:left]
                    labels.append(p["labels"][: len(images)])
                f.write(np.ascontiguousarray(images).tobytes())
                left -= len(images)
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.concatenate(labels))
    return shape


def _part_array(part_files: list[Path], key: str):
    """One array of every part, read lazily; a part without ``key`` gives zeros shaped like its kept counts."""
    for part in part_files:
        with np.load(part) as p:
            yield p[key] if key in p.files else np.zeros(p["kept"].shape)


def sample_npz(ckpt, num: int, flags: dict | None, classes, npz: Path, batch_size: int, vae) -> SampleReport:
    """FID-scale sampling: parts of ``batch_size`` images, rank r takes parts r, r+W, …; each part
    is written atomically (with its kept-token counts and seconds) and skipped when rerun with the
    same settings; rank 0 streams them into ``arr_0`` (N, H, W, 3) uint8. Returns the report on
    rank 0 (``seconds``: the parts' sampling time, summed), None elsewhere."""
    state = PartialState(cpu=not torch.cuda.is_available())  # without cpu=True, CPU ranks would each run alone
    model, recipe, step = load_weights(ckpt, state.device)
    opts = SampleOptions.from_recipe(recipe, **(flags or {}))
    decoder = ToPixels(recipe, vae, state.device)
    parts_dir = Path(str(npz) + ".parts")
    if state.is_main_process:
        parts_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(parts_dir)
        stamp = {"options": dataclasses.asdict(opts), "num": num, "batch_size": batch_size, "classes": classes,
                 "step": step, "recipe": recipe.run.name}
        _check_parts_stamp(parts_dir, stamp)
    state.wait_for_everyone()
    n_parts = math.ceil(num / batch_size)
    mine = [k for k in range(state.process_index, n_parts, state.num_processes)]
    todo = [k for k in mine if not (parts_dir / f"part-{k:06d}.npz").exists()]
    start = time.perf_counter()
    with progress_bar("sample npz") as progress:
        task = progress.add_task("sample npz", total=len(todo), rate="")
        for j, k in enumerate(todo):
            t0 = time.perf_counter()
            idx = list(range(k * batch_size, min(num, (k + 1) * batch_size)))
            x0, labels, log = sample_batch(model, recipe, idx, opts, classes, state.device)
            write_npz(parts_dir / f"part-{k:06d}.npz", images=to_uint8(decoder(x0)), labels=labels.numpy(), kept=log.as_array(),
                      saved=log.saved_array(), seconds=time.perf_counter() - t0)
            progress.update(task, advance=1, rate=f"{(j + 1) * batch_size / (time.perf_counter() - start):.2f} img/s")
    state.wait_for_everyone()
    report = None
    if state.is_main_process:
        files = [parts_dir / f"part-{k:06d}.npz" for k in range(n_parts)]
        done = parts_dir / "done.json"
        fresh = npz.is_file() and all(f.stat().st_mtime <= npz.stat().st_mtime for f in files)
        if fresh and done.is_file() and json.loads(done.read_text()) == {"num": num, "parts": n_parts}:
            shape = load_samples(npz).shape  # assembled by an earlier run of the same settings
        else:
            shape = _write_npz_streaming(npz, files, num)
        seconds = 0.0
        for part in files:
            with np.load(part) as p:
                seconds += float(p["seconds"]) if "seconds" in p.files else 0.0
        report = summarise(recipe, _part_array(files, "kept"), num, seconds, _part_array(files, "saved"))
        print0(f"wrote {npz}: arr_0 {shape} uint8 (weights at step {step})")
        print_report(report)
        write_json(done, {"num": num, "parts": n_parts})
    state.wait_for_everyone()
    return report


def measure_kept_tokens(ckpt, num: int = 4, classes: list[int] | None = None):
    """For `dcdit flops --ckpt`: kept counts and gate savings (steps, images, halves) while sampling
    the ``num`` images in one batch with the recipe's settings (``classes`` cycle over them)."""
    check_sample_options({}, num=num)
    model, recipe, _ = load_weights(ckpt)
    opts = SampleOptions.from_recipe(recipe, cfg_scale=max(recipe.sample.cfg_scale, 1.0 + 1e-6))
    _, _, log = sample_batch(model, recipe, list(range(num)), opts, classes=classes)
    return f"{recipe.run.name} (ckpt)", recipe, log.as_array(), log.saved_array()
