"""Bad input through the real CLI: one line on stderr, exit 2, no traceback, nothing damaged.

Every case runs the console script's ``main()`` (the same function the ``dcdit`` entry point
calls) in-process with sys.argv set and stderr captured; a few run it as a subprocess to
show the two agree. Each case asserts exit code 2, exactly one non-empty stderr line, no
traceback, the named problem, and that every file in the shared workspace is unchanged and
no file was added (hashes before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcdit_cli import cli

# ---------------------------------------------------------------------------------------------
# The shared workspace: one tiny trained run and every kind of bad file, made once
# ---------------------------------------------------------------------------------------------

TINY = "tiny"
LATENTS = ["--set", "data.kind=latents", "--set", "data.image_size=16", "--set", "model.in_channels=4"]
IMAGES = ["--set", "data.kind=images"]  # tiny's 8×8 RGB model reads the pixels directly


class Evil:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _shards(root: Path, shape=(4, 8, 8), n=4, index_extra=None, drop=None, count=None, labels=None) -> Path:
    root.mkdir(parents=True)
    np.save(root / "shard-000000.latents.npy", np.zeros((n, 2, *shape), np.float16))
    np.save(root / "shard-000000.labels.npy", np.arange(n, dtype=np.int64) % 6 if labels is None else np.array(labels, np.int64))
    index = {"format": "dcdit-latents-v1", "image_size": 16, "latent_shape": list(shape), "classes": [str(c) for c in range(6)],
             "shards": [{"name": "shard-000000", "count": n if count is None else count}], **(index_extra or {})}
    for key in drop or ():
        index.pop(key)
    (root / "index.json").write_text(json.dumps(index))
    return root


def _garble_tensor_bytes(path: Path) -> None:
    """Flips bytes after the safetensors header: the file still parses, the weights are wrong."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(header + 16, len(data), 97):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def ws(tmp_path_factory, inception_weights):
    """Paths of the workspace, by name."""
    from safetensors.torch import save_file

    from dcdit_cli.config.recipe import load_recipe
    from dcdit_cli.models import build_model
    from dcdit_cli.training.checkpoint import export_weights, save_checkpoint
    from dcdit_cli.training.loop import train

    root = tmp_path_factory.mktemp("bad-input")
    run = root / "run"
    train(load_recipe(TINY, ["train.max_steps=2", "train.ckpt_every_steps=2"]), run)
    p = {"root": root, "run": run, "weights": next((run / "weights").glob("*.safetensors")),
         "ckpt": run / "checkpoints/step-0000002", "file": root / "a-file.txt", "marker": root / "PWNED"}
    p["file"].write_text("a regular file\n")
    p["inception"] = inception_weights

    # Recipes
    rec = root / "recipes"
    rec.mkdir()
    (rec / "bad.toml").write_text("[train\nlr = 1\n")
    (rec / "latin1.toml").write_bytes("[run]\nname = 'caf\xe9'\n".encode("latin-1"))
    (rec / "optimizer.toml").write_text("[optimizer]\nlr = 1e-4\n")
    (rec / "notable.toml").write_text("model = 3\n")
    (rec / "typo.toml").write_text("[model]\nhidden = 32\n")
    (rec / "types.toml").write_text('[train]\nmax_steps = "ten"\n')
    p["recipes"] = rec

    # Checkpoints: damaged copies of the run, another recipe's checkpoint and weights, pickles
    def damaged(name, fn):
        r = _copy_run(run, root / name)
        fn(r / "checkpoints/step-0000002")
        return r

    p["trunc"] = damaged("trunc", lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:200]))
    p["zero"] = damaged("zero", lambda c: (c / "model.safetensors").write_bytes(b""))
    p["garbled"] = damaged("garbled", lambda c: _garble_tensor_bytes(c / "ema.safetensors"))
    p["nometa"] = damaged("nometa", lambda c: (c / "meta.json").unlink())
    other = load_recipe(TINY, ["model.hidden_size=64"])
    model = build_model(other.model)
    p["other"] = save_checkpoint(root / "other", 2, model.state_dict(), model.state_dict(),
                                 torch.optim.AdamW(model.parameters()).state_dict(), {"step": 2}, keep_last=1)
    other_weights = export_weights(root / "other", 2, model.state_dict(), load_recipe(TINY).to_toml(), keep_last=1)
    p["other_weights"] = other_weights  # tiny's recipe in the metadata, wider tensors
    for name, cut in (("w_trunc", 300), ("w_zero", 0)):
        p[name] = root / f"{name}.safetensors"
        p[name].write_bytes(p["weights"].read_bytes()[:cut])
    p["w_garbled"] = root / "w_garbled.safetensors"
    p["w_garbled"].write_bytes(p["weights"].read_bytes())
    _garble_tensor_bytes(p["w_garbled"])
    p["w_nometa"] = root / "w_nometa.safetensors"
    save_file({"x": torch.zeros(2)}, str(p["w_nometa"]))
    p["evil"] = root / "evil.pt"
    torch.save({"weights": Evil(p["marker"])}, p["evil"])
    p["list_pt"] = root / "list.pt"
    torch.save([1, 2, 3], p["list_pt"])
    # A checkpoint whose files are intact (checksums match) but whose optimizer state is another model's
    tiny_model = build_model(load_recipe(TINY).model)
    other_opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3, 8, 8), torch.tensor([1]), torch.tensor([0]))[0].square().mean().backward()
    other_opt.step()
    p["optbad"] = save_checkpoint(root / "optbad", 2, tiny_model.state_dict(), tiny_model.state_dict(),
                                  other_opt.state_dict(), {"step": 2}, keep_last=1)
    p["empty_run"] = root / "empty-run"
    p["empty_run"].mkdir()

    # Data
    p["empty"] = root / "empty"
    p["empty"].mkdir()
    (root / "dir.png").mkdir()
    junk = root / "junk" / "cls"
    junk.mkdir(parents=True)
    (junk / "a.png").write_text("not an image")
    p["junk"] = junk.parent
    images = root / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    p["images"] = images
    p["lat_ok"] = _shards(root / "lat-ok")
    p["lat_channels"] = _shards(root / "lat-channels", shape=(3, 8, 8))
    p["lat_size"] = _shards(root / "lat-size", shape=(4, 4, 4))
    p["lat_noshards"] = _shards(root / "lat-noshards", drop=["shards"])
    p["lat_count"] = _shards(root / "lat-count", count="four")
    p["lat_zero"] = _shards(root / "lat-zero", count=0)
    p["lat_mismatch"] = _shards(root / "lat-mismatch", count=7)
    p["lat_garbage"] = _shards(root / "lat-garbage")
    (p["lat_garbage"] / "shard-000000.latents.npy").write_bytes(b"garbage")
    p["lat_notjson"] = _shards(root / "lat-notjson")
    (p["lat_notjson"] / "index.json").write_text("{not json")
    p["lat_classes"] = _shards(root / "lat-classes", index_extra={"classes": 3})
    p["lat_labels"] = _shards(root / "lat-labels", labels=[0, 9, 1, 2])  # six class names, a label 9
    p["lat_latin1"] = _shards(root / "lat-latin1")
    p["px_size"] = _shards(root / "px-size", shape=(3, 16, 16), index_extra={"format": "dcdit-pixels-v1", "sample_shape": [3, 16, 16]})
    (p["px_size"] / "shard-000000.latents.npy").rename(p["px_size"] / "shard-000000.pixels.npy")
    (p["lat_latin1"] / "index.json").write_bytes(b'{"format": "caf\xe9"}')

    # Evaluator inputs
    np.savez(root / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(root / "nchw.npz", arr_0=np.zeros((4, 3, 8, 8), np.uint8))
    np.savez(root / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(root / "objects.npz", mu=np.array([object()] * 2048, dtype=object), sigma=np.zeros((2048, 2048)))
    (root / "text.npz").write_text("not a zip")
    with zipfile.ZipFile(root / "bad-header.npz", "w") as zf:  # a zip whose member is no .npy
        zf.writestr("arr_0.npy", b"\x93NUMPY\x01\x00garbage header")
    p["inception_list"] = root / "inception.pth"
    torch.save([1, 2], p["inception_list"])
    return p


def _snapshot(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.rglob("*")) if f.is_file()}


def _run_main(args: list[str], capsys) -> tuple[int, str]:
    """``dcdit ARGS`` in-process through the console script's main()."""
    argv = sys.argv
    sys.argv = ["dcdit", *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    finally:
        sys.argv = argv
    return exit_info.value.code, capsys.readouterr().err


def _run_subprocess(args: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dcdit_cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    return proc.returncode, proc.stderr


# ---------------------------------------------------------------------------------------------
# The table: (id, arguments with {name} placeholders for workspace paths, text the line must hold)
# ---------------------------------------------------------------------------------------------

T = ["train", "--recipe", TINY]
S = lambda *kv: [a for item in kv for a in ("--set", item)]  # noqa: E731

CASES = [
    # --- recipes
    ("no-recipe", ["train"], "no recipe given"),
    ("unknown-recipe", ["train", "--recipe", "tiyn"], "did you mean 'tiny'"),
    ("missing-recipe-file", ["train", "--recipe", "{root}/nope.toml"], "does not exist"),
    ("recipe-not-toml", ["train", "--recipe", "{recipes}/bad.toml"], "not valid TOML"),
    ("recipe-not-utf8", ["train", "--recipe", "{recipes}/latin1.toml"], "not UTF-8"),
    ("unknown-section-literal-brackets", ["train", "--recipe", "{recipes}/optimizer.toml"], "unknown section [optimizer]"),
    ("section-not-table", ["train", "--recipe", "{recipes}/notable.toml"], "[model] must be a table"),
    ("unknown-key", ["train", "--recipe", "{recipes}/typo.toml"], "did you mean 'hidden_size'"),
    ("wrong-type", ["train", "--recipe", "{recipes}/types.toml"], "train.max_steps: expected int"),
    ("print-recipe-bad", ["train", "--recipe", "{recipes}/types.toml", "--print-recipe"], "expected int"),
    # --- overrides: one field out of range
    ("hidden-size-0", T + S("model.hidden_size=0"), "model.hidden_size: 0 is outside [1, 65536]"),
    ("num-heads-0", T + S("model.num_heads=0"), "model.num_heads: 0 is outside"),
    ("mlp-ratio-negative", T + S("model.mlp_ratio=-1.0"), "model.mlp_ratio: -1.0 is outside (0, inf)"),
    ("depth-negative", T + S("model.depth=-1"), "model.depth: -1 is outside"),
    ("seed-negative", T + S("run.seed=-1"), "run.seed: -1 is outside [0, 2**63)"),
    ("lr-nan", T + S("train.lr=nan"), "train.lr: nan is not a finite number"),
    ("lr-inf", T + S("train.lr=inf"), "train.lr: inf is not a finite number"),
    ("lr-negative", T + S("train.lr=-0.001"), "train.lr: -0.001 is outside [0, inf)"),
    ("global-batch-0", T + S("train.global_batch=0"), "train.global_batch: 0 is outside"),
    ("ema-decay-above-1", T + S("train.ema_decay=1.5"), "train.ema_decay: 1.5 is outside [0, 1]"),
    ("label-dropout-1", T + S("train.label_dropout=1.0"), "train.label_dropout: 1.0 is outside [0, 1)"),
    ("betas-item", T + S("train.betas=[0.9, 1.5]"), "train.betas: 1.5 is outside [0, 1)"),
    ("keep-last-0", T + S("train.keep_last=0"), "train.keep_last: 0 is outside"),
    ("target-ratio-1", T + S("model.target_ratio=1.0"), "model.target_ratio: 1.0 is outside (1, inf)"),
    ("fractions-item", T + S("train.multi_budget_fractions=[0.0, 1.0]"), "train.multi_budget_fractions: 1.0 is outside"),
    ("sample-budget-1", T + S("sample.budget=1.0"), "sample.budget: 1.0 is outside [0, 1)"),
    ("sample-cfg-below-1", T + S("sample.cfg_scale=0.5"), "sample.cfg_scale: 0.5 is outside [1, inf)"),
    ("eval-batch-0", T + S("eval.batch_size=0"), "eval.batch_size: 0 is outside"),
    ("kind-choice", T + S("model.kind=vit"), "model.kind: 'vit' is not one of dcdit, dit"),
    ("several-at-once", T + S("model.hidden_size=0", "train.lr=nan", "run.seed=-1"), "3 problems"),
    # --- overrides: fields that must agree
    ("heads-divide-width", T + S("model.num_heads=3"), "not divisible by model.num_heads 3"),
    ("shapes-size-vs-model", T + S("data.image_size=16"), "model.input_size = data.image_size"),
    ("shapes-channels-vs-model", T + S("model.in_channels=4"), "model.in_channels = 3"),
    ("classes-differ", T + S("model.num_classes=7"), "differs from data.num_classes"),
    ("betas-two-values", T + S("train.betas=[0.9]"), "train.betas must have two values"),
    ("micro-exceeds-global", T + S("train.micro_batch=100"), "train.micro_batch 100 exceeds"),
    ("sampling-steps-too-many", T + S("diffusion.sampling_steps=2000"), "diffusion.sampling_steps must be in"),
    ("uncond-budget-between", T + S("sample.uncond_budget=-0.5"), "give -1 (same as sample.budget)"),
    ("guided-channels", T + S("sample.guided_channels=5"), "sample.guided_channels 5 exceeds"),
    ("set-no-equals", T + S("model.depth"), "expected section.key=value"),
    ("set-alias", T + S("train.learning_rate=1"), "did you mean 'lr'"),
    ("flops-recipe-override", ["flops", "--recipe", TINY, "--set", "model.depth=0"], "model.depth: 0 is outside"),
    ("flops-unknown-recipe", ["flops", "--recipe", "nope"], "unknown recipe 'nope'"),
    ("flops-nothing", ["flops"], "nothing to count"),
    ("flops-num-0", ["flops", "--ckpt", "{run}", "--num", "0"], "--num 0: give at least 1"),
    ("flops-memory-dit", ["flops", "--memory", "--recipe", "dit-b-p2"], "the memory model covers DC-DiT recipes"),
    ("flops-memory-nothing", ["flops", "--memory"], "--memory needs --recipe NAME"),
    ("flops-memory-precision", ["flops", "--memory", "--recipe", "b-n4", "--precision", "fp8"], "--precision 'fp8': use bf16"),
    ("flops-convention", ["flops", "--ckpt", "{run}", "--convention", "paper"], "--convention 'paper': use one of dcdit, authors"),
    # --- train: outputs and checkpoints
    ("train-out-under-file", T + ["--out", "{file}/run"], "is a file, not a directory"),
    ("train-out-is-file", T + ["--out", "{file}"], "is a file: pass a directory"),
    ("resume-missing", T + ["--out", "{root}/new", "--resume", "{root}/nope"], "does not exist"),
    ("resume-other-recipe", T + ["--out", "{root}/new", "--resume", "{other}"], "made by a different model"),
    ("resume-truncated", T + ["--out", "{root}/new", "--resume", "{trunc}/checkpoints/step-0000002"], "model.safetensors does not match its checksum"),
    ("resume-zero-byte", T + ["--out", "{root}/new", "--resume", "{zero}/checkpoints/step-0000002"], "model.safetensors does not match its checksum"),
    ("resume-garbled", T + ["--out", "{root}/new", "--resume", "{garbled}/checkpoints/step-0000002"], "ema.safetensors does not match its checksum"),
    ("resume-no-meta", T + ["--out", "{root}/new", "--resume", "{nometa}/checkpoints/step-0000002"], "no meta.json"),
    ("rerun-all-damaged", ["train", "--recipe", TINY, "--set", "train.max_steps=4", "--out", "{garbled}"], "no intact checkpoint"),
    ("rerun-changed-recipe", ["train", "--recipe", TINY, "--set", "train.lr=0.01", "--out", "{run}"], "trained with a different recipe"),
    # --- upcycle / distill
    ("upcycle-no-from", ["upcycle", "--recipe", "tiny-upcycle"], "no --from given"),
    ("upcycle-from-missing", ["upcycle", "--recipe", "tiny-upcycle", "--from", "{root}/nope.pt"], "does not exist"),
    ("upcycle-pickle-runs-code", ["upcycle", "--recipe", "tiny-upcycle", "--from", "{evil}", "--out", "{root}/up"], "refused (nothing from it was run)"),
    ("upcycle-not-a-state-dict", ["upcycle", "--recipe", "tiny-upcycle", "--from", "{list_pt}", "--out", "{root}/up"], "not a DiT state dict"),
    ("upcycle-text-file", ["upcycle", "--recipe", "tiny-upcycle", "--from", "{file}", "--out", "{root}/up"], "not a readable PyTorch checkpoint"),
    ("upcycle-zero-byte", ["upcycle", "--recipe", "tiny-upcycle", "--from", "{w_zero}", "--out", "{root}/up"], "not a readable safetensors file"),
    ("upcycle-dcdit-weights", ["upcycle", "--recipe", "tiny-upcycle", "--from", "{weights}", "--out", "{root}/up"], "not a DiT"),
    ("upcycle-out-under-file", ["upcycle", "--recipe", "tiny-upcycle", "--from", "{evil}", "--out", "{file}/up"], "is a file, not a directory"),
    ("distill-no-from", ["distill", "--recipe", "tiny-upcycle-distill"], "no --from given"),
    # --- sample: weights
    ("sample-missing", ["sample", "--ckpt", "{root}/nope"], "does not exist"),
    ("sample-run-without-weights", ["sample", "--ckpt", "{empty_run}"], "has no exported weights"),
    ("sample-truncated-weights", ["sample", "--ckpt", "{w_trunc}", "--out", "{root}/o.png"], "not a safetensors file"),
    ("sample-zero-byte-weights", ["sample", "--ckpt", "{w_zero}", "--out", "{root}/o.png"], "not a safetensors file"),
    ("sample-garbled-weights", ["sample", "--ckpt", "{w_garbled}", "--out", "{root}/o.png"], "do not match their checksum"),
    ("sample-other-recipe-weights", ["sample", "--ckpt", "{other_weights}", "--out", "{root}/o.png"], "made by a different model"),
    ("sample-pickle", ["sample", "--ckpt", "{evil}", "--out", "{root}/o.png"], "refused (nothing from it was run)"),
    ("sample-no-metadata", ["sample", "--ckpt", "{w_nometa}", "--out", "{root}/o.png"], "has no dcdit recipe"),
    # --- sample: options (all fail before the model loads)
    ("sample-num-0", ["sample", "--ckpt", "{run}", "--num", "0"], "--num 0: give at least 1"),
    ("sample-batch-0", ["sample", "--ckpt", "{run}", "--batch-size", "0"], "--batch-size 0"),
    ("sample-steps-0", ["sample", "--ckpt", "{run}", "--steps", "0"], "--steps 0: give at least 1"),
    ("sample-cfg-negative", ["sample", "--ckpt", "{run}", "--cfg-scale", "-1"], "--cfg-scale -1.0: give a guidance scale >= 1"),
    ("sample-cfg-nan", ["sample", "--ckpt", "{run}", "--cfg-scale", "nan"], "--cfg-scale nan"),
    ("sample-budget-1.5", ["sample", "--ckpt", "{run}", "--budget", "1.5"], "--budget 1.5 is outside [0, 1)"),
    ("sample-uncond-budget", ["sample", "--ckpt", "{run}", "--uncond-budget", "-0.5"], "--uncond-budget -0.5 is outside"),
    ("sample-seed-negative", ["sample", "--ckpt", "{run}", "--seed", "-1"], "--seed -1"),
    ("sample-out-suffix", ["sample", "--ckpt", "{run}", "--out", "{root}/grid.txt"], "must end in .png"),
    ("sample-out-under-file", ["sample", "--ckpt", "{run}", "--out", "{file}/grid.png"], "is a file, not a directory"),
    ("sample-out-is-dir", ["sample", "--ckpt", "{run}", "--out", "{root}/dir.png"], "is a directory"),
    ("sample-npz-suffix", ["sample", "--ckpt", "{run}", "--npz", "{root}/s.png"], "must end in .npz"),
    ("sample-npz-under-file", ["sample", "--ckpt", "{run}", "--npz", "{file}/s.npz"], "is a file, not a directory"),
    ("sample-classes-text", ["sample", "--ckpt", "{run}", "--classes", "cat,dog"], "comma-separated class indices"),
    ("sample-classes-range", ["sample", "--ckpt", "{run}", "--classes", "99", "--out", "{root}/o.png"], "class 99 is outside [0, 6)"),
    ("sample-many-problems", ["sample", "--ckpt", "{run}", "--num", "0", "--steps", "0", "--out", "{root}/x.jpg"], "3 problems"),
    # --- viz-boundaries
    ("viz-num-0", ["viz-boundaries", "--ckpt", "{run}", "--num", "0"], "--num 0"),
    ("viz-timesteps-0", ["viz-boundaries", "--ckpt", "{run}", "--timesteps", "0"], "--timesteps 0"),
    ("viz-steps-0", ["viz-boundaries", "--ckpt", "{run}", "--steps", "0"], "--steps 0"),
    ("viz-budget", ["viz-boundaries", "--ckpt", "{run}", "--budget", "2"], "--budget 2.0 is outside"),
    ("viz-cfg", ["viz-boundaries", "--ckpt", "{run}", "--cfg-scale", "0.5"], "--cfg-scale 0.5"),
    ("viz-out-under-file", ["viz-boundaries", "--ckpt", "{run}", "--out", "{file}/b"], "is a file, not a directory"),
    ("viz-out-is-file", ["viz-boundaries", "--ckpt", "{run}", "--out", "{file}"], "is a file: pass a directory"),
    ("viz-garbled", ["viz-boundaries", "--ckpt", "{w_garbled}", "--out", "{root}/b"], "do not match their checksum"),
    # --- fid
    ("fid-nothing", ["fid"], "pass --samples S.npz and --ref REF.npz"),
    ("fid-samples-missing", ["fid", "--samples", "{root}/none.npz", "--ref", "{root}/s.npz"], "samples not found"),
    ("fid-samples-not-zip", ["fid", "--samples", "{root}/text.npz", "--ref", "{root}/s.npz"], "not a readable .npz"),
    ("fid-samples-nchw", ["fid", "--samples", "{root}/nchw.npz", "--ref", "{root}/s.npz"], "channels-first"),
    ("fid-samples-bad-header", ["fid", "--samples", "{root}/bad-header.npz", "--ref", "{root}/s.npz"], "bad-header.npz: arr_0.npy has no readable .npy header"),
    ("fid-samples-float", ["fid", "--samples", "{root}/float.npz", "--ref", "{root}/s.npz"], "expected uint8"),
    ("fid-samples-empty-folder", ["fid", "--samples", "{empty}", "--ref", "{root}/s.npz"], "no images"),
    ("fid-ref-objects", ["fid", "--samples", "{root}/s.npz", "--ref", "{root}/objects.npz"], "not numeric arrays"),
    ("fid-ref-missing", ["fid", "--samples", "{root}/s.npz", "--ref", "{root}/none.npz"], "reference batch not found"),
    ("fid-batch-0", ["fid", "--samples", "{root}/s.npz", "--ref", "{root}/s.npz", "--batch-size", "0"], "--batch-size 0"),
    ("fid-num-0", ["fid", "--samples", "{root}/s.npz", "--ref", "{root}/s.npz", "--num", "0"], "--num 0"),
    ("fid-num-too-many", ["fid", "--samples", "{root}/s.npz", "--ref", "{root}/s.npz", "--num", "9"], "asked for 9 samples"),
    ("fid-no-weights", ["fid", "--samples", "{root}/s.npz", "--ref", "{root}/s.npz", "--inception-weights", "{root}/none.pth"], "Inception weights not found"),
    ("fid-weights-pickle", ["fid", "--samples", "{root}/s.npz", "--ref", "{root}/s.npz", "--inception-weights", "{evil}"], "never unpickles"),
    ("fid-weights-not-dict", ["fid", "--samples", "{root}/s.npz", "--ref", "{root}/s.npz", "--inception-weights", "{inception_list}"], "does not hold a state dict"),
    ("fid-metrics-unknown", ["fid", "--samples", "{root}/s.npz", "--ref", "{root}/s.npz", "--metrics", "fid,fdd"], "--metrics 'fid,fdd'"),
    ("fid-dinov2-missing", ["fid", "--samples", "{root}/s.npz", "--ref", "{root}/s.npz", "--metrics", "fd_dinov2", "--inception-weights",
                            "{inception}", "--dinov2-weights", "{root}/none.safetensors"], "DINOv2 weights not found"),
    ("fid-dinov2-pickle", ["fid", "--samples", "{root}/s.npz", "--ref", "{root}/s.npz", "--metrics", "fd_dinov2", "--inception-weights",
                           "{inception}", "--dinov2-weights", "{evil}"], "never unpickles"),
    ("make-ref-no-out", ["fid", "--make-ref", "{images}"], "--make-ref needs --out"),
    ("make-ref-suffix", ["fid", "--make-ref", "{images}", "--out", "{root}/ref.txt"], "must end in .npz"),
    ("make-ref-under-file", ["fid", "--make-ref", "{images}", "--out", "{file}/ref.npz"], "is a file, not a directory"),
    ("make-ref-empty", ["fid", "--make-ref", "{empty}", "--out", "{root}/ref.npz"], "no images"),
    ("make-ref-non-images", ["fid", "--make-ref", "{junk}", "--out", "{root}/ref.npz", "--inception-weights", "{inception}"], "only 0 readable image(s)"),
    ("make-ref-missing", ["fid", "--make-ref", "{root}/none", "--out", "{root}/ref.npz"], "image folder not found"),
    # --- extract
    ("extract-missing", ["extract", "--data-path", "{root}/none", "--out", "{root}/f"], "does not exist"),
    ("extract-empty", ["extract", "--data-path", "{empty}", "--out", "{root}/f"], "no class folders"),
    ("extract-batch-0", ["extract", "--data-path", "{junk}", "--out", "{root}/f", "--batch-size", "0"], "--batch-size 0"),
    ("extract-flip", ["extract", "--data-path", "{junk}", "--out", "{root}/f", "--flip", "sideways"], "--flip 'sideways'"),
    ("extract-out-under-file", ["extract", "--data-path", "{junk}", "--out", "{file}/f"], "is a file, not a directory"),
    ("extract-no-vae", ["extract", "--data-path", "{junk}", "--out", "{root}/f", "--vae", "{root}/no-vae"], "VAE"),
    # --- training data against the model
    ("latents-empty-path", T + LATENTS, "data.path is empty"),
    ("latents-missing", T + LATENTS + S("data.path='{root}/none'"), "does not exist"),
    ("latents-path-is-file", T + LATENTS + S("data.path='{file}'"), "is a file: point it at the directory"),
    ("latents-empty-folder", T + LATENTS + S("data.path='{empty}'"), "index.json is missing"),
    ("latents-index-no-shards", T + LATENTS + S("data.path='{lat_noshards}'"), "lacks 'shards'"),
    ("latents-index-bad-count", T + LATENTS + S("data.path='{lat_count}'"), "malformed 'shards'"),
    ("latents-index-not-json", T + LATENTS + S("data.path='{lat_notjson}'"), "not readable JSON"),
    ("latents-index-not-utf8", T + LATENTS + S("data.path='{lat_latin1}'"), "not readable JSON"),
    ("latents-zero-images", T + LATENTS + S("data.path='{lat_zero}'"), "holds zero images"),
    ("latents-count-mismatch", T + LATENTS + S("data.path='{lat_mismatch}'"), "index says 7"),
    ("latents-garbage-shard", T + LATENTS + S("data.path='{lat_garbage}'"), "is unreadable"),
    ("latents-channels", T + LATENTS + S("data.path='{lat_channels}'"), "holds samples of shape (3, 8, 8)"),
    ("latents-size", T + LATENTS + S("data.path='{lat_size}'"), "holds samples of shape (4, 4, 4)"),
    ("images-empty-path", T + IMAGES, "data.kind = 'images' but data.path is empty"),
    ("images-missing", T + IMAGES + S("data.path='{root}/none'"), "is missing: point it at a folder of class subfolders"),
    ("images-path-is-file", T + IMAGES + S("data.path='{file}'"), "is a file: point it at a folder of class subfolders"),
    ("images-no-class-folders", T + IMAGES + S("data.path='{empty}'"), "no class folders"),
    ("images-not-images", T + IMAGES + S("data.path='{junk}'"), "is not an image PIL can read"),
    ("images-latent-shards", T + IMAGES + S("data.path='{lat_ok}'"), "holds latent shards (dcdit-latents-v1), not pixel shards"),
    ("images-shards-size", T + IMAGES + S("data.path='{px_size}'"), "extracted at 16 px but data.image_size = 8"),
    ("images-model-channels", T + IMAGES + S("model.in_channels=4"), "set model.input_size = data.image_size and model.in_channels = 3"),
    # --- found by a hostile review (second round)
    ("hidden-size-not-4", T + S("model.hidden_size=6", "model.num_heads=2"), "not a multiple of 4"),
    ("run-name-empty", T + S("run.name=''"), "run.name '' must be a non-empty name"),
    ("run-name-path", T + S("run.name='a/b'"), "without path separators"),
    ("multi-budget-no-fractions", T + S("train.multi_budget_fractions=[]", "train.multi_budget_start_step=0"),
     "multi_budget_fractions is empty"),
    ("latents-index-classes", T + LATENTS + S("data.path='{lat_classes}'"), "not a list of class names"),
    ("latents-labels-beyond-classes", T + LATENTS + S("data.path='{lat_labels}'"), "have 10 classes"),
    ("sample-steps-beyond-schedule", ["sample", "--ckpt", "{run}", "--steps", "5000", "--out", "{root}/o.png"], "--steps 5000 exceeds"),
    ("viz-classes-range", ["viz-boundaries", "--ckpt", "{run}", "--classes", "77", "--out", "{root}/vb"], "class 77 is outside"),
    ("eval-budgets-flag", ["eval", "--ckpt", "{run}", "--ref", "{root}/s.npz", "--budgets", "0.5,1.5",
                           "--inception-weights", "{inception}"], "--budgets 1.5 is outside"),
    ("eval-uncond", ["eval", "--ckpt", "{run}", "--ref", "{root}/s.npz", "--uncond-budget", "-2",
                     "--inception-weights", "{inception}"], "or -1 for the same as --budget"),
    ("eval-out-is-file", ["eval", "--ckpt", "{run}", "--ref", "{root}/s.npz", "--out", "{file}",
                          "--inception-weights", "{inception}"], "is a file: pass a directory"),
    ("convert-out-is-run", ["convert", "--from", "{other_weights}", "--out", "{run}"], "holds a training run"),
    ("convert-out-is-file", ["convert", "--from", "{weights}", "--out", "{file}"], "is a file: pass a directory"),
    ("resume-broken-keeps-run", T + S("train.max_steps=9") + ["--out", "{run}", "--resume", "{zero}/checkpoints/step-0000002"],
     "model.safetensors"),
    ("resume-optimizer-shapes", T + ["--out", "{root}/optrun", "--resume", "{optbad}"], "optimizer exp_avg"),
    ("recipe-is-a-directory", ["train", "--recipe", "{recipes}"], "is a directory: give a .toml file"),
    ("extract-pixels-mean", ["extract", "--data-path", "{junk}", "--out", "{root}/f", "--pixels", "--mean"], "--pixels runs no VAE"),
    ("extract-out-in-images", ["extract", "--data-path", "{junk}", "--out", "{junk}/cls/f"], "lies inside --data-path"),
    ("hidden-size-beyond-int64", T + S("model.hidden_size=100000000000000000000"), "does not fit a 64-bit integer"),
    # --- the command line itself
    ("unknown-command", ["trian"], "Did you mean 'train'"),
    ("unknown-root-option", ["--bogus"], "No such option: --bogus"),
    ("unknown-option", ["sample", "--ckpt", "{run}", "--nmu", "3"], "No such option: --nmu"),
    ("bad-int", ["sample", "--ckpt", "{run}", "--num", "abc"], "Invalid value for '--num'"),
    ("missing-required", ["sample"], "Missing option '--ckpt'"),
]

# Run as real subprocesses as well: the console script, its stderr and exit code as a user sees them.
SUBPROCESS = {"unknown-section-literal-brackets", "recipe-not-utf8", "upcycle-pickle-runs-code", "unknown-command"}


def _expand(args: list[str], ws: dict) -> list[str]:
    return [a.format(**{k: str(v) for k, v in ws.items()}) for a in args]


def _check(code: int, err: str, expected: str, ws: dict, before: dict) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and "\x1b[" not in err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert _snapshot(ws["root"]) == before, "a file was changed, added or removed"
    assert not ws["marker"].exists(), "a pickle ran code"


def test_the_table_is_large():
    assert len(CASES) >= 80 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_in_process(case, ws, capsys, monkeypatch):
    _, args, expected = case
    monkeypatch.chdir(ws["root"])
    before = _snapshot(ws["root"])
    code, err = _run_main(_expand(args, ws), capsys)
    _check(code, err, expected, ws, before)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in SUBPROCESS], ids=sorted(SUBPROCESS, key=[c[0] for c in CASES].index))
def test_bad_input_subprocess(case, ws):
    _, args, expected = case
    before = _snapshot(ws["root"])
    code, err = _run_subprocess(_expand(args, ws), ws["root"])
    _check(code, err, expected, ws, before)


def test_refused_commands_leave_no_directories(ws, tmp_path, capsys, monkeypatch):
    """Empty folders are not files, so the table's snapshot misses them: a refused viz-boundaries
    creates no --out, a failed first run removes runs/ too."""
    monkeypatch.chdir(tmp_path)
    code, _ = _run_main(_expand(["viz-boundaries", "--ckpt", "{run}", "--classes", "77", "--out", "vb"], ws), capsys)
    assert code == 2 and not (tmp_path / "vb").exists()
    code, _ = _run_main(_expand(T + ["--resume", "{zero}/checkpoints/step-0000002"], ws), capsys)
    assert code == 2 and not (tmp_path / "runs").exists()


def test_unexpected_error_is_one_line_and_a_log(capsys, monkeypatch, tmp_path):
    """A genuine bug: a short line naming the log file that holds the traceback, exit 1."""
    import dcdit_cli.models.flops as flops

    monkeypatch.setenv("DCDIT_LOG_DIR", str(tmp_path))
    monkeypatch.setattr(flops, "run_flops", lambda **kw: {}["boom"])
    code, err = _run_main(["flops", "--recipe", TINY], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "unexpected KeyError" in lines[0] and "Traceback" not in err
    (log,) = tmp_path.glob("dcdit-crash-*.log")
    assert str(log) in lines[0] and "Traceback" in log.read_text() and "boom" in log.read_text()
