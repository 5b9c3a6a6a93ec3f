"""The strict recipe schema, every shipped recipe, and overrides."""

import sys

import pytest
import torch

from dcdit_cli.common.console import DcditError
from dcdit_cli.config.recipe import SECTIONS, available_recipes, load_recipe, parse_override, recipe_diff, recipes_dir
from dcdit_cli.models import build_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ALL = available_recipes()
PAPER = ["b-n4", "b-n16", "xl-n4", "xl-n16", "dit-b-p2", "dit-b-p2-isoflop", "dit-b-p4", "dit-b-p4-isoflop",
         "dit-xl-p2", "dit-xl-p2-isoflop", "dit-xl-p4", "dit-xl-p4-isoflop", "b-n4-random"]


def test_every_recipe_file_is_found_recursively():
    on_disk = sorted(str(p.relative_to(recipes_dir()).with_suffix("")) for p in recipes_dir().rglob("*.toml"))
    assert ALL == on_disk and len(ALL) >= len(PAPER) + 2
    assert set(PAPER) | {"tiny", "toy"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_recipe_loads_complete_and_builds_on_meta(name):
    recipe = load_recipe(name)
    raw = tomllib.loads((recipes_dir() / f"{name}.toml").read_text())
    for section, cls in SECTIONS.items():  # flat and complete: every key is written in the file
        assert set(raw[section]) == set(cls.__dataclass_fields__), (name, section)
    with torch.device("meta"):
        model = build_model(recipe.model)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", [n for n in PAPER])
def test_paper_training_hyperparameters(name):
    t = load_recipe(name).train
    assert (t.max_steps, t.global_batch, t.lr, t.weight_decay, t.ema_decay, t.grad_clip) == (400_000, 256, 1e-4, 0.0, 0.9999, 1.0)
    assert t.mixed_precision == "bf16" and t.label_dropout == 0.1
    if not name.startswith("dit"):
        assert t.ratio_loss_weight == 0.03


def test_unknown_keys_and_types_reported_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[train]\nlearning_rate = 1\nmax_steps = "ten"\n[modle]\nx = 1\n')
    with pytest.raises(DcditError) as e:
        load_recipe(str(path))
    msg = str(e.value)
    assert "3 problems" in msg and "did you mean 'lr'" in msg and "train.max_steps: expected int" in msg
    assert "did you mean 'model'" in msg and "\n" not in msg


def test_set_overrides_and_bad_set():
    r = load_recipe("tiny", ["train.lr=2e-4", "model.router=random", "data.path=/some/dir", "train.betas=[0.8, 0.9]"])
    assert r.train.lr == 2e-4 and r.model.router == "random" and r.data.path == "/some/dir" and r.train.betas == [0.8, 0.9]
    assert recipe_diff(load_recipe("tiny"), r)[0].startswith("model.router")
    with pytest.raises(DcditError, match="did you mean 'global_batch'"):
        load_recipe("tiny", ["train.global_bach=3"])
    with pytest.raises(DcditError, match="expected section.key=value"):
        parse_override("lr")
    with pytest.raises(DcditError, match="not one of"):
        load_recipe("tiny", ["model.router=cosin"])


def test_unknown_recipe_and_invalid_toml(tmp_path):
    with pytest.raises(DcditError, match="did you mean 'tiny'"):
        load_recipe("tinyy")
    bad = tmp_path / "x.toml"
    bad.write_text("[train\n")
    with pytest.raises(DcditError, match="not valid TOML"):
        load_recipe(str(bad))


def test_to_toml_roundtrip():
    from dcdit_cli.config.recipe import recipe_from_toml

    r = load_recipe("xl-n16")
    assert recipe_from_toml(r.to_toml(), "x") == r


def test_every_recipe_key_has_a_docstring():
    from dcdit_cli.config.recipe_docs import field_docs

    for section, cls in SECTIONS.items():
        missing = set(cls.__dataclass_fields__) - set(field_docs(cls))
        assert not missing, f"[{section}] keys without a docstring in recipe.py: {sorted(missing)}"


def test_docs_recipes_md_is_up_to_date():
    from dcdit_cli.config.recipe_docs import render

    committed = (recipes_dir().parent / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert committed == render(), "docs/recipes.md is stale: run `python -m dcdit_cli.config.recipe_docs > docs/recipes.md`"
    assert "`sampling_steps`" in committed and "`cfg_scale`" in committed


def test_removed_keys_error_in_files_and_are_dropped_from_stored_recipes(tmp_path):
    from dcdit_cli.config.recipe import recipe_from_toml

    text = (recipes_dir() / "tiny.toml").read_text().replace("[data]\n", "[data]\nnum_workers = 4\n")
    path = tmp_path / "old.toml"
    path.write_text(text)
    with pytest.raises(DcditError, match="data.num_workers was removed.*delete the line"):
        load_recipe(str(path))
    assert recipe_from_toml(text, "checkpoint") == load_recipe("tiny")  # an old checkpoint still loads


def test_a_recipe_saved_with_a_byte_order_mark_loads(tmp_path):
    text = (recipes_dir() / "tiny.toml").read_text(encoding="utf-8")
    (tmp_path / "bom.toml").write_bytes("\ufeff".encode("utf-8") + text.encode("utf-8"))
    assert load_recipe(str(tmp_path / "bom.toml")) == load_recipe("tiny")


# --- The GroupNorm trap: one channel per group erases the condition inside the scaffold ---------------


def test_one_channel_per_group_erases_the_condition_in_a_res_block():
    """Why the guard exists: the res-block adds c after its first conv and then GroupNorms; with one
    channel per group the per-channel constant c is removed exactly, with several it is not."""
    from dcdit_cli.models.scaffold import ResBlock

    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8)
    c1, c2 = torch.randn(2, 96), torch.randn(2, 96)
    for groups, moves in ((32, False), (8, True)):
        block = ResBlock(32, 32, 32, 96, norm_groups=groups)
        torch.nn.init.normal_(block.conv2.weight, std=0.2)  # so the second conv passes the normalised signal on
        with torch.no_grad():
            delta = (block(x, c1) - block(x, c2)).abs().max().item()
        assert (delta > 0.1) if moves else (delta < 1e-4), (groups, delta)


@pytest.mark.parametrize("name", ALL)
def test_shipped_recipes_keep_two_channels_per_group(name):
    from dcdit_cli.config.recipe import recipe_warnings

    assert recipe_warnings(load_recipe(name)) == []


@pytest.mark.parametrize("width,groups", [(32, 32), (16, 32), (48, 48), (2, 2)])
def test_norm_group_warning_names_the_key_and_a_value_that_fixes_it(width, groups):
    from dcdit_cli.config.recipe import recipe_warnings

    sets = [f"model.scaffold_width={width}", f"model.norm_groups={groups}"]
    (message,) = recipe_warnings(load_recipe("toy", sets))
    assert "model.norm_groups" in message and f"model.scaffold_width = {width}" in message
    fix = int(message.rsplit("set model.norm_groups = ", 1)[1].split()[0])
    fixed = load_recipe("toy", [sets[0], f"model.norm_groups={fix}"])
    assert recipe_warnings(fixed) == []
    model = build_model(fixed.model)  # the built scaffold really has ≥ 2 channels in every group
    norms = [m for m in [*model.encoder.modules(), *model.decoder.modules()] if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels // m.num_groups >= 2 for m in norms)


def test_dit_recipes_are_not_warned_about_the_scaffold():
    from dcdit_cli.config.recipe import recipe_warnings

    assert recipe_warnings(load_recipe("toy-dit", ["model.norm_groups=32"])) == []
