"""DyDiT on a trained toy DC-DiT (paper §4.5): FLOPs reached, validation loss and sampling time.

Three runs on the built-in shapes set: ``--base`` a trained ``toy`` DC-DiT; ``--dydit`` the same
fine-tuned with DyDiT's gates (``toy-dydit``, λ = 0.7); ``--plain`` the same trained on without
gates for as many steps at the same lr (the control). Reports, measured in this run:

- FLOPs: per-image TFLOPs spent while sampling (exact per-sample cost, gates as run, docs/reference.md#flop-convention)
  and their ratio to the same kept tokens without gates (F_dynamic / F_static, the FLOPs loss's
  ratio; target λ ± 0.05), and to the plain continuation's own spend;
- validation loss (MSE + VB, the training loss) on held-out shapes (another dataset seed) with
  fixed timesteps and noise, the EMA weights in eval mode (the gates' inference path);
- sampling wall time at equal DDPM steps, the two fine-tuned models interleaved, medians.

    dcdit train --recipe toy                                           # runs/toy
    dcdit train --recipe toy-dydit --init-from runs/toy --out runs/toy-dydit
    dcdit train --recipe toy --init-from runs/toy --out runs/toy-continued --set train.max_steps=400
    python benchmarks/dydit.py --base runs/toy --dydit runs/toy-dydit --plain runs/toy-continued
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

VAL_SEED = 12345
"""Dataset seed of the held-out shapes (training uses run.seed = 0)."""


@torch.no_grad()
def validation_loss(model, recipe, num: int, batch: int = 64) -> float:
    """Mean training loss over ``num`` held-out images, timesteps evenly spread over [0, T), fixed noise."""
    from dcdit_cli.data.datasets import make_dataset
    from dcdit_cli.diffusion.gaussian import make_diffusion

    data = make_dataset(recipe.data, seed=VAL_SEED)
    diffusion = make_diffusion(num_timesteps=recipe.diffusion.num_timesteps)
    g = torch.Generator().manual_seed(VAL_SEED)
    total = 0.0
    for lo in range(0, num, batch):
        idx = torch.arange(lo, min(num, lo + batch))
        x, y = data.batch(idx)[:2]
        t = (idx * diffusion.num_timesteps // num).long()
        noise = torch.randn(x.shape, generator=g)
        terms = diffusion.training_losses(lambda x_t, t_: model(x_t, t_, y)[0], x, t, noise)
        total += float(terms["loss"].sum())
    return total / num


def blocks_share(model_cfg, kept: float) -> float:
    """Share of one forward spent in the blocks' attention and MLP (what the gates can skip) at M kept tokens."""
    from dcdit_cli.models.dydit import block_flops
    from dcdit_cli.models.flops import static_cost

    D, H, M = model_cfg.hidden_size, model_cfg.num_heads, round(kept)
    ones = torch.ones(1, H)
    block = block_flops(ones, ones, torch.ones(1, M), torch.ones(1, M, dtype=torch.bool), D, H, int(D * model_cfg.mlp_ratio))
    return float(model_cfg.depth * block) / float(static_cost(model_cfg)(M))


