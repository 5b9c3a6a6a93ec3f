"""The CLI through a real subprocess: help with examples, instant --help, one-line errors."""

import json
import os
import re
import subprocess
import sys

import pytest
import typer.main

COMMANDS = ["train", "sample", "flops", "upcycle", "distill", "extract", "fid", "viz-boundaries", "convert", "eval"]


def dcdit(*args, **kw):
    return subprocess.run([sys.executable, "-m", "dcdit_cli", *args], capture_output=True, text=True, **kw)


def test_help_does_not_import_torch():
    code = "import sys; from dcdit_cli.cli import app; import typer.main;\n" \
           "try:\n    app(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().endswith("False")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_has_examples(command):
    proc = dcdit(command, "--help")
    assert proc.returncode == 0 and "Examples" in proc.stdout and f"dcdit {command}" in proc.stdout


def _help_sources(command: str) -> str:
    """Every help text of a command as written in cli.py: its docstring, epilog and option helps."""
    from dcdit_cli.cli import app

    group = typer.main.get_command(app)
    cmd = group if command == "" else group.commands[command]
    return "\n".join(filter(None, [cmd.help, cmd.epilog, *(getattr(p, "help", None) for p in cmd.params)]))


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_keeps_every_bracketed_word(command):
    """rich reads [word] as markup and drops it ("the recipe's  section"): every [word] written in a
    help text must reach the rendered --help, as [word], with no escape left showing."""
    words = sorted(set(re.findall(r"\\?\[([A-Za-z_][\w.-]*)\]", _help_sources(command))))
    env = {**os.environ, "COLUMNS": "400", "TERMINAL_WIDTH": "400"}
    proc = dcdit(*([command] if command else []), "--help", env=env)
    assert proc.returncode == 0
    lost = [w for w in words if f"[{w}]" not in proc.stdout]
    assert lost == [] and "\\[" not in proc.stdout, proc.stdout


def test_bad_set_is_one_line_with_suggestion_and_exit_2():
    proc = dcdit("train", "--recipe", "tiny", "--set", "train.learning_rate=1")
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "did you mean 'lr'" in proc.stderr.replace("\n", " ")


def test_print_recipe_shows_paper_setting():
    proc = dcdit("train", "--recipe", "xl-n16", "--print-recipe")
    assert proc.returncode == 0
    assert "hidden_size = 1152" in proc.stdout and "target_ratio = 16.0" in proc.stdout and "global_batch = 256" in proc.stdout


def test_flops_json():
    proc = dcdit("flops", "--recipe", "dit-xl-p2", "--recipe", "tiny", "--json")
    rows = json.loads(proc.stdout)
    assert rows[0]["recipe"] == "dit-xl-p2" and abs(rows[0]["tflops_per_img"] - 122.41) < 0.5
    assert rows[1]["source"] == "target N"


def test_flops_from_checkpoint(tmp_path):
    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.training.loop import train

    train(load_recipe("tiny", ["train.max_steps=2"]), tmp_path / "run")
    proc = dcdit("flops", "--ckpt", str(tmp_path / "run"), "--num", "2", "--classes", "1,2", "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)[0]
    assert row["source"] == "checkpoint + data" and 1 <= row["compression"] <= 64
    # beside dcdit's own: the authors' sample.py report (geometric-mean CR of the conditional half)
    assert 1 <= row["authors_compression"] <= 64 and row["authors_tflops"] > 0


def test_missing_checkpoint_is_one_line():
    proc = dcdit("sample", "--ckpt", "/nonexistent/run")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_norm_group_trap_is_one_warning_line_and_the_command_goes_on():
    out = dcdit("train", "--recipe", "toy", "--set", "model.norm_groups=32", "--print-recipe")
    assert out.returncode == 0 and "norm_groups = 32" in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: model.norm_groups = 32") and "set model.norm_groups = 8" in lines[0]
    clean = dcdit("train", "--recipe", "toy", "--print-recipe")
    assert clean.returncode == 0 and clean.stderr == ""
