"""Upcycling a DiT into a DC-DiT and the activation-distillation warm-up (paper §4.4, docs/reference.md#upcycling).

The source is a tiny DiT/2 with random weights saved in the official key format; the
recipes tiny-upcycle / tiny-upcycle-distill have the same inner width, depth and heads.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcdit_cli.common.console import DcditError
from dcdit_cli.config.recipe import ModelConfig, load_recipe
from dcdit_cli.diffusion.gaussian import make_diffusion
from dcdit_cli.models import DiT, build_model
from dcdit_cli.training.distill import DistillLoss, activation_distillation_loss, build_teacher, distill, teacher_index
from dcdit_cli.training.losses import ComposableLoss, DiffusionLoss, FlopsLoss, Loss, loss_for_recipe
from dcdit_cli.training.released_checkpoints import inspect_dit, load_dit_checkpoint
from dcdit_cli.training.upcycle import map_dit_to_dcdit, prepare_student, upcycle

EMBEDDERS = ("t_embedder.", "y_embedder.")


def tiny_dit(hidden=32, depth=2, patch=2, heads=2, seed=0) -> DiT:
    """A tiny DiT with every weight random (adaLN and final layers included), like a trained one."""
    torch.manual_seed(seed)
    model = DiT(ModelConfig(kind="dit", input_size=8, patch_size=patch, in_channels=3, hidden_size=hidden, depth=depth, num_heads=heads, num_classes=6))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(flat .pt path, DiT train.py-style {model, ema, opt, args} path, the EMA state dict)."""
    root = tmp_path_factory.mktemp("dit")
    ema, raw = tiny_dit(seed=0), tiny_dit(seed=1)
    torch.save(ema.state_dict(), root / "flat.pt")
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-4)
    wrapped = {"model": raw.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
               "args": argparse.Namespace(model="DiT-XL/2", image_size=256, global_batch_size=256)}
    torch.save(wrapped, root / "train.pt")
    return root / "flat.pt", root / "train.pt", ema.state_dict()


def _model(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors"))


def test_both_layouts_and_safetensors_load_the_ema(source, tmp_path):
    from dcdit_cli.training.checkpoint import export_weights

    flat, wrapped, ema = source
    save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp_path / "dit.safetensors"))
    dit_run = export_weights(tmp_path, 1, ema, load_recipe("toy-dit").to_toml(), 1)  # a `dcdit train` DiT run's weights
    for path in (flat, wrapped, tmp_path / "dit.safetensors", dit_run):
        state = load_dit_checkpoint(path)
        assert state.keys() == ema.keys() and all(torch.equal(state[k], ema[k]) for k in ema), path
    shape = inspect_dit(ema)
    assert (shape.hidden_size, shape.depth, shape.patch_size, shape.num_classes, shape.num_tokens) == (32, 2, 2, 6, 16)


def test_mapping_copies_blocks_and_embedders_and_reports(source):
    _, _, ema = source
    recipe = load_recipe("tiny-upcycle")
    target = build_model(recipe.model).state_dict()
    out, report = map_dit_to_dcdit(ema, target)
    for key in ema:
        if key.startswith(("blocks.", *EMBEDDERS)):
            assert torch.equal(out[key], ema[key]) and key in report.copied
    assert sorted(report.left_out) == sorted(k for k in ema if k.startswith(("x_embedder.", "pos_embed", "final_layer.")))
    assert set(report.frozen) == {k for k in ema if k.startswith(EMBEDDERS)}
    assert report.adaptors and all(".cond_norm." in k for k in report.adaptors)
    assert all(torch.equal(out[k], target[k]) for k in report.new)  # the scaffold keeps its initialisation
    assert "encoder.stem.weight" in report.new and "final_layer.linear.weight" in report.new
    assert [r[0] for r in report.rows()] == ["copied, frozen", "copied", "new: adaptors on c", "new", "left out"]
    assert not set(report.copied) & set(report.new)


def test_dit_xl2_key_set_maps_onto_xl_n4_upcycle_on_meta():
    recipe = load_recipe("xl-n4-upcycle")
    assert recipe.model.cond_adaptor and recipe.model.pos_grid_scale == 0.5 and recipe.upcycle.freeze_embedders
    with torch.device("meta"):
        official = DiT(ModelConfig(kind="dit", hidden_size=1152, depth=28, num_heads=16, patch_size=2)).state_dict()
        target = build_model(recipe.model).state_dict()
    assert len(official) == 292 and sum(v.numel() for v in official.values()) == 675_129_632  # docs/reference.md#official-dit-checkpoint
    out, report = map_dit_to_dcdit(official, target)
    assert len(report.copied) == 5 + 28 * 10 and len(report.left_out) == 7 and len(report.frozen) == 5
    assert out.keys() == target.keys() and out["blocks.27.mlp.fc2.weight"] is official["blocks.27.mlp.fc2.weight"]


