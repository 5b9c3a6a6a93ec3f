"""Packed variable-length inner network: every attention backend equals the per-sample reference,
forward and backward; DiT blocks on packed tokens equal the (B, T, D) path sample by sample."""

import pytest
import torch
import torch.nn.functional as F
from test_models import _randomise
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dcdit_cli.config.recipe import ModelConfig
from dcdit_cli.models import DCDiT
from dcdit_cli.models.attention import (PackedLayout, _additive, _recomputed_grads, available_backends, from_slots, padded_attention, padded_length,
                                        samples_alone, select_backend, to_slots, varlen_attention)
from dcdit_cli.models.chunking import ChunkLayer
from dcdit_cli.models.dit import DiTBlock
from dcdit_cli.models.flops import _CUSTOM

CPU_BACKENDS = available_backends("cpu")
LENGTHS = [5, 1, 9, 3]


def _layout(lengths, backend, alone=False):
    m_max = max(lengths)
    valid = torch.arange(m_max)[None] < torch.tensor(lengths)[:, None]
    return PackedLayout.from_valid(valid, sum(lengths), backend, alone=alone)


def _per_sample(fn, lengths):
    """torch.cat of fn(b, rows of sample b) over the samples of a packed tensor: the unpadded reference."""
    out, lo = [], 0
    for b, m in enumerate(lengths):
        out.append(fn(b, slice(lo, lo + m)))
        lo += m
    return torch.cat(out)


def _check(out, grads, ref, ref_grads, atol):
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=atol)


def test_cpu_has_the_portable_backends_and_auto_picks_the_fallback():
    assert {"sdpa_pad", "sdpa_blockdiag"} <= set(CPU_BACKENDS)
    assert "varlen" not in CPU_BACKENDS and "flash" not in CPU_BACKENDS  # CUDA kernels
    assert select_backend("cpu") == "sdpa_pad"
    with pytest.raises(ValueError, match="not available"):
        select_backend("cpu", "varlen")


def test_layout_offsets_and_sample_ids():
    layout = _layout(LENGTHS, "sdpa_pad")
    assert layout.cu_seqlens.tolist() == [0, 5, 6, 15, 18]
    assert layout.sample.tolist() == [0] * 5 + [1] + [2] * 9 + [3] * 3
    x = torch.randn(18, 4)
    padded = layout.pad(x)  # (4, 9, 4)
    assert torch.equal(padded[2, :9], x[6:15]) and torch.count_nonzero(padded[1, 1:]) == 0
    assert torch.equal(layout.unpad(padded), x)


def test_fallback_groups_are_about_four_samples_and_at_least_the_two_halves():
    assert [PackedLayout.groups(b) for b in (1, 2, 3, 4, 6, 8, 12, 16, 32)] == [1, 2, 1, 2, 2, 2, 3, 4, 8]
    assert [PackedLayout.groups(b, alone=True) for b in (1, 3, 8)] == [1, 3, 8]


def test_samples_run_alone_on_cpu_once_their_attention_is_large():
    """samples_alone: the toy (width 96, 16² grid) keeps its groups on CPU; width 384 on the same grid,
    width 96 on a 32² grid and B width on a 32² grid run each sample alone; off CPU the groups stay.
    The model's sizes follow it: one padded length per sample, each its own kept count."""
    cpu = torch.device("cpu")
    assert not samples_alone(cpu, 96, 16 * 16)
    assert all(samples_alone(cpu, w, side * side) for w, side in ((384, 16), (96, 32), (768, 32)))
    assert not samples_alone(torch.device("meta"), 768, 32 * 32)
    counts = [40, 70, 55, 90]
    mask = torch.zeros(4, 32 * 32, dtype=torch.bool)
    for b, n in enumerate(counts):
        mask[b, :n] = True
    assert ChunkLayer.sizes(mask, 32, 768).tolist()[3:] == sorted(counts)  # alone: exact lengths, no padding
    assert len(ChunkLayer.sizes(mask, 32, 8).tolist()[3:]) == 2  # narrow (8 · 32⁴ < 2²⁴): two groups of two


