"""benchmarks/router_study.py: the study's training loop takes its learning rate, and its
evaluation reports the AUROC at equal position next to the plain one."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from router_study import FACTORS, evaluate, study_recipe, train_variant, validation  # noqa: E402

from dcdit_cli.diffusion.gaussian import make_diffusion  # noqa: E402
from dcdit_cli.models import build_model  # noqa: E402


def test_train_variant_steps_at_its_lr_and_evaluate_reads_place_and_content():
    factors = {k: v[0] for k, v in FACTORS.items()}
    recipe = study_recipe(factors, "shapes", extra=["model.depth=1", "model.hidden_size=32", "model.num_heads=2",
                                                    "model.scaffold_width=16", "model.norm_groups=4", "data.shapes=fixed"])
    torch.manual_seed(0)
    frozen = build_model(recipe.model)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    train_variant(factors, "shapes", 2, 0, model=frozen, recipe=recipe, log=lambda s: None, lr=0.0)
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    moved, *_ = train_variant(factors, "shapes", 2, 0, model=build_model(recipe.model), recipe=recipe, log=lambda s: None, lr=1e-3)
    assert any(not torch.equal(before[k], v) for k, v in moved.state_dict().items())
    out = evaluate(moved, make_diffusion(num_timesteps=1000), validation("shapes", recipe, n=8))
    assert set(out["auroc_equal_position"]) == set(out["auroc"])
    assert all(0.0 <= a <= 1.0 for a in out["auroc_equal_position"].values())