def test_upcycled_training_keeps_embedders_frozen_and_trains_adaptors(source, tmp_path):
    flat, _, ema = source
    recipe = load_recipe("tiny-upcycle", ["train.max_steps=3", "train.ckpt_every_steps=3"])
    model = build_model(recipe.model)
    prepare_student(model, ema, recipe)
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(EMBEDDERS)), name
    for i, block in enumerate(model.blocks):
        for name, p in block.named_parameters():
            assert torch.equal(p, ema[f"blocks.{i}.{name}"])
    init_adaptor = {k: v.clone() for k, v in model.state_dict().items() if ".cond_norm." in k}

    upcycle(recipe, flat, tmp_path / "run")
    trained = _model(tmp_path / "run", 3)
    for key in ema:
        if key.startswith(EMBEDDERS):
            assert torch.equal(trained[key], ema[key]), key  # frozen: bit-identical after training
    assert any(not torch.equal(trained[k], v) for k, v in init_adaptor.items())  # the adaptors learn
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])  # blocks train
    info = json.loads((tmp_path / "run/upcycle.json").read_text())
    assert info["source"] == str(flat) and set(info["frozen"]) == {k for k in ema if k.startswith(EMBEDDERS)}


def test_teacher_patch_index_and_loss_pairing():
    order = torch.tensor([[0, 1, 8, 9, 63, 18]])  # (r, c): (0,0) (0,1) (1,0) (1,1) (7,7) (2,2) on an 8×8 grid
    assert teacher_index(order, 8, 2).tolist() == [[0, 0, 0, 0, 15, 5]]
    teacher = [torch.arange(16.0)[None, :, None].expand(1, 16, 4)]  # patch k holds the value k
    student = [teacher_index(order, 8, 2).float()[..., None].expand(1, 6, 4)]
    valid = torch.tensor([[True] * 5 + [False]])
    assert activation_distillation_loss(student, teacher, order, valid, 8, 2) == 0
    student[0] = student[0].clone()
    student[0][0, 5] += 100.0  # a padding slot does not count
    assert activation_distillation_loss(student, teacher, order, valid, 8, 2) == 0


