"""Where DC-DiT's time goes, against the FLOP-matched DiT, measured in one process (docs/performance.md).

Every ratio comes from one run: the settings are timed interleaved (A B A B …) and the
medians compared, so drift in machine load hits both alike. FLOPs are counted on what runs
(FlopCounterMode, forward + backward for training, dcdit_cli/models/flops.py). Kept counts are set
with the model's ``boundary`` argument: each sample keeps L/N · f tokens at random positions,
f spread evenly over [1 − spread, 1 + spread] across the batch (a trained router's spread), growing
with the sample index, or in a fixed random order with ``--shuffle`` (a router's batch is in no order).

    python benchmarks/perf.py train   [--size toy|b] [--spread 0.3] [--batch 8] [--repeats 5] [--shuffle] [--parts] [--bf16] [--compile]
                                      [--profile [--profile-rows 12] [--profile-shapes]]
    python benchmarks/perf.py sample  [--size toy|b] [--spread 0.3] [--batch 8] [--repeats 5] [--shuffle] [--bf16] [--profile]
    python benchmarks/perf.py scaffold [--sides 32 64 128] [--dim 256] [--batch 8]
    python benchmarks/perf.py attention [--size toy|b] [--batch 8] [--shuffle] [--compile] [--lengths LO HI]
                                        [--grouping --sides 16 32 [--widths 96 384 768]]
    python benchmarks/perf.py smoothing [--sides 8 16 32 64 128] [--dim 96] [--batch 8]
    python benchmarks/perf.py norm    [--size toy|b] [--batch 8] [--repeats 5] [--bf16]  (RMSNorms; GroupNorm + SiLU by memory format)
    python benchmarks/perf.py compile [--steps 12] [--whole]

Every command first prints the machine: CPU model, its vector/matrix ISA extensions (AVX-512, AMX),
and the measured fp32 and bf16 matmul rates. ``--bf16`` runs both models under bf16 autocast: on a
CPU with AVX-512-BF16 or AMX the matmuls get several times faster while norms, gathers and scatters
gain little, the regime of an AMX Xeon or a GPU. ``--parts`` adds the share of a DC-DiT training
step spent in each part, each part's forward + backward timed alone on its real inputs.
``--profile`` adds, for both models, the operators that take the most time over 5 steps
(``torch.profiler``, self time and calls per step, compiled graphs included; ``--profile-shapes``
splits them by input shapes, printed under each row): with ``--compile`` it shows what the
compiler could not fuse away.

The dcdit command puts large CPU tensors on huge pages (dcdit_cli/common/host_memory.py); so does this
script unless --small-pages is given, and the scaffold benchmark times both.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import queue
import resource
import statistics
import sys
import time

from dcdit_cli.common.host_memory import ENV, peak_growth_mib, use_huge_pages

# Before torch allocates anything: PyTorch reads the switch at the process's first tensor.
if "--small-pages" in sys.argv:
    os.environ[ENV] = "0"
else:
    use_huge_pages()  # as the dcdit command runs

import torch

from dcdit_cli.config.recipe import load_recipe
from dcdit_cli.models import build_model, compile_model
from dcdit_cli.models.flops import count_train_flops
from dcdit_cli.training.losses import loss_for_recipe

# (DC-DiT N4, FLOP-matched DiT P2) per size. The B width runs at a short depth that fits a CPU,
# keeping the full-size recipes' difference of 17 − 12 = 5 blocks (the DiT's extra blocks pay for
# the DC-DiT's scaffold).
SIZES = {
    "toy": (("toy", []), ("toy-dit", [])),
    "b": (("b-n4", ["model.depth=3"]), ("dit-b-p2-isoflop", ["model.depth=8"])),
}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each fn, timed A B C A B C … after one warm-up round."""
    for fn in fns.values():
        fn()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in samples.items()}


MATMUL_N = 1536


def matmul_fn(dtype=torch.float32):
    """A 1536² matmul: timed among the steps, it gives the machine's matmul rate (MFU's denominator)."""
    a, b = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype), torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
    return lambda: a @ b


def cpu_model() -> tuple[str, list[str]]:
    """(model name, the AVX-512 / AMX / AVX2 flags) from /proc/cpuinfo (the platform string elsewhere)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine(), []
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return name, sorted(f for f in flags if f.startswith(("avx512", "amx")) or f == "avx2")


def print_machine(repeats: int = 5) -> None:
    """The header every benchmark prints: which CPU ran it and how fast its matmuls are."""
    name, isa = cpu_model()
    amx = [f for f in isa if f.startswith("amx")]
    rates = {dt: 2 * MATMUL_N**3 / t / 1e9 for dt, t in
             interleaved({dt: matmul_fn(dt) for dt in (torch.float32, torch.bfloat16)}, repeats).items()}
    print(f"machine: {name}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"AMX: {' '.join(amx) or 'none'}; AVX-512: {' '.join(f for f in isa if f.startswith('avx512')) or 'none'}")
    print(f"matmul {MATMUL_N}²: fp32 {rates[torch.float32]:.1f} GFLOP/s, bf16 {rates[torch.bfloat16]:.1f} GFLOP/s "
          f"(×{rates[torch.bfloat16] / rates[torch.float32]:.2f})")


def kept_masks(batch: int, side: int, ratio: float, spread: float, seed: int = 0) -> torch.Tensor:
    """(B, L) boundary masks keeping L/ratio · f tokens, f evenly over [1 − spread, 1 + spread]."""
    L = side * side
    g = torch.Generator().manual_seed(seed)
    f = torch.linspace(1 - spread, 1 + spread, batch) if batch > 1 else torch.ones(1)
    masks = torch.zeros(batch, L, dtype=torch.bool)
    for b in range(batch):
        masks[b, torch.randperm(L, generator=g)[: max(1, round(L / ratio * float(f[b])))]] = True
    return masks


def kept_counts(args, side: int) -> torch.Tensor:
    """(B,) kept tokens per sample of :func:`kept_masks` at L/4 ± ``--spread``, in a random batch order with
    ``--shuffle``: the attention benchmarks' packed lengths."""
    masks = kept_masks(args.batch, side, 4.0, args.spread)
    return masks[shuffled_order(args.batch)].sum(1) if args.shuffle else masks.sum(1)


