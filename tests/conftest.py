"""Session set-up and the fixtures tests share; helpers live in tests/helpers/."""
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The tests' runs (most in subprocesses, which inherit this) compile the same programs on
# the same tiny shapes again and again: JAX's persistent compilation cache, shared by the
# session's processes, loads them instead (the sweep's tests take a third of their time).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"infusing_jax_tests_xla_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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


# The slowest files first: pytest-xdist (tests/run.sh, --no-loadscope-reorder) hands out
# files in this order, so the two workers end together instead of one running the
# quickstart alone at the end.
SLOWEST_FILES = ("test_quickstart.py", "test_notebooks.py", "test_user_errors.py",
                 "test_sweep.py", "test_train.py", "test_bench.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)
    items.sort(key=rank)
