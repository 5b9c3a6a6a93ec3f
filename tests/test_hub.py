"""`dcdit export`, loading exported folders (from disk and a pre-filled Hugging Face cache), the
push up to the network call, and broken folders as one line with exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

from dcdit_cli.common.console import DcditError
from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.hub.export import export
from dcdit_cli.pipelines.folders import load_pipeline, read_folder_weights
from dcdit_cli.training.checkpoint import load_weights, read_weights
from dcdit_cli.training.loop import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("hub") / "run"
    train(load_recipe("tiny", ["train.max_steps=4"]), path)
    return path


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    return export(run, tmp_path_factory.mktemp("export") / "tiny", measure=False)


def dcdit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dcdit_cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, cwd=REPO)


def one_line_exit_2(proc, *phrases):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def fill_hf_cache(cache: Path, repo: str, folder: Path) -> Path:
    """The layout huggingface_hub leaves after a download: refs/main names a snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def test_export_writes_a_complete_diffusers_folder(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"model_index.json", "transformer", "scheduler", "README.md", "pipeline_dcdit.py"} <= names
    assert "vae" not in names  # a pixel-space run
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "DCDiTPipeline" and index["transformer"][1] == "DCDiTTransformer2DModel"
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert {p.name for p in (exported / "transformer").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert not list(exported.parent.glob(".*tmp*"))  # written under a temporary name, renamed when complete


def test_exported_weights_are_the_runs_ema_weights_bit_for_bit(run, exported):
    ours, recipe, step = read_weights(run)
    theirs, recipe2, step2 = read_folder_weights(exported)
    assert recipe2 == recipe and step2 == step == 4 and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    model, _, _ = load_weights(exported)  # what `dcdit sample --ckpt EXPORT` builds
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())


def test_model_card_reports_recipe_cost_metrics_figures_and_commands(run, tmp_path):
    evals = run / "eval"
    evals.mkdir(exist_ok=True)
    (evals / "eval.json").write_text(json.dumps([{"setting": "cfg1.5-b0.2", "fid": 12.5, "sfid": 7.0, "kid": 0.25, "tflops_per_img": 0.5,
                                                 "steps": 10, "method": "ddpm"}]))
    try:
        out = export(run, tmp_path / "card", scheduler="ddpm")
    finally:
        shutil.rmtree(evals)
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and 'name = "tiny"' in card  # the recipe, as TOML
    assert "| parameters |" in card and "| hidden_size | 32 |" in card
    for budget in ("0", "0.1", "0.2", "0.3"):
        assert f"\n| {budget} | " in card  # a TFLOPs/img row per budget
    assert "| cfg1.5-b0.2 | 12.5 | 7 |" in card and "|  | 0.25 | 0.5 |" in card  # no FD-DINOv2 in this record
    for figure in ("figures/sample-000.png", "figures/compression_vs_t.png"):
        assert f"]({figure})" in card and (out / figure).is_file()
    assert "dcdit train --recipe tiny.toml" in card and f"dcdit export --ckpt {run} --out {out}" in card
    assert json.loads((out / "model_index.json").read_text())["scheduler"][1] == "DDPMScheduler"