def shuffled_order(batch: int) -> list[int]:
    """``--shuffle``: a fixed random order of the batch's samples, so the kept counts, which
    :func:`kept_masks` makes grow with the sample index, come in no order, as a router's do."""
    return torch.randperm(batch, generator=torch.Generator().manual_seed(0)).tolist()


class WithBoundary:
    """A model whose router decision is fixed (kept counts under test), optionally with its own
    attention backend; the rest of the model runs as usual."""

    def __init__(self, model, boundary, attention: str = "auto"):
        self.model, self.boundary, self.backend = model, boundary, attention

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, y, budget=None):
        reps = x.shape[0] // self.boundary.shape[0]  # CFG: both halves see the same boundaries
        return self.model(x, t, y, budget=budget, boundary=self.boundary.repeat(reps, 1), attention=self.backend)


def build(size: str, batch: int, spread: float, shuffle: bool = False):
    """[(name, recipe, model as called, loss object)] for the DC-DiT and the DiT of ``size``."""
    torch.manual_seed(0)
    out = []
    for name, overrides in SIZES[size]:
        recipe = load_recipe(name, overrides)
        model = build_model(recipe.model)
        if recipe.model.kind == "dcdit":
            masks = kept_masks(batch, recipe.model.input_size, recipe.model.target_ratio, spread)
            model = WithBoundary(model, masks[shuffled_order(batch)] if shuffle else masks)
        out.append((name, recipe, model, loss_for_recipe(recipe)))
    return out


def inputs(recipe, batch: int):
    g = torch.Generator().manual_seed(1)
    side, ch = recipe.model.input_size, recipe.model.in_channels
    x = torch.randn(batch, ch, side, side, generator=g)
    return x, torch.randint(0, recipe.model.num_classes, (batch,), generator=g), torch.randint(0, 1000, (batch,), generator=g)


def padding_waste(masks: torch.Tensor) -> tuple[float, float, float]:
    """Share of padded work: linear layers and attention when every sample is padded to the batch's
    M_max (before), and attention in the CPU fallback's groups (sdpa_pad now: samples sorted by kept
    count, each group padded to its own longest)."""
    from dcdit_cli.models.attention import PackedLayout

    m = masks.sum(1)
    valid = torch.arange(int(m.max()))[None] < m[:, None]
    layout = PackedLayout.from_valid(valid, int(m.sum()))
    padded_groups = sum(rows.shape[0] * rows.shape[1] ** 2 for rows in layout.group_rows)
    m = m.double()
    return (float(1 - m.sum() / (len(m) * m.max())), float(1 - m.square().sum() / (len(m) * m.max() ** 2)),
            float(1 - m.square().sum() / padded_groups))


def useful_flops(model, loss_fn, x, y, t) -> float:
    """Training FLOPs (forward + backward) of the batch without padding: each sample counted alone,
    as an exact varlen kernel runs it (the CPU fallback pads attention to M_max; that shows in time)."""
    if not isinstance(model, WithBoundary):
        return count_train_flops(lambda: loss_fn(model, x, y, t=t)[0])
    total = 0
    for b in range(x.shape[0]):
        one = WithBoundary(model.model, model.boundary[b : b + 1])
        total += count_train_flops(lambda: loss_fn(one, x[b : b + 1], y[b : b + 1], t=t[b : b + 1])[0])
    return total


