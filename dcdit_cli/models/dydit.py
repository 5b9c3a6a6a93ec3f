"""DyDiT's dynamic width and dynamic tokens inside DiT blocks (paper §4.5, docs/reference.md#dydit).

DyDiT (Zhao et al. 2024, arXiv 2410.03456) adds three gates to every DiT block:

    TDW  heads  (B, H) = gate(Linear(D → H)(t_emb))   masks the attention heads' outputs
         groups (B, H) = gate(Linear(D → H)(t_emb))   masks the MLP's hidden channels in H groups
    SDT  tokens (B, T) = gate(MLP D → D/16 → ReLU → 1 (x))   on the stream after the attention
                                                            residual: which tokens run the MLP

The width masks depend on the timestep only (not the class), so while sampling they are the
same for every image of a step, both CFG halves included: each block computes them from t_emb
in its forward, and the masked heads and MLP groups are really skipped by slicing the weights. Skipped tokens keep their residual input; at inference
only the selected tokens are gathered into the MLP, so FLOPs and wall time drop.

A gated block returns what it decided (:class:`GateDecisions`) with its output; the model
collects them in its forward's stats object (``stats.gates``), where the FLOPs loss, ``dcdit flops``,
the sampler and the gates figure read them. Nothing is kept on the modules between forwards.

Training (``module.training``): Gumbel-sigmoid with temperature τ = 5 and a straight-through
hard threshold at 0.5, masks multiplied into the dense computation, and the FLOPs loss
(F_dynamic/F_static − λ)² of :func:`flops_loss`. Inference: plain sigmoid > 0.5.

Facts taken from DyDiT's released code (inference: ``dynamic_model.py``, ``models.py``; training:
alibaba-damo-academy/DyDiT ``train.py``, ``loss.py``, see docs/dydit.md for what differs): the
gate function (two Gumbel draws, sigmoid, τ, STE threshold 0.5, no noise and no temperature at
inference); Linear(D → heads) routers on the timestep embedding t_emb (not c); the token MLP
D → D/16 → ReLU → 1 with biases on the un-normalised stream after the attention residual; the
head mask applied to the heads' outputs before ``proj``, the group mask to ``fc1``'s output, the
token mask to the gated MLP branch; router biases 15 (width routers) and 35 (token router) so
that every gate starts on (DyDiT's weights are xavier-uniform; see :meth:`DyDiTGates.initialize_weights`).
Where this code departs from DyDiT's or DyDiT is silent, the choice is marked [choice].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcdit_cli.config.recipe import ModelConfig
from dcdit_cli.models.attention import PackedLayout, varlen_attention
from dcdit_cli.models.dit import DiTBlock, modulate

GATE_TAU = 5.0
"""Gumbel-sigmoid temperature in training (DyDiT)."""
WIDTH_BIAS, TOKEN_BIAS = 15.0, 35.0
"""Initial router biases (DyDiT): sigmoid(15) and sigmoid(35) keep every gate on at the start."""
LAST_LAYER_STD = 1e-4
"""[choice] Initial weight scale of each router's last layer (DyDiT: xavier), see DyDiTGates."""


def gumbel_sigmoid_gate(logits: torch.Tensor, training: bool, tau: float = GATE_TAU) -> torch.Tensor:
    """A 0/1 gate with the straight-through gradient of a Gumbel-sigmoid (DyDiT).

    Training: soft = sigmoid((logits + g₁ − g₂)/τ) with g₁, g₂ ~ Gumbel(0, 1) (their difference is
    Logistic(0, 1), drawn here directly), hard = soft > 0.5, forward value hard, gradient of soft.
    Inference: soft = sigmoid(logits), hard = soft > 0.5, i.e. logits > 0.
    """
    if training:
        u = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logits.float() + torch.log(u) - torch.log1p(-u)) / tau)
    else:
        soft = torch.sigmoid(logits.float())
    hard = (soft > 0.5).float()
    return hard + (soft - soft.detach())  # forward: exactly hard; backward: d soft


@dataclass
class GateDecisions:
    """What one gated block ran in one forward, returned with its output (``stats.gates``; read by the
    FLOPs loss, flops, sample and viz).

    heads, groups (B, H) and tokens (B, T): 0/1 masks (straight-through in training, so the FLOPs
    loss reaches the routers); valid (B, T) bool: real tokens (False for DC-DiT's batch padding).
    """

    heads: torch.Tensor
    groups: torch.Tensor
    tokens: torch.Tensor
    valid: torch.Tensor


