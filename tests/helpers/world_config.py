"""A config file for `python -m infusing_jax.main` on the tests' tiny world.

    --config=tests/helpers/world_config.py:ROOT[,METHOD[,TEACHER[,TESTS]]]
    (see train_world.world_config; run from the repository root, so `tests` imports)
"""
import jax

from tests.helpers import train_world

# True float32 matmuls, as in the pytest process (conftest.py); no effect on CPU.
jax.config.update("jax_default_matmul_precision", "highest")


def get_config(arg: str):
    return train_world.world_config(*arg.split(","))
