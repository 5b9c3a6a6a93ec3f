"""The GPU benchmark runs end to end on the CPU with tiny models (its figures need a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu.py"), "--device", "cpu", "--smoke"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "b-n4 [sdpa_pad]" in out.stdout and "dit-b-p2-isoflop" in out.stdout
    assert "MFU relative to dit-b-p2-isoflop" in out.stdout and "Lite-CFG 0.0 / 0.9" in out.stdout


def test_scaling_benchmark_smoke():
    """benchmarks/scaling.py end to end at toy grids: rows for the three models and the per-doubling ratios."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/scaling.py"), "--grids", "8", "16", "--width", "64",
                          "--depth", "1", "--repeats", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "16²  scaffold" in out.stdout and "DC-DiT / DiT at each grid" in out.stdout
    scaffold = next(line for line in out.stdout.splitlines() if line.startswith("  16²  scaffold"))
    assert 3.9 < float(scaffold.split()[-1]) <= 4.0  # the scaffold's FLOPs: linear in L plus the per-image embeddings


def test_sampler_comparison_figure_and_doc_table_come_from_its_json(tmp_path):
    """docs/diffusers.md's table and figure are benchmarks/sampler_comparison.py's recorded result."""
    import json

    result = json.loads((ROOT / "docs/figures/sampler-comparison.json").read_text())
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/sampler_comparison.py"), "--from-json",
                          str(ROOT / "docs/figures/sampler-comparison.json"), "--figure", str(tmp_path / "f.png")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "f.png").stat().st_size > 0
    doc = (ROOT / "docs/diffusers.md").read_text()
    for row in result["rows"]:
        cells = f"| {row['seconds_per_image']:.2f} | {row['time_vs_ddpm250']:.3f} | {row['tflops_spent_per_img']:.3g} | " \
                f"{row['kept_tokens']:.1f} | {100 * row['recognised']:.0f} % | {row['feature_fd']:.1f} |"
        assert cells in doc, cells


def test_perf_train_profile_lists_the_costliest_operators_of_both_models():
    """benchmarks/perf.py train --profile: per model, a header with the per-step total, the top 12
    operators in falling order and the rest, whose shares add up to the whole."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/perf.py"), "train", "--size", "toy", "--batch", "2",
                          "--repeats", "1", "--profile"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if "most self time per step" in line]
    assert [lines[i].split(":")[0].strip() for i in heads] == ["toy-dit", "toy"]
    op_calls = [int(lines[i].split(" aten operator calls")[0].split()[-1]) for i in heads]
    assert op_calls[1] > op_calls[0] > 0  # the DC-DiT's scaffold runs more operators than the DiT
    for i in heads:
        rows, rest = lines[i + 1 : i + 13], lines[i + 13]
        ms = [float(r.split()[-3]) for r in rows]
        shares = [float(r.split()[-1].rstrip("%")) for r in rows + [rest]]
        assert ms == sorted(ms, reverse=True) and "the other" in rest and abs(sum(shares) - 100.0) < 0.5
        assert all(float(r.split()[-4].rstrip("×")) > 0 for r in rows)  # calls per step


def test_perf_train_profile_shapes_names_the_input_shapes_under_each_operator():
    """--profile-shapes --profile-rows 40: forty operator rows per model, each followed by its input shapes,
    which for the DC-DiT include a 3×3 convolution's (B, C, 16, 16) input and (C', C, 3, 3) weight."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/perf.py"), "train", "--size", "toy", "--batch", "2",
                          "--repeats", "1", "--profile", "--profile-rows", "40", "--profile-shapes"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if "most self time per step" in line]
    for i in heads:
        block = lines[i + 1 : i + 81]
        assert all(shape.strip().startswith("[") for shape in block[1::2]) and "the other" in lines[i + 81]
    dcdit_block = "\n".join(lines[heads[1] :])
    assert "convolution" in dcdit_block and "[2, 32, 16, 16], [32, 32, 3, 3]" in dcdit_block


