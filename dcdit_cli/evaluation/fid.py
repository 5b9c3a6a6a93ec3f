"""FID, sFID, Inception Score and precision / recall, compatible with OpenAI's ADM evaluator,
and on request FD-DINOv2 and KID.

The paper's "standard suite" (docs/reference.md#adm-data-and-evaluator) is ADM's TensorFlow evaluator. dcdit computes the
same quantities in PyTorch:

* Inception: the 2015-12-05 graph as ported by torch-fidelity, its pool, logits and sFID
  features, from local weights only (:mod:`dcdit_cli.evaluation.inception`).
* FID, sFID and IS in float64 with numpy / scipy; IS over ADM's contiguous chunks of 5,000.
  Precision / recall (Kynkäänniemi et al. 2019) with ADM's distance precision by default
  (float16 per 10,000 × 10,000 block where finite, else float32), float64 on request; the
  blocks are computed in row slices, so no N × N matrix is ever held (:mod:`dcdit_cli.evaluation.precision_recall`).

* On request (``metrics``, :mod:`dcdit_cli.evaluation.metrics`): FD-DINOv2, the same Fréchet
  distance on DINOv2 ViT-L/14 CLS features (:mod:`dcdit_cli.evaluation.dinov2`), against the
  reference's ``mu_dinov2``/``sigma_dinov2``; and KID, computed by torch-fidelity's own
  ``kid_features_to_metric`` on the Inception pool features already held for precision / recall.

Samples are an ``.npz`` whose ``arr_0`` is uint8 (N, H, W, 3) or a folder of images; they are
read in batches, so 50,000 samples are never held in memory twice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import scipy.linalg
import scipy.special
import torch
from rich.table import Table
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

from dcdit_cli.common.atomic import write_npz
from dcdit_cli.common.console import DcditError, RateMeter, plain_log, print0, progress_bar
from dcdit_cli.config.options import OptionCheck
from dcdit_cli.data.image_batches import (
    IMAGE_SUFFIXES,
    POOL_DIM,
    SPATIAL_DIM,
    FolderImages,
    NpzImages,
    Reference,
    check_images_shape,
    list_images,
    load_reference,
    load_samples,
)
from dcdit_cli.data.imaging import center_crop_arr
from dcdit_cli.evaluation.dinov2 import DinoV2Features, load_dinov2
from dcdit_cli.evaluation.inception import InceptionFeatures, load_inception
from dcdit_cli.evaluation.metrics import ADM_METRICS, FIELDS, fields_of
from dcdit_cli.evaluation.precision_recall import check_distances, precision_recall

PR_REF_IMAGES = 10_000  # ADM: precision / recall against the reference batch's 10,000 images
IS_SPLIT_SIZE = 5_000  # ADM: Inception Score over contiguous chunks of 5,000 samples
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1_000  # torch-fidelity's defaults
KID_KERNEL = {"kid_kernel": "poly", "kid_kernel_poly_degree": 3, "kid_kernel_poly_gamma": None,  # gamma None: 1 / d
              "kid_kernel_poly_coef0": 1, "rng_seed": 2020}  # torch-fidelity's defaults, pinned


# -----------------------------------------------------------------------------------------
#                                        Metrics
# -----------------------------------------------------------------------------------------


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + tr σ1 + tr σ2 − 2 tr √(σ1 σ2), as the ADM evaluator computes it.

    If scipy's ``sqrtm`` is not finite (singular covariances), retry with ``eps · I`` added to
    both covariances; an imaginary part is dropped when its diagonal is below 1e-3.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise DcditError(
            f"Fréchet distance: statistics do not match (mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
            f"{sigma2.shape}): compute both with the same feature extractor"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():  # "matrix is singular": handled by the checks below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = eps * np.eye(d)
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all():
        raise DcditError("Fréchet distance: sqrtm is not finite even with 1e-6·I added: evaluate more samples")
    if np.iscomplexobj(covmean):
        max_imag = float(np.abs(np.diagonal(covmean).imag).max())
        if max_imag >= 1e-3:
            raise DcditError(
                f"Fréchet distance: sqrtm(σ1·σ2) has an imaginary diagonal part of {max_imag:.3g} (limit 1e-3), "
                "so the covariances are degenerate: evaluate more samples (ADM uses 50,000)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class RunningStats:
    """Mean and covariance accumulated batch by batch (float64 sums), for reference sets too
    large to keep their features (e.g. all of ImageNet train)."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise DcditError(f"need at least 2 images for a covariance, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, sigma


