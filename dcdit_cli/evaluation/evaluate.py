"""`dcdit eval`: from a checkpoint to paper Table 1's metrics and the FID–FLOPs figures in one command.

For every setting (guidance scale × tail-dropping budget, with an optional Lite-CFG budget for
the unconditional half) it samples an ADM ``.npz`` with :func:`dcdit_cli.sampling.sampler.sample_npz`
(sharded over the processes of ``accelerate launch``, resumable: finished parts are kept and
skipped), then evaluates it on rank 0 with the ADM-exact metrics of :mod:`dcdit_cli.evaluation.fid`
against one reference batch whose features are computed once. Each setting's record holds
FID, sFID, IS, precision, recall (and FD-DINOv2, KID when ``--metrics`` asks), the TFLOPs/img
measured from the kept tokens the sampler actually used (paper Table 1's convention and the
FLOPs actually spent), the sampling rate, and what is needed to rerun it (command, checkpoint,
weights step, seed, versions).

Outputs in ``--out`` (default ``RUN/eval``)::

    eval.json      one record per setting (merged with the records of earlier invocations)
    pareto.png     --pareto-metric (default FID) against TFLOPs/img, one point per setting,
                   other runs overlaid (--compare)
    elastic.png    FID (and FD-DINOv2, KID, the Pareto metric when computed) and TFLOPs/img
                   against the budget, one line per guidance scale
    samples/       the .npz of each setting (and its .parts while sampling)
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_fidelity
from accelerate import PartialState
from rich.table import Table

from dcdit_cli import __version__
from dcdit_cli.common.atomic import write_json, write_png
from dcdit_cli.common.console import DcditError, print0, print_table
from dcdit_cli.config.options import OptionCheck
from dcdit_cli.evaluation import fid
from dcdit_cli.evaluation.dinov2 import load_dinov2
from dcdit_cli.evaluation.figures import elastic_figure, pareto_figure
from dcdit_cli.evaluation.inception import load_inception
from dcdit_cli.evaluation.metrics import ADM_METRICS, FIELDS, METRICS, Field, fields_of, metric_field
from dcdit_cli.evaluation.precision_recall import check_distances
from dcdit_cli.sampling.sampler import SampleOptions, sample_npz
from dcdit_cli.training.checkpoint import load_weights

EVAL_FILE = "eval.json"
PLOTTED = ("fid", "tflops_per_img")
"""The fields every record has for the figures, checked when a record is read."""
ELASTIC_FIELDS = ("fid", "fd_dinov2", "kid")
"""The quality panels of elastic.png, where computed (with the Pareto metric)."""


@dataclass(frozen=True)
class Setting:
    """One evaluated point: guidance scale, budget and the unconditional half's budget (−1: as budget)."""

    cfg_scale: float
    budget: float
    uncond_budget: float = -1.0

    @property
    def name(self) -> str:
        lite = "" if self.uncond_budget < 0 else f"-u{self.uncond_budget:g}"
        return f"cfg{self.cfg_scale:g}-b{self.budget:g}{lite}"

    def flags(self) -> dict:
        return {"cfg_scale": self.cfg_scale, "budget": self.budget, "uncond_budget": self.uncond_budget}


