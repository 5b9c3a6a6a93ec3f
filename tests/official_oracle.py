"""Test oracle: the authors' DC-DiT (AMD-AGI/DynamicChunkingDiT models.py + hnet/), re-derived
from the facts of their code at a tiny size, with plain-torch attention (theirs needs
flash-attn/CUDA). Module attributes are named so that ``state_dict()`` has exactly their keys.
Deliberately written without any dcdit code: per-sample loops, their order of operations.

Also writes checkpoints in their format: ``torch.save({"model", "ema", "opt", "config"})``
with the config dataclasses defined in a module named ``config`` (made on the fly).
"""

from __future__ import annotations

import math
import sys
import textwrap

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-5  # their GroupNorm default and RMSNorm(eps=1e-5)


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS) * self.weight


class ConvBlock(nn.Module):
    """HNetConvBlock: GN → SiLU → conv → + cond_proj(c) → GN → SiLU → conv → + skip."""

    def __init__(self, cin, cout, cond):
        super().__init__()
        inner = min(cin, cout)
        self.norm1, self.norm2 = nn.GroupNorm(32, cin), nn.GroupNorm(32, inner)
        self.conv1, self.conv2 = nn.Conv2d(cin, inner, 3, padding=1), nn.Conv2d(inner, cout, 3, padding=1)
        self.skip_proj = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(cond, inner))

    def forward(self, x, c, side):  # x (B, L, cin) → (B, L, cout)
        B, L, D = x.shape
        h = x.view(B, side, side, D).permute(0, 3, 1, 2)
        skip = h
        h = self.conv1(F.silu(self.norm1(h))) + self.cond_proj(c)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        h = h + (self.skip_proj(skip) if self.skip_proj is not None else skip)
        return h.permute(0, 2, 3, 1).reshape(B, L, -1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # one sample (N, D): their varlen attention never crosses samples
        N, D = x.shape
        q, k, v = self.qkv(x).reshape(N, 3, self.heads, D // self.heads).permute(1, 2, 0, 3)
        w = (q @ k.transpose(-1, -2) / math.sqrt(D // self.heads)).softmax(-1)
        return self.proj((w @ v).transpose(0, 1).reshape(N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):  # x (N, D), c (D,)
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6)
        x = x + g1 * self.attn(F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + sc1) + s1)
        return x + g2 * self.mlp(F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + sc2) + s2)


class Isotropic(nn.Module):
    def __init__(self, layers, out_dim):
        super().__init__()
        self.layers, self.rmsnorm = nn.ModuleList(layers), RMSNorm(out_dim)


class Routing(nn.Module):
    def __init__(self, d):
        super().__init__()
        b = d // 4
        self.proj, self.context_predictor = nn.Conv2d(d, b, 1), nn.Conv2d(b, b, 3, padding=1)
        self.residual_scorer = nn.Sequential(nn.Conv2d(b, b, 3, padding=1), nn.GroupNorm(8, b), nn.SiLU(), nn.Conv2d(b, 1, 1))


class Inner(nn.Module):
    def __init__(self, iso):
        super().__init__()
        self.main_network = iso


class HNet(nn.Module):
    def __init__(self, D, e, heads, depth, mlp_ratio, n_enc, n_dec):
        super().__init__()
        self.encoder = Isotropic([ConvBlock(e, D if i == n_enc - 1 else e, D) for i in range(n_enc)], D)
        self.main_network = Inner(Isotropic([DiTBlock(D, heads, mlp_ratio) for _ in range(depth)], D))
        self.decoder = Isotropic([ConvBlock(D if i == 0 else e, e, D) for i in range(n_dec)], e)
        self.routing_module = Routing(D)
        self.residual_proj = nn.Linear(D, D)


class FinalLayer(nn.Module):
    def __init__(self, e, out, cond):
        super().__init__()
        self.linear = nn.Linear(e, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond, 2 * e))


def mae_sincos(dim, side):
    """MAE's get_2d_sincos_pos_embed: meshgrid(w, h) so the first half encodes the column."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1).double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([one(dim // 2, cols), one(dim // 2, rows)], dim=1).float()[None]


class AuthorsDCDiT(nn.Module):
    def __init__(self, D=64, factor=2, heads=4, depth=2, mlp_ratio=4.0, n_enc=2, n_dec=2, side=8, classes=10, C=4):
        super().__init__()
        e = D // factor
        self.side, self.C = side, C
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(C, e, 3, padding=1)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(classes + 1, D)
        self.pos_embed = nn.Parameter(mae_sincos(D, side), requires_grad=False)
        self.hnet = HNet(D, e, heads, depth, mlp_ratio, n_enc, n_dec)
        self.final_layer = FinalLayer(e, 2 * C, D)

    def randomize(self, seed=0, scale=0.15):
        """Trained-like weights: every tensor random (norm weights around 1), no zero gates."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name == "pos_embed":
                continue
            noise = torch.randn(p.shape, generator=g) * scale
            p.data.copy_(1 + noise if name.endswith(("rmsnorm.weight", "norm1.weight", "norm2.weight", "scorer.1.weight")) else noise)
        scorer = self.hnet.routing_module.residual_scorer[-1]
        scorer.weight.data.mul_(20)  # spread the logits so that p straddles 0.5
        scorer.bias.data.fill_(-0.3)
        return self

    @torch.no_grad()
    def forward(self, x, t, y, fraction):
        """x (B, C, H, W), t (B,), y (B,), fraction (B,) tail-dropping → (B, 2C, H, W), kept (B, L)."""
        hn, side = self.hnet, self.side
        B, L = x.shape[0], side * side
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2)
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([args.cos(), args.sin()], -1)) + self.y_embedder.embedding_table(y)
        for block in hn.encoder.layers:
            h = block(h, c, side)
        h = hn.encoder.rmsnorm(h)
        residual = hn.residual_proj(h)

        r = hn.routing_module
        a = r.proj(h.transpose(1, 2).reshape(B, -1, side, side))
        p = torch.sigmoid(r.residual_scorer(a - r.context_predictor(a)).view(B, L)).clone()
        p[:, 0] = 1.0
        p[:, -1] = 1.0
        probs = torch.stack([1 - p, p], -1)
        selected = probs.max(-1).values  # the prob of the argmax choice
        mask = probs.argmax(-1) == 1
        ranks = p.masked_fill(~mask, float("inf")).argsort(-1).argsort(-1)
        n_drop = (mask.sum(-1, keepdim=True).float() * fraction[:, None]).long()
        kept = mask & ~((ranks < n_drop) & mask)

        out = torch.empty(B, L, h.shape[-1])
        rc = torch.stack([torch.arange(L) // side, torch.arange(L) % side], -1).float()
        for b in range(B):
            idx = kept[b].nonzero().squeeze(1)  # boundaries in raster order
            z = h[b, idx] + self.pos_embed[0, idx]
            for block in hn.main_network.main_network.layers:
                z = block(z, c[b])
            z = hn.main_network.main_network.rmsnorm(z)
            pk = p[b].clamp(1e-4, 1 - 1e-4)[idx]
            d2 = ((rc[idx][:, None] - rc[idx][None]) ** 2).sum(-1)
            w = torch.exp(-d2 / 2.0) * pk[None]
            w = w / (w.sum(-1, keepdim=True) + 1e-8)
            z = pk[:, None] * z + (1 - pk[:, None]) * (w @ z)
            nearest = ((rc[:, None] - rc[idx][None]) ** 2).sum(-1).argmin(-1)  # first minimum: smallest raster index
            out[b] = z[nearest]
        h = out * 1.0 + residual  # STE(selected) is 1 in the forward pass
        for block in hn.decoder.layers:
            h = block(h, c, side)
        h = hn.decoder.rmsnorm(h)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        h = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        h = self.final_layer.linear(h)
        return h.transpose(1, 2).reshape(B, 2 * self.C, side, side), kept, selected


CONFIG_SOURCE = '''
from dataclasses import dataclass, field
from typing import List, Optional, Union


@dataclass
class HNetConfig:
    arch_layout: list = field(default_factory=lambda: ["c2", ["D12"], "c2"])
    d_model: list = field(default_factory=lambda: [768, 768])
    num_heads: list = field(default_factory=lambda: [12, 12])
    tie_embeddings: bool = False
    enc_dec_dim_factor: Optional[list] = None
    dechunk_kernel_sigma: float = 1.0
    fp32_router_dechunk: bool = True


@dataclass
class ModelConfig:
    name: str = "DC-DiT"
    hnet: HNetConfig = field(default_factory=HNetConfig)
    mlp_ratio: float = 4.0


@dataclass
class TrainingConfig:
    epochs: int = 80
    global_batch_size: int = 256
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    ratio_loss_weight: float = 0.03
    ratio_batch_size: Optional[int] = 16
    downsample_factor: Union[float, list] = 4.0
    downsample_factor_start: Optional[float] = None
    downsample_factor_warmup_steps: int = 0
    multi_budget_training: bool = False
    multi_budget_drop_fractions: list = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3])
    multi_budget_start_step: Optional[int] = None
    profile: bool = False
    profile_steps: list = field(default_factory=lambda: [10, 20])
    resume_from_ckpt: Optional[str] = None


@dataclass
class DataConfig:
    feature_path: str = "features"
    image_size: int = 256
    num_classes: int = 1000
    num_workers: int = 32


@dataclass
class DiffusionConfig:
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000


@dataclass
class LoggingConfig:
    results_dir: str = "results"
    log_every: int = 100
    ckpt_every: int = 10000
    wandb_project: str = "Dynamic-Chunking-DiT"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ckpt: Optional[str] = None
'''


def save_authors_checkpoint(path, tmp_dir, model: AuthorsDCDiT, ema, side=8, classes=10, depth=2, edit=None):
    """Their train.py's file: {model, ema, opt, config}, the config pickled from a module `config`.
    ``ema``: a model, or a state dict (to write damaged files); ``edit(cfg)``: changes the config."""
    pkg = tmp_dir / "authors_config"
    pkg.mkdir(exist_ok=True)
    (pkg / "config.py").write_text(textwrap.dedent(CONFIG_SOURCE))
    sys.path.insert(0, str(pkg))
    try:
        import config  # noqa: the authors' module name

        cfg = config.Config()
        cfg.model.hnet = config.HNetConfig(arch_layout=["c2", [f"D{depth}"], "c2"], d_model=[64, 64], num_heads=[4, 4],
                                           enc_dec_dim_factor=[2, None])
        cfg.training = config.TrainingConfig(multi_budget_training=True, multi_budget_drop_fractions=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                                             multi_budget_start_step=50000, downsample_factor=4.0, ratio_loss_weight=0.03)
        cfg.data = config.DataConfig(image_size=side * 8, num_classes=classes)
        if edit is not None:
            edit(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        torch.save({"model": model.state_dict(), "ema": ema.state_dict() if isinstance(ema, nn.Module) else ema, "opt": opt.state_dict(), "config": cfg}, path)
    finally:
        sys.path.remove(str(pkg))
        sys.modules.pop("config", None)
    return path
