"""The Inception network of ADM's evaluator, as torch-fidelity ports it, from local weights only.

* The 2015-12-05 graph as ported by torch-fidelity (``FeatureExtractorInceptionV3``), which does
  the TF1-style bilinear resize to 299 and ``(x - 128) / 128`` itself. Features: ``pool_3``
  (2048-d, FID and precision / recall), the 1008 unbiased logits ``pool_3 · W`` (Inception Score)
  and, for sFID, the first 7 channels of ``mixed_6/conv`` (torch-fidelity's ``Mixed_6d.branch1x1``,
  17×17×7 flattened as h, w, c: 2023-d), taken with a forward hook.
* Weights come from a local file only (``--inception-weights`` or ``DCDIT_INCEPTION_WEIGHTS``),
  read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from dcdit_cli.common.console import DcditError, load_error_reason

INCEPTION_WEIGHTS_ENV = "DCDIT_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"


def resolve_inception_weights(path: str | Path | None = None) -> Path:
    """The weights file from the argument, else $DCDIT_INCEPTION_WEIGHTS; an error saying where
    to get it otherwise."""
    path = path or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if not path:
        raise DcditError(
            f"no Inception weights: download {INCEPTION_WEIGHTS_URL} and pass --inception-weights PATH "
            f"or set {INCEPTION_WEIGHTS_ENV}=PATH"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise DcditError(
            f"Inception weights not found: {path} (download {INCEPTION_WEIGHTS_URL} and pass its path with "
            f"--inception-weights or {INCEPTION_WEIGHTS_ENV})"
        )
    return path


class InceptionFeatures:
    """torch-fidelity's 2015-12-05 Inception: uint8 (N, H, W, 3) batch → pool (N, 2048),
    logits (N, 1008, unbiased: pool_3 · W) and spatial (N, 2023) float32 arrays."""

    def __init__(self, state_dict: dict, device: str | torch.device | None = None) -> None:
        # torch-fidelity reads its weights with torch.load(weights_only=False); hand it a buffer
        # holding only the tensors already read safely with weights_only=True.
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        buf.seek(0)
        try:
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=buf
            )
        except RuntimeError as e:
            raise DcditError(f"the weights are not torch-fidelity's Inception ({str(e).splitlines()[0]}): use {INCEPTION_WEIGHTS_FILE}") from None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.to(self.device)
        self._spatial: torch.Tensor | None = None
        # ADM's sFID layer "mixed_6/conv" = the first 1x1 branch of Mixed_6d (after BN + ReLU).
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._grab_spatial)

    def _grab_spatial(self, module, inputs, output) -> None:
        self._spatial = output[:, :7]  # (N, 7, 17, 17)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images) if images.flags.writeable else images.copy()
        x = torch.from_numpy(images).to(self.device)  # (N, H, W, 3) uint8
        x = x.permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W): the extractor resizes to 299 itself
        pool, logits = self.net(x)
        spatial = self._spatial.permute(0, 2, 3, 1).reshape(len(x), -1)  # (N, 17·17·7), h, w, c as TF
        self._spatial = None
        return {"pool": pool.float().cpu().numpy(), "logits": logits.float().cpu().numpy(), "spatial": spatial.float().cpu().numpy()}


def load_inception(weights: str | Path | None = None, device: str | torch.device | None = None) -> InceptionFeatures:
    """The Inception extractor from a local weights file (argument or $DCDIT_INCEPTION_WEIGHTS)."""
    path = resolve_inception_weights(weights)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, not a torch file
        raise DcditError(f"cannot read Inception weights {path} ({load_error_reason(e)}): download {INCEPTION_WEIGHTS_URL} again") from None
    if not isinstance(state_dict, dict):
        raise DcditError(f"{path} does not hold a state dict: use {INCEPTION_WEIGHTS_FILE}")
    return InceptionFeatures(state_dict, device)
