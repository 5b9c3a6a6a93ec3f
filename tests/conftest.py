import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_recipe():
    from dcdit_cli.recipe import load_recipe

    return load_recipe("tiny")
