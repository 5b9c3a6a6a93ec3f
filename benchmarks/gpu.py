"""Training and sampling throughput on one GPU: b-n4 against the FLOP-matched dit-b-p2-isoflop,
at batch 32 in bf16, with every attention backend the device has (docs/performance.md).

Prints per model/backend: images/s, step time (median, interleaved), peak memory and MFU
(training FLOPs counted on what runs ÷ step time ÷ the device's measured bf16 matmul rate);
then DC-DiT/DiT time over FLOP ratios and the sampling-step ratios of budgets and Lite-CFG.
Kept counts are L/4 spread ±30% over the batch (as trained routers give), set through the
model's ``boundary`` argument.

    python benchmarks/gpu.py                           # one CUDA GPU, ~3 minutes
    python benchmarks/gpu.py --compile                 # the same with the whole model compiled (dcdit train --compile)
    python benchmarks/gpu.py --device cpu --smoke      # tiny models on the CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from perf import WithBoundary, kept_masks

from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.models import build_model, compile_model
from dcdit_cli.models.attention import available_backends
from dcdit_cli.models.flops import count_train_flops, dcdit_cost
from dcdit_cli.training.losses import loss_for_recipe

SMOKE = ["model.hidden_size=64", "model.num_heads=2", "model.depth=1", "model.scaffold_width=16", "model.input_size=8"]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        sync(device)
        samples.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(samples)


def interleaved_medians(fns: dict, repeats: int, device) -> dict[str, float]:
    """Median seconds of each fn, timed A B C A B C … with the device drained around each call."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def setups(args, device):
    """[(label, recipe, model as called, params, loss)]: the DiT, then the DC-DiT once per attention backend."""
    torch.manual_seed(0)
    out = []
    for name in ("dit-b-p2-isoflop", "b-n4"):
        recipe = load_recipe(name, SMOKE if args.smoke else [])
        model = build_model(recipe.model).to(device)
        params = list(model.parameters())
        loss = loss_for_recipe(recipe)
        if recipe.model.kind == "dit":
            out.append((name, recipe, model, params, loss))
            continue
        masks = kept_masks(args.batch, recipe.model.input_size, recipe.model.target_ratio, 0.3).to(device)
        for backend in available_backends(device):
            out.append((f"{name} [{backend}]", recipe, WithBoundary(model, masks, backend), params, loss))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny models (checks the script, not the speed)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the whole model (dcdit train --compile)")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.repeats = 2, 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --device cpu --smoke to check the script")
    dtype = torch.bfloat16
    rate = matmul_rate(device, dtype, 512 if args.smoke else 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, batch {args.batch}, bf16 autocast, measured bf16 matmul {rate / 1e12:.1f} TFLOP/s"
          + (", whole model compiled" if args.compile else ""))

    rows = setups(args, device)
    steps, flops = {}, {}
    for label, recipe, model, params, loss_fn in rows:
        side, ch = recipe.model.input_size, recipe.model.in_channels
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.batch, ch, side, side, device=device, generator=g)
        y = torch.randint(0, recipe.model.num_classes, (args.batch,), device=device, generator=g)
        t = torch.randint(0, 1000, (args.batch,), device=device, generator=g)
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

        def step(model=model, loss_fn=loss_fn, x=x, y=y, t=t, opt=opt, params=params):
            with torch.autocast(device.type, dtype=dtype):
                loss, _, _ = loss_fn(model, x, y, t=t)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with torch.autocast(device.type, dtype=dtype):
            flops[label] = count_train_flops(lambda: loss_fn(model, x, y, t=t)[0])
        for p in params:
            p.grad = None
        steps[label] = step
    if args.compile:  # after counting: FLOPs are counted on the eager model
        for model in {id(m): m for m in (getattr(r[2], "model", r[2]) for r in rows)}.values():
            compile_model(model)

    peak = {}
    for k, fn in steps.items():  # warm-up and peak memory, one model at a time
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fn()
        fn()
        sync(device)
        peak[k] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    med = interleaved_medians(steps, args.repeats, device)
    print(f"{'setting':<28} {'img/s':>8} {'step ms':>9} {'peak GiB':>9} {'GFLOP/step':>11} {'MFU':>6}")
    for k in steps:
        print(f"{k:<28} {args.batch / med[k]:8.1f} {med[k] * 1e3:9.1f} {peak[k]:9.2f} {flops[k] / 1e9:11.1f} {flops[k] / med[k] / rate:6.3f}")
    dit = rows[0][0]
    for k in list(steps)[1:]:
        tr, fr = med[k] / med[dit], flops[k] / flops[dit]
        mfu_ratio = (flops[k] / med[k]) / (flops[dit] / med[dit])
        print(f"{k}: time ratio {tr:.3f} / FLOP ratio {fr:.3f} = {tr / fr:.3f}; MFU relative to {dit} {mfu_ratio:.3f}")
    sampling(rows[1:], args, device, dtype)


def sampling(rows, args, device, dtype) -> None:
    """One CFG sampling step of the DC-DiT per backend: budget 0.2 and Lite-CFG against full CFG."""
    from dcdit_cli.diffusion.gaussian import make_diffusion
    from dcdit_cli.sampling.sampler import KeptLog, SampleOptions, make_model_fn

    settings = {"budget 0 (full CFG)": (0.0, 0.0), "budget 0.2": (0.2, 0.2), "Lite-CFG 0.0 / 0.9": (0.0, 0.9)}
    for label, recipe, model, _, _ in rows:
        cost = dcdit_cost(recipe.model)
        diffusion = make_diffusion("250", recipe.diffusion.num_timesteps)
        side, ch = recipe.model.input_size, recipe.model.in_channels
        x = torch.randn(args.batch, ch, side, side, device=device)
        y = torch.zeros(args.batch, dtype=torch.long, device=device)
        t = torch.full((args.batch,), 200, device=device)
        fns, spent = {}, {}
        for s, (b, u) in settings.items():
            log = KeptLog()
            fn = make_model_fn(model, y, SampleOptions(cfg_scale=4.0, budget=b, uncond_budget=u), log)

            @torch.no_grad()
            def one(fn=fn):
                with torch.autocast(device.type, dtype=dtype):
                    diffusion.p_sample(fn, x, t)

            one()
            spent[s] = float(cost(log.per_step[-1].double().cpu()).sum())
            fns[s] = one
        times = interleaved_medians(fns, args.repeats, device)
        base = next(iter(settings))
        for s in settings:
            tr, fr = times[s] / times[base], spent[s] / spent[base]
            print(f"sampling step {label} {s:<20} time x {tr:.3f}  FLOPs x {fr:.3f}  time/FLOP {tr / fr:.3f}")


if __name__ == "__main__":
    main()
