import io
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
