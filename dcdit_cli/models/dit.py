"""DiT building blocks and the fixed-patchify DiT baseline.

Follows facebookresearch/DiT ``models.py`` (Peebles & Xie 2023) and docs/reference.md#dit-block: the
state-dict names (``x_embedder.proj``, ``t_embedder.mlp.0``, ``blocks.i.attn.qkv``,
``blocks.i.adaLN_modulation.1``, ``final_layer.linear`` …) are the official checkpoint's,
so an official DiT loads into :class:`DiT` and its blocks into DC-DiT's inner network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import Attention, Mlp, PatchEmbed

from dcdit_cli.config.recipe import ModelConfig
from dcdit_cli.models.attention import PackedLayout, packed_self_attention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x·(1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding layers for timesteps and class labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps: 256-d sinusoidal frequencies → MLP (DiT, from GLIDE)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """[cos | sin] of t·exp(−log(max_period)·k/half), k < half."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class-label table with one extra row (index num_classes) for the CFG null class.

    Label dropout is applied by the training loop (it owns the random stream), so this
    module is a pure lookup.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)  # (B, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning.

    Two token layouts, one set of weights: x (B, T, D) with c (B, D) (the DiT baseline), or
    packed variable-length tokens x (N, D) with a :class:`PackedLayout` (DC-DiT's inner
    network), whose per-sample modulation rows are expanded to one per token and whose
    attention stays within each sample.
    """

    gated = False  # DyDiT's gated subclass (models/dydit.py) also takes t_emb and returns its decisions

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def attend(self, x: torch.Tensor, layout: PackedLayout | None) -> torch.Tensor:
        return self.attn(x) if layout is None else packed_self_attention(self.attn, x, layout)

    def forward(self, x: torch.Tensor, c: torch.Tensor, layout: PackedLayout | None = None) -> torch.Tensor:
        mod = self.adaLN_modulation(c)  # (B, 6D): once per sample, not per token
        mod = mod.unsqueeze(1) if layout is None else layout.per_token(mod)  # (B, 1, 6D) or (N, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attend(self.norm1(x) * (1 + scale_msa) + shift_msa, layout)
        x = x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x  # (B, T, D) or (N, D)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor, t_emb: torch.Tensor,
               layout: PackedLayout | None = None, skip_masked: bool = True, record: bool = False):
    """x through every block → (x, gates, outputs).

    DyDiT's gated blocks (``block.gated``, models/dydit.py) also take the timestep embedding t_emb
    (B, D) and return what they decided: ``gates`` lists it per block, None without gated blocks.
    ``outputs``: each block's output when ``record`` (activation distillation), else None.
    """
    gates, outputs = [], [] if record else None
    for block in blocks:
        if block.gated:
            x, decided = block(x, c, layout, t_emb=t_emb, skip_masked=skip_masked)
            gates.append(decided)
        else:
            x = block(x, c, layout)
        if record:
            outputs.append(x)
    return x, gates or None, outputs


@dataclass(kw_only=True)
class ForwardStats:
    """What one forward decided besides its prediction: DyDiT's gate decisions, one
    :class:`~dcdit_cli.models.dydit.GateDecisions` per block (``gates``, None without gates).
    A DiT returns this; DC-DiT's :class:`~dcdit_cli.models.dcdit.RouterStats` adds the router's."""

    gates: list | None = None


class FinalLayer(nn.Module):
    """LayerNorm (no affine) + adaLN shift/scale + Linear to the output channels."""

    def __init__(self, hidden_size: int, out_features: int, cond_size: int | None = None):
        super().__init__()
        cond_size = cond_size or hidden_size
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_features, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_2d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sin-cos embedding at (row, col) positions (MAE/DiT form).

    positions (..., 2) float as (row, col) → (..., dim): the first dim/2 channels encode
    the column and the second half the row, each as [sin | cos] with ω_k = 10000^(−k/(dim/4)).
    Evaluated on the fly so DC-DiT can embed each kept token at its original position.
    """
    assert dim % 4 == 0, "sin-cos embedding needs a width divisible by 4"
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=positions.device) / quarter)

    def one_axis(coord: torch.Tensor) -> torch.Tensor:
        out = coord.double().unsqueeze(-1) * omega  # (..., dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)  # (..., dim/2)

    emb = torch.cat([one_axis(positions[..., 1]), one_axis(positions[..., 0])], dim=-1)
    return emb.float()


