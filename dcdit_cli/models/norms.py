"""RMSNorm with a written-out backward on CPU (the DC-DiT's encoder, inner and decoder norms).

torch 2.14 runs ``nn.RMSNorm`` on CPU as a fused forward and a composite backward (``pow``,
``mul``, ``div`` and ``sum`` through autograd). On the toy encoder's (8, 256, 96) output its forward
and backward took 1.9× a LayerNorm's time, and 2.3× its own on the transposed view that a
channels-first encoder hands it (``python benchmarks/perf.py norm``, docs/performance.md). The backward
below is the same derivative in three elementwise passes, a sum and a matrix-vector product. The
forward's values are the fused kernel's, bit for bit; only the gradients' rounding differs
(tests/test_norms.py)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _RMSNormCPU(torch.autograd.Function):
    """y = x · r · w with r = 1 / √(mean(x²) + ε) over the last dim; x (..., D) fp32, w (D,)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)  # (..., 1)
        x_hat = x * r  # (..., D)
        ctx.save_for_backward(x_hat, r, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_hat, r, weight = ctx.saved_tensors
        gx = grad * x_hat  # (..., D)
        grad_w = gx.flatten(0, -2).sum(0)  # (D,)
        dot = (gx @ weight)[..., None]  # (..., 1): Σ_d ∂L/∂x̂ · x̂ with ∂L/∂x̂ = grad · w
        # ∂L/∂x = r · (∂L/∂x̂ − x̂ · mean(∂L/∂x̂ · x̂)): the normalisation removes the component along x̂.
        grad_x = (grad * weight).addcmul_(x_hat, dot, value=-1 / x_hat.shape[-1]).mul_(r)
        return grad_x, grad_w, None


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters and state-dict keys) whose CPU fp32 path has the backward above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and len(self.normalized_shape) == 1 and self.weight is not None
                and self.weight.dtype == x.dtype and not torch.compiler.is_compiling()):
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            return _RMSNormCPU.apply(x.contiguous(), self.weight, eps)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