def test_push_uploads_the_folder_through_hf_api(run, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    out = export(run, tmp_path / "pushed", push_to_hub="me/dcdit-tiny", measure=False)
    assert calls[0][:2] == ("create", "me/dcdit-tiny") and calls[0][2]["exist_ok"]
    assert calls[1][1]["folder_path"] == str(out) and calls[1][1]["repo_id"] == "me/dcdit-tiny"
    assert 'DCDiTPipeline.from_pretrained("me/dcdit-tiny")' in (out / "README.md").read_text()


def test_a_failed_push_is_one_line_and_keeps_the_folder(run, tmp_path, monkeypatch):
    def refuse(self, repo_id, **kw):
        raise OSError("401 Client Error: Unauthorized")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(DcditError, match="huggingface-cli login") as e:
        export(run, tmp_path / "pushed", push_to_hub="me/dcdit-tiny", measure=False)
    assert "\n" not in str(e.value) and (tmp_path / "pushed" / "model_index.json").is_file()


def test_bad_export_options_fail_before_any_work(run, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    one_line_exit_2(dcdit("export", "--ckpt", run, "--out", tmp_path / "busy"), "non-empty folder")
    one_line_exit_2(dcdit("export", "--ckpt", run, "--out", tmp_path / "x", "--push-to-hub", "no-owner"), "OWNER/NAME")
    one_line_exit_2(dcdit("export", "--ckpt", run, "--out", tmp_path / "x", "--scheduler", "heun"), "--scheduler")
    assert not (tmp_path / "x").exists() and (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_hf_reference_loads_from_a_prefilled_cache(exported, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    fill_hf_cache(cache, "me/dcdit-tiny", exported)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    state, recipe, step = read_weights("hf:me/dcdit-tiny")
    assert recipe.run.name == "tiny" and step == 4
    assert isinstance(load_pipeline("hf:me/dcdit-tiny").scheduler, type(load_pipeline(exported).scheduler))
    with pytest.raises(DcditError, match="not in the local Hugging Face cache"):
        read_weights("hf:me/absent")
    one_line_exit_2(dcdit("sample", "--ckpt", "hf:me/absent", env={"HF_HUB_CACHE": str(cache)}), "hf:me/absent")


def test_pipeline_from_pretrained_by_repo_id_reads_the_cache_in_a_process_without_the_cli(exported, tmp_path):
    cache = tmp_path / "hub"
    fill_hf_cache(cache, "me/dcdit-tiny", exported)
    script = textwrap.dedent("""
        import sys, torch
        from dcdit_cli.pipelines import DCDiTPipeline
        pipe = DCDiTPipeline.from_pretrained("me/dcdit-tiny")
        pipe.set_progress_bar_config(disable=True)
        out = pipe(class_labels=[1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
        assert "dcdit_cli.cli" not in sys.modules
        print(len(out.images), out.images[0].size)
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "(8,", "8)"]


# --- broken folders: one line, exit 2 (issue 21 item 5) ---------------------------------------


def broken(exported: Path, tmp_path: Path, how) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(exported, folder)
    how(folder)
    return folder


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            for inner_key, inner in value.items():
                data[key][inner_key].update(inner)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


BREAKAGES = {
    "missing config": (lambda f: (f / "transformer" / "config.json").unlink(), "config.json is missing"),
    "mismatched config": (lambda f: _edit_json(f / "transformer" / "config.json", recipe={"model": {"hidden_size": 64}}),
                          "does not match diffusion_pytorch_model.safetensors"),
    "truncated weights": (lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(
        (f / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()[:-100]), "damaged or truncated"),
    "unknown pipeline class": (lambda f: _edit_json(f / "model_index.json", _class_name="StableDiffusionPipeline"),
                               "unknown pipeline class 'StableDiffusionPipeline'"),
    "unknown transformer class": (lambda f: _edit_json(f / "transformer" / "config.json", _class_name="Evil"),
                                  "unknown class 'Evil'"),
    "unknown scheduler class": (lambda f: _edit_json(f / "model_index.json", scheduler=["diffusers", "os"]),
                                "scheduler class 'os'"),
    "pickled weights only": (lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").rename(
        f / "transformer" / "diffusion_pytorch_model.bin"), "never unpickles"),
    "not json": (lambda f: (f / "model_index.json").write_text("{"), "not readable JSON"),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_a_broken_folder_is_one_clear_error(exported, tmp_path, name):
    how, phrase = BREAKAGES[name]
    folder = broken(exported, tmp_path, how)
    with pytest.raises(DcditError, match=phrase.replace("(", r"\(").replace(")", r"\)")) as e:
        load_pipeline(folder)
    assert "\n" not in str(e.value)
    with pytest.raises(DcditError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        read_weights(folder)


@pytest.mark.parametrize("name", ["truncated weights", "mismatched config"])
def test_a_broken_folder_exits_2_from_the_cli(exported, tmp_path, name):
    how, phrase = BREAKAGES[name]
    one_line_exit_2(dcdit("sample", "--ckpt", broken(exported, tmp_path, how), "--num", "1", "--out", tmp_path / "s.png"),
                    phrase)
    assert not (tmp_path / "s.png").exists()


# --- issue 21's "done when": a newcomer's few lines, on the toy recipe ------------------------

NEWCOMER = """
import sys, torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline="pipeline_dcdit", trust_remote_code=True)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
out = pipe(class_labels=[0, 3], num_inference_steps=25, budget=0.2, generator=torch.Generator().manual_seed(0),
           return_boundaries=True)
assert "dcdit_cli.cli" not in sys.modules and type(pipe).__name__ == "DCDiTPipeline"
print(type(pipe.scheduler).__name__, len(out.images), out.images[0].size, tuple(out.boundaries.shape), out.kept.shape)
"""


@pytest.mark.slow
def test_train_export_and_sample_with_dpm_solver_like_a_newcomer(tmp_path):
    proc = dcdit("train", "--recipe", "toy", "--set", "train.max_steps=4", "--set", "train.ckpt_every_steps=4",
                 "--out", tmp_path / "toy")
    assert proc.returncode == 0, proc.stderr
    proc = dcdit("export", "--ckpt", tmp_path / "toy", "--out", tmp_path / "toy-diffusers", "--no-measure")
    assert proc.returncode == 0, proc.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # diffusers copies the shim there
    proc = subprocess.run([sys.executable, "-c", NEWCOMER, str(tmp_path / "toy-diffusers")], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["DPMSolverMultistepScheduler", "2", "(16,", "16)", "(25,", "2,", "16,", "16)", "(25,", "2,", "2)"]


def test_viz_boundaries_runs_a_diffusers_scheduler(run, tmp_path):
    from dcdit_cli.sampling.viz_boundaries import run_viz

    result = run_viz(run, num=1, timesteps=3, out_dir=tmp_path / "b", steps=5, method="dpm-solver")
    assert result["steps"] == 5 and len(result["timesteps"]) == 3 and result["timesteps"][0] == 999
    assert Path(result["summary"]).is_file()


def test_a_latent_run_exports_its_vae_or_a_pointer_to_it(tiny_recipe, vae_dir, tmp_path):
    from dcdit_cli.models import build_model
    from dcdit_cli.training.checkpoint import export_weights

    recipe = tiny_recipe.replace(model={"in_channels": 4}, data={"kind": "latents", "path": "x"})
    run = tmp_path / "latent-run"
    export_weights(run, 3, build_model(recipe.model).state_dict(), recipe.to_toml(), keep_last=1)
    out = export(run, tmp_path / "with-vae", vae=str(vae_dir))
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    assert (out / "figures" / "compression_vs_t.png").is_file()
    pipe = load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(class_labels=[1], num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)
    out = export(run, tmp_path / "pointer", vae=str(tmp_path / "no-vae-here"), measure=False)
    card = (out / "README.md").read_text()
    assert not (out / "vae").exists() and "not included" in card and "AutoencoderKL.from_pretrained" in card
