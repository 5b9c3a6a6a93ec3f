"""Experiment trackers through accelerate: the metrics.jsonl scalars and a probe of the router.

accelerate launches every dcdit run, and its trackers (TensorBoard, Weights & Biases, MLflow, Aim,
…) are where researchers follow a run live and compare runs. ``train.log_with`` names them. Each
gets the run name and the resolved recipe as its configuration, and every metrics.jsonl record at
its step: the loop brings those values to the host at its log steps anyway, so logging them adds no
synchronisation. Every ``train.image_every_steps`` rank 0 also runs a :class:`RouterProbe` on the
EMA model, the weights that are sampled from: a sample grid, the boundary maps of a fixed batch,
the histogram of the boundary probability p (H-Net users watch it collapse to 0.5) and the kept
tokens against t. The probe costs one batched forward and one short sampling run; its seconds are
logged beside it (``probe/seconds``). docs/tracking.md lists every name that is logged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from pathlib import Path

import accelerate
import numpy as np
import torch
from accelerate.utils import LoggerType, ProjectConfiguration
from PIL import Image

from dcdit_cli.common.console import DcditError
from dcdit_cli.common.plots import kept_tokens_figure
from dcdit_cli.config.recipe import Recipe
from dcdit_cli.diffusion.gaussian import make_diffusion
from dcdit_cli.models import RouterStats

PACKAGES = {  # tracker → (module it needs, what to pip install)
    "tensorboard": ("tensorboard", "dcdit[tensorboard]"), "wandb": ("wandb", "dcdit[wandb]"),
    "mlflow": ("mlflow", "mlflow"), "aim": ("aim", "aim"), "comet_ml": ("comet_ml", "comet-ml"),
    "clearml": ("clearml", "clearml"), "dvclive": ("dvclive", "dvclive"), "swanlab": ("swanlab", "swanlab"),
    "trackio": ("trackio", "trackio"),
}
PROBE_IMAGES = 8
PROBE_TIMESTEPS = 8
MIN_SIDE = 64
"""Probe images narrower than this are enlarged (nearest neighbour) so that a tracker shows them."""


def check_trackers(names: list[str]) -> None:
    """One line naming what to install for the first tracker that cannot start (before any work)."""
    known = {t.value for t in LoggerType}
    for name in names:
        module, package = PACKAGES[name]
        if name not in known:
            raise DcditError(f"train.log_with: accelerate {accelerate.__version__} has no '{name}' tracker: upgrade "
                             f"accelerate or remove '{name}' from train.log_with / --log-with")
        if importlib.util.find_spec(module) is None:
            raise DcditError(f"train.log_with asks for {name} but {module} is not installed: pip install '{package}', "
                             f"or remove '{name}' from train.log_with / --log-with")


def accelerator_options(recipe: Recipe, out_dir: Path) -> dict:
    """Accelerator(...) arguments: the trackers and their folder, runs/<name>/trackers (none without trackers)."""
    if not recipe.train.log_with:
        return {}
    return {"log_with": list(recipe.train.log_with),
            "project_config": ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(Path(out_dir) / "trackers"))}


def tracker_config(recipe: Recipe, out_dir: Path) -> dict:
    """The recipe as flat ``section.key`` values (lists as text: TensorBoard's hparams take scalars only)."""
    flat = {f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
            for section, values in recipe.to_dict().items() for key, value in values.items()}
    return {**flat, "out": str(out_dir)}


class RouterProbe:
    """The EMA model on one fixed batch: noised at PROBE_TIMESTEPS evenly spaced t in one forward,
    and sampled from fixed noise, so that successive probes differ only by the weights."""

    def __init__(self, recipe: Recipe, dataset, device) -> None:
        n = min(PROBE_IMAGES, len(dataset))
        x0, y, _ = dataset.batch(torch.arange(n), None)  # (n, C, H, W), (n,)
        g = torch.Generator().manual_seed(recipe.run.seed)
        self.x0, self.y = x0.to(device), y.to(device)
        self.noise = torch.randn(x0.shape, generator=g).to(device)  # q(x_t | x_0)'s ε
        self.sampler_seed = recipe.run.seed + 1  # the sampler's x_T and step noise, the same at every probe
        T = recipe.diffusion.num_timesteps
        self.ts = torch.linspace(0, T - 1, PROBE_TIMESTEPS).round().long().to(device)  # (K,)
        self.forward_process = make_diffusion(num_timesteps=T)
        self.sampler = make_diffusion(respacing=str(recipe.diffusion.sampling_steps), num_timesteps=T)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
        """(images HWC uint8, histograms, scalars) by tracker name."""
        start = time.perf_counter()
        n, K = len(self.y), len(self.ts)
        t = self.ts.repeat_interleave(n)  # (K n,)
        x_t = self.forward_process.q_sample(self.x0.repeat(K, 1, 1, 1), t, self.noise.repeat(K, 1, 1, 1))
        _, stats = model(x_t, t, self.y.repeat(K))
        samples = self.sampler.sample_loop(lambda x, s: model(x, s, self.y)[0], self.x0.shape, device=self.x0.device,
                                           generator=torch.Generator().manual_seed(self.sampler_seed))
        images = {"probe/samples": grid(to_unit(samples.cpu()), n)}
        histograms, scalars = {}, {}
        if isinstance(stats, RouterStats):  # a router: DC-DiT (a DiT has none)
            side = self.x0.shape[-1]
            mask = stats.mask.reshape(K, n, 1, side, side).float().cpu()  # the router's boundaries
            shown = 0.35 * to_unit(self.x0.cpu())[None] + 0.65 * mask  # boundaries bright over the dimmed image
            images["probe/boundaries"] = grid(shown.reshape(K * n, -1, side, side), n)
            kept = stats.num_kept.float().reshape(K, n).mean(1).cpu().numpy()  # (K,)
            ts = self.ts.cpu().numpy()
            images["probe/kept_tokens_vs_t"] = np.asarray(kept_tokens_figure(ts, kept, side * side))
            histograms["probe/p"] = stats.p.float().cpu().numpy().reshape(-1)
            scalars = {f"probe/kept_tokens/t{int(s):04d}": float(k) for s, k in zip(ts, kept)}
        scalars["probe/seconds"] = time.perf_counter() - start  # everything above is on the host by now
        return images, histograms, scalars


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) → three channels in [0, 1]: pixels from [−1, 1]; latents (C ≠ 3) by their first
    three channels, each image stretched to its own range (no VAE is loaded during training)."""
    if x.shape[1] == 3:
        return ((x + 1) / 2).clamp(0, 1)
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def grid(x: torch.Tensor, columns: int) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] → one (rows·H', columns·W', 3) uint8 image, enlarged to MIN_SIDE per tile."""
    B, C, H, W = x.shape
    scale = max(1, -(-MIN_SIDE // H))
    x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    rows = -(-B // columns)
    x = torch.cat([x, x.new_ones(rows * columns - B, *x.shape[1:])])
    x = x.reshape(rows, columns, C, H * scale, W * scale).permute(0, 3, 1, 4, 2)
    return (x.reshape(rows * H * scale, columns * W * scale, C) * 255).round().to(torch.uint8).numpy()


class Trackers:
    """What the loop calls: ``log`` at its log steps, ``probe`` after every step (a no-op off cadence)."""

    def __init__(self, accelerator, recipe: Recipe, out_dir: Path, dataset) -> None:
        self.accelerator, self.every = accelerator, recipe.train.image_every_steps
        self.on, self.router_probe = bool(recipe.train.log_with), None
        if not self.on:
            return
        run_id = hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:16]  # a resumed run continues its W&B run
        accelerator.init_trackers("dcdit", config=tracker_config(recipe, out_dir), init_kwargs={
            "wandb": {"name": recipe.run.name, "dir": str(out_dir), "id": run_id, "resume": "allow"}})
        self.router_probe = RouterProbe(recipe, dataset, accelerator.device) if accelerator.is_main_process else None

    def log(self, record: dict, step: int) -> None:
        """A metrics.jsonl record's numbers (host values already): the same names, the same step."""
        if self.on:
            self.accelerator.log({k: v for k, v in record.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}, step=step)

    def probe(self, step: int, ema: torch.nn.Module) -> None:
        if self.router_probe is None or self.every == 0 or step % self.every:  # rank 0 with trackers only
            return
        images, histograms, scalars = self.router_probe(ema)
        self.accelerator.log(scalars, step=step)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                for tag, image in images.items():
                    tracker.writer.add_image(tag, image, step, dataformats="HWC")
                for tag, values in histograms.items():
                    tracker.writer.add_histogram(tag, values, step)
                tracker.writer.flush()
            elif tracker.name == "wandb":
                import wandb  # optional dependency, present when this tracker runs

                tracker.log({**{tag: wandb.Image(Image.fromarray(image)) for tag, image in images.items()},
                             **{tag: wandb.Histogram(values) for tag, values in histograms.items()}}, step=step)