class DyDiTGates(nn.Module):
    """The three routers of one block; lives at ``blocks.i.dydit`` so that a plain DiT / DC-DiT
    state dict loads into a gated model with exactly the ``.dydit.`` keys missing."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.head_router = nn.Linear(hidden_size, num_heads)
        self.mlp_router = nn.Linear(hidden_size, num_heads)
        self.token_router = nn.Sequential(
            nn.Linear(hidden_size, hidden_size // 16), nn.ReLU(), nn.Linear(hidden_size // 16, 1)
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DyDiT: xavier-uniform weights, biases 15 / 15 / 35. [choice] The last layer of each router
        starts at N(0, 1e-4²) weights instead, so every gate is on at the start whatever the scale of
        t_emb and of a pretrained model's stream (with xavier weights a trained toy DC-DiT started
        with whole blocks' tokens off), while every router parameter, the token router's first
        layer included, has a gradient from the first step (a zero last layer would block it)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for last in (self.head_router, self.mlp_router, self.token_router[-1]):
            nn.init.normal_(last.weight, std=LAST_LAYER_STD)
        nn.init.constant_(self.head_router.bias, WIDTH_BIAS)
        nn.init.constant_(self.mlp_router.bias, WIDTH_BIAS)
        nn.init.constant_(self.token_router[-1].bias, TOKEN_BIAS)

    def route(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TDW: head and MLP-group masks (B, H) each, from the timestep embedding."""
        return (gumbel_sigmoid_gate(self.head_router(t_emb), self.training),
                gumbel_sigmoid_gate(self.mlp_router(t_emb), self.training))

    def select_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """SDT: (B, T, D) stream after the attention residual → (B, T) 0/1 'runs the MLP'."""
        return gumbel_sigmoid_gate(self.token_router(x).squeeze(-1), self.training)


def _head_rows(index: torch.Tensor, width: int) -> torch.Tensor:
    """Channel indices of the given heads (or MLP groups), each ``width`` channels wide."""
    return (index[:, None] * width + torch.arange(width, device=index.device)).reshape(-1)


