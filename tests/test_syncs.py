"""Host synchronisations, counted on CPU (tests/sync_counter.py): one per DC-DiT forward (the kept
count), none in backward, the loss, the sampler step or the training step beyond it; and no
host-to-device copy from pageable memory in any of them (the budget is built on the device)."""

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
    assert not s.copies, s.copies


def test_counter_sees_host_to_device_copies_but_not_scalar_fills():
    x = torch.randn(5)
    with SyncCounter() as s:
        torch.as_tensor(0.2, device=x.device), torch.tensor([1, 2], device="cpu"), x.new_tensor([3.0]), x.to(x.device)
        x.to(device="cpu")
        torch.full((5,), 0.2, device=x.device), x * 0.5, torch.where(x > 0, x, 1.0), x.to(torch.float64), torch.as_tensor(x)
        torch.tensor([1, 2])  # a host tensor: copied only when moved
    assert s.total == 0 and sum(s.copies.values()) == 5, s.copies



def test_dcdit_forward_syncs_once_and_backward_never():
    recipe = load_recipe("tiny")
    model = build_model(recipe.model)
    x, t, y = _inputs(recipe)
    for budget in (None, 0.3, torch.tensor([0.0, 0.5, 0.2])):
        with SyncCounter() as s:
            out, _ = model(x, t, y, budget=budget)
        assert s.total == 1, s.where  # ChunkLayer: N and M_max, read together
        assert not s.copies, s.copies  # a host budget is filled on the device, not copied to it
    with SyncCounter() as s:
        out.square().mean().backward()
    assert s.total == 0 and not s.copies, (s.where, s.copies)


def test_forward_with_forced_endpoints_copies_nothing_to_the_device():
    recipe = load_recipe("tiny", ["model.force_endpoints=true"])
    model = build_model(recipe.model)
    x, t, y = _inputs(recipe)
    with SyncCounter() as s:
        model(x, t, y, budget=0.2)
    assert s.total == 1 and not s.copies, (s.where, s.copies)


def test_loss_object_syncs_once_and_returns_device_logs():
    recipe = load_recipe("tiny")
    model = build_model(recipe.model)
    x, _, y = _inputs(recipe)
    loss_fn = loss_for_recipe(recipe)
    loss_fn(model, x, y)  # the diffusion copies its schedules to the device once, at first use
    with SyncCounter() as s:
        loss, logs, stats = loss_fn(model, x, y, budget=0.2)
        loss.backward()
    assert s.total == 1 and not s.copies, (s.where, s.copies)
    assert {"loss", "mse", "vb", "ratio_loss", "compression", "kept_tokens"} <= set(logs)
    assert all(torch.is_tensor(v) and not v.requires_grad for v in logs.values())
    assert stats.num_kept.shape == (3,)


def _train_syncs(tmp_path, steps, *overrides):
    recipe = load_recipe("tiny", [f"train.max_steps={steps}", "train.log_every_steps=1000", "train.ckpt_every_steps=1000",
                                  *overrides])
    with SyncCounter() as s:
        train(recipe, tmp_path / f"run{steps}")
    return s.total, sum(s.copies.values())


@pytest.mark.parametrize("budgets", [[], ["train.multi_budget_start_step=0", "train.multi_budget_fractions=[0.0, 0.3, 0.5]"]],
                         ids=["no-budget", "multi-budget"])
def test_training_step_syncs_only_for_the_forward_and_copies_nothing(tmp_path, budgets):
    # Log and checkpoint only at the end: the 3 extra steps cost one synchronisation each (the kept count)
    # and no host-to-device copy (the batch's pinned copy is the allowed path).
    (syncs5, copies5), (syncs2, copies2) = _train_syncs(tmp_path, 5, *budgets), _train_syncs(tmp_path, 2, *budgets)
    assert (syncs5 - syncs2, copies5 - copies2) == (3, 0)


def test_sampler_step_syncs_once_with_cfg_and_lite_cfg():
    recipe = load_recipe("tiny")
    model = build_model(recipe.model).eval()
    for cfg_scale in (4.0, 1.0):  # both halves in one forward; the conditional half alone
        counts = []
        for steps in (2, 5):
            with SyncCounter() as s:
                sample_batch(model, recipe, [0, 1, 2], SampleOptions(steps=steps, cfg_scale=cfg_scale, budget=0.1,
                                                                     uncond_budget=0.5))
            counts.append((s.total, sum(s.copies.values())))
        assert (counts[1][0] - counts[0][0], counts[1][1] - counts[0][1]) == (3, 0)  # one sync per step, no copy


def test_non_finite_loss_on_an_unlogged_step_stops_before_any_weights_are_saved(tmp_path):
    recipe = load_recipe("tiny", ["train.max_steps=8", "train.lr=1e30", "train.grad_clip=0.0", "train.ckpt_every_steps=4",
                                  "train.log_every_steps=1000"])
    with pytest.raises(DcditError, match=r"diverged at step [1-4]\b.*last good checkpoint: none"):
        train(recipe, tmp_path / "run")
    assert not list((tmp_path / "run").glob("checkpoints/step-*")) and not list((tmp_path / "run").glob("weights/*"))
