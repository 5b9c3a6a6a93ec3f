"""Attention over packed variable-length sequences: the DC-DiT inner network runs on exactly
the kept tokens (the authors' code does the same with flash-attn's varlen kernel).

The B samples' kept tokens are concatenated into one (N, D) tensor, N = Σ M_b, described by a
:class:`PackedLayout`. Everything in a DiT block except attention is per token, so it runs on
the packed tensor directly; attention runs over each sample's own tokens through one of these
backends, chosen by :func:`select_backend` (and recorded in a run's ``env.json``):

- ``varlen``: PyTorch's native ``torch.nn.attention.varlen.varlen_attn`` (CUDA builds that have it);
- ``flash``: flash-attn's ``flash_attn_varlen_func`` (``pip install dcdit[flash]``, CUDA);
- ``sdpa_pad``: the portable fallback (CPU, ROCm, MPS): the samples are sorted by kept count and
  split into groups of about four (:meth:`PackedLayout.groups`; at least two, so a Lite-CFG
  unconditional half is not padded to the conditional one), or on CPU each sample alone where its
  attention is large (:func:`samples_alone`); q, k, v are each gathered once into
  the groups' padded slots and split into one padded (G, H, m, d) batch per group, m its longest
  length, SDPA runs with a key-padding mask, and the rows are gathered back; only attention pays
  for padding, the linear layers do not;
- ``sdpa_blockdiag``: SDPA over all N tokens with a block-diagonal mask (N² scores, B× the work).

On CPU ``sdpa_pad`` is the faster portable one (``benchmarks/perf.py attention``), so it is the
fallback. ``flex_attention`` with a document mask was considered: torch 2.14 has no CPU backward
for it, so it cannot train there.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("varlen", "flash", "sdpa_pad", "sdpa_blockdiag")
FALLBACK = "sdpa_pad"
# The fallback pads a group of several samples up to the next multiple of PAD_MULTIPLE, except a
# length 1–4 past a multiple of 2·PAD_MULTIPLE, which it leaves: on this project's AVX-512 CPU the
# flash kernel runs a multiple of 8 faster than the lengths below it, but a length just past a
# multiple of 16 about as fast as the next multiple of 8 or faster (`python benchmarks/perf.py
# attention --lengths`, toy and B width, docs/performance.md). A lone sample needs no padding and
# gets none, so a one-sample forward (what models/flops.py counts) does exactly its own work.
PAD_MULTIPLE = 8
# On CPU the fallback runs every sample as its own group (no padding) once one sample's attention is
# large: about width · tokens² of work, with the grid's token count as its bound. Grouping saves a
# kernel call per sample, a fixed cost, and pays for padding, about a fifth of the kernel's time. With
# 8 samples kept at L/4 ± 30 % (`python benchmarks/perf.py attention --grouping --sides 16 32`,
# docs/performance.md), groups of four win at width 96 on a 16² grid (6.3·10⁶ of work); from width
# 384 on a 16² grid (2.5·10⁷) up, samples alone take 0.82–0.97× their time.
ALONE_WORK = 2**24


def padded_length(longest: torch.Tensor) -> torch.Tensor:
    """The length a group of several samples is padded to (see above), from its longest sample's, on
    the device: the host reads the result with the forward's other sizes, so a compiled graph gets it
    as a plain size and holds no guard on the rule."""
    up = torch.div(longest + PAD_MULTIPLE - 1, PAD_MULTIPLE, rounding_mode="floor") * PAD_MULTIPLE
    past = longest % (2 * PAD_MULTIPLE)  # how far past a multiple of 16
    return torch.where((past >= 1) & (past <= PAD_MULTIPLE // 2), longest, up)


@dataclass
class PackedLayout:
    """Where each of the N packed tokens sits.

    cu_seqlens (B + 1,) int32: sample b owns packed rows cu_seqlens[b]:cu_seqlens[b + 1];
    max_len: the largest M_b (a host int: the forward's one synchronisation);
    sample (N,) int64: the sample of each packed row; slot (N,) int64: its index in the
    flattened (B, max_len) padded layout; valid (B, max_len): real slots of that layout;
    group_len: the samples sorted by kept count and split into len(group_len) groups of equal size
    (:meth:`groups`), the length each is padded to (:meth:`sorted_group_len`; host ints, read with
    the others).

    For the padded fallback (``sdpa_pad``, built for every backend that can fall back to it): the groups'
    padded slots, group after group, each group's G samples one after another: ``padded_rows`` (S,)
    holds the packed row of each slot (a sample's last row in its padding slots, which ``padded_valid``
    (S,) marks False), S = Σ_g G·group_len[g]; ``from_groups`` (N,) is each packed row's slot.
    :attr:`group_rows` and :attr:`group_valid` view them group by group, (G, m) each.
    """

    cu_seqlens: torch.Tensor
    max_len: int
    sample: torch.Tensor
    slot: torch.Tensor
    valid: torch.Tensor
    backend: str = FALLBACK
    group_len: tuple[int, ...] = ()
    padded_rows: torch.Tensor | None = None
    padded_valid: torch.Tensor | None = None
    from_groups: torch.Tensor | None = None

    @staticmethod
    def groups(batch: int, alone: bool = False) -> int:
        """How many equal groups the padded fallback splits a batch into, its samples sorted by kept
        count: one per sample when ``alone`` (:func:`samples_alone`), else about four samples each
        (fewer groups pad more, more groups call SDPA more often; `python benchmarks/perf.py
        attention`), and at least two when the batch is even, so that the unconditional half of a
        Lite-CFG batch, which keeps fewer tokens, is padded apart."""
        most = batch if alone else max(2, batch // 4)
        return max(k for k in range(1, min(batch, most) + 1) if batch % k == 0)

    @staticmethod
    def sorted_group_len(counts: torch.Tensor, alone: bool = False) -> torch.Tensor:
        """counts (B,) kept tokens per sample → (groups,) the length each group is padded to, on the
        device: its largest count, through :func:`padded_length` when the group has several samples."""
        groups = PackedLayout.groups(counts.shape[0], alone)
        longest = counts.sort().values.view(groups, -1)[:, -1]
        return padded_length(longest) if counts.shape[0] > groups else longest

    @classmethod
    def from_valid(cls, valid: torch.Tensor, total: int, backend: str = FALLBACK, group_len=None,
                   alone: bool = False) -> "PackedLayout":
        """From the padded validity mask (B, M_max) whose rows are left-aligned, N = valid.sum(), and
        the groups' lengths (None: read them from ``valid``, a host synchronisation, with ``alone`` as
        in :meth:`groups`)."""
        B, m_max = valid.shape
        flat = valid.flatten()
        # Row r of the packed tensor is the r-th True of ``flat``; False entries go to a dump row.
        dest = torch.where(flat, flat.cumsum(0) - 1, total)
        slot = torch.zeros(total + 1, dtype=torch.long, device=valid.device)
        slot = slot.scatter_(0, dest, torch.arange(flat.numel(), device=valid.device))[:total]  # (N,)
        counts = valid.sum(dim=1)
        cu = F.pad(counts.cumsum(0), (1, 0))  # (B + 1,)
        if group_len is None:
            group_len = cls.sorted_group_len(counts, alone).tolist()
        sample = torch.div(slot, m_max, rounding_mode="floor")
        layout = cls(cu.to(torch.int32), m_max, sample, slot, valid, backend, tuple(group_len))
        if backend != "sdpa_blockdiag":  # the fallback's groups (also the flash kernels' fallback in fp32)
            layout.padded_rows, layout.padded_valid, layout.from_groups = _padded_groups(counts, cu, sample, slot - sample * m_max,
                                                                                        group_len)
        return layout

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def group_size(self) -> int:
        """G: samples per group of the padded fallback."""
        return self.batch // len(self.group_len)

    @property
    def group_slots(self) -> list[int]:
        """Slots of each padded group, G·m: how :attr:`padded_rows` splits into groups."""
        return [self.group_size * m for m in self.group_len]

    @property
    def group_rows(self) -> tuple[torch.Tensor, ...]:
        """Each group's padded rows (G, m), views of :attr:`padded_rows`."""
        return tuple(r.view(self.group_size, -1) for r in self.padded_rows.split(self.group_slots))

    @property
    def group_valid(self) -> tuple[torch.Tensor, ...]:
        """Each group's real slots (G, m), views of :attr:`padded_valid`."""
        return tuple(ok.view(self.group_size, -1) for ok in self.padded_valid.split(self.group_slots))

    def per_token(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-sample rows (B, ...) → one per packed token (N, ...)."""
        return rows.index_select(0, self.sample)

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """(N, ...) → (B, max_len, ...), zeros in the padding slots (memory only, no compute)."""
        out = packed.new_zeros((self.batch * self.max_len, *packed.shape[1:]))
        return out.index_copy(0, self.slot, packed).view(self.batch, self.max_len, *packed.shape[1:])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, max_len, ...) → (N, ...)."""
        return padded.flatten(0, 1).index_select(0, self.slot)


def samples_alone(device: torch.device, width: int, tokens: int) -> bool:
    """Whether the padded fallback runs each sample as its own group, for a model of ``width`` on a
    grid of ``tokens``: on CPU once width · tokens² reaches :data:`ALONE_WORK`. Elsewhere (ROCm, MPS,
    not measured) the groups stay: on a GPU a kernel call costs more next to the kernel's work."""
    return device.type == "cpu" and width * tokens**2 >= ALONE_WORK


def _padded_groups(counts, cu, sample, position, group_len):
    """The fallback's padded slots (see :class:`PackedLayout`): rows (S,), valid (S,), from_groups (N,),
    built on the device from the host's group lengths: no host-to-device copy. counts (B,),
    cu (B + 1,), sample and position (N,)."""
    B = counts.shape[0]
    size = B // len(group_len)
    order = counts.argsort(stable=True)  # (B,) samples by kept count
    rows, masks, starts = [], [], []
    offset = 0
    for g, m in enumerate(group_len):
        members = order[g * size : (g + 1) * size]  # (G,)
        j = torch.arange(m, device=counts.device)
        n = counts[members, None]  # (G, 1)
        rows.append((cu[members, None] + torch.minimum(j, n - 1).clamp(min=0)).flatten())  # (G·m,)
        masks.append((j < n).flatten())
        starts.append(offset + m * torch.arange(size, device=counts.device))  # (G,) first padded slot of each member
        offset += size * m
    start = torch.empty_like(order).scatter_(0, order, torch.cat(starts))  # (B,)
    return torch.cat(rows), torch.cat(masks), start[sample] + position


#################################################################################
#                                   Backends                                    #
#################################################################################


def _groups(padded: torch.Tensor, slots: list[int], size: int) -> list[torch.Tensor]:
    """The padded slots (S, H, ...) → each group's padded batch (G, H, m, ...), views; ``slots`` the
    groups' G·m (:attr:`PackedLayout.group_slots`), G = ``size``."""
    return [a.view(size, -1, *padded.shape[1:]).transpose(1, 2) for a in padded.split(slots)]


def _flat(groups: list[torch.Tensor]) -> torch.Tensor:
    """The groups' (G, H, m, ...) → the padded slots (S, H, ...), group after group: one copy."""
    return torch.cat([g.transpose(1, 2).flatten(0, 1) for g in groups])


def _key_padding(valid: torch.Tensor, slots: list[int], size: int) -> list[torch.Tensor]:
    """valid (S,) (or the additive mask of :func:`_additive`) → each group's key-padding mask (G, 1, 1, m), views."""
    return [m.view(size, 1, 1, -1) for m in valid.split(slots)]


def _additive(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """valid (S,) → the additive mask the CPU flash kernels take, in the query's dtype: 0 at real keys,
    −inf at padding."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))


class _SlotGather(torch.autograd.Function):
    """x[index] along dim 0, between packed rows (N, ...) and a layout's padded slots (S, ...), with a
    gather for its backward too: ``back`` picks each input row's gradient, ``keep`` (optional) zeroes
    gradient rows.

    Packed → slots (index ``padded_rows``, back ``from_groups``): a padding slot repeats a real row,
    and the exact gradient of that row also sums the padding slots'. Masked attention gives a padding
    slot exactly zero gradient (its query gets no output gradient, its key and value zero weight), so
    the row's gradient is its own slot's. Slots → packed (index ``from_groups``, back ``padded_rows``,
    keep ``padded_valid``): the padding slots get none. Autograd's index_select backward would be a
    scatter-add instead."""

    @staticmethod
    def forward(x, index, back, keep):
        return x.index_select(0, index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[2:])

    @staticmethod
    def backward(ctx, grad):
        back, keep = ctx.saved_tensors
        grad = grad.index_select(0, back)
        return grad if keep is None else grad * keep.view(-1, *[1] * (grad.dim() - 1)), None, None, None


def to_slots(packed: torch.Tensor, layout: "PackedLayout") -> torch.Tensor:
    """Packed (N, H, d) → the layout's padded slots (S, H, d) (a sample's last row in its padding slots)."""
    return _SlotGather.apply(packed, layout.padded_rows, layout.from_groups, None)


def from_slots(padded: torch.Tensor, layout: "PackedLayout") -> torch.Tensor:
    """The padded slots (S, H, d) → packed (N, H, d): each row from its own slot."""
    return _SlotGather.apply(padded, layout.from_groups, layout.padded_rows, layout.padded_valid)


@torch.library.custom_op("dcdit::padded_attention", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, slots: list[int],
                     size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v (S, H, d) in a :class:`PackedLayout`'s padded slots → (output (S, H, d), logsumexp (S, H)):
    attention within each sample, the samples in the layout's groups (``slots`` each group's share of
    S, ``size`` = G), ``mask`` (S,) its key padding (:func:`_additive` on CPU, the bools elsewhere).

    The fallback under torch.compile, which does not look into it: its inputs, outputs and saved
    tensors are flat, so no stride depends on a group's length (:func:`_sdpa_pad` says why that
    matters), and the gathers around it are the compiler's. On CPU it is the flash kernel, whose
    logsumexp lets the backward be the flash backward; elsewhere SDPA, and the logsumexp is empty (the
    backward recomputes the weights).
    """
    cpu = q.device.type == "cpu"
    outs, lses = [], []
    for qp, kp, vp, m in zip(*(_groups(a, slots, size) for a in (q, k, v)), _key_padding(mask, slots, size)):
        if cpu:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qp, kp, vp, attn_mask=m)  # lse (G, H, m) fp32
            lses.append(lse)
        else:
            out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=m)
        outs.append(out)
    return _flat(outs), _flat(lses) if lses else q.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("dcdit::padded_attention_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def padded_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                              lse: torch.Tensor, mask: torch.Tensor, slots: list[int],
                              size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`padded_attention` with respect to q, k, v (S, H, d), from the output's (S, H, d),
    zero at the padding slots (:func:`from_slots`). On CPU the flash backward from the saved output and
    logsumexp; elsewhere the attention weights are recomputed (:func:`_recomputed_grads`)."""
    groups = zip(*(_groups(a, slots, size) for a in (grad, q, k, v)), _key_padding(mask, slots, size))
    if q.device.type == "cpu":
        grads = [torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            gp, qp, kp, vp, op, lp.contiguous(), 0.0, False, attn_mask=m)
            for (gp, qp, kp, vp, m), op, lp in zip(groups, _groups(out, slots, size), _groups(lse, slots, size))]
    else:
        grads = [_recomputed_grads(*group) for group in groups]
    return tuple(_flat(list(a)) for a in zip(*grads))


def _recomputed_grads(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked attention's gradients with respect to q, k, v (G, H, m, d) from the output's gradient g,
    the weights P recomputed (where no flash kernel kept a logsumexp); valid (G, 1, 1, m) marks real keys:
    dv = Pᵀ g, dS = P ⊙ (g vᵀ − rowsum(g vᵀ ⊙ P)), dq = dS k / √d, dk = dSᵀ q / √d."""
    scale = q.shape[-1] ** -0.5
    weights = (q @ k.transpose(-2, -1) * scale).masked_fill(~valid, float("-inf")).softmax(-1)  # (G, H, m, m)
    d_weights = g @ v.transpose(-2, -1)
    d_scores = weights * (d_weights - (d_weights * weights).sum(dim=-1, keepdim=True))
    return d_scores @ k * scale, d_scores.transpose(-2, -1) @ q * scale, weights.transpose(-2, -1) @ g


@padded_attention.register_fake
def _(q, k, v, mask, slots, size):
    lse_shape = (q.shape[0], q.shape[1]) if q.device.type == "cpu" else (0,)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=torch.float32)