def parse_floats(text: str | None, option: str) -> list[float] | None:
    """'0,0.1,0.2' → [0.0, 0.1, 0.2]; None stays None (take the recipe's value)."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DcditError(f"{option} {text!r}: give comma-separated numbers, e.g. {option} 0,0.1,0.2") from None
    if not values:
        raise DcditError(f"{option} is empty: give at least one value, e.g. {option} 0")
    return values


def settings_for(recipe, budgets: list[float] | None, uncond_budget: float | None,
                 cfg_scales: list[float] | None) -> list[Setting]:
    """Every guidance scale × budget; what is not given comes from the recipe (eval.cfg_scale,
    sample.budget, sample.uncond_budget), as `dcdit sample` takes it."""
    uncond = recipe.sample.uncond_budget if uncond_budget is None else uncond_budget
    return [Setting(c, b, uncond) for c in (cfg_scales or [recipe.eval.cfg_scale]) for b in (budgets or [recipe.sample.budget])]


def default_out(ckpt: Path) -> Path:
    """RUN/eval for a run directory, else eval/ beside the weights file's run; for a Hub reference
    (``hf:OWNER/NAME…``, read from the cache) eval/OWNER--NAME… in the working directory."""
    if str(ckpt).startswith("hf:"):
        return Path("eval") / str(ckpt)[len("hf:"):].strip("/").replace("/", "--")
    ckpt = Path(ckpt)
    run = ckpt if ckpt.is_dir() else ckpt.parent.parent if ckpt.parent.name == "weights" else ckpt.parent
    return run / "eval"


def find_eval_json(path: Path) -> Path:
    """An eval.json given as the file, its folder or a run directory (RUN/eval/eval.json)."""
    path = Path(path)
    for candidate in (path, path / EVAL_FILE, path / "eval" / EVAL_FILE):
        if candidate.is_file():
            return candidate
    raise DcditError(f"--compare {path}: no {EVAL_FILE} there (run `dcdit eval --ckpt {path} ...` first, or pass the file)")


def load_records(path: Path) -> list[dict]:
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DcditError(f"{path} is not a readable {EVAL_FILE} ({e}): delete it or pass another file") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and all(_finite(r.get(k)) for k in PLOTTED)
                                                 for r in records):
        raise DcditError(f"{path} is not a list of `dcdit eval` records (each with a finite {' and '.join(PLOTTED)}): "
                         f"delete it or pass another file")
    return records


def check_plotted(field: Field, metrics: tuple[str, ...], others: list[tuple[Path, list[dict]]]) -> None:
    """The Pareto metric is computed by this run and present in every compared run: one line otherwise."""
    if not any(field.key in METRICS[m] for m in metrics):
        name = next(m for m, keys in METRICS.items() if field.key in keys)
        raise DcditError(f"--pareto-metric {field.key} is not among --metrics {','.join(metrics)}: add {name}")
    for path, records in others:
        if not any(_finite(r.get(field.key)) for r in records):
            raise DcditError(f"--compare {path}: no record has a finite {field.key}: evaluate that run with --metrics "
                             f"including it, or plot another --pareto-metric")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def versions() -> dict:
    out = {"dcdit": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        out["torch_fidelity"] = torch_fidelity.__version__
    except ImportError:
        pass
    return out


def merge_records(old: list[dict], new: list[dict]) -> list[dict]:
    """Earlier records, each replaced by a new one of the same setting, then the new settings."""
    fresh = {r["setting"]: r for r in new}
    kept = [fresh.pop(r["setting"]) if r["setting"] in fresh else r for r in old]
    return kept + [r for r in new if r["setting"] in fresh]


def run_eval(ckpt: Path, ref: Path, *, num: int | None = None, budgets: list[float] | None = None,
             uncond_budget: float | None = None, cfg_scales: list[float] | None = None, steps: int | None = None,
             seed: int = 0, batch_size: int | None = None, out: Path | None = None, inception_weights: Path | None = None,
             vae: str | None = None, compare: list[Path] = (), distances: str = "adm", metrics: tuple[str, ...] = ADM_METRICS,
             dinov2_weights: Path | None = None, pareto_metric: str = "fid", command: str = "",
             method: str | None = None) -> list[dict]:
    """What `dcdit eval` does; returns this invocation's records (on rank 0; [] elsewhere)."""
    # Every input is checked before the first image is sampled.
    _, recipe, step = load_weights(ckpt)
    check = OptionCheck()
    for b in budgets or []:
        check.fraction("--budgets", b)
    for c in cfg_scales or []:
        check.cfg_scale("--cfg-scales", c)
    out = Path(out) if out is not None else default_out(ckpt)
    check.output("--out", out, directory=True).done()
    settings = settings_for(recipe, budgets, uncond_budget, cfg_scales)
    for s in settings:
        SampleOptions.from_recipe(recipe, steps=steps, seed=seed, method=method, **s.flags())  # bad budget / steps / scheduler → one line, now
    num = recipe.eval.num_samples if num is None else num
    batch_size = recipe.eval.batch_size if batch_size is None else batch_size
    if num < 4 or batch_size < 1:
        raise DcditError(f"--num {num} / --batch-size {batch_size}: evaluate at least 4 samples (precision/recall use k = 3) in batches of >= 1")
    check_distances(distances)
    plotted = metric_field(pareto_metric)
    reference = fid.load_reference(ref)
    fid.check_reference(reference, metrics, None)
    others = [(p, load_records(find_eval_json(p))) for p in compare]
    check_plotted(plotted, metrics, others)
    extractor = load_inception(inception_weights)  # a bad weights file is reported now, not after sampling
    dinov2 = load_dinov2(dinov2_weights, extractor.device) if "fd_dinov2" in metrics else None
    fid.check_reference(reference, metrics, dinov2)
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:
        (out / "samples").mkdir(parents=True, exist_ok=True)
    old = load_records(out / EVAL_FILE) if (out / EVAL_FILE).exists() else []

    # Sample every setting first (all processes), then evaluate on rank 0: no rank waits at a
    # barrier while another runs the Inception net.
    reports = {s: sample_npz(ckpt, num, {"steps": steps, "seed": seed, "method": method, **s.flags()}, None, out / "samples" / f"{s.name}.npz",
                             batch_size, vae) for s in settings}
    if not state.is_main_process:
        return []  # no barrier after this: rank 0 may evaluate for longer than a collective's timeout
    ref_pool = fid.reference_features(reference, extractor, dinov2=dinov2, metrics=metrics)
    args = dict(steps=steps, seed=seed, method=method, distances=distances, ref=ref, ckpt=ckpt, command=command,
                metrics=metrics, dinov2=dinov2)
    records = [_evaluate_setting(s, report, recipe, step, extractor, reference, ref_pool, out, num, args)
               for s, report in reports.items()]
    merged = merge_records(old, records)
    write_json(out / EVAL_FILE, merged, indent=1)
    write_png(out / "pareto.png", pareto_figure(merged, others, f"{recipe.run.name}: {plotted.label} against inference cost", plotted))
    panels = [FIELDS[k] for k in dict.fromkeys([*ELASTIC_FIELDS, plotted.key]) if any(_finite(r.get(k)) for r in merged)]
    write_png(out / "elastic.png", elastic_figure(merged, f"{recipe.run.name}: quality and cost across tail-dropping budgets", panels))
    table = results_table(merged, f"dcdit eval: {recipe.run.name} (weights step {step}, {num:,} samples)")
    print_table(table)
    print0(f"wrote {out / EVAL_FILE}, {out / 'pareto.png'}, {out / 'elastic.png'}")
    return records


