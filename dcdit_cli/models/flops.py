"""FLOP accounting in the convention of paper Table 1 (docs/reference.md#flop-convention).

FLOPs of one forward are counted on the real model with ``torch.utils.flop_counter``: 2 per
multiply-add for linear, conv and matmul. Attention is counted as H·L²·(4·d_head + 3) per
layer: SDPA runs under the MATH backend so QKᵀ and AV appear as matmuls on every device
(FlopCounterMode counts 0 for the fused CPU kernel, docs/reference.md#flop-counting-on-cpu), and the softmax adds
3 per score. TFLOPs/img = forward × 2 (CFG halves) × (sampling steps − 1).

A DiT forward is counted on the meta device (no memory, no compute). A DC-DiT forward
depends on the kept count M; its cost is exactly quadratic in M (linear layers ∝ M,
attention and smoothing ∝ M², plug-back ∝ L·M), so three counts at M = 1, 2, 3 give the
exact cost at every M, which we sum per sample and per step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from dcdit_cli.common.console import DcditError, print_table
from dcdit_cli.config.recipe import available_recipes, load_recipe
from dcdit_cli.models import build_model
from dcdit_cli.models.dydit import kept_counts, saved_flops


def _softmax_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    return 3 * math.prod(input_shape)


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Both gradients of a convolution cost what its forward costs (same multiply-adds).

    torch's formula builds the weight gradient's count from transposed input and grad-output
    shapes and ignores ``groups``: a 96-channel depthwise 3×3 conv counts 96× too much.
    """
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def _gaussian_blur_flops(grid_shape, kernel_shape, out_shape=None, **kwargs) -> int:
    """The de-chunk smoothing's blur (``dcdit::gaussian_blur``, band-matrix products) costs the two
    depthwise convolutions it equals, 2·(2r + 1) FLOPs per element each: what the convolutions that
    run on larger grids count, so the smoothing counts alike on both sides of the switch."""
    return 2 * 2 * kernel_shape[0] * math.prod(grid_shape)


