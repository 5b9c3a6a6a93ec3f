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