def test_ab_benchmark_times_the_working_tree_against_a_commit():
    """benchmarks/ab.py: worker processes (a commit, the working tree, the DiT; two of each with
    --processes 2) timed in turn; the same seed and inputs give the same loss on a commit whose model
    code is the working tree's, and each version's figure is the median over its processes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/ab.py"), "--before", "HEAD", "--batch", "2", "--repeats", "1",
                          "--processes", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    losses = [line for line in out.stdout.splitlines() if "loss before" in line][0]
    before, after = (float(part.split()[-1]) for part in losses.split(";")[1].split(","))
    assert before == after  # a clean tree runs HEAD's code: same seed and inputs, the same loss
    assert "after / before = " in out.stdout and out.stdout.count("per FLOP") == 2
    rows = [line for line in out.stdout.splitlines() if "(processes: " in line]
    for row in rows:  # "<label> <model> <median> ms  (processes: a, b)": the median of two is their mean
        median = float(row.split(" ms")[0].split()[-1])
        per_process = [float(v) for v in row.split("(processes: ")[1].rstrip(")").split(", ")]
        assert len(per_process) == 2 and median == pytest.approx(sum(per_process) / 2, abs=0.06)
    assert [row.split()[0] for row in rows] == ["before", "after", "dit"]
    for args, message in ((["--before", "no-such-commit"], "--before no-such-commit: not a commit of this repository"),
                          (["--before", "HEAD", "--processes", "0"], "--processes must be at least 1")):
        bad = subprocess.run([sys.executable, str(ROOT / "benchmarks/ab.py"), *args], capture_output=True, text=True, env=env,
                             timeout=60)
        assert bad.returncode == 2 and message in bad.stderr


def test_perf_attention_compares_every_backend_with_the_dit_per_token():
    """benchmarks/perf.py attention: a row per portable backend, the fallback's op (what --compile runs)
    and the DiT's, each against the DiT per token and per useful score, then the kernels alone; --shuffle
    keeps the same kept counts in another order; --grouping times both groupings per width and grid and
    names the one the model runs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def run(*extra):
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks/perf.py"), "attention", "--size", "toy", "--batch", "4",
                              "--repeats", "1", *extra], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.splitlines()

    lines = run()
    rows = {line.split("  ")[1].strip(): line for line in lines if "vs DiT per token" in line}
    assert set(rows) == {"sdpa_pad", "sdpa_blockdiag", "sdpa_pad (op)", "DiT"}
    assert rows["DiT"].endswith("vs DiT per token 1.00, per useful score 1.00")
    kernels = next(line for line in lines if "the CPU flash kernels alone" in line)
    assert "the fallback's groups" in kernels and "each sample alone at its exact length" in kernels
    kept = next(line for line in lines if "kept [" in line).split("kept ")[1].split("]")[0]
    shuffled = next(line for line in run("--shuffle") if "kept [" in line).split("kept ")[1].split("]")[0]
    assert kept != shuffled and sorted(kept.split(", ")) == sorted(shuffled.split(", "))
    by_length = subprocess.run([sys.executable, str(ROOT / "benchmarks/perf.py"), "attention", "--lengths", "40", "58",
                                "--batch", "1", "--repeats", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert by_length.returncode == 0, by_length.stderr[-2000:]
    assert sum(line.endswith(" µs") for line in by_length.stdout.splitlines()) == 19  # one row per length 40 … 58
    assert "padding rule, group lengths 40–48: time at the rule's length / at the next multiple of 8: mean" in by_length.stdout
    grouping = subprocess.run([sys.executable, str(ROOT / "benchmarks/perf.py"), "attention", "--grouping", "--sides", "8", "16",
                               "--widths", "96", "768", "--batch", "4", "--repeats", "1"], capture_output=True, text=True, env=env,
                              timeout=300)
    assert grouping.returncode == 0, grouping.stderr[-2000:]
    picks = {(line.split("width")[1].split()[0], line.split("² grid")[0].split()[-1]): line.rsplit(" ", 1)[1]
             for line in grouping.stdout.splitlines() if "alone / groups" in line}
    assert picks == {("96", "8"): "groups", ("768", "8"): "groups", ("96", "16"): "groups", ("768", "16"): "alone"}
    for args, message in ((["--widths", "50"], "--widths 50: give widths that are multiples of 64 or of 24"),
                          (["--sides", "0"], "--sides 0: give grid sides of at least 1")):
        wrong = subprocess.run([sys.executable, str(ROOT / "benchmarks/perf.py"), "attention", "--grouping", *args],
                               capture_output=True, text=True, env=env, timeout=60)
        assert wrong.returncode == 2 and message in wrong.stderr and wrong.stdout == ""
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks/perf.py"), "attention", "--lengths", "90", "56"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--lengths 90 56: give 1 ≤ LO ≤ HI" in bad.stderr


def test_perf_norm_times_each_norm_of_the_model_against_torchs_and_a_layernorm():
    """benchmarks/perf.py norm: one row per RMSNorm of the model, at the shape it sees in a step."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/perf.py"), "norm", "--batch", "2", "--repeats", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if "dcdit / torch" in line]
    assert [r.split("(")[0].strip() for r in rows] == ["encoder", "inner", "decoder", "encoder, transposed"]
    assert "(2, 256, 96)" in rows[0] and "(128, 96)" in rows[1] and "(2, 256, 32)" in rows[2]
    groups = [line for line in out.stdout.splitlines() if "last / first" in line]  # the toy scaffold's two widths
    assert [g.split()[0] for g in groups] == ["GroupNorm(8,"] * 4
    assert ["(2, 32, 16, 16)" in g for g in groups] == [True, True, False, False]
    assert ["(2, 96, 16, 16)" in g for g in groups] == [False, False, True, True]
    assert [g.split(")")[-1].split()[0] for g in groups] == ["fwd+bwd", "fwd"] * 2  # training, then sampling


def test_train_speed_counts_the_flops_of_what_each_step_kept():
    """benchmarks/train_speed.py: both models' real training steps interleaved, each step's FLOPs
    counted on an untimed copy of it, so the DC-DiT's FLOPs follow what its router kept (not the
    target L/N); the last line is the ratio of the two FLOP rates in the table."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/train_speed.py"), "--steps", "3", "--batch", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[1]: line.split("│")[2:-1] for line in out.stdout.splitlines() if line.startswith("│")}
    assert set(rows) == {"toy-dit", "toy"}
    dit, toy = ([cell.strip() for cell in rows[name]] for name in ("toy-dit", "toy"))
    assert dit[0] == "-" and 0 < float(toy[0]) < 256  # kept tokens: only the DC-DiT's, whatever its router kept
    assert float(dit[1]) > 0.3 and float(toy[1]) < float(dit[1])  # train GFLOP/img: below the DiT's at < L/4 kept
    ratio = float(out.stdout.strip().splitlines()[-1].split(":")[1].split()[0])
    assert ratio == pytest.approx(float(dit[4]) / float(toy[4]), rel=0.02)  # GFLOP/s column, printed to 0.1
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks/train_speed.py"), "--steps", "0"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--steps must be at least 1, got 0" in bad.stderr


def test_perf_sample_times_each_budget_and_profiles_the_dcdit_at_budget_0_and_lite_cfg():
    """benchmarks/perf.py sample: one row per setting (time, FLOPs and their ratio against full CFG);
    --profile then lists the DC-DiT's operators at budget 0 and at Lite-CFG."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/perf.py"), "sample", "--batch", "2", "--repeats", "1",
                          "--profile", "--profile-rows", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("  ")[1].strip() for line in out.stdout.splitlines() if "time/FLOP ratio" in line]
    assert rows == ["budget 0 (full CFG)", "budget 0.2", "Lite-CFG 0.0 / 0.9"]
    headers = [line for line in out.stdout.splitlines() if "most self time per step" in line]
    assert [h.split(":")[0].strip() for h in headers] == ["toy, budget 0 (full CFG)", "toy, Lite-CFG 0.0 / 0.9"]