def _group_scores(q_shape, slots, size: int) -> int:
    """Scores (q·k pairs, all heads) of the attention fallback's padded groups: G·H·m² per group,
    ``slots`` each group's G·m."""
    return sum(size * q_shape[1] * (n // size) ** 2 for n in slots)


def _padded_attention_flops(q_shape, k_shape, v_shape, mask_shape, slots, size, out_shape=None, **kwargs) -> int:
    """``dcdit::padded_attention`` counts as SDPA's math form on its padded groups: QKᵀ and AV at
    2·d per score each and the softmax at 3, H·m²·(4·d + 3) per sample of a group."""
    return _group_scores(q_shape, slots, size) * (4 * q_shape[2] + 3)


def _padded_attention_backward_flops(grad_shape, q_shape, k_shape, v_shape, out_shape_, lse_shape, mask_shape, slots, size,
                                    out_shape=None, **kwargs) -> int:
    """Its backward counts as the math form's: the two gradients of each of the two matrix products
    (8·d per score); the softmax's backward counts 0, as torch's counter counts it."""
    return _group_scores(q_shape, slots, size) * 8 * q_shape[2]


_CUSTOM = {torch.ops.aten._softmax: _softmax_flops, torch.ops.aten._safe_softmax: _softmax_flops,
           torch.ops.aten.convolution_backward: _conv_backward_flops,
           torch.ops.dcdit.gaussian_blur: _gaussian_blur_flops,
           torch.ops.dcdit.padded_attention: _padded_attention_flops,
           torch.ops.dcdit.padded_attention_backward: _padded_attention_backward_flops}


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` in the convention of docs/reference.md#flop-convention."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter, torch.no_grad():
        fn(*args, **kwargs)
    return counter.get_total_flops()


def count_train_flops(fn, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs).backward()`` forward and backward (fn returns a scalar loss)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        fn(*args, **kwargs).backward()
    return counter.get_total_flops()


def _dummy_inputs(model, device, batch: int = 1):
    side, ch = model.config.input_size, model.config.in_channels
    x = torch.zeros(batch, ch, side, side, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    return x, t, y


def build_for_counting(model_cfg, device: str):
    """The model with cheap, deterministic weights (no initialisation cost: FLOPs do not depend on values)."""
    with torch.device("meta"):
        model = build_model(model_cfg)
    if device != "meta":
        model = model.to_empty(device=device)
        for p in model.parameters():
            torch.nn.init.constant_(p, 0.01)
    return model.eval()


def dit_forward_flops(model_cfg) -> int:
    model = build_for_counting(model_cfg, "meta")
    return count_flops(model, *_dummy_inputs(model, "meta"))


@dataclass(frozen=True)
class QuadraticCost:
    """FLOPs of one single-image forward with M kept tokens: a + b·M + c·M²."""

    a: float
    b: float
    c: float

    def __call__(self, m):
        return self.a + self.b * m + self.c * m * m


def _counted_forward(model, m: int) -> FlopCounterMode:
    """One single-image DC-DiT forward with exactly m kept tokens (the first m in raster order), counted."""
    x, t, y = _dummy_inputs(model, "cpu")
    L = (model.config.input_size // model.config.patch_size) ** 2  # tokens the router sees
    boundary = torch.zeros(1, L, dtype=torch.bool)
    boundary[0, :m] = True
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter, torch.no_grad():
        model(x, t, y, boundary=boundary)
    return counter


def forward_flops_at(model, m: int) -> int:
    """FLOPs of one single-image DC-DiT forward with exactly m kept tokens."""
    return _counted_forward(model, m).get_total_flops()


def dcdit_cost(model_cfg, model=None) -> QuadraticCost:
    """The exact per-image forward cost as a function of M, from three counts on the real model."""
    model = model if model is not None else build_for_counting(model_cfg, "cpu")
    f1, f2, f3 = (forward_flops_at(model, m) for m in (1, 2, 3))
    c = (f3 - 2 * f2 + f1) / 2
    b = f2 - f1 - 3 * c
    a = f1 - b - c
    return QuadraticCost(a, b, c)


@dataclass(frozen=True)
class AuthorsDelta:
    """How the authors' ``flop_counter.py`` counts one DC-DiT forward differently from dcdit
    (docs/reference.md#authors-flop-counter). Their smoothing is a bmm over the chunk slots padded
    to the batch's largest kept count: 2·M_max²·D per sample, where dcdit counts its grid
    convolution (``dechunk``, constant in M); and ``residual_proj``, which runs, is outside every
    component they track. Every other component is counted alike."""

    dechunk: float
    residual_proj: float
    hidden_size: int

    def __call__(self, m_max):
        """Authors' count − dcdit's, per sample of a batch whose largest kept count is m_max."""
        return 2.0 * m_max * m_max * self.hidden_size - self.dechunk - self.residual_proj


def authors_delta(model_cfg, model=None) -> AuthorsDelta:
    """Measured on the real model: dcdit's de-chunk and residual_proj FLOPs of one forward."""
    model = model if model is not None else build_for_counting(model_cfg, "cpu")
    counts = _counted_forward(model, 1).get_flop_counts()
    name = type(model).__name__
    dechunk, residual = (sum(counts.get(f"{name}.{part}", {}).values()) for part in ("dechunk", "residual_proj"))
    return AuthorsDelta(float(dechunk), float(residual), model.config.hidden_size)


def static_cost(model_cfg) -> QuadraticCost:
    """Per-sample forward FLOPs of the model without DyDiT's gates, as a function of the inner
    token count M (constant for a DiT): F_static of the FLOPs loss and of the accounting."""
    plain = dataclasses.replace(model_cfg, dynamic="none")
    if plain.kind == "dit":
        return QuadraticCost(dit_forward_flops(plain), 0.0, 0.0)
    return dcdit_cost(plain)


def dynamic_flops(gates: list, config, cost: QuadraticCost) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_dynamic, F_static), each (B,), of one gated forward (its ``stats.gates``; ``config`` the
    model's ModelConfig): the ungated cost at each sample's kept count minus what the gates saved (net
    of the routers' cost); differentiable in the gates' straight-through masks, so the FLOPs loss
    trains the routers."""
    f_static = cost(kept_counts(gates).double()).float()
    return f_static - saved_flops(gates, config), f_static


def tflops_per_image(forward_flops: float, sampling_steps: int) -> float:
    """Paper Table 1: one forward × 2 (CFG) × (steps − 1), in TFLOPs."""
    return forward_flops * 2 * (sampling_steps - 1) / 1e12


def per_image_flops(model_cfg, kept, saved=None) -> np.ndarray:
    """FLOPs each image actually cost: the exact ungated forward cost at its kept count (a DiT's are
    its fixed patch tokens) minus what DyDiT's gates skipped (``saved``, the same shape), summed
    over the sampler steps and CFG halves. ``kept``: (steps, images, halves) or (steps, images)
    counts. The one place that turns kept tokens into FLOPs."""
    kept = torch.as_tensor(np.asarray(kept), dtype=torch.float64)
    kept = kept[..., None] if kept.ndim == 2 else kept  # (steps, images, halves)
    cost = _static_cost_cached(model_cfg)(kept).expand_as(kept)
    if saved is not None and np.size(saved):
        cost = cost - torch.as_tensor(np.asarray(saved), dtype=torch.float64).view_as(kept)
    return cost.sum(dim=(0, 2)).numpy()


def static_delta(model_cfg) -> AuthorsDelta:
    """:func:`authors_delta` of the model without DyDiT's gates; zero for a DiT (counted alike)."""
    plain = dataclasses.replace(model_cfg, dynamic="none")
    return AuthorsDelta(0.0, 0.0, 0) if plain.kind == "dit" else authors_delta(plain)


# Counting builds the model: once per configuration (ModelConfig is frozen, hence hashable).
_static_cost_cached = functools.lru_cache(maxsize=8)(static_cost)
_static_delta_cached = functools.lru_cache(maxsize=8)(static_delta)


def authors_tflops_per_image(model_cfg, kept, saved=None) -> float:
    """TFLOPs/img as the authors' sample.py totals them (docs/reference.md#authors-sample-report):
    each step's forward of the whole batch, both CFG halves in one batch with smoothing padded to
    its largest kept count, summed over every step but the first, divided by the images.
    ``kept``: (steps, images, halves) or (steps, images) counts; ``saved`` what gates skipped."""
    kept = np.asarray(kept, dtype=np.float64)
    kept = kept[..., None] if kept.ndim == 2 else kept  # (steps, images, halves)
    rows = kept.shape[1] * kept.shape[2]
    per_row = _static_cost_cached(model_cfg)(kept)
    if saved is not None and np.size(saved):
        per_row = per_row - np.asarray(saved, dtype=np.float64).reshape(kept.shape)
    per_step = per_row.sum(axis=(1, 2)) + rows * _static_delta_cached(model_cfg)(kept.max(axis=(1, 2)))  # (steps,)
    return float(per_step[1:].sum()) / kept.shape[1] / 1e12


def authors_compression(kept, tokens: int) -> float:
    """Avg CR as the authors' sample.py prints it: per step L·n / Σ M over the n images of the
    conditional half (the first half of the batch), then the geometric mean over all steps."""
    kept = np.asarray(kept, dtype=np.float64)
    cond = kept[..., 0] if kept.ndim == 3 else kept  # (steps, images)
    per_step = tokens * cond.shape[1] / cond.sum(axis=1)
    return float(np.exp(np.log(per_step).mean()))


def table1_tflops(model_cfg, kept, sampling_steps: int, saved=None) -> float:
    """TFLOPs/img in paper Table 1's convention from measured kept counts (and DyDiT's savings):
    the images' mean forward cost × 2 (CFG halves, counted even when guidance is off) ×
    (sampling_steps − 1)."""
    kept = np.asarray(kept)
    forwards = kept.shape[0] * (kept.shape[2] if kept.ndim == 3 else 1)
    return tflops_per_image(float(per_image_flops(model_cfg, kept, saved).mean()) / forwards, sampling_steps)


def param_count(model_cfg) -> int:
    with torch.device("meta"):
        model = build_model(model_cfg)
    return sum(p.numel() for p in model.parameters())


@dataclass
class FlopsRow:
    """One row of `dcdit flops`."""

    recipe: str
    kind: str
    params: int
    tflops_per_img: float
    compression: float
    """Input positions (latent or image pixels) per token of the inner network: a DiT/p has p², a DC-DiT
    P²·L/M with L = (input_size / P)² routed tokens and M kept (P = 1 in the paper, docs/pixels.md)."""
    source: str
    """Where the kept count comes from: 'fixed patchify', 'target N' or 'checkpoint + data'."""
    authors_tflops: float | None = None
    """TFLOPs/img as the authors count them (their flop_counter, and for a checkpoint their sample.py's totals)."""
    authors_compression: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


CONVENTIONS = ("dcdit", "authors")


def check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise DcditError(f"--convention {convention!r}: use one of {', '.join(CONVENTIONS)}")


def flops_row(name: str, recipe, kept_per_step=None, saved_per_step=None, convention: str = "dcdit") -> FlopsRow:
    """One Table-1 row. ``kept_per_step``: a (steps, images, 2 halves) array of kept counts measured
    while sampling with a checkpoint, ``saved_per_step`` what DyDiT's gates skipped there (same
    shape); else the target N is used, and for a gated recipe λ times the ungated cost (Table 4).
    ``convention="authors"`` adds the authors' count beside dcdit's; a measured row always has it."""
    m, steps = recipe.model, recipe.diffusion.sampling_steps
    params = param_count(m)
    kind = m.kind + ("+dydit" if m.dynamic == "dydit" else "")
    L, tokens = m.input_size**2, (m.input_size // m.patch_size) ** 2  # input positions; patch tokens
    if kept_per_step is None:
        kept = tokens if m.kind == "dit" else max(1, round(tokens / m.target_ratio))
        lam = recipe.train.flops_target if m.dynamic == "dydit" else 1.0
        source = ("fixed patchify" if m.kind == "dit" else "target N") + (f" × λ {lam:g}" if lam != 1.0 else "")
        row = FlopsRow(name, kind, params, tflops_per_image(_static_cost_cached(m)(kept) * lam, steps), L / kept, source)
        if convention == "authors":  # every sample at M = L/N: the padded M_max is M
            forward = (_static_cost_cached(m)(kept) + _static_delta_cached(m)(kept)) * lam
            row.authors_tflops, row.authors_compression = tflops_per_image(forward, steps), L / kept
        return row
    kept = np.asarray(kept_per_step, dtype=np.float64)  # (steps, images, halves) or (steps, images)
    source = "checkpoint + data" + (" (gates as run)" if m.dynamic == "dydit" else "")
    return FlopsRow(name, kind, params, table1_tflops(m, kept, steps, saved_per_step), float(L / kept.mean()), source,
                    authors_tflops_per_image(m, kept, saved_per_step), authors_compression(kept, L))


def run_flops(recipes, all_recipes: bool, measured, overrides, as_json: bool, convention: str = "dcdit") -> list[FlopsRow]:
    """What `dcdit flops` does: build the rows, print a rich table or JSON. ``measured``: None or
    (name, recipe, kept counts) from :func:`dcdit_cli.sampling.sampler.measure_kept_tokens`."""
    check_convention(convention)
    rows = []
    if measured is not None:
        name, recipe, kept, saved = measured
        rows.append(flops_row(name, recipe, kept_per_step=kept, saved_per_step=saved))
    names = available_recipes() if all_recipes else list(recipes)
    if not names and measured is None:
        raise DcditError("nothing to count: pass --recipe NAME, --all or --ckpt RUN")
    rows += [flops_row(n, load_recipe(n, overrides), convention=convention) for n in names]
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return rows
    table = Table(title="Parameters and inference cost (paper Table 1 convention: 2 FLOPs/MAC, ×2 CFG, ×(steps−1))")
    authors = any(r.authors_tflops is not None for r in rows)
    columns = ("recipe", "model", "params", "TFLOPs/img", "avg CR") + (("authors' TFLOPs/img", "authors' CR") if authors else ())
    for col in columns + ("kept tokens from",):
        table.add_column(col, justify="left" if col in ("recipe", "model", "kept tokens from") else "right")
    for r in rows:
        theirs = (f"{r.authors_tflops:.4g}", f"{r.authors_compression:.2f}") if r.authors_tflops is not None else ("", "")
        table.add_row(r.recipe, r.kind, f"{r.params / 1e6:.1f}M", f"{r.tflops_per_img:.4g}", f"{r.compression:.2f}",
                      *(theirs if authors else ()), r.source)
    print_table(table)
    return rows