def grid_positions(side: int, device=None) -> torch.Tensor:
    """(side², 2) float (row, col) of a side×side grid in raster order."""
    r, c = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    return torch.stack([r.reshape(-1), c.reshape(-1)], dim=-1).float()


def initialize_dit_weights(module: nn.Module) -> None:
    """DiT's initialisation: xavier-uniform linears, zero biases; embedders N(0, 0.02);
    adaLN modulations and final layers zero (adaLN-Zero)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, LabelEmbedder):
            nn.init.normal_(m.embedding_table.weight, std=0.02)
        elif isinstance(m, TimestepEmbedder):
            nn.init.normal_(m.mlp[0].weight, std=0.02)
            nn.init.normal_(m.mlp[2].weight, std=0.02)
    zero_adaln(module)


def zero_adaln(module: nn.Module) -> None:
    """adaLN-Zero: every block's modulation and the final layer start at zero, so each block starts
    as the identity and the untrained model predicts 0 (DiT)."""
    for m in module.modules():
        if isinstance(m, (DiTBlock, FinalLayer)):
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)


class DiT(nn.Module):
    """The fixed-patchify baseline: patch embed P×P → DiT blocks → final layer → unpatchify.

    Built from the recipe's ``[model]`` section (``kind = "dit"``), kept as ``self.config``: the one
    place that states the model's options (docs/architecture.md#one-source-for-model-options).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.kind != "dit":
            raise ValueError(f"DiT needs a model config with kind = 'dit', got {config.kind!r}")
        self.config = config
        D, P = config.hidden_size, config.patch_size
        self.out_channels = config.in_channels * 2 if config.learn_sigma else config.in_channels
        self.x_embedder = PatchEmbed(config.input_size, P, config.in_channels, D, bias=True)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        # Fixed sin-cos table, a frozen parameter as in the official checkpoint (counted in its 675.1M).
        self.pos_embed = nn.Parameter(sincos_2d(grid_positions(config.input_size // P), D)[None], requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth)])
        self.final_layer = FinalLayer(D, P * P * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        initialize_dit_weights(self)
        w = self.x_embedder.proj.weight.data  # patch embed like nn.Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        self.pos_embed.data.copy_(sincos_2d(grid_positions(self.config.input_size // self.config.patch_size), self.config.hidden_size)[None])

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, P²·C) → (B, C, H, W) with channel index (p·P + q)·C + c."""
        c, p = self.out_channels, self.config.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward_blocks(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Each block's output (B, T, D), in order; the teacher side of activation distillation (docs/reference.md#activation-distillation)."""
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        t_emb = self.t_embedder(t)  # (B, D)
        _, _, outputs = run_blocks(self.blocks, x, t_emb + self.y_embedder(y), t_emb, record=True)
        return outputs

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, budget=None, boundary=None,
                skip_masked: bool = True):
        """x (B, C, H, W), t (B,), y (B,) → (prediction (B, 2C, H, W), ForwardStats).

        ``budget`` and ``boundary`` exist for interface parity with DC-DiT and are ignored.
        ``skip_masked``: DyDiT's gated blocks at inference really skip what their gates turned off
        (False: multiply the masks, as training does).
        """
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D), T = H·W / P²
        t_emb = self.t_embedder(t)  # (B, D); DyDiT's width gates see the timestep only
        c = t_emb + self.y_embedder(y)  # (B, D)
        x, gates, _ = run_blocks(self.blocks, x, c, t_emb, skip_masked=skip_masked)  # (B, T, D)
        x = self.final_layer(x, c)  # (B, T, P²·2C)
        return self.unpatchify(x), ForwardStats(gates=gates)  # (B, 2C, H, W)
