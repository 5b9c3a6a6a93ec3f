"""Sampling: elastic budgets (tail dropping), CFG and Lite-CFG, PNG grids and ADM .npz files.

Every image has its own generator seeded from (seed, global image index), and its class is
drawn from the same stream, so an image depends only on (checkpoint, seed, index, class,
budgets): the same alone, in a batch of 8, or on another rank of a multi-process run.

CFG follows DiT (REFERENCE §2): the conditional and unconditional halves run as one batched
forward; Lite-CFG gives the unconditional half its own tail-dropping budget.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dcdit_cli.console import DcditError, print0, progress_bar


@dataclass(frozen=True)
class SampleOptions:
    cfg_scale: float = 4.0
    steps: int = 250
    method: str = "ddpm"
    budget: float = 0.0
    uncond_budget: float | None = None
    """Lite-CFG: the unconditional half's budget (None: the same as ``budget``)."""
    guided_channels: int | None = 3
    """CFG on the first N ε channels (DiT: 3); None guides all channels."""
    seed: int = 0


@dataclass
class KeptLog:
    """Kept-token counts per sampler step: a list of (halves, B) tensors."""

    per_step: list = field(default_factory=list)

    def as_array(self) -> np.ndarray:
        """(steps, B, halves)."""
        return torch.stack(self.per_step).permute(0, 2, 1).numpy() if self.per_step else np.zeros((0, 0, 0))