@padded_attention_backward.register_fake
def _(grad, q, k, v, out, lse, mask, slots, size):
    return tuple(torch.empty_like(a, memory_format=torch.contiguous_format) for a in (q, k, v))


def _save_for_backward(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    q, k, v, mask, slots, size = inputs
    ctx.slots, ctx.size = slots, size
    ctx.save_for_backward(q, k, v, *output, mask)


def _attention_grads(ctx, grad, _grad_lse):
    return (*padded_attention_backward(grad.contiguous(), *ctx.saved_tensors, ctx.slots, ctx.size), None, None, None)


padded_attention.register_autograd(_attention_grads, setup_context=_save_for_backward)


def _sdpa_pad(q, k, v, layout: PackedLayout) -> torch.Tensor:
    slots, size = layout.group_slots, layout.group_size
    if torch.compiler.is_compiling():
        # Under torch.compile (torch 2.14) attention is one opaque op on flat tensors: padded (G, H, m, d)
        # tensors in the graph, or saved for the backward, let Inductor specialise on their lengths (a
        # recompile per batch) or gave them the strides of the first batch ("expected … stride 480==800"
        # on the next batch), and attention written out (q kᵀ, softmax, · v) specialised on M_max.
        mask = _additive(layout.padded_valid, q.dtype) if q.device.type == "cpu" else layout.padded_valid
        out = padded_attention(*(to_slots(a, layout) for a in (q, k, v)), mask, slots, size)[0]  # (S, H, d)
        return from_slots(out, layout)  # (N, H, d)
    # Eager: the same groups through SDPA and autograd (whose C++ backward costs less than the op's or
    # _SlotGather's Python), q, k, v each gathered once for all groups.
    groups = (_groups(a.index_select(0, layout.padded_rows), slots, size) for a in (q, k, v))  # each [(G, H, m, d)]
    masks = _key_padding(_additive(layout.padded_valid, q.dtype), slots, size)
    out = _flat([F.scaled_dot_product_attention(*qkv, attn_mask=m) for *qkv, m in zip(*groups, masks)])  # (S, H, d)
    return out.index_select(0, layout.from_groups)  # (N, H, d)


def _sdpa_blockdiag(q, k, v, layout: PackedLayout) -> torch.Tensor:
    same = layout.sample[:, None] == layout.sample[None, :]  # (N, N)
    out = F.scaled_dot_product_attention(*(a.transpose(0, 1)[None] for a in (q, k, v)), attn_mask=same)
    return out[0].transpose(0, 1)  # (N, H, d)


def _varlen(q, k, v, layout: PackedLayout) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    m = layout.max_len
    return varlen_attn(q, k, v, layout.cu_seqlens, layout.cu_seqlens, m, m)


def _flash(q, k, v, layout: PackedLayout) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    m = layout.max_len
    return flash_attn_varlen_func(q, k, v, layout.cu_seqlens, layout.cu_seqlens, m, m)


_KERNELS = {"varlen": _varlen, "flash": _flash, "sdpa_pad": _sdpa_pad, "sdpa_blockdiag": _sdpa_blockdiag}


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """q, k, v (N, H, d) → (N, H, d): softmax(q kᵀ/√d) v within each sample, by ``layout.backend``.

    The flash kernels take only half precision; an fp32 forward uses the portable fallback.
    """
    backend = layout.backend
    if backend in ("varlen", "flash") and q.dtype not in (torch.float16, torch.bfloat16):
        backend = FALLBACK
    return _KERNELS[backend](q, k, v, layout)


def available_backends(device) -> list[str]:
    """The backends that run on ``device`` with the installed packages, best first."""
    return list(_available(torch.device(device).type))


@functools.lru_cache(maxsize=None)
def _available(device_type: str) -> tuple[str, ...]:
    names = []
    if device_type == "cuda":
        from torch.nn.attention import varlen as native

        if hasattr(native, "varlen_attn"):
            names.append("varlen")
        if importlib.util.find_spec("flash_attn") is not None:
            names.append("flash")
    return (*names, "sdpa_pad", "sdpa_blockdiag")


def select_backend(device, requested: str = "auto") -> str:
    """``requested`` if it runs on ``device``, else the first available (``auto``)."""
    names = available_backends(device)
    if requested == "auto":
        return names[0]
    if requested not in names:
        raise ValueError(f"attention backend {requested!r} is not available on {device}; use one of {names} or 'auto'")
    return requested


def packed_self_attention(attn, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """timm ``Attention`` (its qkv/proj weights, so checkpoint keys stay) on packed tokens (N, D) → (N, D)."""
    N = x.shape[0]
    q, k, v = attn.qkv(x).view(N, 3, attn.num_heads, attn.head_dim).unbind(1)  # (N, H, d) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    x = varlen_attention(q, k, v, layout).reshape(N, attn.attn_dim)  # (N, H·d)
    return attn.proj(attn.norm(x))