def sample_once(model, recipe, opts, num: int):
    """(seconds, kept, saved) for one batch of ``num`` images; kept/saved (steps, B, halves)."""
    from dcdit_cli.sampling.sampler import sample_batch

    start = time.perf_counter()
    _, _, log = sample_batch(model, recipe, list(range(num)), opts)
    return time.perf_counter() - start, log.as_array(), log.saved_array()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="the trained toy DC-DiT (before)")
    parser.add_argument("--dydit", type=Path, required=True, help="toy-dydit fine-tuned from --base")
    parser.add_argument("--plain", type=Path, required=True, help="toy trained on from --base for as many steps")
    parser.add_argument("--val", type=int, default=1024, help="held-out images for the validation loss")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--num", type=int, default=16, help="images per sampling batch")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=None, help="DDPM steps (default: the recipe's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from dcdit_cli.models.flops import per_image_flops
    from dcdit_cli.sampling.sampler import SampleOptions
    from dcdit_cli.training.checkpoint import load_weights

    def spent_tflops(recipe, kept, saved=None) -> float:  # TFLOPs actually spent per image
        return float(per_image_flops(recipe.model, kept, saved).mean()) / 1e12

    torch.set_num_threads(1)
    models = {name: load_weights(path) for name, path in (("base", args.base), ("dydit", args.dydit), ("plain", args.plain))}
    recipe = models["dydit"][1]
    if recipe.model.dynamic != "dydit" or models["plain"][1].model.dynamic != "none":
        raise SystemExit("--dydit must be a gated run (model.dynamic = 'dydit') and --plain an ungated one")
    steps = args.steps or recipe.diffusion.sampling_steps
    val = {name: validation_loss(m, r, args.val) for name, (m, r, _) in models.items()}

    opts = SampleOptions(cfg_scale=args.cfg_scale, steps=steps, seed=0, guided_channels=recipe.sample.guided_channels)
    timed = ("plain", "dydit")
    for name in timed:  # warm-up
        sample_once(models[name][0], models[name][1], SampleOptions(cfg_scale=args.cfg_scale, steps=2), args.num)
    times: dict[str, list[float]] = {name: [] for name in timed}
    logs = {}
    for _ in range(args.repeats):  # interleaved: both models see the same drift in machine load
        for name in timed:
            seconds, kept, saved = sample_once(models[name][0], models[name][1], opts, args.num)
            times[name].append(seconds)
            logs[name] = (kept, saved)

    kept, saved = logs["dydit"]
    spent = spent_tflops(recipe, kept, saved)
    ungated = spent_tflops(recipe, kept)
    plain_spent = spent_tflops(models["plain"][1], logs["plain"][0])
    t_plain, t_dydit = statistics.median(times["plain"]), statistics.median(times["dydit"])
    metrics = [json.loads(line) for line in (args.dydit / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = {
        "flops_target": recipe.train.flops_target,
        "flops_ratio_sampling": spent / ungated,
        "flops_ratio_training_last_log": metrics[-1]["flops_ratio"],
        "tflops_per_img": {"dydit": spent, "dydit_gates_open": ungated, "plain": plain_spent},
        "kept_tokens": {"dydit": float(kept.mean()), "plain": float(logs["plain"][0].mean())},
        "val_loss": val,
        "steps": {name: s for name, (_, _, s) in models.items()},
        "sampling_seconds_median": {"plain": t_plain, "dydit": t_dydit},
        "sampling_seconds_all": times,
        "wall_time_ratio": t_dydit / t_plain,
        "images": args.num, "ddpm_steps": steps, "cfg_scale": args.cfg_scale, "repeats": args.repeats,
    }
    print(f"\nDyDiT on toy: {args.num} images × {steps} DDPM steps, cfg {args.cfg_scale:g}, median of {args.repeats}, 1 thread")
    print(f"FLOPs ratio F_dynamic/F_static while sampling: {result['flops_ratio_sampling']:.3f} "
          f"(target {recipe.train.flops_target:g}; last training log {result['flops_ratio_training_last_log']:.3f})")
    print(f"TFLOPs/img: dydit {spent:.4g}, same kept tokens without gates {ungated:.4g}, plain continuation {plain_spent:.4g} "
          f"(ratio to plain {spent / plain_spent:.3f})")
    print(f"validation loss: base (step {models['base'][2]}) {val['base']:.4f}, dydit (step {models['dydit'][2]}) "
          f"{val['dydit']:.4f}, plain continuation (step {models['plain'][2]}) {val['plain']:.4f}")
    print(f"sampling wall time: plain {t_plain:.2f}s, dydit {t_dydit:.2f}s, ratio {t_dydit / t_plain:.3f} "
          f"(all: plain {[round(s, 2) for s in times['plain']]}, dydit {[round(s, 2) for s in times['dydit']]})")
    from dcdit_cli.config.recipe import load_recipe

    paper = load_recipe("b-n4-dydit").model
    result["gateable_share"] = {"toy": blocks_share(recipe.model, kept.mean()),
                                "b-n4 (M = L/4)": blocks_share(paper, paper.input_size**2 / paper.target_ratio)}
    print(f"attention + MLP share of a forward (all the gates can skip): toy {result['gateable_share']['toy']:.3f} "
          f"at its mean kept count, b-n4 {result['gateable_share']['b-n4 (M = L/4)']:.3f} at M = L/4")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
