"""Shared fixtures: tiny random models (unit tests) and the shipped SmolLM2 (integration tests)."""
import os

import pytest
import torch

from editcollapse.models.loading import load_model
from tests.device import DEVICE

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))  # 1 on a shared machine


@pytest.fixture(scope="session")
def tiny_models():
    """Loader with memo: tiny_models('tiny-llama') -> LoadedModel on tests.device.DEVICE (the CPU unless
    EDITCOLLAPSE_TEST_DEVICE says otherwise; fresh weights per name)."""
    cache = {}

    def get(name="tiny-llama"):
        if name not in cache:
            cache[name] = load_model(name, device=DEVICE)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def smollm2():
    """The default model (first load converts the GGUF, later loads read the safetensors cache)."""
    return load_model("smollm2-135m", device=DEVICE)
