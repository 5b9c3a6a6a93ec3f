"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``), offline only.

docs/reference.md#vae-latents: latents = ``latent_dist.sample() × 0.18215``; decode ``z / 0.18215``. Weights come
from a local directory or the Hugging Face cache; nothing is ever downloaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from huggingface_hub import constants as hf_constants

from dcdit_cli.common.console import DcditError

VAE_SCALE = 0.18215
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


def _fix(name: str) -> str:
    hub_id = name if "/" in name and not Path(name).is_absolute() and not name.startswith(".") else DEFAULT_VAE
    return (
        f"on a machine with internet run `huggingface-cli download {hub_id} --local-dir vae/`, "
        "copy vae/ here and pass `--vae vae/`"
    )


def load_vae(name_or_path: str, device: str | torch.device = "cpu"):
    """An ``AutoencoderKL`` in eval mode without gradients, from a local directory or the HF cache.

    A directory must hold ``config.json`` (or a ``vae/`` subfolder that does, as in a full
    Stable Diffusion pipeline). A hub id such as ``stabilityai/sd-vae-ft-ema`` is resolved with
    ``local_files_only=True``.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    kwargs: dict = {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            if (path / "vae" / "config.json").is_file():
                kwargs["subfolder"] = "vae"
            else:
                raise DcditError(f"VAE directory {path} has no config.json (not a diffusers AutoencoderKL): {_fix(name)}")
        source = str(path)
    elif path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise DcditError(f"VAE {name} not found (expected a diffusers directory with config.json): {_fix(name)}")
    else:
        source = name  # a hub id: the local cache only
    try:
        with warnings.catch_warnings():  # diffusers passes a deprecated hub argument; not the user's concern
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            vae = AutoencoderKL.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        where = f"in the Hugging Face cache ({_hf_cache()})" if source == name and not path.is_dir() else f"at {source}"
        raise DcditError(f"VAE {name} could not be loaded {where}, and nothing is downloaded: {_fix(name)}") from exc
    return vae.to(device).eval().requires_grad_(False)


def _hf_cache() -> str:
    return str(hf_constants.HF_HUB_CACHE)  # read at call time: HF_HUB_CACHE may change after import


def latent_shape(vae, image_size: int) -> tuple[int, int, int]:
    """(C, h, w) of the latents of a square ``image_size`` image (8× smaller for the SD VAE)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise DcditError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {factor}: use e.g. 256")
    return (int(vae.config.latent_channels), image_size // factor, image_size // factor)


@torch.no_grad()
def encode(vae, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] → scaled latents (B, C, H/8, W/8): posterior sample, or mean."""
    dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mode()
    return z * VAE_SCALE


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, C, h, w) → images (B, 3, 8h, 8w) clamped to [-1, 1]."""
    images = vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / VAE_SCALE).sample
    return images.clamp(-1.0, 1.0)
