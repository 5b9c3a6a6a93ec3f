"""torch.compile of the transformer blocks and of the whole model (:func:`compile_model`): the
numbers of eager mode, a bounded number of graphs for every kept count, the same state-dict names."""

import copy
import json

import pytest
import torch
import torch._dynamo as dynamo
from safetensors.torch import load_file

from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.models import attention, build_model, compile_blocks, compile_model
from dcdit_cli.models.chunking import plug_back_radius
from dcdit_cli.training.loop import train

pytestmark = pytest.mark.slow  # Inductor's cold compile takes 10–30 s on 2 cores


def _boundary(counts: list[int], side: int) -> torch.Tensor:
    """(B, L) masks keeping counts[b] tokens at random positions."""
    g = torch.Generator().manual_seed(sum(counts))
    mask = torch.zeros(len(counts), side * side, dtype=torch.bool)
    for b, m in enumerate(counts):
        mask[b, torch.randperm(side * side, generator=g)[:m]] = True
    return mask


def test_compiled_blocks_match_eager_without_recompiling_as_kept_counts_change():
    recipe = load_recipe("tiny")
    torch.manual_seed(0)
    eager = build_model(recipe.model)
    for p in eager.parameters():  # trained-like weights: DiT's init zeroes the adaLN outputs
        p.data.add_(0.05 * torch.randn_like(p))
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    side = recipe.model.input_size
    x, y, t = torch.randn(3, recipe.model.in_channels, side, side), torch.tensor([0, 1, 2]), torch.tensor([5, 500, 900])
    dynamo.reset()
    dynamo.utils.counters.clear()
    for counts in ([16, 9, 21], [5, 30, 12], [40, 3, 17]):  # N = 46, 47, 60; M_max = 21, 30, 40
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            out, _ = model(x, t, y, boundary=_boundary(counts, side))
            out.square().mean().backward()
            outs.append((out.detach(), [p.grad.clone() for p in model.blocks.parameters()]))
        (out_e, grads_e), (out_c, grads_c) = outs
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
        for g_c, g_e in zip(grads_c, grads_e):
            torch.testing.assert_close(g_c, g_e, rtol=1e-3, atol=1e-6)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1  # every block, every N: one graph
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_whole_model_compiles_to_two_graphs_that_match_eager_as_kept_counts_and_radii_change():
    # Before: one graph per plug-back radius (a Python loop over it), per longest CFG half (an
    # in-place slice of the padded batch) and graph breaks at the host synchronisation.
    recipe = load_recipe("tiny")
    torch.manual_seed(0)
    eager = build_model(recipe.model)
    for p in eager.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    compiled = copy.deepcopy(eager)
    compile_model(compiled)
    side, B = recipe.model.input_size, 4
    x, y, t = torch.randn(B, recipe.model.in_channels, side, side), torch.arange(B), torch.tensor([5, 300, 600, 900])
    dynamo.reset()
    dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(0)
    radii = set()
    # The first batch keeps one token per sample, as a fresh router does at step 1 (keep_at_least_one):
    # M_max = 1, a size Dynamo would specialise on, then kept counts 2 … L/2: N, M_max, the longer
    # half and the plug-back radius all change.
    for i in range(8):
        counts = [1] * B if i == 0 else torch.randint(2, side * side // 2, (B,), generator=g).tolist()
        boundary = _boundary(counts, side)
        radii.add(int(plug_back_radius(boundary.view(B, side, side))))
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            out, _ = model(x, t, y, boundary=boundary)
            out.square().mean().backward()
            outs.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (out_e, grads_e), (out_c, grads_c) = outs
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
        for g_c, g_e in zip(grads_c, grads_e, strict=True):
            torch.testing.assert_close(g_c, g_e, rtol=1e-3, atol=1e-5)
    assert len(radii) > 1  # the batches do span several radii
    assert dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # route + process_kept, never recompiled
    assert not dynamo.utils.counters["graph_break"]
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_train_compile_records_it_and_writes_the_usual_weights(tmp_path, monkeypatch):
    # Every sample its own attention group, as wider models run on CPU (attention.samples_alone): the
    # test above compiles the tiny model's groups of several samples, this one the other grouping.
    monkeypatch.setattr(attention, "ALONE_WORK", 0)
    recipe = load_recipe("tiny", ["train.max_steps=2"])
    train(recipe, tmp_path / "eager")
    train(recipe, tmp_path / "compiled", torch_compile=True)
    env = json.loads((tmp_path / "compiled" / "env.json").read_text())
    assert env["compile"] == "model"
    assert json.loads((tmp_path / "eager" / "env.json").read_text())["compile"] == "none"
    a = load_file(str(tmp_path / "eager" / "checkpoints" / "step-0000002" / "model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "checkpoints" / "step-0000002" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
