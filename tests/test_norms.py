"""The DC-DiT's RMSNorm (models/norms.py): torch's values, a correct written-out backward on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dcdit_cli.models.norms import RMSNorm, _RMSNormCPU


def _norm(dim: int, seed: int = 0) -> RMSNorm:
    norm = RMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    return norm


@pytest.mark.parametrize("shape", [(8, 16, 24), (37, 24), (2, 3, 5, 24)])
def test_forward_equals_torch_bitwise_and_gradients_match_float64(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * 3
    upstream = torch.randn(*shape, generator=g)
    norm = _norm(shape[-1])
    xa = x.clone().requires_grad_()
    out = norm(xa)
    assert torch.equal(out, F.rms_norm(x, (shape[-1],), norm.weight.detach(), 1e-5))  # the fused kernel's bits
    out.backward(upstream)

    x64, w64 = x.double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    F.rms_norm(x64, (shape[-1],), w64, 1e-5).backward(upstream.double())  # torch's own derivative, in float64
    torch.testing.assert_close(xa.grad, x64.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad, w64.grad.float(), rtol=1e-5, atol=1e-4)


def test_backward_passes_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, 10, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(10, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormCPU.apply(x, w, 1e-5), (x, w))


def test_transposed_input_gives_contiguous_output_and_the_same_values():
    """The encoder's (B, D, H, W) → (B, L, D) view: a non-contiguous input of the norm."""
    norm = _norm(24)
    image = torch.randn(2, 24, 4, 4, generator=torch.Generator().manual_seed(3))
    view = image.flatten(2).transpose(1, 2)  # (B, L, D), strides of channels-first
    out = norm(view)
    assert out.is_contiguous()
    assert torch.equal(out, F.rms_norm(view.contiguous(), (24,), norm.weight.detach(), 1e-5))


def test_other_dtypes_use_torchs_kernel_and_state_dict_keys_are_nn_rmsnorms():
    norm = _norm(24)
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    assert torch.equal(norm(x), F.rms_norm(x, (24,), norm.weight, 1e-5))
    assert isinstance(norm, torch.nn.RMSNorm)
    assert norm.state_dict().keys() == torch.nn.RMSNorm(24).state_dict().keys()


def test_a_compiled_norm_traces_torchs_kernel_with_the_same_values_and_gradients():
    norm = _norm(24)
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(4))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = norm(xa)
    out = torch.compile(norm, backend=backend, fullgraph=True)(xb)
    assert len(graphs) == 1 and "rms_norm" in graphs[0] and "rsqrt" not in graphs[0]
    torch.testing.assert_close(out, eager)
    eager.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