class DyDiTBlock(DiTBlock):
    """A DiT block with DyDiT's gates; DiTBlock's parameters and key names are unchanged.

    forward(x, c, layout, t_emb=…, skip_masked=…) → (x, :class:`GateDecisions`): tokens (B, T, D)
    (the DiT baseline) or packed (N, D) with a :class:`~dcdit_cli.models.attention.PackedLayout`
    (DC-DiT: exactly the kept tokens, attention through the layout's variable-length backend, as the
    plain block). The width masks come from t_emb (B, D), the timestep embedding. ``skip_masked``: at
    inference, really skip the masked heads, groups and tokens (False: multiply the masks, as training does).
    """

    gated = True

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.dydit = DyDiTGates(hidden_size, num_heads)

    def forward(self, x: torch.Tensor, c: torch.Tensor, layout: PackedLayout | None = None, *,
                t_emb: torch.Tensor, skip_masked: bool = True) -> tuple[torch.Tensor, GateDecisions]:
        heads, groups = self.dydit.route(t_emb)  # (B, H) each
        sliced = skip_masked and not self.training
        if layout is None:
            return self._forward_tokens(x, c, heads, groups, sliced)
        return self._forward_packed(x, c, layout, heads, groups, sliced)

    def _forward_tokens(self, x, c, heads, groups, sliced: bool) -> tuple[torch.Tensor, GateDecisions]:
        """x (B, T, D), c (B, D) → (B, T, D): the DiT baseline's layout."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, T, D)
        attn = self._sliced_attention(h, heads) if sliced else self._masked_attention(h, heads.unsqueeze(1), None)
        x = x + gate_msa.unsqueeze(1) * attn
        tokens = self.dydit.select_tokens(x)  # (B, T)
        if sliced:
            x = self._gathered_mlp(x, shift_mlp, scale_mlp, gate_mlp, groups, tokens.bool())
        else:
            mlp = self._masked_mlp(modulate(self.norm2(x), shift_mlp, scale_mlp), groups.unsqueeze(1))
            x = x + tokens.unsqueeze(-1).to(x.dtype) * (gate_mlp.unsqueeze(1) * mlp)
        return x, GateDecisions(heads, groups, tokens, valid)  # (B, T, D)

    def _forward_packed(self, x, c, layout: PackedLayout, heads, groups, sliced: bool) -> tuple[torch.Tensor, GateDecisions]:
        """x (N, D) packed kept tokens, c (B, D) → (N, D). Training, and inference batches whose
        samples have different width masks, multiply the masks per token; inference with one width
        mask for the batch (sampling: every image shares t) slices the weights and gathers tokens."""
        mod = layout.per_token(self.adaLN_modulation(c))  # (N, 6D): once per sample, gathered per token
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa  # (N, D)
        head_plan = self._width_plan(heads) if sliced else []
        if len(head_plan) == 1:
            attn = self._active_heads_attention(h, head_plan[0][1], layout)
        else:
            attn = self._masked_attention(h, layout.per_token(heads), layout)
        x = x + gate_msa * attn
        logits = layout.pad(self.dydit.token_router(x).squeeze(-1))  # (B, M_max): one draw per slot
        tokens = gumbel_sigmoid_gate(logits, self.training)  # (B, M_max), padding slots ignored
        run_mlp = layout.unpad(tokens)  # (N,)
        group_plan = self._width_plan(groups) if sliced else []
        if len(group_plan) == 1:
            x = self._gathered_mlp_packed(x, shift_mlp, scale_mlp, gate_mlp, group_plan[0][1], run_mlp.bool())
        else:
            mlp = self._masked_mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp, layout.per_token(groups))
            x = x + run_mlp.unsqueeze(-1).to(x.dtype) * (gate_mlp * mlp)
        return x, GateDecisions(heads, groups, tokens, layout.valid)  # (N, D)

    # --- training path: masks multiply the dense computation --------------------------------

    def _qkv_attention(self, h, weight, bias, n_heads, layout=None):
        """Multi-head attention with the given qkv rows → (..., n_heads·d) before ``proj``: SDPA over
        h (B, T, D), or within each sample of packed h (N, D) through the layout's backend."""
        d = self.attn.head_dim
        q, k, v = F.linear(h, weight, bias).unflatten(-1, (3, n_heads, d)).unbind(-3)  # (..., n_heads, d)
        q, k = self.attn.q_norm(q), self.attn.k_norm(k)
        if layout is not None:
            return varlen_attention(q, k, v, layout).flatten(-2)  # (N, n_heads·d)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, n, T, d)
        return out.transpose(1, 2).flatten(-2)  # (B, T, n_heads·d)

    def _masked_attention(self, h, heads, layout):
        """heads: the head mask per row of h, (B, 1, H) or (N, H)."""
        a = self.attn
        out = self._qkv_attention(h, a.qkv.weight, a.qkv.bias, a.num_heads, layout)  # (..., D)
        mask = heads.to(out.dtype).repeat_interleave(a.head_dim, dim=-1)  # head h → its d channels
        return a.proj(a.norm(out * mask))

    def _masked_mlp(self, h, groups):
        """groups: the MLP-group mask per row of h, (B, 1, H) or (N, H)."""
        m = self.mlp
        hidden = m.fc1(h)  # (..., 4D)
        mask = groups.to(hidden.dtype).repeat_interleave(hidden.shape[-1] // groups.shape[-1], dim=-1)
        return m.drop2(m.fc2(m.norm(m.drop1(m.act(hidden * mask)))))

    # --- inference path: masked heads, groups and tokens are not computed -------------------

    def _width_plan(self, mask: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """[(sample rows or None for all, active indices)] per distinct mask row. While sampling
        every image of a step shares t, so this is one entry and no sample is indexed."""
        rows, inverse = torch.unique(mask.bool(), dim=0, return_inverse=True)
        if rows.shape[0] == 1:
            return [(None, rows[0].nonzero().squeeze(1))]
        return [((inverse == i).nonzero().squeeze(1), row.nonzero().squeeze(1)) for i, row in enumerate(rows)]

    def _sliced_attention(self, h, heads):
        out = torch.empty_like(h)
        for samples, active in self._width_plan(heads):
            o = self._active_heads_attention(h if samples is None else h[samples], active)  # (b, T, D)
            if samples is None:
                return o
            out[samples] = o
        return out

    def _active_heads_attention(self, h, active, layout=None):
        """Attention computed for the ``active`` heads only: their q, k, v rows and ``proj`` columns."""
        a, D = self.attn, h.shape[-1]
        rows = _head_rows(active, a.head_dim)  # (k·d,)
        qkv_rows = torch.cat([rows, rows + D, rows + 2 * D])  # the q, k and v rows of the active heads
        o = self._qkv_attention(h, a.qkv.weight[qkv_rows], a.qkv.bias[qkv_rows], len(active), layout)
        return F.linear(o, a.proj.weight[:, rows], a.proj.bias)

    def _gathered_mlp(self, x, shift, scale, gate, groups, selected):
        """Only the selected tokens (B, T bool) run the MLP, on the active groups' channels."""
        x = x.clone()
        for samples, active in self._width_plan(groups):
            if samples is None:
                chosen = selected
            else:
                chosen = torch.zeros_like(selected)
                chosen[samples] = selected[samples]
            b, t = chosen.nonzero(as_tuple=True)  # (N,) each: the tokens that run the MLP
            x[b, t] = x[b, t] + gate[b] * self._active_groups_mlp(self.norm2(x[b, t]) * (1 + scale[b]) + shift[b], active)
        return x

    def _gathered_mlp_packed(self, x, shift, scale, gate, active, selected):
        """Packed x (N, D) with per-token modulation (N, D) each; only the selected tokens (N,) bool
        run the MLP, on the ``active`` groups' channels (one set for the whole batch)."""
        x = x.clone()
        n = selected.nonzero().squeeze(1)  # the tokens that run the MLP
        x[n] = x[n] + gate[n] * self._active_groups_mlp(self.norm2(x[n]) * (1 + scale[n]) + shift[n], active)
        return x

    def _active_groups_mlp(self, h, active):
        """The MLP on modulated rows h (n, D), computed for the ``active`` hidden groups only."""
        m = self.mlp
        rows = _head_rows(active, m.fc1.out_features // self.attn.num_heads)
        h = m.act(F.linear(h, m.fc1.weight[rows], m.fc1.bias[rows]))  # (n, g·c)
        return F.linear(m.norm(h), m.fc2.weight[:, rows], m.fc2.bias)


#################################################################################
#                       Building gated models and counting                      #
#################################################################################


def add_gates(model: nn.Module) -> nn.Module:
    """Replaces every ``model.blocks[i]`` (a DiTBlock) by a DyDiTBlock holding the same weights.

    The plain model is built first, so its weights are those of ``dynamic = "none"`` with the
    same seed; the gates are initialised after it (all on). Returns the model.
    """
    for i, block in enumerate(model.blocks):
        D, H = block.attn.qkv.in_features, block.attn.num_heads
        gated = DyDiTBlock(D, H, block.mlp.fc1.out_features / D).to(block.attn.qkv.weight.device)
        missing, unexpected = gated.load_state_dict(block.state_dict(), strict=False, assign=True)
        assert not unexpected and all(k.startswith("dydit.") for k in missing), (missing, unexpected)
        assert isinstance(gated.attn.norm, nn.Identity), "head slicing needs an attention without a norm over heads"
        model.blocks[i] = gated
    return model


def block_flops(heads, groups, tokens, valid, dim: int, num_heads: int, mlp_hidden: int) -> torch.Tensor:
    """(B,) FLOPs of one block's attention and MLP with the given masks, docs/reference.md#flop-convention.

    M real tokens (``valid``), h active heads of width d, g active MLP groups of width c, n tokens
    that run the MLP: qkv 2·M·D·3hd + attention h·M²·(4d + 3) + proj 2·M·hd·D + MLP 2·2·n·D·gc.
    Differentiable in the (straight-through) masks. adaLN and norms do not change and are not here.
    """
    d, c = dim // num_heads, mlp_hidden // num_heads
    valid = valid.float()
    M = valid.sum(1)
    h, g, n = heads.float().sum(1), groups.float().sum(1), (tokens.float() * valid).sum(1)
    return 2 * M * dim * 3 * h * d + h * M * M * (4 * d + 3) + 2 * M * h * d * dim + 4 * n * dim * g * c


def gate_overhead_flops(M: torch.Tensor, dim: int, num_heads: int) -> torch.Tensor:
    """(B,) FLOPs of one block's routers: two Linear(D → H) on t_emb, the token MLP on M tokens."""
    r = dim // 16
    return 2 * 2 * dim * num_heads + 2 * M * (dim * r + r)


def saved_flops(gates: list[GateDecisions] | None, config: ModelConfig) -> torch.Tensor | None:
    """(B,) FLOPs the gates saved in one forward (its ``stats.gates``), net of the routers' own cost
    (negative while every gate is on); None for an ungated model."""
    if gates is None:
        return None
    D, H = config.hidden_size, config.num_heads
    hidden = int(D * config.mlp_ratio)  # the blocks' MLP width (DiTBlock)
    total = None
    for g in gates:
        ones = torch.ones_like(g.heads, dtype=torch.float32)
        static = block_flops(ones, ones, torch.ones_like(g.valid, dtype=torch.float32), g.valid, D, H, hidden)
        used = block_flops(g.heads, g.groups, g.tokens, g.valid, D, H, hidden)
        saved = static - used - gate_overhead_flops(g.valid.float().sum(1), D, H)
        total = saved if total is None else total + saved
    return total


def kept_counts(gates: list[GateDecisions]) -> torch.Tensor:
    """(B,) tokens the inner blocks ran on in one forward (DC-DiT's kept count M), from its gates."""
    return gates[0].valid.sum(1)


def flops_loss(dynamic_flops: torch.Tensor, static_flops: torch.Tensor, target: float) -> torch.Tensor:
    """DyDiT's FLOPs loss ((1/B)·Σ_b F_dynamic,b / F_static,b − λ)² over the batch's samples.

    F_static,b is the ungated model's cost on sample b's own kept tokens [choice], so λ is the
    fraction of the DC-DiT's own cost that the gates may spend; with fixed patchify it is a constant.
    """
    return ((dynamic_flops / static_flops).mean() - target) ** 2