def _evaluate_setting(s: Setting, report, recipe, step: int, extractor, reference, ref_pool, out: Path, num: int,
                      args: dict) -> dict:
    """The record of one sampled setting: ADM metrics of its .npz plus cost, speed and provenance."""
    opts = SampleOptions.from_recipe(recipe, steps=args["steps"], seed=args["seed"], method=args["method"], **s.flags())
    npz = out / "samples" / f"{s.name}.npz"
    samples = fid.load_samples(npz)
    dinov2 = args["dinov2"]
    acts = fid.compute_activations(samples.batches(50, limit=num), extractor, 50, total=num, description=f"features {s.name}",
                                   dinov2=dinov2)
    t0 = time.perf_counter()
    metrics = fid.sample_metrics(acts, reference, ref_pool, metrics=args["metrics"], distances=args["distances"],
                                 device=extractor.device)
    return {
        "run": recipe.run.name, "setting": s.name, "cfg_scale": s.cfg_scale, "budget": s.budget,
        "uncond_budget": opts.uncond, **metrics, "metric_seconds": time.perf_counter() - t0,
        "tflops_per_img": report.table1_tflops, "tflops_spent_per_img": report.tflops_per_img,
        "compression": report.compression, "kept_tokens": report.kept_tokens,
        "images_per_s": num / max(report.seconds, 1e-9), "steps": opts.steps, "method": opts.method,
        "guided_channels": opts.guided_channels, "pr_distances": args["distances"], "samples": str(npz),
        "reference": str(args["ref"]), "dinov2_weights": None if dinov2 is None else str(dinov2.path),
        "checkpoint": str(args["ckpt"]), "step": step, "seed": opts.seed,
        "command": args["command"], "versions": versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def results_table(records: list[dict], title: str):
    """One row per setting: the metrics of paper Table 1 (and those asked beyond it) plus cost and speed."""
    table = Table(title=title)
    asked = tuple(dict.fromkeys(m for r in records for m in r.get("metrics", ADM_METRICS) if m in METRICS))
    short = {"precision": "Prec", "recall": "Rec"}
    columns = [("cfg", "cfg_scale", "{:g}"), ("budget", "budget", "{:g}"), ("uncond", "uncond_budget", "{:g}"),
               *((short.get(f.key, f.label), f.key, f.fmt) for f in fields_of(asked)),
               ("TFLOPs/img", "tflops_per_img", "{:.4g}"), ("CR", "compression", "{:.2f}"), ("img/s", "images_per_s", "{:.3g}")]
    for label, _, _ in columns:
        table.add_column(label, justify="right")
    for r in records:
        table.add_row(*("n/a" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in columns))
    table.caption = ("TFLOPs/img: paper Table 1's convention (2 CFG halves × (steps − 1) forwards) from the kept tokens "
                     "measured while sampling; img/s: per process")
    return table
