"""The metric names of `dcdit fid` / `dcdit eval`: what ``--metrics`` accepts, which record fields
each name fills, and how a field is shown (label, format, which direction is better).

One table serves the option parser, the result tables and the figures' axes, so a new metric is
declared once. The default is ADM's evaluator set (FID, sFID, IS, precision / recall); FD-DINOv2
(Stein et al. 2023, dgm-eval's protocol) and KID (torch-fidelity's definition) are opt-in because
they cost a second network (DINOv2 ViT-L/14) or 100 kernel subsets.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcdit_cli.common.console import DcditError


@dataclass(frozen=True)
class Field:
    """One number of a result record: its key, its label and format, and its better direction."""

    key: str
    label: str
    fmt: str
    higher_is_better: bool = False

    def axis_label(self) -> str:
        return f"{self.label} ({'higher' if self.higher_is_better else 'lower'} is better)"


FIELDS = {f.key: f for f in (
    Field("fid", "FID", "{:.3f}"),
    Field("sfid", "sFID", "{:.3f}"),
    Field("inception_score", "IS", "{:.2f}", higher_is_better=True),
    Field("precision", "Precision", "{:.4f}", higher_is_better=True),
    Field("recall", "Recall", "{:.4f}", higher_is_better=True),
    Field("fd_dinov2", "FD-DINOv2", "{:.2f}"),
    Field("kid", "KID", "{:.5f}"),
)}

METRICS = {
    "fid": ("fid",),
    "sfid": ("sfid",),
    "is": ("inception_score",),
    "pr": ("precision", "recall"),
    "fd_dinov2": ("fd_dinov2",),
    "kid": ("kid",),
}
"""``--metrics`` name → the record fields it fills."""

ADM_METRICS = ("fid", "sfid", "is", "pr")
"""The default: the five numbers of OpenAI's ADM evaluator."""
DEFAULT_METRICS = ",".join(ADM_METRICS)


def parse_metrics(text: str | None) -> tuple[str, ...]:
    """'fid,fd_dinov2,kid' → ('fid', 'fd_dinov2', 'kid') in the table's order; 'all' → every metric.
    FID is always computed (every record and figure has it, and its features are computed anyway)."""
    names = [n.strip().lower() for n in (text or DEFAULT_METRICS).split(",") if n.strip()]
    if names == ["all"]:
        names = list(METRICS)
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise DcditError(f"--metrics {text!r}: use comma-separated names from {', '.join(METRICS)} (or all), "
                         f"e.g. --metrics {DEFAULT_METRICS},fd_dinov2,kid")
    return tuple(m for m in METRICS if m in names or m == "fid")


def metric_field(name: str, option: str = "--pareto-metric") -> Field:
    """The record field a plotted metric names: a field key (``inception_score``) or a metric name
    with one field (``is``, ``fd_dinov2``)."""
    key = METRICS[name][0] if name in METRICS and len(METRICS[name]) == 1 else name
    if key not in FIELDS:
        raise DcditError(f"{option} {name!r}: use one of {', '.join(FIELDS)}")
    return FIELDS[key]


def fields_of(metrics: tuple[str, ...]) -> list[Field]:
    """The record fields the metrics fill, in the table's order."""
    keys = {k for m in metrics for k in METRICS[m]}
    return [f for k, f in FIELDS.items() if k in keys]
