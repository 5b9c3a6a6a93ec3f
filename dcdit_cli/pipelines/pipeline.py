"""``DCDiTPipeline``: class-conditional sampling of a dcdit model in diffusers' pipeline form.

    pipe = DCDiTPipeline.from_pretrained("out/toy-diffusers")
    out = pipe(class_labels=[0, 3], guidance_scale=4.0, num_inference_steps=25, budget=0.2,
               generator=g, return_boundaries=True)
    out.images, out.boundaries (steps, B, H, W), out.kept (steps, B, halves)

The steps are diffusers' (any scheduler), the model function is dcdit's sampler's
(``diffusion/guidance.py``: CFG, Lite-CFG, kept counts), and the loop is the one ``dcdit sample
--scheduler`` runs (``diffusion/schedulers.py``), so the pipeline and the CLI sample alike.
Learned σ is handled as diffusers' DiTPipeline does (see ``diffusion/schedulers.py``); with
``DDPMScheduler(variance_type="learned_range")`` and ADM's timesteps (``adm_timesteps``) the
pipeline reproduces ``dcdit sample``'s DDPM (tests/test_pipelines.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from dcdit_cli.diffusion.gaussian import randn_like_per_sample
from dcdit_cli.diffusion.guidance import KeptLog, guided_model_fn
from dcdit_cli.diffusion.schedulers import scheduler_sample_loop
from dcdit_cli.pipelines.transformer import DCDiTTransformer2DModel

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class DCDiTPipelineOutput(BaseOutput):
    """``images``: PIL images, or an array / tensor (B, H, W, 3) in [0, 1] (``np``), (B, 3, H, W)
    in [0, 1] (``pt``) or the model-space x_0 (B, C, h, w) (``latent``). With ``return_boundaries``:
    ``boundaries`` (steps, B, h/P, w/P) bool (P = model.patch_size), the tokens the conditional half's
    inner network ran on at each step (None for a DiT baseline), and ``kept`` (steps, B, halves), the
    kept-token counts."""

    images: list | np.ndarray | torch.Tensor
    boundaries: torch.Tensor | None = None
    kept: np.ndarray | None = None


class DCDiTPipeline(DiffusionPipeline):
    """transformer (``DCDiTTransformer2DModel``) + scheduler (any diffusers scheduler) + an optional
    VAE (``AutoencoderKL``: latent models; None: pixel-space models, whose x_0 is the image)."""

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: DCDiTTransformer2DModel, scheduler: SchedulerMixin, vae: AutoencoderKL | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 4.0, num_inference_steps: int = 250, budget: float = 0.0,
                 uncond_budget: float | None = None, generator=None, output_type: str = "pil",
                 return_boundaries: bool = False, timesteps: list[int] | None = None, guided_channels: int = 3,
                 latents: torch.Tensor | None = None, return_dict: bool = True):
        """Samples one image per class label.

        guidance_scale: CFG scale s (≤ 1: no guidance, one forward per step); guided_channels: the
        ε channels CFG guides (DiT's 3; 0: all). budget: the tail-dropping fraction of the
        conditional half; uncond_budget: the unconditional half's (Lite-CFG; None: ``budget``).
        generator: one ``torch.Generator`` or one per image. timesteps: explicit descending
        timesteps for the scheduler (e.g. ADM's, ``diffusion.schedulers.adm_timesteps``).
        latents: the initial noise (B, C, h, w) instead of drawing it.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r}: use one of {', '.join(OUTPUT_TYPES)}")
        network = self.transformer.model
        device = self._execution_device
        y = torch.as_tensor(class_labels, device=device).reshape(-1)  # (B,)
        if ((y < 0) | (y >= network.config.num_classes)).any():
            raise ValueError(f"class_labels must lie in [0, {network.config.num_classes}), got {y.tolist()}")
        shape = (len(y), network.config.in_channels, network.config.input_size, network.config.input_size)
        noise = latents.to(device) if latents is not None else randn_like_per_sample(shape, _per_image(generator, len(y)), device)
        log = KeptLog(record_maps=return_boundaries)
        model_fn = guided_model_fn(network, y, cfg_scale=guidance_scale, budget=budget,
                                   uncond_budget=budget if uncond_budget is None else uncond_budget,
                                   guided_channels=guided_channels, log=log)
        with self.progress_bar(total=num_inference_steps if timesteps is None else len(timesteps)) as bar:
            x0 = scheduler_sample_loop(self.scheduler, model_fn, noise.to(self.transformer.dtype), num_inference_steps,
                                       timesteps=timesteps, generator=generator, on_step=lambda done, total: bar.update())
        images = self._to_output(x0, output_type)
        side = network.config.input_size // network.config.patch_size  # the router's token grid
        boundaries = log.maps_tensor(side) if return_boundaries else None
        kept = log.as_array() if return_boundaries else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, boundaries, kept)
        return DCDiTPipelineOutput(images=images, boundaries=boundaries, kept=kept)

    def _to_output(self, x0: torch.Tensor, output_type: str):
        if output_type == "latent":
            return x0
        if self.vae is not None:  # diffusers' convention: latents were scaled by the VAE's scaling factor
            x0 = self.vae.decode(x0.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        images = (x0.float() / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        return array if output_type == "np" else [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def _per_image(generator, batch: int):
    """The initial noise's generators: one per image as given, else the one generator for every row."""
    if generator is None:
        return [torch.Generator().manual_seed(int(torch.randint(2**62, (1,)))) for _ in range(batch)]
    return generator if isinstance(generator, list) else [generator] * batch