def test_distillation_loss_falls_and_teacher_never_changes(source):
    _, _, ema = source
    recipe = load_recipe("tiny-upcycle-distill")
    teacher = build_teacher(ema, recipe)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model(recipe.model)
    prepare_student(student, ema, recipe)
    loss_fn = DistillLoss(DiffusionLoss(make_diffusion(num_timesteps=1000), diffusion_weight=0.0), teacher, recipe.distill.weight)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x0, t, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g), torch.randint(0, 7, (8,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    losses = []
    for _ in range(12):
        loss, logs, stats = loss_fn(student, x0, y, t=t, noise=noise)
        assert stats.block_outputs is not None and torch.equal(logs["loss"], loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(logs["distill_loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert torch.equal(teacher.state_dict()["blocks.1.attn.qkv.weight"], ema["blocks.1.attn.qkv.weight"])


def test_distill_run_switches_phase_and_resumes_on_both_sides(source, tmp_path):
    _, wrapped, _ = source
    recipe = load_recipe("tiny-upcycle-distill", ["train.max_steps=4", "train.ckpt_every_steps=1"])
    distill(recipe, wrapped, tmp_path / "straight")
    rows = [json.loads(l) for l in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["distill", "distill", "diffusion", "diffusion"]
    assert all("distill_loss" in r for r in rows[:2]) and not any("distill_loss" in r for r in rows[2:])
    # Stop inside the warm-up (step 1), then after the switch (step 3), then finish: bitwise equal.
    for steps in (1, 3, 4):
        distill(recipe.replace(train={"max_steps": steps}), wrapped, tmp_path / "resumed")
    a, b = _model(tmp_path / "straight", 4), _model(tmp_path / "resumed", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_phase_rules(source, tmp_path):
    flat, _, _ = source
    with pytest.raises(DcditError, match="run `dcdit distill`"):
        upcycle(load_recipe("tiny-upcycle-distill"), flat, tmp_path / "a")
    with pytest.raises(DcditError, match="distill.steps = 0"):
        distill(load_recipe("tiny-upcycle"), flat, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"hidden": 64, "heads": 2}, ["width 64 in the checkpoint", "model.hidden_size = 32"]),
        ({"depth": 3}, ["depth 3 in the checkpoint", "model.depth = 2"]),
        ({"patch": 4}, ["patch size 4 in the checkpoint", "upcycle.source_patch_size = 2"]),
    ],
)
def test_mismatched_checkpoint_is_one_clear_error(tmp_path, kwargs, words):
    torch.save(tiny_dit(**kwargs).state_dict(), tmp_path / "other.pt")
    with pytest.raises(DcditError) as e:
        upcycle(load_recipe("tiny-upcycle"), tmp_path / "other.pt", tmp_path / "run")
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_files_that_are_not_dit_checkpoints(tmp_path):
    from dcdit_cli.training.checkpoint import export_weights

    (tmp_path / "garbage.pt").write_bytes(b"\x00\x01 not a checkpoint at all" * 10)
    torch.save({"weight": torch.zeros(3), "bias": torch.zeros(3)}, tmp_path / "random.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    recipe = load_recipe("tiny-upcycle")
    dcdit_weights = export_weights(tmp_path, 1, build_model(recipe.model).state_dict(), recipe.to_toml(), 1)
    save_file(build_model(recipe.model).state_dict(), str(tmp_path / "dcdit.safetensors"))
    cases = {"garbage.pt": "not a readable PyTorch checkpoint", "random.pt": "not a DiT checkpoint",
             "list.pt": "not a DiT state dict", dcdit_weights: "weights of a DC-DiT run",
             "dcdit.safetensors": "a DC-DiT state dict", "missing.pt": "does not exist"}
    for name, words in cases.items():
        with pytest.raises(DcditError, match=words) as e:
            load_dit_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------
# Through the real CLI
# ----------------------------------------------------------------------------------------


def dcdit(*args, **kw):
    return subprocess.run([sys.executable, "-m", "dcdit_cli", *args], capture_output=True, text=True, **kw)


def test_cli_upcycle_and_distill_end_to_end(source, tmp_path):
    flat, wrapped, _ = source
    proc = dcdit("upcycle", "--recipe", "tiny-upcycle", "--from", str(flat), "--out", str(tmp_path / "up"),
                 "--set", "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "copied, frozen" in proc.stdout and "left out" in proc.stdout and "blocks.0–1" in proc.stdout
    assert (tmp_path / "up/weights/step-0000002-ema.safetensors").is_file()
    proc = dcdit("distill", "--recipe", "tiny-upcycle-distill", "--from", str(wrapped), "--out", str(tmp_path / "di"),
                 "--set", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    phases = [json.loads(l)["phase"] for l in (tmp_path / "di/metrics.jsonl").read_text().splitlines()]
    assert phases == ["distill", "distill", "diffusion"]


def test_cli_help_and_errors_are_one_line(tmp_path):
    for command in ("upcycle", "distill"):
        proc = dcdit(command, "--help")
        assert proc.returncode == 0 and "Examples" in proc.stdout and f"dcdit {command}" in proc.stdout
    torch.save(tiny_dit(hidden=64).state_dict(), tmp_path / "wide.pt")
    proc = dcdit("upcycle", "--recipe", "tiny-upcycle", "--from", str(tmp_path / "wide.pt"), "--out", str(tmp_path / "run"))
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "width 64 in the checkpoint" in proc.stderr.replace("\n", " ") and "model.hidden_size = 32" in proc.stderr.replace("\n", " ")
    assert len(lines) == 1
    proc = dcdit("distill", "--recipe", "tiny-upcycle-distill", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "no --from given" in proc.stderr


def test_distill_loss_asks_for_block_outputs_and_forwards_step():
    """The student is asked for its block outputs in the call (nothing is set on the model), and
    ``step`` reaches the wrapped loss, whose terms may have a schedule (a DyDiT student's FLOPs target)."""
    seen = {}

    class Stop(Exception):
        pass

    class Spy(ComposableLoss):
        diffusion = None

        def forward(self, model, x, y, t=None, budget=None, noise=None, step=None, **model_kwargs):
            seen.update(step=step, **model_kwargs)
            raise Stop

    with pytest.raises(Stop):
        DistillLoss(Spy(), SimpleNamespace(config=SimpleNamespace(patch_size=2)), 1.0)(None, None, None, step=7)
    assert seen == {"step": 7, "record_blocks": True}
    assert not hasattr(build_model(load_recipe("tiny-upcycle").model), "record_block_outputs")


def test_every_loss_declares_the_interface(source):
    _, _, ema = source
    recipe = load_recipe("tiny-upcycle-distill")
    gated = loss_for_recipe(load_recipe("tiny", ["model.dynamic=dydit"]))
    distill_loss = DistillLoss(loss_for_recipe(recipe, diffusion_weight=0.0), build_teacher(ema, recipe), recipe.distill.weight)
    assert isinstance(gated, FlopsLoss)
    for loss in (loss_for_recipe(recipe), gated, distill_loss):
        assert isinstance(loss, Loss) and loss.diffusion is not None
