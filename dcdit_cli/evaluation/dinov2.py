"""DINOv2 ViT-L/14 features for FD-DINOv2, with dgm-eval's protocol (Stein et al., NeurIPS 2023).

FD-DINOv2 is the Fréchet distance of FID computed on DINOv2 features instead of Inception's
(docs/reference.md#fd-dinov2). dgm-eval, the authors' code, fixes what "DINOv2 features" means,
and each step below follows it:

* the network is ``dinov2_vitl14`` (torch hub, LVD-142M weights): built here by timm as its
  ``vit_large_patch14_dinov2`` architecture, which holds the same weights under the same names;
* every image is resized to 224 × 224 with PIL's bicubic filter (torchvision's ``Resize`` on a PIL
  image), so the output is uint8 again, then scaled to [0, 1] and normalised with ImageNet's mean
  and standard deviation;
* the 37 × 37 position embeddings of the 518-pixel pretraining are resized to the 16 × 16 patch
  grid of a 224 input as the hub model does it on every forward: bicubic, no antialiasing, with
  the scale factor (16 + 0.1) / 37;
* the feature is the CLS token after the final LayerNorm (the hub model's output, its head being
  the identity): 1024-d.

The resize runs batched in torch: PIL resizes in two passes (width, then height), each rounded
to uint8; two antialiased bicubic ``interpolate`` passes with the same rounding agree with it to
within 2 grey levels on under 1 % of the pixels (tests/test_dinov2.py checks it against PIL).

Weights are read from a local file or the Hugging Face cache and never downloaded: timm builds the
architecture with ``pretrained=False`` and ``huggingface_hub.try_to_load_from_cache`` only looks
on disk.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache

from dcdit_cli.common.console import DcditError, load_error_reason, print0

DINOV2_WEIGHTS_ENV = "DCDIT_DINOV2_WEIGHTS"
DINOV2_HF_REPO = "timm/vit_large_patch14_dinov2.lvd142m"  # model.safetensors, timm's names
DINOV2_HUB_FILE = "dinov2_vitl14_pretrain.pth"  # torch hub's file, in $TORCH_HOME/hub/checkpoints
DINOV2_TIMM_ARCH = "vit_large_patch14_dinov2"
INPUT_SIZE = 224  # dgm-eval: Resize((224, 224), BICUBIC)
PATCH = 14
HEAD_DIM = 64  # every DINOv2 ViT has 64-d attention heads (ViT-L/14: 1024 = 16 × 64)
POS_EMBED_OFFSET = 0.1  # the hub model's interpolate_offset
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_L = {"embed_dim": 1024, "depth": 24}

_WHERE = (f"pass --dinov2-weights PATH (timm's model.safetensors from hf.co/{DINOV2_HF_REPO}, or the hub's "
          f"{DINOV2_HUB_FILE}), set {DINOV2_WEIGHTS_ENV}=PATH, or fetch it into the Hugging Face cache on a machine "
          f"with internet: `huggingface-cli download {DINOV2_HF_REPO}` (then copy $HF_HUB_CACHE here)")


# -----------------------------------------------------------------------------------------
#                                        Weights
# -----------------------------------------------------------------------------------------


def cached_weights() -> Path | None:
    """The ViT-L/14 weights already on disk: the HF cache (timm's file), else torch hub's checkpoint."""
    cache = os.environ.get("HF_HUB_CACHE") or hf_constants.HF_HUB_CACHE
    hit = try_to_load_from_cache(DINOV2_HF_REPO, "model.safetensors", cache_dir=cache)
    if isinstance(hit, str) and Path(hit).is_file():
        return Path(hit)
    hub = Path(torch.hub.get_dir()) / "checkpoints" / DINOV2_HUB_FILE
    return hub if hub.is_file() else None


def resolve_dinov2_weights(path: str | Path | None = None) -> Path:
    """The weights file from the argument, else $DCDIT_DINOV2_WEIGHTS, else the caches; one line
    saying where to put it otherwise."""
    path = path or os.environ.get(DINOV2_WEIGHTS_ENV)
    if not path:
        found = cached_weights()
        if found is None:
            raise DcditError(f"no DINOv2 ViT-L/14 weights for fd_dinov2: {_WHERE}")
        return found
    path = Path(path).expanduser()
    if not path.is_file():
        raise DcditError(f"DINOv2 weights not found: {path}: {_WHERE}")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch file read with weights_only=True (never unpickled)."""
    try:
        if path.suffix == ".safetensors":
            state_dict = safetensors.torch.load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, unpickling refused, not a weights file
        raise DcditError(f"cannot read DINOv2 weights {path} ({load_error_reason(e)}): {_WHERE}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise DcditError(f"{path} does not hold a state dict of tensors: {_WHERE}")
    return state_dict


def architecture(state_dict: dict[str, torch.Tensor], path: Path) -> dict:
    """timm's ``vit_large_patch14_dinov2`` arguments that fit these weights (ViT-L/14 for the real
    file; smaller widths and depths are read from the shapes, so tests can use a tiny ViT)."""
    if "register_tokens" in state_dict or "blocks.0.mlp.w12.weight" in state_dict:
        raise DcditError(f"{path} is a DINOv2 with registers or SwiGLU (ViT-g), not FD-DINOv2's ViT-L/14: {_WHERE}")
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise DcditError(f"{path} has no {', '.join(missing)}: not a DINOv2 ViT; {_WHERE}")
    embed_dim = state_dict["cls_token"].shape[-1]
    patch = state_dict["patch_embed.proj.weight"].shape[-1]
    if patch != PATCH or embed_dim % HEAD_DIM:
        raise DcditError(f"{path} is a /{patch} ViT of width {embed_dim}, not a DINOv2 /14 with 64-d heads: {_WHERE}")
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    return {"embed_dim": embed_dim, "depth": depth, "num_heads": embed_dim // HEAD_DIM,
            "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim}


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M², D) position embeddings for a grid × grid patch input, as the hub model computes
    them for that input: bicubic, align_corners False, no antialias, scale factor (grid + 0.1) / M."""
    n, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    m = math.isqrt(n)
    if m * m != n:
        raise DcditError(f"DINOv2 position embeddings hold {n} patches, not a square grid: not a DINOv2 ViT")
    if m == grid:
        return pos_embed
    patches = pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    scale = (grid + POS_EMBED_OFFSET) / m
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)  # (1, grid², D)
    return torch.cat([pos_embed[:, :1].float(), patches], dim=1).to(pos_embed.dtype)


# -----------------------------------------------------------------------------------------
#                                        Features
# -----------------------------------------------------------------------------------------


def pil_bicubic_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) float pixels in [0, 255] → (N, 3, size, size), as PIL's ``Image.resize(BICUBIC)``
    on uint8: antialiased bicubic (a = −0.5) along the width, rounded to uint8, then along the height,
    rounded again (PIL clips its intermediate image; a single 2-D pass differs by up to 20 levels)."""
    x = F.interpolate(x, size=(x.shape[2], size), mode="bicubic", antialias=True, align_corners=False)
    x = x.round_().clamp_(0, 255)
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255)


class DinoV2Features:
    """uint8 (N, H, W, 3) images → float32 (N, D) DINOv2 CLS features (dgm-eval's protocol)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], device: str | torch.device | None = None,
                 path: Path = Path("<state dict>")) -> None:
        state_dict = {k: v for k, v in state_dict.items() if k != "mask_token"}  # the hub's, unused here
        arch = architecture(state_dict, path)
        state_dict["pos_embed"] = resize_pos_embed(state_dict["pos_embed"], INPUT_SIZE // PATCH)
        with torch.device("meta"):  # no random init of 300M parameters: the weights replace them
            net = timm.create_model(DINOV2_TIMM_ARCH, pretrained=False, img_size=INPUT_SIZE, num_classes=0, **arch)
        try:
            net.load_state_dict(state_dict, strict=True, assign=True)
        except RuntimeError as e:
            raise DcditError(f"{path} does not fit timm's {DINOV2_TIMM_ARCH} ({str(e).splitlines()[1].strip()}): {_WHERE}") from None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.eval().float().to(self.device)
        self.dim, self.path = arch["embed_dim"], path
        self.is_vit_l = all(arch[k] == v for k, v in VIT_L.items())
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) → normalised float32 (N, 3, 224, 224) on the device."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float()  # (N, 3, H, W) in [0, 255]
        x = pil_bicubic_resize(x, INPUT_SIZE) / 255.0
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        tokens = self.net.forward_features(self.preprocess(images))  # (N, 1 + 256, D), after the final norm
        return tokens[:, 0].float().cpu().numpy()  # the CLS token


def load_dinov2(weights: str | Path | None = None, device: str | torch.device | None = None) -> DinoV2Features:
    """The DINOv2 extractor from a local file, $DCDIT_DINOV2_WEIGHTS or the caches (never a download)."""
    path = resolve_dinov2_weights(weights)
    extractor = DinoV2Features(read_state_dict(path), device, path)
    if not extractor.is_vit_l:
        print0(f"[yellow]{path} is not DINOv2 ViT-L/14 ({extractor.dim}-d features): its FD-DINOv2 is not comparable "
               "with published values[/]")
    return extractor