def inception_score(logits_or_probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score: mean over contiguous chunks of ``split_size`` samples (ADM: 5,000;
    the last chunk may be shorter) of exp(E_x KL(p(y|x) ‖ p(y))).

    The chunk rule matters: ten equal splits agree with ADM only at N = 50,000 (at N = 10,000
    ADM takes two chunks of 5,000). Rows that are non-negative and sum to 1 are taken as
    probabilities; anything else as logits and passed through a softmax (float64).
    """
    x = np.asarray(logits_or_probs)  # no copy: each chunk is converted to float64 on its own
    if x.ndim != 2 or x.shape[0] == 0:
        raise DcditError(f"Inception Score needs (N, classes) predictions, got shape {x.shape}")
    if split_size < 1:
        raise DcditError(f"Inception Score split size must be >= 1, got {split_size}")
    chunks = [x[i : i + split_size] for i in range(0, len(x), split_size)]
    is_probs = all((c >= 0).all() and np.allclose(c.astype(np.float64).sum(axis=1), 1.0, atol=1e-6) for c in chunks)
    scores = []
    for part in chunks:
        part = part.astype(np.float64)
        part = part if is_probs else scipy.special.softmax(part, axis=1)
        p_y = part.mean(axis=0, keepdims=True)  # marginal over the chunk
        kl = scipy.special.rel_entr(part, p_y).sum(axis=1)  # p log(p / p_y), 0 where p = 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def kernel_inception_distance(real_feats: np.ndarray, fake_feats: np.ndarray,
                              subset_size: int = KID_SUBSET_SIZE) -> tuple[float, float, int]:
    """KID (Bińkowski et al. 2018) as torch-fidelity defines it, computed by torch-fidelity's own
    ``kid_features_to_metric``: over 100 subsets of ``subset_size`` rows drawn without replacement
    from each set (its seed 2020), the unbiased MMD² with the kernel k(x, y) = (x·y / d + 1)³;
    returns (mean, standard deviation, subset size).

    torch-fidelity refuses sets smaller than the subset size; here the subset size shrinks to the
    smaller set (toy runs), and the size used is returned so a record says when it is not 1,000.
    """
    size = min(subset_size, len(real_feats), len(fake_feats))
    if size < 2:
        raise DcditError(f"KID needs at least 2 images per set, got {len(fake_feats)} samples and {len(real_feats)} reference images")
    out = kid_features_to_metric(torch.as_tensor(np.asarray(fake_feats)), torch.as_tensor(np.asarray(real_feats)),
                                 kid_subsets=KID_SUBSETS, kid_subset_size=size, verbose=False, **KID_KERNEL)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD], size


# -----------------------------------------------------------------------------------------
#                                      Activations
# -----------------------------------------------------------------------------------------


def _as_batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    if isinstance(images, np.ndarray):
        images = [images]
    for batch in images:
        check_images_shape(batch.shape, batch.dtype, "an image batch")
        for i in range(0, len(batch), batch_size):
            yield batch[i : i + batch_size]


def _iter_activations(images, extractor: InceptionFeatures, batch_size: int, total: int | None, description: str,
                      dinov2: DinoV2Features | None = None):
    """Yields (batch, features) with a progress bar in images/s; ``features["dinov2"]`` (N, D) too
    when a DINOv2 extractor is given."""
    meter, rate = RateMeter(), ""
    with progress_bar(description) as progress:
        task = progress.add_task(description, total=total, rate="")
        for batch in _as_batches(images, batch_size):
            feats = extractor(batch)
            if dinov2 is not None:
                feats["dinov2"] = dinov2(batch)
            rate = f"{meter.update(len(batch)):.2f} img/s"
            progress.update(task, advance=len(batch), rate=rate)
            yield batch, feats
    if meter.count:
        plain_log(f"{description}: {meter.count} images, {rate}")


@dataclass
class Activations:
    """What the metrics need from N images, held once: ``pool`` (N, 2048) and ``logits``
    (N, 1008) float32 (precision / recall, KID and IS need every row), and running mean /
    covariance of pool, spatial and (for FD-DINOv2) DINOv2 features, so those are never kept."""

    pool: np.ndarray
    logits: np.ndarray
    pool_stats: RunningStats
    spatial_stats: RunningStats
    dinov2_stats: RunningStats | None = None


class _Rows:
    """Rows appended batch by batch into one array allocated for ``total`` rows when known
    (no concatenation copy at 50,000 images), else collected and concatenated."""

    def __init__(self, total: int | None) -> None:
        self.total, self.array, self.parts, self.n = total, None, [], 0

    def add(self, x: np.ndarray) -> None:
        if self.total is None:
            self.parts.append(x)
        else:
            if self.array is None:
                self.array = np.empty((self.total, *x.shape[1:]), x.dtype)
            self.array[self.n : self.n + len(x)] = x
        self.n += len(x)

    def result(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.total is None else self.array[: self.n]


def compute_activations(
    images: np.ndarray | Iterable[np.ndarray],
    extractor: InceptionFeatures,
    batch_size: int = 50,
    *,
    total: int | None = None,
    description: str = "inception",
    dinov2: DinoV2Features | None = None,
) -> Activations:
    """Inception (and, given ``dinov2``, DINOv2) features of uint8 (N, H, W, 3) images (an array
    or an iterable of at most ``total`` images in batches)."""
    if total is None and isinstance(images, np.ndarray):
        total = len(images)
    pool, logits = _Rows(total), _Rows(total)
    pool_stats, spatial_stats = RunningStats(POOL_DIM), RunningStats(SPATIAL_DIM)
    dinov2_stats = RunningStats(dinov2.dim) if dinov2 is not None else None
    for _, feats in _iter_activations(images, extractor, batch_size, total, description, dinov2):
        pool.add(feats["pool"])
        logits.add(feats["logits"])
        pool_stats.update(feats["pool"])
        spatial_stats.update(feats["spatial"])
        if dinov2_stats is not None:
            dinov2_stats.update(feats["dinov2"])
    if pool.n == 0:
        raise DcditError("no images to evaluate")
    return Activations(pool.result(), logits.result(), pool_stats, spatial_stats, dinov2_stats)


def sample_metrics(acts: Activations, ref: Reference, ref_pool: np.ndarray | None, *, metrics: tuple[str, ...] = ADM_METRICS,
                   split_size: int = IS_SPLIT_SIZE, distances: str = "adm", device: str | torch.device | None = None) -> dict:
    """The metric step: the ``metrics`` (FID always) of the samples' activations against the
    reference's statistics and (precision / recall, KID) its pool features. Every field of
    :data:`~dcdit_cli.evaluation.metrics.FIELDS` is in the result, None where not computed."""
    out: dict = dict.fromkeys(FIELDS)
    out["fid"] = frechet_distance(*acts.pool_stats.result(), ref.mu, ref.sigma)
    if "sfid" in metrics:
        out["sfid"] = frechet_distance(*acts.spatial_stats.result(), ref.mu_s, ref.sigma_s)
    if "is" in metrics:
        out["inception_score"] = inception_score(acts.logits, split_size=split_size)
    if "pr" in metrics and ref_pool is not None:
        out["precision"], out["recall"] = precision_recall(ref_pool, acts.pool, k=3, device=device, distances=distances)
    if "fd_dinov2" in metrics:
        out["fd_dinov2"] = frechet_distance(*acts.dinov2_stats.result(), ref.mu_dinov2, ref.sigma_dinov2)
    if "kid" in metrics:
        out["kid"], out["kid_std"], out["kid_subset_size"] = kernel_inception_distance(ref_pool, acts.pool)
    return {**out, "metrics": list(metrics), "num_samples": int(len(acts.pool)),
            "num_ref": int(len(ref_pool)) if ref_pool is not None else 0}


def _warn_skipped(source) -> None:
    if source.skipped:
        print0(f"[yellow]skipped {len(source.skipped)} unreadable image(s) under {source.path} (first: {source.skipped[0]})[/]")


# -----------------------------------------------------------------------------------------
#                                 Evaluation and reference
# -----------------------------------------------------------------------------------------


def check_reference(ref: Reference, metrics: tuple[str, ...], dinov2: DinoV2Features | None) -> None:
    """One line, before any work, when the reference cannot serve the asked metrics: FD-DINOv2
    needs DINOv2 statistics of the extractor's width (or an images-only reference, whose
    statistics are all computed from ``arr_0``); KID needs the reference images."""
    rebuild = "build the reference once with `dcdit fid --make-ref DIR --out REF.npz --metrics all`"
    if "fd_dinov2" in metrics:
        if ref.mu_dinov2 is None and ref.has_stats:
            raise DcditError(f"{ref.path} has Inception statistics but no DINOv2 ones (mu_dinov2/sigma_dinov2), so "
                             f"fd_dinov2 cannot be computed: it predates FD-DINOv2 or comes from ADM; {rebuild}")
        if ref.mu_dinov2 is not None and dinov2 is not None and ref.mu_dinov2.shape[0] != dinov2.dim:
            raise DcditError(f"{ref.path} holds {ref.mu_dinov2.shape[0]}-d DINOv2 statistics but {dinov2.path} gives "
                             f"{dinov2.dim}-d features: use the DINOv2 weights the reference was built with")
    if "kid" in metrics and ref.images is None:
        raise DcditError(f"{ref.path} has no arr_0 images, which KID compares the samples with: {rebuild}")


def reference_features(ref: Reference, extractor: InceptionFeatures, batch_size: int = 50,
                       dinov2: DinoV2Features | None = None, metrics: tuple[str, ...] = ADM_METRICS) -> np.ndarray | None:
    """The reference's pool features for precision / recall and KID (its first 10,000 images),
    filling in its FID / sFID (and, given ``dinov2``, DINOv2) statistics from ``arr_0`` when the
    file has none. None without ``arr_0``, or when the file has its statistics and ``metrics``
    need no features (neither pr nor kid)."""
    if ref.has_stats and not {"pr", "kid"} & set(metrics):
        return None
    if ref.images is None:
        print0(f"[yellow]{ref.path} has no arr_0 images: precision and recall are not computed[/]")
        return None
    limit = None if not ref.has_stats else min(ref.images.num, PR_REF_IMAGES)
    dinov2 = dinov2 if not ref.has_stats and ref.mu_dinov2 is None else None  # only an images-only reference
    acts = compute_activations(ref.images.batches(batch_size, limit=limit), extractor, batch_size,
                               total=limit or ref.images.num, description="reference", dinov2=dinov2)
    if not ref.has_stats:
        ref.mu, ref.sigma = acts.pool_stats.result()
        ref.mu_s, ref.sigma_s = acts.spatial_stats.result()
    if acts.dinov2_stats is not None:
        ref.mu_dinov2, ref.sigma_dinov2 = acts.dinov2_stats.result()
    return acts.pool[:PR_REF_IMAGES]


def evaluate(
    samples: str | Path | NpzImages | FolderImages,
    ref: str | Path | Reference,
    inception_weights: str | Path | None = None,
    *,
    num: int | None = None,
    batch_size: int = 50,
    split_size: int = IS_SPLIT_SIZE,
    distances: str = "adm",
    device: str | torch.device | None = None,
    extractor: InceptionFeatures | None = None,
    metrics: tuple[str, ...] = ADM_METRICS,
    dinov2_weights: str | Path | None = None,
    dinov2: DinoV2Features | None = None,
) -> dict:
    """ADM-evaluator metrics of ``samples`` against the reference batch ``ref``: FID and sFID
    (against the reference's statistics), Inception Score (contiguous chunks of ``split_size``)
    and precision / recall (k = 3, against the reference's first 10,000 images, distances in
    ``distances`` precision: see :func:`precision_recall`); FD-DINOv2 and KID when ``metrics``
    names them."""
    OptionCheck().count("--num", num).count("--batch-size", batch_size, example=50).done()
    check_distances(distances)
    samples = samples if isinstance(samples, (NpzImages, FolderImages)) else load_samples(samples)
    ref = ref if isinstance(ref, Reference) else load_reference(ref)
    if num is not None and num > samples.num:
        raise DcditError(f"asked for {num} samples but {samples.path} holds {samples.num}: lower --num or sample more")
    check_reference(ref, metrics, dinov2)
    extractor = extractor or load_inception(inception_weights, device)
    if "fd_dinov2" in metrics:
        dinov2 = dinov2 or load_dinov2(dinov2_weights, extractor.device)
        check_reference(ref, metrics, dinov2)
    else:
        dinov2 = None

    n = samples.num if num is None else num
    acts = compute_activations(samples.batches(batch_size, limit=n), extractor, batch_size, total=n, description="samples",
                               dinov2=dinov2)
    _warn_skipped(samples)
    if num is not None and len(acts.pool) < num:
        raise DcditError(f"asked for {num} samples but only {len(acts.pool)} under {samples.path} are readable: lower --num")

    ref_pool = reference_features(ref, extractor, batch_size, dinov2, metrics)
    return sample_metrics(acts, ref, ref_pool, metrics=metrics, split_size=split_size, distances=distances,
                          device=extractor.device)


def make_reference(
    image_dir: str | Path,
    out_npz: str | Path,
    *,
    image_size: int = 256,
    extractor: InceptionFeatures | None = None,
    inception_weights: str | Path | None = None,
    num: int | None = None,
    keep_images: int = PR_REF_IMAGES,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    metrics: tuple[str, ...] = ADM_METRICS,
    dinov2_weights: str | Path | None = None,
    dinov2: DinoV2Features | None = None,
) -> dict:
    """An ADM-style reference batch from real images: each image ADM-centre-cropped to
    ``image_size``; ``mu``/``sigma`` and ``mu_s``/``sigma_s`` over all of them (or the first
    ``num``), ``arr_0`` = ``keep_images`` crops spread evenly over the sorted files (ADM keeps
    10,000; the indices count readable images, so skipped files may leave fewer). With ``fd_dinov2``
    in ``metrics`` also ``mu_dinov2``/``sigma_dinov2`` over all of them, so one reference serves
    every metric (KID needs no extra field: it uses the Inception features of ``arr_0``, which
    precision / recall compute anyway). Returns a summary."""
    root, out = Path(image_dir), Path(out_npz)
    OptionCheck().count("--num", num).count("--batch-size", batch_size, example=50).count("--image-size", image_size, example=256) \
        .output("--out", out, (".npz",)).done()
    if not root.is_dir():
        raise DcditError(f"image folder not found: {root}: pass --make-ref DIR, a folder of real images")
    files = list_images(root)[:num]
    if not files:
        raise DcditError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}: pass --make-ref DIR, a folder of real images")
    extractor = extractor or load_inception(inception_weights, device)
    if "fd_dinov2" in metrics:
        dinov2 = dinov2 or load_dinov2(dinov2_weights, extractor.device)
    else:
        dinov2 = None
    out.parent.mkdir(parents=True, exist_ok=True)

    source = FolderImages(root, files, transform=lambda im: center_crop_arr(im, image_size))
    pool_stats, spatial_stats = RunningStats(POOL_DIM), RunningStats(SPATIAL_DIM)
    dinov2_stats = RunningStats(dinov2.dim) if dinov2 is not None else None
    # arr_0 (what precision / recall and KID compare with) spread evenly over the sorted files, so a
    # class-sorted folder such as ImageNet's gives every class a share, not its first few classes.
    keep = np.unique(np.linspace(0, len(files) - 1, min(keep_images, len(files))).round().astype(np.int64))
    kept, seen = [], 0
    for batch, feats in _iter_activations(source.batches(batch_size), extractor, batch_size, len(files), "reference", dinov2):
        pool_stats.update(feats["pool"])
        spatial_stats.update(feats["spatial"])
        if dinov2_stats is not None:
            dinov2_stats.update(feats["dinov2"])
        kept.append(batch[np.isin(np.arange(seen, seen + len(batch)), keep)])
        seen += len(batch)
    _warn_skipped(source)
    if pool_stats.n < 2:
        raise DcditError(f"only {pool_stats.n} readable image(s) under {root}: a reference needs at least 2")
    mu, sigma = pool_stats.result()
    mu_s, sigma_s = spatial_stats.result()
    arr_0 = np.concatenate(kept)
    extra = {}
    if dinov2_stats is not None:
        extra["mu_dinov2"], extra["sigma_dinov2"] = dinov2_stats.result()
    write_npz(out, arr_0=arr_0, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, **extra)
    return {"path": str(out), "num_images": pool_stats.n, "num_stored": len(arr_0), "skipped": len(source.skipped),
            "statistics": ["mu", "sigma", "mu_s", "sigma_s", *extra]}


def report_table(results: dict):
    """The metrics as a rich table (what ``dcdit fid`` prints): the fields of the asked metrics."""
    table = Table(title="ADM evaluator metrics" + ("" if set(results.get("metrics", ADM_METRICS)) <= set(ADM_METRICS) else " and more"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [(f.label, f.key, f.fmt) for f in fields_of(tuple(results.get("metrics", ADM_METRICS)))]
    if results.get("kid") is not None:
        rows += [("KID std (subsets)", "kid_std", "{:.5f}"), ("KID subset size", "kid_subset_size", "{:,}")]
    rows += [("samples", "num_samples", "{:,}"), ("reference images (P/R, KID)", "num_ref", "{:,}")]
    for label, key, fmt in rows:
        value = results.get(key)
        table.add_row(label, "n/a" if value is None else fmt.format(value))
    return table
