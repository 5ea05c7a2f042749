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


# The slowest files first: pytest-xdist (tests/run.sh) hands out files in this order, so
# the two workers end together instead of one running the quickstart alone at the end.
SLOWEST_FILES = ("test_quickstart.py", "test_notebooks.py", "test_user_errors.py",
                 "test_sweep.py", "test_train.py", "test_bench.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)
    items.sort(key=rank)
