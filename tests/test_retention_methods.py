"""The retention methods that are settings of the trainer (recipes.METHODS beyond the
paper's), each trained on the tiny world: its loss falls, and it does what it says."""
import os

import jax
import numpy as np
import pytest

from infusing_jax import checkpoints
from infusing_jax.training import loop
from infusing_jax.training import recipes
from infusing_jax.training import run_checkpoints
from tests.helpers import train_world

STEPS = 24


def _run(world, tmp_path, method):
    c = train_world.world_config(world, "naive")
    c.train.update(num_steps=STEPS, log_every=4, checkpoint_every=STEPS, eval_every=0,
                   select_by="last")
    recipes.set_method(c, method, linear_probe_steps=STEPS // 2)
    workdir = str(tmp_path / method)
    loop.train_and_evaluate(c, workdir)
    losses = [m["target/normface"] for m in train_world.read_metrics(workdir)
              if "target/normface" in m]
    pretrained = checkpoints.load(os.path.join(world, "pretrained.npz"))[0]["img"]
    _, backbone = run_checkpoints.kept_backbone(c, workdir, pretrained)
    moved = np.sqrt(sum(np.sum((np.asarray(a, np.float64) - b) ** 2) for a, b in
                        zip(jax.tree.leaves(backbone), jax.tree.leaves(pretrained))))
    return losses, moved


@pytest.fixture(scope="module")
def naive(world, tmp_path_factory):
    return _run(world, tmp_path_factory.mktemp("naive"), "naive")


@pytest.mark.parametrize("method", ["spd", "ftp", "lp_ft"])
def test_each_method_trains_and_holds_the_backbone_nearer_than_naive(world, tmp_path, naive,
                                                                     method):
    losses, moved = _run(world, tmp_path, method)
    assert losses[-1] < 0.8 * losses[0], losses
    naive_losses, naive_moved = naive
    assert 0 < moved < naive_moved, (moved, naive_moved)
