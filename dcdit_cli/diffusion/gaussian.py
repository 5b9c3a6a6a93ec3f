"""Gaussian diffusion as used by DiT and DC-DiT (docs/reference.md#adm-diffusion), written to be read.

The process is ADM's (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic
Models", https://arxiv.org/abs/2102.09672) with DiT's settings: linear β over T = 1000 steps,
ε prediction with a learned-range variance (the model outputs [ε | v], 2C channels),
loss = MSE(ε, ε̂) + VB with no rescaling, and sampling respaced to fewer steps while the
model always sees the original integer timestep.

Shapes: x is (B, C, H, W); the model output is (B, 2C, H, W); t is a (B,) long tensor of
indices into *this* diffusion's schedule (for a respaced diffusion: the respaced index).
Schedules are float64 numpy arrays; ``_extract`` gathers them into float32 tensors from copies
made once per device (no host-to-device copy per call).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from dcdit_cli.common.console import DcditError

ModelOutFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> (B, 2C, H, W)


# ----------------------------------------------------------------------------------------
# Schedules and respacing
# ----------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """ADM's linear schedule: β from 1e-4 to 0.02 (scaled by 1000/T), float64 (docs/reference.md#noise-schedule)."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The original timesteps kept when respacing, with ADM's exact semantics.

    ``section_counts`` splits [0, T) into equal sections and takes that many evenly strided
    steps from each (stride (size-1)/(count-1), rounded), e.g. ``space_timesteps(1000, "250")``
    = {0, 4, 8, ..., 991, 995, 999} (docs/reference.md#respacing). ``"ddimN"`` takes a fixed integer stride
    ``range(0, T, k)`` with exactly N elements, as in the DDIM paper.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise DcditError(f"bad respacing {section_counts!r}: write 'ddimN', e.g. 'ddim50'") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise DcditError(
                f"respacing {section_counts!r}: no integer stride gives exactly {desired} of "
                f"{num_timesteps} steps; use a plain count such as '{desired}' instead"
            )
        try:
            section_counts = [int(x) for x in text.split(",")]
        except ValueError:
            raise DcditError(
                f"bad respacing {section_counts!r}: use a step count like '250', "
                "comma-separated counts like '10,15,20', or 'ddim50'"
            ) from None
    section_counts = list(section_counts)
    if not section_counts or any(c < 1 for c in section_counts):
        raise DcditError(f"bad respacing {section_counts!r}: every section needs at least 1 step")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise DcditError(
                f"respacing asks for {count} steps from a section of {size}; "
                f"ask for at most {size} (total at most {num_timesteps})"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):  # ADM accumulates the fractional index, then rounds
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension except the batch one: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------
# Gaussian log-likelihood helpers (ADM losses.py)
# ----------------------------------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """ADM's tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-probability (nats) of data in [-1, 1] under a Gaussian discretised into 256 bins.

    ADM's decoder term L_0: each value owns the bin x ± 1/255; the two edge bins extend to ±∞.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ----------------------------------------------------------------------------------------
# Per-sample noise
# ----------------------------------------------------------------------------------------


def randn_like_per_sample(shape: Sequence[int], generators: torch.Generator | Sequence[torch.Generator] | None,
                          device: str | torch.device = "cpu") -> Tensor:
    """Standard normal noise of ``shape``; with a list of generators, row i comes from generators[i].

    A list makes each sample's noise independent of the batch it is in, so a seed gives the same
    image alone or in a batch. Noise is drawn on each generator's own device, then moved.
    """
    shape = tuple(shape)
    if generators is None:
        return torch.randn(shape, device=device)
    if isinstance(generators, torch.Generator):
        return to_device(torch.randn(shape, generator=generators, device=generators.device), device)
    generators = list(generators)
    if len(generators) != shape[0]:
        raise DcditError(f"got {len(generators)} generators for a batch of {shape[0]}; pass one per sample")
    rows = [torch.randn(shape[1:], generator=g, device=g.device) for g in generators]
    return to_device(torch.stack(rows), device)


def to_device(x: Tensor, device: str | torch.device) -> Tensor:
    """A host tensor onto ``device`` without stalling a GPU: a copy from pageable memory waits for
    the device's queue, one from pinned memory does not."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


# ----------------------------------------------------------------------------------------
# Gaussian diffusion
# ----------------------------------------------------------------------------------------


class GaussianDiffusion:
    """ADM's diffusion with ε prediction and learned-range variance (DiT's settings, docs/reference.md#learned-variance)."""

    clip_denoised: bool = False

    def __init__(self, betas: np.ndarray) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise DcditError("betas must be a 1-D array with values in (0, 1]; build them with linear_betas()")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)                                   # ᾱ_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])        # ᾱ_{t-1}
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0): variance β̃_t and mean coefficients (DDPM eq. 7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0, so the log is clipped by repeating β̃_1 (ADM)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]) if len(betas) > 1
            else self.betas)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        self._on_device: dict = {}  # (id of a schedule array above, device) → its tensor

    def _extract(self, arr: np.ndarray, t: Tensor, shape: Sequence[int]) -> Tensor:
        """Gather ``arr[t]`` (``arr`` one of this diffusion's schedules) as float32 on t's device,
        shaped (B, 1, ..., 1) to broadcast against ``shape``."""
        key = (id(arr), t.device)
        if key not in self._on_device:
            self._on_device[key] = torch.as_tensor(arr, device=t.device)
        out = self._on_device[key][t].float()
        return out.reshape(out.shape + (1,) * (len(shape) - out.ndim))

    # -- model timesteps (overridden by SpacedDiffusion) --------------------------------

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The integer timesteps the model is called with for schedule indices ``t``."""
        return t

    def _call(self, model_out_fn: ModelOutFn, x_t: Tensor, t: Tensor) -> Tensor:
        return self.check_output(model_out_fn(x_t, self.model_timesteps(t)), x_t)

    @staticmethod
    def check_output(out: Tensor, x_t: Tensor) -> Tensor:
        """The model output, after checking it is (B, 2C, H, W) for x_t (B, C, H, W)."""
        if out.shape[1] != 2 * x_t.shape[1] or out.shape[2:] != x_t.shape[2:]:
            raise DcditError(f"model output has shape {tuple(out.shape)} for input {tuple(x_t.shape)}; "
                             "the model must output 2C channels [eps | v] (learned variance)")
        return out

    # -- forward process ----------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (self._extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t.shape) * x0
                + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, self._extract(self.posterior_variance, t, x_t.shape),
                self._extract(self.posterior_log_variance_clipped, t, x_t.shape))

    # -- reverse process ----------------------------------------------------------------

    def p_mean_variance(self, model_out: Tensor, x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from the raw model output [ε | v] (ADM, learned range; x_0 clamped
        to [−1, 1] only when ``clip_denoised`` is set).

        frac = (v + 1)/2 interpolates the log-variance between log β̃_t and log β_t.
        """
        C = x_t.shape[1]
        eps, v = model_out[:, :C], model_out[:, C:]                                   # (B, C, H, W) each
        min_log = self._extract(self.posterior_log_variance_clipped, t, x_t.shape)
        max_log = self._extract(self.log_betas, t, x_t.shape)
        frac = (v + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        pred_xstart = (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                       - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)
        if self.clip_denoised:  # ADM: clamp x_0, and re-derive ε from it for DDIM
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
            eps = ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                   / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart, "eps": eps}

    def _vb_terms_bpd(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """VB term in bits per dimension: KL for t > 0, the decoder NLL at t = 0. Shape (B,)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_out, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_out_fn: ModelOutFn, x0: Tensor, t: Tensor,
                        noise: Tensor | None = None) -> dict[str, Tensor]:
        """DiT's loss: MSE(ε, ε̂) + VB, each (B,). VB sees ε̂ detached, so it trains only v (docs/reference.md#training-loss).

        ADM rescales VB by T/1000 only for its rescaled-MSE loss; DiT uses plain MSE, so no rescale.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        return self.loss_terms(self._call(model_out_fn, x_t, t), x0, x_t, t, noise)

    def loss_terms(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """:meth:`training_losses` from the model output (B, 2C, H, W) at x_t = q_sample(x0, t, noise)."""
        C = x0.shape[1]
        eps, v = model_out[:, :C], model_out[:, C:]
        frozen = torch.cat([eps.detach(), v], dim=1)
        vb = self._vb_terms_bpd(frozen, x0, x_t, t)
        mse = mean_flat((noise - eps.float()) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # -- sampling -----------------------------------------------------------------------

    def p_sample(self, model_out_fn: ModelOutFn, x: Tensor, t: Tensor, generator=None) -> Tensor:
        """One DDPM step (ADM p_sample): mean + σ z, with no noise added at t == 0."""
        out = self.p_mean_variance(self._call(model_out_fn, x, t), x, t)
        noise = randn_like_per_sample(x.shape, generator, x.device)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample(self, model_out_fn: ModelOutFn, x: Tensor, t: Tensor, eta: float = 0.0,
                    generator=None) -> Tensor:
        """One DDIM step (ADM ddim_sample, DDIM eq. 12 with σ scaled by eta)."""
        out = self.p_mean_variance(self._call(model_out_fn, x, t), x, t)
        eps = out["eps"]
        alpha_bar = self._extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        if eta == 0.0:  # deterministic: no noise drawn
            return mean
        noise = randn_like_per_sample(x.shape, generator, x.device)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        return mean + nonzero * sigma * noise

    @torch.no_grad()
    def sample_loop(self, model_out_fn: ModelOutFn, shape: Sequence[int], *, noise: Tensor | None = None,
                    method: str = "ddpm", eta: float = 0.0, generator=None, device: str | torch.device = "cpu",
                    on_step: Callable[[int, int], None] | None = None) -> Tensor:
        """Sample x_0 from pure noise, stepping from index T'−1 down to 0.

        ``generator`` is None, one ``torch.Generator``, or a list with one per batch row (batch-
        invariant samples); it draws the initial noise (unless ``noise`` is given) and every step's
        noise. ``on_step(done, total)`` is called after each step, done = 1..total.
        """
        if method not in ("ddpm", "ddim"):
            raise DcditError(f"unknown sampling method {method!r}; use 'ddpm' or 'ddim'")
        x = noise.to(device) if noise is not None else randn_like_per_sample(shape, generator, device)
        total = self.num_timesteps
        for done, i in enumerate(reversed(range(total)), start=1):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            if method == "ddpm":
                x = self.p_sample(model_out_fn, x, t, generator)
            else:
                x = self.ddim_sample(model_out_fn, x, t, eta, generator)
            if on_step is not None:
                on_step(done, total)
        return x


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset of the base timesteps (ADM respacing, docs/reference.md#respacing).

    Keeps ᾱ at the kept steps s_0 < s_1 < ... by setting β'_i = 1 − ᾱ_{s_i}/ᾱ_{s_{i−1}} (ᾱ_{s_{−1}} = 1);
    the model is always called with the original integer step s_i through ``timestep_map``.
    """

    def __init__(self, use_timesteps: set[int] | Sequence[int], base_betas: np.ndarray) -> None:
        base = GaussianDiffusion(base_betas)
        self.use_timesteps = sorted(set(int(s) for s in use_timesteps))
        if not self.use_timesteps or self.use_timesteps[0] < 0 or self.use_timesteps[-1] >= base.num_timesteps:
            raise DcditError(f"respaced timesteps must lie in [0, {base.num_timesteps}); got {self.use_timesteps[:3]}...")
        new_betas, last = [], 1.0
        for s in self.use_timesteps:
            new_betas.append(1.0 - base.alphas_cumprod[s] / last)
            last = base.alphas_cumprod[s]
        self.timestep_map = torch.tensor(self.use_timesteps, dtype=torch.long)
        self.original_num_timesteps = base.num_timesteps
        super().__init__(np.array(new_betas, dtype=np.float64))

    def model_timesteps(self, t: Tensor) -> Tensor:
        if self.timestep_map.device != t.device:
            self.timestep_map = self.timestep_map.to(t.device)  # once, not every call
        return self.timestep_map[t]


def make_diffusion(respacing: str = "", num_timesteps: int = 1000, *, clip_denoised: bool = False) -> GaussianDiffusion:
    """DiT's diffusion: linear β over ``num_timesteps``; ``respacing`` "" = all steps, "250", "ddim50", ...

    Callers name the arguments: ``make_diffusion(num_timesteps=T)`` for training (every step),
    ``make_diffusion(respacing="250", num_timesteps=T)`` for a respaced sampler.

    ``clip_denoised`` clamps the predicted x_0 to [−1, 1] while sampling: ADM's setting for
    pixel-space models; DiT samples latents without it (the default, docs/reference.md#sampler-settings).
    """
    betas = linear_betas(num_timesteps)
    diffusion = GaussianDiffusion(betas) if not respacing else SpacedDiffusion(space_timesteps(num_timesteps, respacing), betas)
    diffusion.clip_denoised = clip_denoised
    return diffusion


# ----------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------


def classifier_free_guidance(model_out: Tensor, scale: float, guided_channels: int | None = 3) -> Tensor:
    """Guide the output of a [cond; uncond] batch (DiT forward_with_cfg, docs/reference.md#classifier-free-guidance).

    model_out is (2B, 2C, H, W). On the first ``guided_channels`` ε channels (None = all C),
    ε = ε_u + s(ε_c − ε_u); the other ε channels and the variance channels come from the
    conditional half unchanged. The guided result is returned for both halves: (2B, 2C, H, W).
    """
    if model_out.shape[0] % 2 or model_out.shape[1] % 2:
        raise DcditError(f"CFG needs a (2B, 2C, ...) output for a [cond; uncond] batch; got {tuple(model_out.shape)}")
    C = model_out.shape[1] // 2
    g = C if guided_channels is None else guided_channels
    if not 0 <= g <= C:
        raise DcditError(f"guided_channels={guided_channels} but the model has {C} eps channels; use 1..{C} or None")
    cond, uncond = model_out.chunk(2, dim=0)                                          # (B, 2C, H, W) each
    guided = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    half = torch.cat([guided, cond[:, g:]], dim=1)
    return torch.cat([half, half], dim=0)
