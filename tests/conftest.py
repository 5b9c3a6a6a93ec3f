import io
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# pytest-xdist (``-n auto`` in pyproject.toml) runs one worker per core: each worker, and every
# process it starts, computes on one thread, so the workers never contend for a core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def tiny_recipe():
    from dcdit_cli.config.recipe import load_recipe

    return load_recipe("tiny")


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A tiny diffusers AutoencoderKL (×2 downsampling, 4 latent channels), saved offline."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def random_inception_state_dict() -> dict:
    """torch-fidelity's Inception with Kaiming-initialised convs (PyTorch's default init makes
    the features vanish and every FID exactly 0, docs/reference.md#random-inception-weights)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with pytest.MonkeyPatch.context() as mp:  # build the module without any weights file
        mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = FeatureExtractorInceptionV3("random", ["2048"], feature_extractor_weights_path=empty)
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
    return net.state_dict()


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A random-but-informative Inception weights file, as the real one would be passed."""
    path = tmp_path_factory.mktemp("inception") / "weights-random.pth"
    torch.save(random_inception_state_dict(), path)
    return path


def random_dinov2_state_dict(embed_dim: int = 128, depth: int = 2) -> dict:
    """A tiny DINOv2-shaped ViT (patch 14, 64-d heads, 37×37 position embeddings of the 518-pixel
    pretraining, the hub's ``mask_token``) with random weights. Layer-scale gammas are drawn
    around 1, not timm's 1e-5, so the blocks change the CLS token and the tests can see them."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_large_patch14_dinov2", pretrained=False, embed_dim=embed_dim, depth=depth,
                            num_heads=embed_dim // 64, num_classes=0)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for k, v in state.items():
        if k.endswith(("gamma", "pos_embed", "cls_token")) or k.startswith("norm") or ".norm" in k:
            state[k] = (1.0 if k.endswith(("gamma", "weight")) else 0.0) + 0.5 * torch.randn(v.shape, generator=gen)
    state["mask_token"] = torch.zeros(1, embed_dim)
    return state


@pytest.fixture(scope="session")
def dinov2_weights(tmp_path_factory):
    """The tiny DINOv2 as a .safetensors file, as real weights would be passed (--dinov2-weights)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("dinov2") / "dinov2-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in random_dinov2_state_dict().items()}, path)
    return path