def test_fallback_pads_groups_of_samples_sorted_by_kept_count():
    """The padded fallback sorts the samples by kept count before grouping them, so a group pads to
    lengths close to its own: here 4 and 9 (padded to 4 and 16) where the batch's halves in order
    would pad to 9 and 8 (16 and 8)."""
    lengths = [9, 1, 5, 3, 7, 2, 8, 4]
    layout = _layout(lengths, "sdpa_pad")
    assert layout.group_len == (4, 16)  # the lengths the groups are padded to
    assert [tuple(r.shape) for r in layout.group_rows] == [(4, 4), (4, 16)]
    members = [sorted(layout.sample[r[:, 0]].tolist()) for r in layout.group_rows]
    assert members == [[1, 3, 5, 7], [0, 2, 4, 6]]  # the short samples together, the long ones together
    assert sorted(v.sum(1).tolist() for v in layout.group_valid) == [[1, 2, 3, 4], [5, 7, 8, 9]]
    for rows, valid in zip(layout.group_rows, layout.group_valid):  # each real slot is its sample's next row
        assert torch.equal(rows[valid], torch.cat([torch.arange(int(r[0]), int(r[0]) + int(n)) for r, n in zip(rows, valid.sum(1))]))
    padded = torch.cat([r.flatten() for r in layout.group_rows])
    assert torch.equal(padded[layout.from_groups], torch.arange(sum(lengths)))  # from_groups undoes the gather
    scores = sum(r.shape[0] * r.shape[1] ** 2 for r in layout.group_rows)
    assert scores == 4 * 4**2 + 4 * 16**2 < 4 * 16**2 + 4 * 8**2  # the halves in batch order: 9 and 8, padded to 16 and 8


def test_a_group_is_padded_to_a_multiple_of_8_except_just_past_a_multiple_of_16():
    """padded_length: up to the next multiple of 8 (where the CPU flash kernel runs faster), except a
    length 1–4 past a multiple of 16 (where the kernel is already about as fast)."""
    assert padded_length(torch.arange(1, 18)).tolist() == [1, 2, 3, 4, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 17]
    assert padded_length(torch.tensor([60, 61, 64, 65, 68, 69, 83, 85, 90, 253])).tolist() == [64, 64, 64, 65, 68, 72, 83, 88, 96, 256]
    layout = _layout([13, 2, 6, 5], "sdpa_pad")  # groups (2, 5) and (6, 13): padded to 8 and 16
    assert [tuple(r.shape) for r in layout.group_rows] == [(2, 8), (2, 16)]


def test_fallback_leaves_a_lone_sample_unpadded():
    """A group of one sample is not rounded up: a one-sample forward, which models/flops.py counts,
    attends over exactly its own tokens."""
    layout = _layout([5, 3], "sdpa_pad")
    assert [tuple(r.shape) for r in layout.group_rows] == [(1, 3), (1, 5)]
    assert all(bool(v.all()) for v in layout.group_valid)


