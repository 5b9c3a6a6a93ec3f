"""DC-DiT: a DiT whose fixed patchify is replaced by learned dynamic chunking (paper §3).

    x (B,C,H,W) ─patch stem P + Encoder─▶ h (B,L,D), L = (H/P)² ─Router─▶ p (B,L), boundary = p > 0.5
      ─ChunkLayer─▶ (N = ΣM, D) packed ─+ sin-cos at original (r,c)─▶ DiT blocks ─▶ RMSNorm
      ─DeChunkLayer─▶ (B,L,D) ─× STE(max(p,1−p)) + residual_proj(h)─▶ Decoder (… RMSNorm(e))
      ─▶ FinalLayer ─▶ (B,L,P²·2C) ─pixel-shuffle─▶ [ε | v] (B,2C,H,W)

The de-chunked features are gated by the STE of the router's confidence and the encoder
output is added back through a zero-initialised ``residual_proj`` (H-Net; docs/reference.md#ste-residual).
The inner network runs on exactly the kept tokens, packed over the batch (models/attention.py).

The patch stem (``model.patch_size = P``, docs/pixels.md) lets the router chunk P×P patches of pixels
instead of single latent pixels. It is a pixel-unshuffle, (B, C, H, W) → (B, C·P², H/P, W/P), and
the encoder's own stem conv taking C·P² channels; its inverse is the final layer writing P²·2C
channels per token and a pixel-shuffle. Chosen over a strided P×P conv (DiT's patch embedding)
because it adds no layer: the 3×3 stem conv sees a 3P×3P pixel neighbourhood, like the rest of
the scaffold's convs do at the token grid, and at P = 1 both reshapes are skipped, so the model
is the paper's (and the authors' release) with the same parameter names, shapes and outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcdit_cli.config.recipe import ModelConfig
from dcdit_cli.models.attention import select_backend
from dcdit_cli.models.chunking import ChunkLayer, DeChunkLayer, bucket_radius, keep_at_least_one, raster_to_rc, ste, tail_drop
from dcdit_cli.models.dit import (DiTBlock, FinalLayer, ForwardStats, LabelEmbedder, TimestepEmbedder, initialize_dit_weights,
                                  run_blocks, sincos_2d)
from dcdit_cli.models.norms import RMSNorm
from dcdit_cli.models.routers import force_endpoints, make_router
from dcdit_cli.models.scaffold import Decoder, Encoder


@dataclass
class RouterStats(ForwardStats):
    """What the router (and DyDiT's gates, ``gates``) decided for one forward pass (read by the loss,
    viz-boundaries and flops).

    p (B, L) boundary probabilities; mask (B, L) the router's boundaries before tail dropping
    (what the ratio loss sees); kept (B, L) the tokens the inner network actually ran on;
    num_kept (B,); order (B, M_max) raster index of each chunk slot; valid (B, M_max);
    block_outputs: each inner block's output (B, M_max, D), only when the model's
    forward ran with ``record_blocks=True`` (activation distillation, docs/reference.md#activation-distillation), else None.
    """

    p: torch.Tensor
    mask: torch.Tensor
    kept: torch.Tensor
    num_kept: torch.Tensor
    order: torch.Tensor
    valid: torch.Tensor
    block_outputs: list[torch.Tensor] | None = None

    @property
    def compression(self) -> torch.Tensor:
        """L / M per sample."""
        return self.p.shape[1] / self.num_kept.float()


def as_fraction(budget, batch: int, device) -> torch.Tensor | None:
    """A scalar or per-sample tail-dropping fraction → (B,) float tensor on ``device``, checked in [0, 1),
    or None for a host 0 (or None): nothing to drop, so the forward skips tail dropping.

    A host value (None, a float) is checked on the host and filled on the device: the value travels
    as a kernel argument, so a training or sampling step copies nothing from host memory (a
    ``torch.as_tensor`` of it would be a blocking copy from pageable memory on a GPU,
    tests/test_syncs.py). A tensor (the sampler's per-half budgets, built once on the device) is
    used as it is and checked on the device, without waiting for it.
    """
    if not torch.is_tensor(budget):  # a host value: checked on the host
        value = 0.0 if budget is None else float(budget)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"budget fractions must lie in [0, 1), got {budget}")
        return torch.full((batch,), value, dtype=torch.float32, device=device) if value > 0 else None
    f = budget.to(dtype=torch.float32)
    if f.device != torch.device(device):  # the caller's tensor lives elsewhere: build it on the device to avoid this
        f = f.to(device)
    f = f.expand(batch) if f.ndim == 0 else f
    if f.shape != (batch,):
        raise ValueError(f"budget must be a scalar or have one value per sample ({batch}), got shape {tuple(f.shape)}")
    torch._assert_async(((f >= 0) & (f < 1)).all(), "budget fractions must lie in [0, 1)")
    return f


class DCDiT(nn.Module):
    """DC-DiT built from the recipe's ``[model]`` section, kept as ``self.config``: the one place that
    states the model's options (docs/architecture.md#one-source-for-model-options)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.kind != "dcdit":
            raise ValueError(f"DCDiT needs a model config with kind = 'dcdit', got {config.kind!r}")
        self.config = config
        D, e, eps, groups = config.hidden_size, config.scaffold_width, config.norm_eps, config.norm_groups
        P2 = config.patch_size**2  # the patch stem's channels per input channel (1 in the paper)
        self.out_channels = config.in_channels * 2 if config.learn_sigma else config.in_channels

        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        self.encoder = Encoder(config.in_channels * P2, e, D, config.encoder_blocks, config.cond_adaptor, eps, groups)
        self.router = make_router(config.router, D, config.target_ratio, eps)
        self.chunk = ChunkLayer()
        self.blocks = nn.ModuleList([DiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth)])
        self.inner_norm = RMSNorm(D, eps=eps)
        self.dechunk = DeChunkLayer(config.smoothing_sigma)
        self.residual_proj = nn.Linear(D, D)
        self.decoder = Decoder(e, D, config.decoder_blocks, config.cond_adaptor, eps, groups)
        self.final_layer = FinalLayer(e, self.out_channels * P2, cond_size=D)
        # The sin-cos embedding of every position of the recipe's grid, computed once as the DiT's pos_embed is
        # (a forward on another grid computes its own); not in the state dict, so checkpoints do not change.
        self.register_buffer("pos_table", self.position_table(config.input_size // config.patch_size), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        initialize_dit_weights(self)
        if self.config.init == "torch":  # recipe option, not the paper's: PyTorch's defaults (docs/router-study.md)
            zero = {id(m.adaLN_modulation[-1]) for m in self.modules() if isinstance(m, (DiTBlock, FinalLayer))}
            zero.add(id(self.final_layer.linear))
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)) and id(m) not in zero:
                    m.reset_parameters()
        if hasattr(self.router, "initialize_weights"):
            self.router.initialize_weights()  # cosine: identity W_Q, W_K, averaging k̄ (§3.3); predictive: bias −1.1
        nn.init.zeros_(self.residual_proj.weight)  # docs/reference.md#residual-projection-init: zero, unlike the reference code
        nn.init.zeros_(self.residual_proj.bias)

    def inner_positions(self, order: torch.Tensor, side: int) -> torch.Tensor:
        """Original (row, col) of each chunk slot, on the source grid when upcycling (docs/reference.md#source-grid-positions)."""
        return (raster_to_rc(order, side) + 0.5) * self.config.pos_grid_scale - 0.5  # (B, M, 2)

    def position_table(self, side: int, device=None) -> torch.Tensor:
        """(L, D): the inner network's sin-cos embedding of every position of a side × side grid, in raster order."""
        return sincos_2d(self.inner_positions(torch.arange(side * side, device=device), side), self.config.hidden_size)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C·P², H/P, W/P), channel c·P² + i·P + j = pixel (i, j) of the patch."""
        return F.pixel_unshuffle(x, self.config.patch_size) if self.config.patch_size > 1 else x

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2C·P², H/P, W/P) → (B, 2C, H, W), the inverse of :meth:`patchify`."""
        return F.pixel_shuffle(x, self.config.patch_size) if self.config.patch_size > 1 else x

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, budget=None, boundary=None,
                record_blocks: bool = False, attention: str = "auto", skip_masked: bool = True):
        """x (B, C, H, W), t (B,), y (B,) → (prediction (B, 2C, H, W), RouterStats over L = (H/P)² tokens).

        budget: tail-dropping fraction in [0, 1), a scalar or one per sample (docs/reference.md#tail-dropping).
        boundary: an optional (B, L) bool mask that replaces the router's decision (FLOP
        accounting and analysis). Where it flips the router's decision p becomes 1 − p: the same
        confidence on the forced side of 0.5, so the smoothing, which weighs kept tokens by p, sees
        kept tokens with p > 0.5 as in training. Forcing the router's own decision changes nothing.
        record_blocks: also return every inner block's output in ``RouterStats.block_outputs`` (the
        student side of activation distillation, training/distill.py).
        attention: the variable-length attention backend of the inner network (models/attention.py);
        "auto" picks the best one the device supports (benchmarks compare them).
        skip_masked: DyDiT's gated blocks at inference really skip what their gates turned off
        (False: multiply the masks, as training does); their decisions come back in ``stats.gates``.
        """
        B, side = x.shape[0], x.shape[2] // self.config.patch_size  # side of the token grid
        backend = select_backend(x.device, attention)
        c, t_emb, h, p, mask, kept, sizes = self.route(x, t, y, as_fraction(budget, B, x.device), boundary)
        # The forward's one host synchronisation: N, M_max, the plug-back radius and the attention
        # groups' lengths fix the shapes after it.
        total, m_max, radius, *group_len = sizes.tolist()
        out, order, valid, block_outputs, gates = self.process_kept(
            h, c, t_emb, p, kept, side, [total, m_max, bucket_radius(radius), *group_len], backend, record_blocks,
            skip_masked)
        stats = RouterStats(p=p, mask=mask, kept=kept, num_kept=kept.sum(dim=1), order=order, valid=valid,
                            block_outputs=block_outputs, gates=gates)
        return out, stats

    def route(self, x, t, y, fraction, boundary=None):
        """Everything before the host synchronisation: x (B, C, H, W), t, y (B,), fraction (B,) or None →
        c (B, D), t_emb (B, D), h (B, L, D), p (B, L), mask (B, L), kept (B, L) and the device sizes
        the host reads (:meth:`ChunkLayer.sizes`). One graph under ``torch.compile``
        (:func:`dcdit_cli.models.compile_model`)."""
        side = x.shape[-1] // self.config.patch_size  # side of the token grid
        t_emb = self.t_embedder(t)  # (B, D); DyDiT's width gates see the timestep only
        c = t_emb + self.y_embedder(y)  # (B, D)
        h = self.encoder(self.patchify(x), c)  # (B, L, D)
        p = self.router(h, side)  # (B, L) fp32
        if self.config.force_endpoints:  # the release's p = 1 at raster positions 0 and L − 1
            p = force_endpoints(p)
        mask = keep_at_least_one(p > 0.5, p)  # (B, L)
        if boundary is not None:
            p = torch.where(boundary == mask, p, 1 - p)  # a flipped decision flips p: same confidence
            mask = keep_at_least_one(boundary, p)
        kept = mask if fraction is None else tail_drop(mask, p, fraction)  # (B, L)
        return c, t_emb, h, p, mask, kept, self.chunk.sizes(kept, side, h.shape[-1])

    def process_kept(self, h, c, t_emb, p, kept, side: int, sizes: list[int], backend: str, record_blocks: bool = False,
                     skip_masked: bool = True):
        """Everything after it: chunk, the inner blocks on the N packed kept tokens, de-chunk, decoder,
        with ``sizes`` the host ints [N, M_max, plug-back radius, groups' lengths …] → (prediction
        (B, 2C, H, W), order, valid, block outputs or None, DyDiT's gates). One graph under
        ``torch.compile``, the sizes dynamic (the radius bucketed to a power of two, :func:`bucket_radius`)."""
        B = h.shape[0]
        tokens, order, valid, layout, radius = self.chunk(h, kept, p, backend, sizes)  # (N, D) packed; (B, M_max) × 2
        # One embedding per grid position (L rows, shared by the batch), then each kept token's row.
        table = self.pos_table if self.pos_table.shape[0] == side * side else self.position_table(side, h.device)  # (L, D)
        tokens = tokens + table.index_select(0, layout.unpad(order)).to(tokens.dtype)  # (N, D)
        tokens, gates, outputs = run_blocks(self.blocks, tokens, c, t_emb, layout, skip_masked, record_blocks)  # (N, D)
        block_outputs = [layout.pad(o) for o in outputs] if record_blocks else None  # each (B, M_max, D)
        tokens = self.inner_norm(tokens)

        z = self.dechunk(layout.pad(tokens), order, valid, p, side, radius)  # (B, L, D) fp32
        confidence = torch.maximum(p, 1 - p)  # (B, L)
        z = z.to(h.dtype) * ste(confidence)[..., None].to(h.dtype) + self.residual_proj(h)  # (B, L, D)
        out = self.decoder(z, c, side)  # (B, L, e)
        out = self.final_layer(out, c)  # (B, L, P²·2C)
        out = self.unpatchify(out.transpose(1, 2).reshape(B, -1, side, side))  # (B, 2C, H, W)
        return out, order, valid, block_outputs, gates