def check_budget(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value < 1.0:
        raise DcditError(f"{name} {value} is outside [0, 1): pass a tail-dropping fraction such as 0.2 (0 keeps every boundary)")


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
    """The sampler's model function: CFG with Lite-CFG budgets in one batched forward."""
    from dcdit_cli.diffusion import classifier_free_guidance

    B = y.shape[0]
    use_cfg = opts.cfg_scale > 1.0
    uncond_budget = opts.budget if opts.uncond_budget is None else opts.uncond_budget
    null = torch.full_like(y, model.num_classes)

    def model_fn(x, t):
        if not use_cfg:
            out, stats = model(x, t, y, budget=opts.budget)
        else:
            budgets = torch.cat([torch.full((B,), opts.budget), torch.full((B,), uncond_budget)]).to(x.device)
            out, stats = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), budget=budgets)
            out = classifier_free_guidance(out, opts.cfg_scale, opts.guided_channels)[:B]
        if stats is not None:
            log.per_step.append(stats.num_kept.detach().cpu().view(-1, B))
        else:  # a DiT runs every patch token, in each CFG half
            tokens = (model.input_size // model.patch_size) ** 2
            log.per_step.append(torch.full((2 if use_cfg else 1, B), tokens))
        return out

    return model_fn


@torch.no_grad()
def sample_batch(model, recipe, indices: list[int], opts: SampleOptions, classes=None, device="cpu", on_step=None):
    """Samples the images with the given global indices → (x0 (B, C, H, W) in model space, labels, KeptLog)."""
    from dcdit_cli.diffusion import make_diffusion

    y = classes_for(indices, recipe.model.num_classes, opts.seed, classes).to(device)
    gens = [torch.Generator().manual_seed(image_seed(opts.seed, i)) for i in indices]
    # Pixel-space runs (shapes, photos) clamp x_0 to [−1, 1] as ADM does; latents are not clamped (DiT).
    diffusion = make_diffusion(str(opts.steps), recipe.diffusion.num_timesteps, clip_denoised=recipe.data.kind != "latents")
    log = KeptLog()
    shape = (len(indices), model.in_channels, model.input_size, model.input_size)
    x0 = diffusion.sample_loop(
        make_model_fn(model, y, opts, log), shape, method=opts.method, generator=gens, device=device, on_step=on_step
    )
    return x0, y.cpu(), log


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, 3, H, W) → uint8 (B, H, W, 3) with the ADM convention clamp(127.5·x + 128)."""
    return (127.5 * images + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Decoder:
    """Model space → pixels: the VAE for latent runs, identity for pixel-space (shapes) runs."""

    def __init__(self, recipe, vae: str | None, device):
        self.vae = None
        if recipe.data.kind == "latents":
            from dcdit_cli.vae import load_vae

            self.vae = load_vae(vae or "stabilityai/sd-vae-ft-ema", device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x
        from dcdit_cli.vae import decode

        return decode(self.vae, x)


def save_grid(images_uint8: np.ndarray, path: Path, nrow: int | None = None) -> Path:
    from PIL import Image

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
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)
    return path


@dataclass
class SampleReport:
    images: int
    kept_tokens: float
    compression: float
    tflops_per_img: float
    seconds: float


def spent_tflops(recipe, kept: np.ndarray, steps: int) -> float:
    """TFLOPs actually spent per image: exact per-sample cost summed over steps (and CFG halves)."""
    from dcdit_cli.flops import dcdit_cost, dit_forward_flops

    if recipe.model.kind == "dit":
        return dit_forward_flops(recipe.model) * steps * kept.shape[2] / 1e12
    cost = dcdit_cost(recipe.model)
    return float(cost(torch.as_tensor(kept, dtype=torch.float64)).sum(dim=(0, 2)).mean()) / 1e12


def summarise(recipe, kept: np.ndarray, steps: int, images: int, seconds: float) -> SampleReport:
    kept_mean = float(kept.mean())
    return SampleReport(images, kept_mean, recipe.model.input_size**2 / kept_mean, spent_tflops(recipe, kept, steps), seconds)


def print_report(r: SampleReport) -> None:
    print0(
        f"{r.images} images in {r.seconds:.1f}s ({r.images / max(r.seconds, 1e-9):.2f} img/s): "
        f"average kept tokens {r.kept_tokens:.1f}, compression {r.compression:.2f}, "
        f"{r.tflops_per_img:.4g} TFLOPs spent per image"
    )


def run_sample(ckpt, num: int, opts: SampleOptions, classes=None, out: Path | None = None, npz: Path | None = None,
               batch_size: int = 16, vae: str | None = None) -> SampleReport:
    """What `dcdit sample` does: a PNG grid, or an ADM .npz sharded over processes."""
    from dcdit_cli.checkpoint import load_weights

    check_budget("--budget", opts.budget)
    check_budget("--uncond-budget", opts.uncond_budget)
    if num < 1:
        raise DcditError(f"--num {num}: sample at least one image")
    if npz is not None:
        return sample_npz(ckpt, num, opts, classes, npz, batch_size, vae)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, recipe, step = load_weights(ckpt, device)
    decoder = Decoder(recipe, vae, device)
    start, images, kept_all = time.perf_counter(), [], []
    with progress_bar("sample") as progress:
        task = progress.add_task("sample", total=num * opts.steps, rate="")
        for lo in range(0, num, batch_size):
            idx = list(range(lo, min(num, lo + batch_size)))

            def on_step(done, total, lo=lo, n=len(idx)):
                progress.update(task, advance=n, rate=_img_rate(start, lo, n, done, total))

            x0, _, log = sample_batch(model, recipe, idx, opts, classes, device, on_step)
            images.append(to_uint8(decoder(x0)))
            kept_all.append(log.as_array())
    report = summarise(recipe, np.concatenate(kept_all, axis=1), opts.steps, num, time.perf_counter() - start)
    grid = save_grid(np.concatenate(images), Path(out or "sample.png"))
    print0(f"wrote {grid} (weights at step {step})")
    print_report(report)
    return report


def _img_rate(start: float, done_before: int, n: int, step: int, total: int) -> str:
    images = done_before + n * step / total
    return f"{images / max(time.perf_counter() - start, 1e-9):.2f} img/s"


def sample_npz(ckpt, num: int, opts: SampleOptions, classes, npz: Path, batch_size: int, vae) -> SampleReport:
    """FID-scale sampling: parts of ``batch_size`` images, rank r takes parts r, r+W, …; each part
    is written atomically and skipped when rerun; rank 0 assembles ``arr_0`` (N, H, W, 3) uint8."""
    from accelerate import PartialState

    from dcdit_cli.checkpoint import load_weights

    state = PartialState()
    model, recipe, step = load_weights(ckpt, state.device)
    decoder = Decoder(recipe, vae, state.device)
    parts_dir = Path(str(npz) + ".parts")
    if state.is_main_process:
        parts_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    n_parts = math.ceil(num / batch_size)
    mine = [k for k in range(state.process_index, n_parts, state.num_processes)]
    todo = [k for k in mine if not (parts_dir / f"part-{k:06d}.npz").exists()]
    start = time.perf_counter()
    with progress_bar("sample npz") as progress:
        task = progress.add_task("sample npz", total=len(todo), rate="")
        for j, k in enumerate(todo):
            idx = list(range(k * batch_size, min(num, (k + 1) * batch_size)))
            x0, labels, log = sample_batch(model, recipe, idx, opts, classes, state.device)
            tmp = parts_dir / f".part-{k:06d}.tmp.npz"
            np.savez(tmp, images=to_uint8(decoder(x0)), labels=labels.numpy(), kept=log.as_array())
            os.replace(tmp, parts_dir / f"part-{k:06d}.npz")
            progress.update(task, advance=1, rate=f"{(j + 1) * batch_size / (time.perf_counter() - start):.2f} img/s")
    state.wait_for_everyone()
    report = None
    if state.is_main_process:
        parts = [np.load(parts_dir / f"part-{k:06d}.npz") for k in range(n_parts)]
        arr = np.concatenate([p["images"] for p in parts])[:num]
        labels = np.concatenate([p["labels"] for p in parts])[:num]
        kept = np.concatenate([p["kept"] for p in parts], axis=1)
        tmp = Path(str(npz) + ".tmp.npz")
        np.savez(tmp, arr_0=arr, arr_1=labels)
        os.replace(tmp, npz)
        report = summarise(recipe, kept, opts.steps, num, time.perf_counter() - start)
        print0(f"wrote {npz}: arr_0 {arr.shape} uint8 (weights at step {step})")
        print_report(report)
        (parts_dir / "done.json").write_text(json.dumps({"num": num, "parts": n_parts}))
    state.wait_for_everyone()
    return report


def measure_kept_tokens(ckpt, num: int = 4):
    """For `dcdit flops --ckpt`: kept counts (steps, images, halves) while sampling with the recipe's settings."""
    from dcdit_cli.checkpoint import load_weights

    model, recipe, _ = load_weights(ckpt)
    opts = SampleOptions(cfg_scale=max(recipe.sample.cfg_scale, 1.0 + 1e-6), steps=recipe.diffusion.sampling_steps,
                         method=recipe.sample.method)
    _, _, log = sample_batch(model, recipe, list(range(num)), opts)
    return f"{recipe.run.name} (ckpt)", recipe, log.as_array()