def precision(args):
    """The context every timed call runs in: bf16 autocast with --bf16, else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()


def compile_both(models) -> None:
    """--compile: the whole DC-DiT (two graphs, dcdit_cli.models.compile_model) and the whole DiT."""
    for _, _, model, _ in models:
        compile_model(model.model if isinstance(model, WithBoundary) else model)


def bench_train(args) -> None:
    models = build(args.size, args.batch, args.spread, args.shuffle)
    steps, flops = {}, {}
    for name, recipe, model, loss_fn in models:
        x, y, t = inputs(recipe, args.batch)
        params = [p for p in (model.model if isinstance(model, WithBoundary) else model).parameters()]

        def step(model=model, loss_fn=loss_fn, x=x, y=y, t=t, params=params):
            torch.manual_seed(0)
            with precision(args):
                loss, _, _ = loss_fn(model, x, y, t=t)
            loss.backward()
            for p in params:
                p.grad = None

        steps[name] = step
        flops[name] = useful_flops(model, loss_fn, x, y, t)
    if args.compile:
        compile_both(models)
        for name, step in steps.items():  # cold compiles outside the timings
            cold = timed(step)
            print(f"  compiled {name}: cold compile + first step {cold:.1f} s")
    times = interleaved({**steps, "matmul": matmul_fn(torch.bfloat16 if args.bf16 else torch.float32)}, args.repeats)
    rate = 2 * MATMUL_N**3 / times["matmul"]
    (dc, dc_recipe, dc_model, dc_loss), (dit, *_) = models
    print(f"train step, {args.size}, batch {args.batch}, kept spread ±{args.spread:.0%}{order(args)}, {mode(args)}, median of "
          f"{args.repeats} (interleaved), matmul rate {rate / 1e9:.1f} GFLOP/s (measured among the steps)")
    for name in (dit, dc):
        print(f"  {name:<18} {times[name] * 1e3:9.1f} ms  {flops[name] / 1e9:9.2f} GFLOP (fwd+bwd)  "
              f"MFU {flops[name] / times[name] / rate:.2f}")
    tr, fr = times[dc] / times[dit], flops[dc] / flops[dit]
    lin, att, att_now = padding_waste(dc_model.boundary)
    print(f"  time ratio {tr:.3f} / FLOP ratio {fr:.3f} = {tr / fr:.3f} (DC-DiT time per FLOP relative to DiT; "
          f"FLOPs without padding)")
    print(f"  padding waste: before (batch padded to M_max) {lin:.1%} of linear-layer tokens, {att:.1%} of attention "
          f"scores; now 0% of linear-layer tokens, attention {att_now:.1%} (CPU sdpa_pad, groups sorted by kept count; "
          f"0% with a varlen kernel)")
    if args.parts:
        step_parts(dc_model, dc_loss, *inputs(dc_recipe, args.batch), steps[dc], models[1], args)
    if args.profile:
        for name in (dit, dc):
            profile_step(name, steps[name], rows=args.profile_rows, shapes=args.profile_shapes)


def profile_step(name: str, step, calls: int = 5, rows: int = 12, shapes: bool = False) -> None:
    """The operators with the most self time over ``calls`` steps (training or sampling), as ms per step and share;
    ``shapes``: one row per operator and input shapes (which convolution, which gather)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=shapes) as prof:
        for _ in range(calls):
            step()
    events = sorted(prof.key_averages(group_by_input_shape=shapes), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    ops = sum(e.count for e in events if e.key.startswith("aten::")) / calls
    print(f"  {name}: most self time per step ({calls} steps profiled, {total / calls / 1e3:.1f} ms per step in all, "
          f"{ops:.0f} aten operator calls per step, nested ones included)")
    for e in events[:rows]:
        print(f"    {e.key[:60]:<60} {e.count / calls:5.1f}× {e.self_cpu_time_total / calls / 1e3:7.2f} ms  "
              f"{e.self_cpu_time_total / total:6.1%}")
        if shapes:
            print(f"        {[list(s) for s in e.input_shapes if s]}")
    rest = sum(e.self_cpu_time_total for e in events[rows:])
    print(f"    {f'the other {len(events) - rows} operators':<60} {rest / calls / 1e3:7.2f} ms  {rest / total:6.1%}")


def order(args) -> str:
    return ", kept counts shuffled over the batch" if args.shuffle else ""


def mode(args) -> str:
    return (f"{'bf16 autocast' if args.bf16 else 'fp32'}, {'compiled (whole model)' if args.compile else 'eager'}, "
            f"torch threads {torch.get_num_threads()}")


def fwd_bwd(fn, *args):
    """fn(*args) forward + backward (a ones gradient on its first output), the float inputs as leaves."""
    def run():
        leaves = [a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return run


def step_parts(model, loss_fn, x, y, t, step, dit, args) -> None:
    """Share of a DC-DiT training step (forward + backward) by part: each part's forward + backward
    timed alone on the inputs it gets in a step (captured by forward hooks), interleaved with the
    whole step; "other" is the rest (embedders, positions, STE gate, residual projection, glue)."""
    from dcdit_cli.models.attention import varlen_attention

    inner = model.model
    seen = {}
    mods = {"encoder": inner.encoder, "router": inner.router, "chunk": inner.chunk, "block": inner.blocks[0],
            "de-chunk": inner.dechunk, "decoder": inner.decoder, "final": inner.final_layer}
    handles = [m.register_forward_hook(lambda m, a, o, k=k: None if k in seen else seen.update({k: (a, o)}))
               for k, m in mods.items()]
    d = loss_fn.diffusion
    noise = torch.randn_like(x)
    x_t = d.q_sample(x, t, noise)
    with precision(args):
        out, _ = model(x_t, t, y)
    for h in handles:
        h.remove()
    layout = seen["block"][0][2]
    heads = inner.blocks[0].attn.num_heads
    q = torch.randn(layout.sample.shape[0], heads, inner.config.hidden_size // heads)

    def blocks(tokens, c):
        for block in inner.blocks:
            tokens = block(tokens, c, layout)
        return tokens

    def attention(q, k, v):
        return torch.stack([varlen_attention(q, k, v, layout) for _ in inner.blocks])

    def decoder(z, c):
        return inner.final_layer(inner.decoder(z, c, x.shape[-1]), c)

    def loss(out):
        return d.loss_terms(out, x, x_t, t, noise)["loss"].mean()

    # DiT's attention at its own (B, T) for the per-token comparison
    dit_model = dit[2]
    T = (dit_model.config.input_size // dit_model.config.patch_size) ** 2
    qd = torch.randn(x.shape[0], heads, T, inner.config.hidden_size // heads)

    def dit_attention(q, k, v):
        return torch.stack([torch.nn.functional.scaled_dot_product_attention(q, k, v) for _ in dit_model.blocks])

    a = seen
    parts = {
        "encoder": fwd_bwd(inner.encoder, *a["encoder"][0]),
        "router": fwd_bwd(inner.router, *a["router"][0]),
        "chunk": fwd_bwd(inner.chunk, *a["chunk"][0]),
        "inner blocks": fwd_bwd(blocks, *a["block"][0][:2]),
        "attention": fwd_bwd(attention, q, q, q),
        "de-chunk": fwd_bwd(inner.dechunk, *a["de-chunk"][0]),
        "decoder + final": fwd_bwd(decoder, a["decoder"][0][0], a["decoder"][0][1]),
        "loss": fwd_bwd(loss, out.float()),
        "DiT attention": fwd_bwd(dit_attention, qd, qd, qd),
    }

    def in_precision(fn):
        def run():
            with precision(args):
                fn()
        return run

    times = interleaved({"step": step, **{k: in_precision(f) for k, f in parts.items()}}, args.repeats)
    inner.zero_grad(set_to_none=True)
    shares = {k: times[k] / times["step"] for k in parts if k != "DiT attention"}
    shares["inner blocks"] -= shares["attention"]  # attention apart
    print(f"  DC-DiT training step by part (forward + backward, each timed alone on its step inputs; {mode(args)}; "
          f"step {times['step'] * 1e3:.1f} ms):")
    print("    " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()) + f", other {1 - sum(shares.values()):.1%}")
    n = layout.cu_seqlens.diff().double()
    packed_scores, dit_scores = float(n.square().sum()), x.shape[0] * T * T
    packed, dense = times["attention"] / len(inner.blocks), times["DiT attention"] / len(dit_model.blocks)  # per block
    print(f"    attention fwd+bwd per block: packed (kept {n.int().tolist()}) {packed * 1e3:.2f} ms, DiT ({x.shape[0]}×{T}) "
          f"{dense * 1e3:.2f} ms; packed / DiT per token {(packed / n.sum()) / (dense / (x.shape[0] * T)):.2f}, "
          f"per score (useful q·k pair) {(packed / packed_scores) / (dense / dit_scores):.2f}")


@torch.no_grad()
def sample_step(diffusion, fn, x, t, args):
    with precision(args):
        return diffusion.p_sample(fn, x, t)


def bench_sample(args) -> None:
    from dcdit_cli.diffusion.gaussian import make_diffusion
    from dcdit_cli.models.flops import dcdit_cost
    from dcdit_cli.sampling.sampler import KeptLog, SampleOptions, make_model_fn

    (name, recipe, model, _), _ = build(args.size, args.batch, args.spread, args.shuffle)
    settings = {"budget 0 (full CFG)": (0.0, 0.0), "budget 0.2": (0.2, 0.2), "Lite-CFG 0.0 / 0.9": (0.0, 0.9)}
    diffusion = make_diffusion("250", recipe.diffusion.num_timesteps)
    x, y, _ = inputs(recipe, args.batch)
    t = torch.full((args.batch,), 200)
    cost = dcdit_cost(recipe.model)
    fns, spent = {}, {}
    for label, (b, u) in settings.items():
        log = KeptLog()
        fn = make_model_fn(model, y, SampleOptions(cfg_scale=4.0, budget=b, uncond_budget=u), log)
        with torch.no_grad(), precision(args):
            fn(x, t)
        spent[label] = float(cost(log.per_step[-1].double()).sum())  # exact per-sample cost, both halves
        fns[label] = lambda fn=fn: sample_step(diffusion, fn, x, t, args)
    times = interleaved(fns, args.repeats)
    base = next(iter(settings))
    print(f"sampling step (CFG 4, one forward of both halves), {name}, batch {args.batch}, kept spread ±{args.spread:.0%}"
          f"{order(args)}, "
          f"{mode(args)}, median of {args.repeats} (interleaved)")
    for label in settings:
        tr, fr = times[label] / times[base], spent[label] / spent[base]
        print(f"  {label:<20} {times[label] * 1e3:8.1f} ms  time x {tr:.3f}  FLOPs x {fr:.3f}  time/FLOP ratio {tr / fr:.3f}")
    if args.profile:
        for label in (base, "Lite-CFG 0.0 / 0.9"):
            profile_step(f"{name}, {label}", fns[label], rows=args.profile_rows, shapes=args.profile_shapes)


def scaffold_fn(side: int, dim: int, batch: int):
    """Router + chunk + de-chunk of a batch on a side×side grid, as one callable."""
    from dcdit_cli.models.chunking import ChunkLayer, DeChunkLayer
    from dcdit_cli.models.routers import Router

    torch.manual_seed(0)
    router, chunk, dechunk = Router(dim), ChunkLayer(), DeChunkLayer(1.0)
    h = torch.randn(batch, side * side, dim)
    masks = kept_masks(batch, side, 4.0, 0.3)

    @torch.no_grad()
    def run():
        p = router(h, side)
        tokens, order, valid, layout, radius = chunk(h, masks, p)
        return dechunk(layout.pad(tokens), order, valid, p, side, radius)

    return run


def _scaffold_peak(side: int, dim: int, batch: int, results) -> None:
    results.put(peak_growth_mib(scaffold_fn(side, dim, batch))[1])


def _scaffold_times(args, results) -> None:
    """Medians of all sides interleaved, and the minor page faults of one call per side."""
    torch.set_num_threads(args.threads)
    fns = {side: scaffold_fn(side, args.dim, args.batch) for side in args.sides}
    times = interleaved(fns, args.repeats)
    faults = {}
    for side, fn in fns.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        faults[side] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    results.put((times, faults))


def _in_fresh_process(target, *args, huge: bool = True):
    """target(*args, results queue) in a new interpreter, with or without huge pages; → what it put in the queue."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    saved = os.environ.get(ENV)
    os.environ[ENV] = "1" if huge else "0"  # the child inherits it and reads it at its first tensor
    try:
        p.start()
    finally:
        if saved is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = saved
    while True:  # a child that dies (e.g. out of memory) ends the benchmark instead of hanging it
        try:
            result = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise SystemExit(f"{target.__name__} died in its process (exit code {p.exitcode})")
    p.join()
    return result


def bench_scaffold(args) -> None:
    """Router + chunk + de-chunk: time (all sides interleaved in one process, once with glibc's
    pages and once with huge pages) and peak memory growth (a fresh process per side and setting)."""
    print(f"router + chunk + de-chunk, batch {args.batch}, width {args.dim}, kept L/4 ±30%, median of {args.repeats} (interleaved)")
    for huge in (False, True):
        peak = {side: _in_fresh_process(_scaffold_peak, side, args.dim, args.batch, huge=huge) for side in args.sides}
        times, faults = _in_fresh_process(_scaffold_times, args, huge=huge)
        print(f"  {'huge pages (as dcdit runs)' if huge else '4 KiB pages (glibc mmap, unmapped when freed)'}:")
        prev = None
        for side in args.sides:
            # a peak growth below 0.1 MiB (the smallest side, where the allocator's pool suffices) has no ratio
            memory = "—" if prev is None or peak[prev] < 0.1 else f"x{peak[side] / peak[prev]:.2f}"
            step = "" if prev is None else f"  x{times[side] / times[prev]:.2f} time, {memory} memory per doubling"
            print(f"    {side:>4}²  {times[side] * 1e3:9.1f} ms  peak +{peak[side]:8.1f} MiB  {faults[side]:>7} page faults/call{step}")
            prev = side


def bench_smoothing(args) -> None:
    """The de-chunk blur (models/chunking.py ``gaussian_blur``: band-matrix products on an
    (H, W, B·(D + 1)) table) against the two depthwise convolutions it replaced, on the (B, D + 1, H, W) grid they ran
    on, forward + backward, per grid side: time, and time per element (flat when linear in L)."""
    import torch.nn.functional as F

    from dcdit_cli.models.chunking import BAND_MAX_SIDE, DeChunkLayer, gaussian_blur

    kernel = DeChunkLayer(1.0).kernel_1d
    r, C = kernel.numel() // 2, args.dim + 1
    rows, cols = kernel.view(1, 1, -1, 1).expand(C, 1, -1, 1), kernel.view(1, 1, 1, -1).expand(C, 1, 1, -1)
    print(f"de-chunk blur (σ = 1, {kernel.numel()} taps), batch {args.batch}, {C} channels, forward + backward, "
          f"median of {args.repeats} (interleaved)")
    for side in args.sides:
        grid = torch.randn(side, side, args.batch * C, requires_grad=True)  # (H, W, B·(D + 1)) as in the model
        image = torch.randn(args.batch, C, side, side, requires_grad=True)  # the convolutions' layout

        def band(grid=grid):
            gaussian_blur(grid, kernel).backward(torch.ones_like(grid))

        def conv(image=image):  # the kernel is a buffer: no gradient, as in the model
            F.conv2d(F.conv2d(image, rows, padding=(r, 0), groups=C), cols, padding=(0, r), groups=C).sum().backward()

        times = interleaved({"band": band, "conv": conv}, args.repeats)
        per = 1e9 / grid.numel()
        print(f"  {side:>4}²  band products {times['band'] * 1e3:8.2f} ms ({times['band'] * per:5.2f} ns/element)  "
              f"convolutions {times['conv'] * 1e3:8.2f} ms ({times['conv'] * per:5.2f} ns/element)  "
              f"band / conv {times['band'] / times['conv']:.2f}  (the model runs: "
              f"{'band' if side <= BAND_MAX_SIDE else 'conv'})")


def bench_norm(args) -> None:
    """The DC-DiT's RMSNorm (models/norms.py: a written-out backward on CPU) against torch's
    ``nn.RMSNorm`` (fused forward, composite backward) and against a LayerNorm of the same shape,
    forward + backward on the (rows, D) each norm of the ``--size`` model sees in a training step."""
    from dcdit_cli.models.norms import RMSNorm

    recipe = load_recipe(SIZES[args.size][0][0], SIZES[args.size][0][1]).model
    D, e, L = recipe.hidden_size, recipe.scaffold_width, recipe.input_size**2
    shapes = {"encoder (B, L, D)": (args.batch, L, D), "inner (N, D)": (args.batch * L // 4, D),
              "decoder (B, L, e)": (args.batch, L, e), "encoder, transposed": (args.batch, L, D)}
    print(f"RMSNorm forward + backward, {args.size}, batch {args.batch}, median of {args.repeats} (interleaved); "
          f"'transposed': the (B, L, D) view of a channels-first (B, D, H, W) encoder output")
    for name, shape in shapes.items():
        if name.endswith("transposed"):
            x = torch.randn(shape[0], shape[2], shape[1]).transpose(1, 2).requires_grad_()
        else:
            x = torch.randn(*shape, requires_grad=True)
        norms = {"dcdit": RMSNorm(shape[-1], eps=1e-5), "torch": torch.nn.RMSNorm(shape[-1], eps=1e-5),
                 "LayerNorm": torch.nn.LayerNorm(shape[-1], eps=1e-5)}
        times = interleaved({k: (lambda n=n: n(x).backward(torch.ones(shape))) for k, n in norms.items()}, args.repeats)
        print(f"  {name:<20} {str(shape):<16} dcdit {times['dcdit'] * 1e6:7.0f} us  torch {times['torch'] * 1e6:7.0f} us  "
              f"LayerNorm {times['LayerNorm'] * 1e6:7.0f} us  dcdit / torch {times['dcdit'] / times['torch']:.2f}  "
              f"dcdit / LayerNorm {times['dcdit'] / times['LayerNorm']:.2f}")
    group_norm_silu(args, recipe)


def group_norm_silu(args, recipe) -> None:
    """The scaffold's GroupNorm + SiLU (every res-block has two) forward + backward, and forward alone
    (as sampling runs it), at each width it runs at, channels-last as the model runs them against
    channels-first: torch's CPU GroupNorm is far slower channels-last at some widths, and the
    convolutions around it faster (docs/performance.md). ``--bf16``: bf16 inputs under autocast, as a
    bf16 convolution hands them over."""
    from dcdit_cli.models.scaffold import group_norm

    side = recipe.input_size // recipe.patch_size
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    print(f"GroupNorm + SiLU (the scaffold's res-blocks), {args.size}, batch {args.batch}, {str(dtype)[6:]}, median of "
          f"{args.repeats} (interleaved)")
    for width in dict.fromkeys((recipe.scaffold_width, recipe.hidden_size)):
        norm = group_norm(width, recipe.norm_groups, recipe.norm_eps)
        shape = (args.batch, width, side, side)
        inputs = {"channels-last": torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last),
                  "channels-first": torch.randn(shape, dtype=dtype)}

        def train(x):
            with precision(args):
                torch.nn.functional.silu(norm(x)).backward(torch.ones_like(x))

        @torch.no_grad()
        def forward(x):
            with precision(args):
                torch.nn.functional.silu(norm(x))

        fns = {(k, "fwd+bwd"): (lambda x=x: train(x.detach().requires_grad_())) for k, x in inputs.items()}
        fns |= {(k, "fwd"): (lambda x=x: forward(x)) for k, x in inputs.items()}
        times = interleaved(fns, args.repeats)
        for part in ("fwd+bwd", "fwd"):
            last, first = times["channels-last", part], times["channels-first", part]
            print(f"  GroupNorm({norm.num_groups}, {width}) {str(shape):<18} {part:<7} channels-last {last * 1e6:7.0f} us  "
                  f"channels-first {first * 1e6:7.0f} us  last / first {last / first:.2f}")


def bench_attention(args) -> None:
    """Packed attention (forward + backward) on kept counts L/4 ± spread, every portable backend and
    the fallback's op that ``--compile`` runs, against the DiT's dense attention over as many tokens:
    B samples of the mean kept count."""
    from dcdit_cli.models.attention import (FALLBACK, PackedLayout, _additive, available_backends, from_slots, padded_attention,
                                            samples_alone, to_slots, varlen_attention)

    heads, head_dim, side = {"toy": (4, 24, 16), "b": (12, 64, 32)}[args.size]
    if args.lengths:
        return attention_by_length(args, heads, head_dim)
    if args.grouping:
        return attention_grouping(args)
    n = kept_counts(args, side)
    m_max, T = int(n.max()), round(float(n.double().mean()))
    valid = torch.arange(m_max)[None] < n[:, None]
    q, k, v = (torch.randn(int(n.sum()), heads, head_dim, requires_grad=True) for _ in range(3))
    dense = torch.randn(args.batch, heads, T, head_dim, requires_grad=True)

    alone = samples_alone(torch.device("cpu"), heads * head_dim, side * side)  # as the model groups its samples
    layouts = {b: PackedLayout.from_valid(valid, int(n.sum()), b, alone=alone) for b in available_backends("cpu")}  # once per forward

    # --compile: each attention compiled alone (dynamic shapes), the fallback then running as its op.
    attend = torch.compile(varlen_attention, dynamic=True) if args.compile else varlen_attention
    sdpa = torch.nn.functional.scaled_dot_product_attention
    dense_sdpa = torch.compile(sdpa, dynamic=True) if args.compile else sdpa

    def run(backend):
        attend(q, k, v, layouts[backend]).sum().backward()

    def op():  # eager: the op that the fallback runs under --compile, dispatched with its autograd wrapper
        pad = layouts[FALLBACK]
        out = padded_attention(*(to_slots(a, pad) for a in (q, k, v)), _additive(pad.padded_valid, q.dtype), pad.group_slots,
                               pad.group_size)[0]
        from_slots(out, pad).sum().backward()

    def dit():
        dense_sdpa(dense, dense, dense).sum().backward()

    fns = {b: (lambda b=b: run(b)) for b in layouts} | ({} if args.compile else {"sdpa_pad (op)": op})
    names = list(fns)
    times = interleaved({**fns, "DiT": dit}, args.repeats)
    print(f"packed attention fwd+bwd, {args.size}, batch {args.batch}, {heads} heads × {head_dim}, kept {n.tolist()}, "
          f"median of {args.repeats}, {'each compiled alone' if args.compile else 'eager'}; DiT: dense SDPA on {args.batch} × {T} tokens")
    useful, dit_scores = float(n.double().square().sum()), args.batch * T * T
    for b in [*names, "DiT"]:
        tokens, scores = (args.batch * T, dit_scores) if b == "DiT" else (int(n.sum()), useful)
        print(f"  {b:<16} {times[b] * 1e3:8.2f} ms  x{times[b] / times[names[0]]:.2f}  vs DiT per token "
              f"{(times[b] / tokens) / (times['DiT'] / (args.batch * T)):.2f}, per useful score "
              f"{(times[b] / scores) / (times['DiT'] / dit_scores):.2f}")
    attention_kernels(args, q, k, v, layouts[FALLBACK], dense)


def attention_kernels(args, q, k, v, layout, dense) -> None:
    """The CPU flash kernels alone (forward + backward, no autograd, no gathers, no op): on the
    fallback's padded groups with their masks, on each sample alone at its exact length (no padding,
    no mask), and on the DiT's dense batch. What is left between the last two is the kernel's own
    cost on ragged lengths, which no padding scheme removes."""
    from dcdit_cli.models.attention import _additive, _groups, _key_padding, to_slots

    forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def calls(batches):  # [(q, k, v, mask)] (G, H, m, d) each → run every batch's forward and backward
        grads = [torch.randn_like(b[0]) for b in batches]

        def run():
            for (qb, kb, vb, mask), grad in zip(batches, grads):
                out, lse = forward(qb, kb, vb, attn_mask=mask)
                backward(grad, qb, kb, vb, out, lse, 0.0, False, attn_mask=mask)
        return run

    with torch.no_grad():
        slots, size = layout.group_slots, layout.group_size
        grouped = zip(*(_groups(to_slots(a, layout), slots, size) for a in (q, k, v)),
                      _key_padding(_additive(layout.padded_valid, q.dtype), slots, size))
        bounds = layout.cu_seqlens.tolist()
        alone = [(*(a[lo:hi].transpose(0, 1)[None] for a in (q, k, v)), None) for lo, hi in zip(bounds, bounds[1:])]
        fns = {"groups": calls(list(grouped)), "alone": calls(alone), "DiT": calls([(dense, dense, dense, None)])}
        times = interleaved(fns, args.repeats)
    tokens, dit_tokens = q.shape[0], dense.shape[0] * dense.shape[2]
    per_token = {name: (times[name] / (dit_tokens if name == "DiT" else tokens)) / (times["DiT"] / dit_tokens) for name in fns}
    print(f"  the CPU flash kernels alone, forward + backward: the fallback's groups {times['groups'] * 1e3:.2f} ms "
          f"({per_token['groups']:.2f} per token vs the DiT's), each sample alone at its exact length "
          f"{times['alone'] * 1e3:.2f} ms ({per_token['alone']:.2f}), the DiT's {times['DiT'] * 1e3:.2f} ms")


def attention_grouping(args) -> None:
    """--grouping: the fallback with its samples in groups of about four against each sample alone,
    forward + backward, for each width in --widths (heads of 64, or of 24 where 64 does not divide) and
    grid side in --sides, kept L/4 ± spread: the measurement behind ``samples_alone``'s threshold."""
    from dcdit_cli.models.attention import PackedLayout, samples_alone, varlen_attention

    print(f"the fallback's grouping, batch {args.batch}, kept L/4 ±{args.spread:.0%}{order(args)}, forward + backward, "
          f"median of {args.repeats} (interleaved)")
    for side in args.sides:
        n = kept_counts(args, side)
        valid = torch.arange(int(n.max()))[None] < n[:, None]
        layouts = {alone: PackedLayout.from_valid(valid, int(n.sum()), alone=alone) for alone in (False, True)}
        for width in args.widths:
            head_dim = 64 if width % 64 == 0 else 24
            q, k, v = (torch.randn(int(n.sum()), width // head_dim, head_dim, requires_grad=True) for _ in range(3))
            times = interleaved({alone: (lambda alone=alone: varlen_attention(q, k, v, layouts[alone]).sum().backward())
                                 for alone in layouts}, args.repeats)
            rule = "alone" if samples_alone(torch.device("cpu"), width, side * side) else "groups"
            print(f"  width {width:4d} ({width // head_dim} × {head_dim}), {side}² grid, width · tokens² {width * side**4:.1e}: "
                  f"groups {times[False] * 1e3:8.2f} ms, alone {times[True] * 1e3:8.2f} ms, alone / groups "
                  f"{times[True] / times[False]:.2f}; the model runs {rule}")


def attention_by_length(args, heads: int, head_dim: int) -> None:
    """--lengths LO HI: SDPA forward + backward on (batch, heads, m, head_dim) with a key-padding
    mask, as the fallback runs a group, for every m in [LO, HI]: the time per sample against m. Then
    the fallback's padding rule (models/attention.py ``padded_length``) on these times: for each
    group length whose padded lengths were timed, the time at the rule's length against always
    rounding up to a multiple of 8, and against the fastest length from m to that multiple + 8."""
    from dcdit_cli.models.attention import PAD_MULTIPLE, padded_length

    def run(m):
        q = torch.randn(args.batch, heads, m, head_dim, requires_grad=True)
        mask = torch.ones(args.batch, 1, 1, m, dtype=torch.bool)
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask).sum().backward()

    lo, hi = args.lengths
    times = interleaved({m: run(m) for m in range(lo, hi + 1)}, args.repeats)
    print(f"masked SDPA fwd+bwd, {args.size}: batch {args.batch}, {heads} heads × {head_dim}, median of {args.repeats}; "
          f"µs per sample at each length (* a multiple of 8)")
    for m, t in times.items():
        print(f"  {m:4d}{'*' if m % 8 == 0 else ' '} {t / args.batch * 1e6:8.1f} µs")
    lengths = torch.arange(lo, hi + 1)
    rule, up = padded_length(lengths).tolist(), (-(-lengths // PAD_MULTIPLE) * PAD_MULTIPLE).tolist()
    fair = [(m, r, u) for m, r, u in zip(lengths.tolist(), rule, up) if u + PAD_MULTIPLE <= hi]
    if fair:
        vs_up = [times[r] / times[u] for _, r, u in fair]
        vs_best = [times[r] / min(times[k] for k in range(m, u + PAD_MULTIPLE + 1)) for m, r, u in fair]
        print(f"  padding rule, group lengths {fair[0][0]}–{fair[-1][0]}: time at the rule's length / at the next multiple "
              f"of {PAD_MULTIPLE}: mean {statistics.mean(vs_up):.3f}, range {min(vs_up):.3f}–{max(vs_up):.3f}; "
              f"/ the fastest length up to that multiple + {PAD_MULTIPLE}: mean {statistics.mean(vs_best):.3f}, "
              f"worst {max(vs_best):.3f}")


def bench_compile(args) -> None:
    """torch.compile as the kept counts change, on the toy DC-DiT training step: its transformer blocks
    compiled with dynamic shapes (the default here), or the whole model (``--whole``, ``dcdit train
    --compile``: dcdit_cli.models.compile_model); recompiles, graph breaks, agreement with eager and
    time against eager."""
    import copy

    import torch._dynamo as dynamo

    from dcdit_cli.models import compile_blocks

    torch.manual_seed(0)
    recipe = load_recipe("toy")
    eager, loss_fn = build_model(recipe.model), loss_for_recipe(recipe)
    x, y, t = inputs(recipe, args.batch)
    batches = [kept_masks(args.batch, recipe.model.input_size, 4.0, 0.3, seed=s) for s in range(args.steps)]
    compiled = copy.deepcopy(eager)
    if args.whole:
        compile_model(compiled)  # route + process_kept: two graphs
    else:
        compile_blocks(compiled)

    def step(m, b, seed=0):
        torch.manual_seed(seed)  # the loss draws its noise: the same draw for both models
        loss = loss_fn(WithBoundary(m, b), x, y, t=t)[0]
        loss.backward()
        return loss.detach()

    dynamo.utils.counters.clear()
    cold = timed(lambda: step(compiled, batches[0]))
    later = [timed(lambda b=b: step(compiled, b)) for b in batches[1:]]
    graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    breaks = sum(dynamo.utils.counters["graph_break"].values())
    gap = max(float((step(compiled, b, i) - step(eager, b, i)).abs()) for i, b in enumerate(batches[:3]))
    times = interleaved({"eager": lambda: step(eager, batches[1]), "compiled": lambda: step(compiled, batches[1])}, args.repeats)
    what = "the whole model" if args.whole else "its transformer blocks"
    print(f"torch.compile(dynamic=True) of {what}: toy DC-DiT training step, batch {args.batch}, "
          f"{args.steps} batches with different kept counts")
    print(f"  cold compile + first step {cold:.1f} s; later steps {', '.join(f'{s:.2f}' for s in later)} s; "
          f"unique graphs {graphs}; graph breaks {breaks}; |loss compiled − eager| ≤ {gap:.1e}")
    print(f"  step time compiled / eager = {times['compiled'] / times['eager']:.2f} (median of {args.repeats}, interleaved)")


def main() -> None:
    # No abbreviations: --small-pages is read from sys.argv before argparse runs.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("what", choices=["train", "sample", "scaffold", "attention", "smoothing", "norm", "compile"])
    parser.add_argument("--size", choices=sorted(SIZES), default="toy")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--spread", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--widths", type=int, nargs="+", default=[96, 384, 768], help="attention --grouping: inner widths")
    parser.add_argument("--grouping", action="store_true",
                        help="attention: the fallback's groups against each sample alone, per width and grid side")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--parts", action="store_true", help="train: also the share of a DC-DiT step by part (fwd+bwd)")
    parser.add_argument("--bf16", action="store_true", help="train, sample: both models under bf16 autocast; norm: GroupNorm + SiLU on bf16 inputs")
    parser.add_argument("--compile", action="store_true", help="train: both models compiled whole (compile_model); attention: each attention compiled alone")
    parser.add_argument("--profile", action="store_true", help="train: the operators with the most time, both models; sample: the DC-DiT at budget 0 and Lite-CFG")
    parser.add_argument("--profile-rows", type=int, default=12, help="--profile: how many operators to list")
    parser.add_argument("--profile-shapes", action="store_true", help="--profile: one row per operator and input shapes")
    parser.add_argument("--whole", action="store_true", help="compile: the whole DC-DiT, not its blocks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs=2, metavar=("LO", "HI"),
                        help="attention: the masked SDPA of one group at every length from LO to HI")
    parser.add_argument("--shuffle", action="store_true",
                        help="train, sample, attention: kept counts in a random batch order (default: growing with the index)")
    parser.add_argument("--small-pages", action="store_true",
                        help="4 KiB pages for every tensor instead of huge pages as dcdit runs (scaffold: always both)")
    args = parser.parse_args()
    if args.profile_rows < 1:
        parser.error(f"--profile-rows {args.profile_rows}: list at least 1 operator")
    if args.lengths and not 1 <= args.lengths[0] <= args.lengths[1]:
        parser.error(f"--lengths {args.lengths[0]} {args.lengths[1]}: give 1 ≤ LO ≤ HI")
    if bad := [side for side in args.sides if side < 1]:
        parser.error(f"--sides {bad[0]}: give grid sides of at least 1, e.g. --sides 16 32")
    if bad := [w for w in args.widths if w < 1 or (w % 64 and w % 24)]:
        parser.error(f"--widths {bad[0]}: give widths that are multiples of 64 or of 24 (heads of that size), e.g. 96 384 768")
    torch.set_num_threads(args.threads)
    print_machine()
    {"train": bench_train, "sample": bench_sample, "scaffold": bench_scaffold, "attention": bench_attention,
     "smoothing": bench_smoothing, "norm": bench_norm, "compile": bench_compile}[args.what](args)


if __name__ == "__main__":
    main()
