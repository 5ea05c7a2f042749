"""A config file for `python -m infusing_jax.main` on the tests' tiny world.

    --config=tests/world_config.py:ROOT[,METHOD[,TEACHER]]   (see train_world.world_config)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_world  # noqa: E402


def get_config(arg: str):
    return train_world.world_config(*arg.split(","))
