"""Host synchronisations, counted on CPU (tests/sync_counter.py): one per DC-DiT forward (the kept
count), none in backward, the loss, the sampler step or the training step beyond it."""

import pytest
import torch
from sync_counter import SyncCounter

from dcdit_cli.common.console import DcditError
from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.models import build_model
from dcdit_cli.sampling.sampler import SampleOptions, sample_batch
from dcdit_cli.training.loop import train
from dcdit_cli.training.losses import loss_for_recipe


def _inputs(recipe, b=3):
    g = torch.Generator().manual_seed(0)
    side, ch = recipe.model.input_size, recipe.model.in_channels
    return torch.randn(b, ch, side, side, generator=g), torch.randint(0, 1000, (b,), generator=g), torch.randint(0, 5, (b,), generator=g)


def test_counter_sees_conversions_and_data_dependent_shapes():
    x = torch.randn(5)
    with SyncCounter() as s:
        x.sum().item(), bool(x[0] > 0), int(x.argmax()), x.tolist(), x[x > 0], x.nonzero()
    assert s.total == 6, s.where


def test_dcdit_forward_syncs_once_and_backward_never():
    recipe = load_recipe("tiny")
    model = build_model(recipe.model)
    x, t, y = _inputs(recipe)
    for budget in (None, 0.3, torch.tensor([0.0, 0.5, 0.2])):
        with SyncCounter() as s:
            out, _ = model(x, t, y, budget=budget)
        assert s.total == 1, s.where  # ChunkLayer: N and M_max, read together
    with SyncCounter() as s:
        out.square().mean().backward()
    assert s.total == 0, s.where


def test_loss_object_syncs_once_and_returns_device_logs():
    recipe = load_recipe("tiny")
    model = build_model(recipe.model)
    x, _, y = _inputs(recipe)
    with SyncCounter() as s:
        loss, logs, stats = loss_for_recipe(recipe)(model, x, y, budget=0.2)
        loss.backward()
    assert s.total == 1, s.where
    assert {"loss", "mse", "vb", "ratio_loss", "compression", "kept_tokens"} <= set(logs)
    assert all(torch.is_tensor(v) and not v.requires_grad for v in logs.values())
    assert stats.num_kept.shape == (3,)


def _train_syncs(tmp_path, steps):
    recipe = load_recipe("tiny", [f"train.max_steps={steps}", "train.log_every_steps=1000", "train.ckpt_every_steps=1000"])
    with SyncCounter() as s:
        train(recipe, tmp_path / f"run{steps}")
    return s.total


def test_training_step_syncs_only_for_the_forward(tmp_path):
    # Log and checkpoint only at the end: the 3 extra steps cost one synchronisation each (the kept count).
    assert _train_syncs(tmp_path, 5) - _train_syncs(tmp_path, 2) == 3


def test_sampler_step_syncs_once_with_cfg_and_lite_cfg():
    recipe = load_recipe("tiny")
    model = build_model(recipe.model).eval()
    counts = []
    for steps in (2, 5):
        with SyncCounter() as s:
            sample_batch(model, recipe, [0, 1, 2], SampleOptions(steps=steps, budget=0.1, uncond_budget=0.5))
        counts.append(s.total)
    assert counts[1] - counts[0] == 3  # one per step: both CFG halves in one forward


def test_non_finite_loss_on_an_unlogged_step_stops_before_any_weights_are_saved(tmp_path):
    recipe = load_recipe("tiny", ["train.max_steps=8", "train.lr=1e30", "train.grad_clip=0.0", "train.ckpt_every_steps=4",
                                  "train.log_every_steps=1000"])
    with pytest.raises(DcditError, match=r"diverged at step [1-4]\b.*last good checkpoint: none"):
        train(recipe, tmp_path / "run")
    assert not list((tmp_path / "run").glob("checkpoints/step-*")) and not list((tmp_path / "run").glob("weights/*"))