def test_fallback_pads_a_lite_cfg_unconditional_half_apart():
    """Lite-CFG: the unconditional half keeps fewer tokens, and it is its own group."""
    layout = _layout([9, 8, 2, 3], "sdpa_pad")
    assert [tuple(r.shape) for r in layout.group_rows] == [(2, 3), (2, 16)]
    assert [sorted(layout.sample[r[:, 0]].tolist()) for r in layout.group_rows] == [[2, 3], [0, 1]]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_equals_per_sample_attention_forward_and_backward(backend):
    g = torch.Generator().manual_seed(0)
    N, H, d = sum(LENGTHS), 2, 8
    q, k, v = (torch.randn(N, H, d, generator=g, requires_grad=True) for _ in range(3))
    out = varlen_attention(q, k, v, _layout(LENGTHS, backend))
    grad_out = torch.randn(N, H, d, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    ref = _per_sample(  # each sample alone, no mask at all
        lambda b, rows: F.scaled_dot_product_attention(*(a[rows].transpose(0, 1) for a in (q, k, v))).transpose(0, 1), LENGTHS)
    _check(out, grads, ref, torch.autograd.grad(ref, (q, k, v), grad_out), atol=1e-5)


@pytest.mark.parametrize("alone", [False, True])
@pytest.mark.parametrize("lengths", [LENGTHS, [9, 1, 5, 3, 7, 2, 8, 4]])
def test_packed_attention_op_equals_per_sample_attention_and_passes_opcheck(lengths, alone):
    """The fallback as torch.compile runs it: q, k, v gathered into the padded slots (to_slots), the op
    (flash forward and flash backward on CPU, from the saved logsumexp), the rows gathered back
    (from_slots), each gather's backward a gather too. It gives each sample's own attention, its
    logsumexp and the same gradients, over groups of one, two and four samples with padding, and with
    every sample alone (no padding); opcheck
    verifies the op's fake (meta) functions and autograd registration as torch.compile will use them."""
    g = torch.Generator().manual_seed(1)
    N, H, d = sum(lengths), 2, 8
    q, k, v = (torch.randn(N, H, d, generator=g, requires_grad=True) for _ in range(3))
    layout = _layout(lengths, "sdpa_pad", alone)
    assert alone == bool(layout.padded_valid.all()), "groups of several samples pad, samples alone do not"
    mask, shares = _additive(layout.padded_valid, q.dtype), (layout.group_slots, layout.group_size)

    def attend(q, k, v):
        out, lse = padded_attention(*(to_slots(a, layout) for a in (q, k, v)), mask, *shares)
        return from_slots(out, layout), lse.index_select(0, layout.from_groups)

    out, lse = attend(q, k, v)
    grad_out = torch.randn(N, H, d, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    def alone(b, rows):
        qb, kb, vb = (a[rows].transpose(0, 1) for a in (q, k, v))  # (H, M, d)
        return F.scaled_dot_product_attention(qb, kb, vb).transpose(0, 1)

    ref = _per_sample(alone, lengths)
    _check(out, grads, ref, torch.autograd.grad(ref, (q, k, v), grad_out), atol=1e-5)
    ref_lse = _per_sample(lambda b, rows: torch.logsumexp(
        torch.einsum("mhd,nhd->mhn", q[rows], k[rows]) * d**-0.5, dim=-1), lengths)  # (N, H)
    assert lse.shape == (N, H) and torch.allclose(lse, ref_lse, atol=1e-5)
    slotted = [to_slots(a, layout).detach().requires_grad_() for a in (q, k, v)]
    torch.library.opcheck(padded_attention, (*slotted, mask, *shares))

    # FLOPs: those of SDPA's math form on the same padded groups, forward and forward + backward.
    def counted(fn):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            fn()
        return counter.get_total_flops()

    def math_groups():
        G = layout.group_size
        return sum(F.scaled_dot_product_attention(*(a[r.flatten()].view(G, -1, H, d).transpose(1, 2) for a in (q, k, v)),
                                                  attn_mask=ok.view(G, 1, 1, -1)).sum()
                   for r, ok in zip(layout.group_rows, layout.group_valid))

    assert counted(lambda: attend(q, k, v)) == counted(math_groups) > 0
    assert counted(lambda: attend(q, k, v)[0].sum().backward()) == counted(lambda: math_groups().backward())


def test_the_ops_recomputed_backward_equals_autograd_through_masked_attention():
    """The compiled op's backward off CPU (ROCm, MPS: no flash logsumexp) recomputes the weights; run
    here on CPU, its gradients equal autograd's through SDPA with the same key-padding mask."""
    g = torch.Generator().manual_seed(2)
    G, H, m, d = 3, 2, 7, 8
    q, k, v = (torch.randn(G, H, m, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    valid = (torch.arange(m) < torch.tensor([7, 4, 1])[:, None]).view(G, 1, 1, m)  # full, padded, one key
    grad_out = torch.randn(G, H, m, d, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=valid), (q, k, v), grad_out)
    with torch.no_grad():
        got = _recomputed_grads(grad_out, q, k, v, valid)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_block_equals_dense_block_per_sample(backend):
    torch.manual_seed(0)
    block = _randomise(DiTBlock(32, 2))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(LENGTHS), 32, generator=g, requires_grad=True)
    c = torch.randn(len(LENGTHS), 32, generator=g)
    w = torch.randn(sum(LENGTHS), 32, generator=g)
    inputs = [x, *block.parameters()]
    out = block(x, c, _layout(LENGTHS, backend))  # (N, D)
    grads = torch.autograd.grad((out * w).sum(), inputs)

    # The (B, T, D) path of the DiT baseline, one sample at a time.
    ref = _per_sample(lambda b, rows: block(x[None, rows], c[b : b + 1])[0], LENGTHS)
    _check(out, grads, ref, torch.autograd.grad((ref * w).sum(), inputs), atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dcdit_batch_of_four_equals_four_batches_of_one(backend):
    torch.manual_seed(0)
    m = _randomise(DCDiT(ModelConfig(input_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                         scaffold_width=16))).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.5])[:, None, None, None]
    t, y = torch.randint(0, 1000, (4,), generator=g), torch.randint(0, 5, (4,), generator=g)
    with torch.no_grad():
        batched, stats = m(x, t, y, attention=backend)
        assert len(set(stats.num_kept.tolist())) > 1, "the test needs different kept counts"
        for i in range(4):
            alone, _ = m(x[i : i + 1], t[i : i + 1], y[i : i + 1], attention=backend)
            assert torch.allclose(alone[0], batched[i], atol=1e-5), i


def test_block_keeps_the_official_key_names():
    keys = set(DiTBlock(32, 2).state_dict())
    assert keys == {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight",
                    "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"}
