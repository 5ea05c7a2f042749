"""Session set-up and the fixtures tests share; helpers live in tests/helpers/."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity is checked in true float32: on GPU / TPU, JAX's default matmul precision
# (TF32 / bf16 passes) is ~1e-3 away from PyTorch's float32. No effect on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

from tests.helpers import train_world  # noqa: E402


@pytest.fixture(params=["siglip", "clip"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny training world (tests/helpers/train_world.py), with 2 undecodable target
    train images; one per test module."""
    return train_world.make_world(str(tmp_path_factory.mktemp("world")), broken=2)
