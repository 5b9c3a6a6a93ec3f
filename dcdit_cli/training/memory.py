"""Peak training memory of a DC-DiT per GPU: a model fitted to measured peaks (`dcdit flops --memory`).

A training step's peak is the static state (fp32 weights, gradients, AdamW's two moments, the EMA
copy) plus the activations the backward pass needs, which grow with the batch. The activations of
one sample are a sum of terms with a fixed number of bytes per element:

    P                    static state, bytes per parameter
    L·e                  the scaffold's narrow res-blocks (L grid tokens, width e)
    L·D                  the wide tensors on the grid: encoder output, router, de-chunk, residual, decoder input
    depth·M·D            the inner blocks' intermediates (M kept tokens)
    M·D                  the chunked tokens, the inner norm, and with checkpointing the one block recomputed
    depth·H·M²           attention scores where the backend materialises them (CPU ``sdpa_pad``; none
                         for flash-attn and varlen, which keep O(M·H))

The bytes per element of each term are fitted by least squares to peaks measured on CPU at reduced
widths (``benchmarks/memory_fit.py``, which prints :data:`COEFFICIENTS`), once per precision and with
and without gradient checkpointing. :func:`measure_peak_bytes` measures a step's peak with
``torch.distributed._tools.mem_tracker.MemTracker``: a dispatch mode that records every tensor
storage the step allocates and frees (parameters, gradients, optimizer state, activations,
temporaries), so the peak is that of live tensors, as ``torch.cuda.max_memory_allocated`` reports it
on a GPU; an allocator's cache and the CUDA context come on top.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import torch
from rich.table import Table
from torch.distributed._tools.mem_tracker import MemTracker

from dcdit_cli.common.console import DcditError, print_table
from dcdit_cli.config.recipe import ModelConfig, load_recipe
from dcdit_cli.models import build_model, checkpoint_blocks
from dcdit_cli.models.flops import param_count

FEATURES = ("P", "L·e", "L·D", "depth·M·D", "M·D", "depth·H·M²")
PRECISIONS = ("no", "bf16")

# Bytes per element of each of FEATURES, fitted by `python benchmarks/memory_fit.py` (CPU, reduced widths).
COEFFICIENTS: dict[tuple[str, bool], tuple[float, ...]] = {  # (precision, checkpointing) → bytes per element
    ("no", False): (17.4, 110.0, 56.34, 117.8, 28.48, 0.5465),
    ("no", True): (18.86, 4.258, 49.83, 3.283, 107.6, 0.3809),
    ("bf16", False): (18.46, 69.72, 53.44, 60.43, 20.18, 0.2854),
    ("bf16", True): (19.08, 9.34, 49.3, 1.758, 33.99, 0.2103),
}

GIB = 2**30


def grid_tokens(m: ModelConfig) -> int:
    """L: the tokens the router sees, (input_size / P)² (P = model.patch_size, docs/pixels.md)."""
    return (m.input_size // m.patch_size) ** 2


def kept_tokens(m: ModelConfig) -> int:
    """The kept count a training step runs at: M = L/N (the ratio loss's target)."""
    return max(1, round(grid_tokens(m) / m.target_ratio))


def features(m: ModelConfig, batch: int, params: int, scores: bool = True) -> np.ndarray:
    """The terms of FEATURES for ``batch`` samples; ``scores``: whether attention keeps its H·M² scores."""
    if m.kind != "dcdit":
        raise DcditError(f"the memory model covers DC-DiT recipes; model.kind = {m.kind!r} is not one")
    L, M, D = grid_tokens(m), kept_tokens(m), m.hidden_size
    per_sample = [L * m.scaffold_width, L * D, m.depth * M * D, M * D, m.depth * m.num_heads * M * M * scores]
    return np.array([params, *(batch * f for f in per_sample)], dtype=np.float64)


def predict_peak_bytes(m: ModelConfig, batch: int, precision: str, checkpointing: bool, scores: bool = False) -> float:
    """Predicted peak bytes of one training step on one device. ``scores=False``: an attention
    backend that keeps no M² scores (flash-attn, varlen: the GPU backends). fp16 stores what bf16 stores."""
    precision = "bf16" if precision == "fp16" else precision
    if precision not in PRECISIONS:
        raise DcditError(f"--precision {precision!r}: use bf16, fp16 or no")
    return float(features(m, batch, param_count(m), scores) @ np.array(COEFFICIENTS[precision, checkpointing]))


def training_step(m: ModelConfig, batch: int, precision: str = "no", checkpointing: bool = False, seed: int = 0):
    """One training step of a model built from ``m`` as a closure (forward, at M = L/N for a DC-DiT,
    backward, AdamW step over the trainable parameters, as the training loop), the model, and what
    lives across steps: the optimizer and the tensors of the model, its EMA copy and the inputs."""
    torch.manual_seed(seed)
    model = build_model(m)
    ema = copy.deepcopy(model).requires_grad_(False)
    if checkpointing:
        checkpoint_blocks(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    side = m.input_size
    x = torch.randn(batch, m.in_channels, side, side)
    t, y = torch.randint(0, 1000, (batch,)), torch.randint(0, m.num_classes, (batch,))
    kwargs = {}
    if m.kind == "dcdit":
        kwargs["boundary"] = torch.zeros(batch, grid_tokens(m), dtype=torch.bool)
        kwargs["boundary"][:, : kept_tokens(m)] = True  # every sample at M = L/N

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, t, y, **kwargs)[0]  # (prediction, router stats or None)
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tensors = [*model.parameters(), *model.buffers(), *ema.parameters(), *ema.buffers(), x, t, y, *kwargs.values()]
    return step, model, (optimizer, *tensors)


def measure_peak_bytes(m: ModelConfig, batch: int, precision: str, checkpointing: bool, seed: int = 0) -> int:
    """Measured peak bytes of one :func:`training_step` on CPU, after a first step has created the
    optimizer state; everything that lives across steps is counted."""
    step, model, state = training_step(m, batch, precision, checkpointing, seed)
    step()
    for p in model.parameters():  # MemTracker hooks every parameter a forward uses, which a frozen one
        p.requires_grad_(True)  # refuses (DiT's position table): its gradient, never stepped, adds T·D
    tracker = MemTracker()
    tracker.track_external(*state)
    with tracker:
        step()
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


@dataclass
class MemoryRow:
    recipe: str
    batch: int
    precision: str
    peak_gib: float
    peak_gib_checkpointing: float
    max_batch: dict
    """card GiB → (largest batch without, with checkpointing)."""


def max_batch(m: ModelConfig, precision: str, checkpointing: bool, card_bytes: float) -> int:
    """The largest per-device batch whose predicted peak fits in ``card_bytes`` (0: not even one)."""
    per_sample = predict_peak_bytes(m, 2, precision, checkpointing) - predict_peak_bytes(m, 1, precision, checkpointing)
    static = predict_peak_bytes(m, 1, precision, checkpointing) - per_sample
    return max(0, int((card_bytes - static) // per_sample))


def memory_row(name: str, recipe, batch: int, precision: str | None, cards_gb) -> MemoryRow:
    m = recipe.model
    precision = precision or recipe.train.mixed_precision
    peaks = [predict_peak_bytes(m, batch, precision, c) / GIB for c in (False, True)]
    fits = {gb: tuple(max_batch(m, precision, c, gb * GIB) for c in (False, True)) for gb in cards_gb}
    return MemoryRow(name, batch, precision, *peaks, fits)


def run_memory(recipes, overrides, batch: int | None, precision: str | None, cards_gb=(80, 192), as_json: bool = False):
    """What `dcdit flops --memory` prints: predicted peak GiB per device, with and without checkpointing."""
    if not recipes:
        raise DcditError("--memory needs --recipe NAME (a DC-DiT recipe), e.g. --recipe xl-n4-512")
    if batch < 1:
        raise DcditError(f"--batch {batch}: give at least 1 sample per GPU, e.g. --batch 32")
    if precision not in (None, "bf16", "fp16", "no"):
        raise DcditError(f"--precision {precision!r}: use bf16, fp16 or no")
    rows = [memory_row(n, load_recipe(n, overrides), batch, precision, cards_gb) for n in recipes]
    if as_json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return rows
    table = Table(title="Predicted peak training memory per device (GiB, live tensors; docs/resolutions.md#memory)")
    for col in ("recipe", "batch", "precision", "peak", "with checkpointing", *(f"max batch in {gb} GiB (plain / ckpt)" for gb in cards_gb)):
        table.add_column(col, justify="left" if col == "recipe" else "right")
    for r in rows:
        table.add_row(r.recipe, str(r.batch), r.precision, f"{r.peak_gib:.1f}", f"{r.peak_gib_checkpointing:.1f}",
                      *(f"{a} / {b}" for a, b in r.max_batch.values()))
    print_table(table)
    return rows
