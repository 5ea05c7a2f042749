"""The retention methods that are settings of the trainer (recipes.METHODS beyond the
paper's), each trained on the tiny world: its loss falls, and it does what it says."""
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from infusing_jax import checkpoints
from infusing_jax import errors
from infusing_jax.training import config as config_lib
from infusing_jax.training import domains as domains_lib
from infusing_jax.training import loop
from infusing_jax.training import recipes
from infusing_jax.training import run_checkpoints
from tests.helpers import train_world

STEPS = 24


def _run(world, tmp_path, method):
    """-> (the target's logged losses, the kept tower, the pretrained tower)."""
    c = train_world.world_config(world, "naive")
    c.eval.tokenizer = os.path.join(world, "spm.model")  # lipsum's random texts
    c.train.update(num_steps=STEPS, log_every=4, checkpoint_every=STEPS, eval_every=0,
                   select_by="last")
    recipes.set_method(c, method, "target", linear_probe_steps=STEPS // 2,
                       lora_lr_mult=c.optim.backbone_lr_mult)
    workdir = str(tmp_path / method)
    loop.train_and_evaluate(c, workdir)
    losses = [m["target/normface"] for m in train_world.read_metrics(workdir)
              if "target/normface" in m]
    pretrained = checkpoints.load(os.path.join(world, "pretrained.npz"))[0]["img"]
    _, backbone = run_checkpoints.kept_backbone(c, workdir, pretrained)
    return losses, backbone, pretrained


def _distance(a, b) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(x, np.float64) - y) ** 2)
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))


@pytest.fixture(scope="module")
def naive(world, tmp_path_factory):
    losses, backbone, pretrained = _run(world, tmp_path_factory.mktemp("naive"), "naive")
    return losses, _distance(backbone, pretrained)


@pytest.mark.parametrize("method", ["l2sp", "spd", "ftp", "lp_ft", "lipsum"])
def test_each_method_trains_and_holds_the_backbone_nearer_than_naive(world, tmp_path, naive,
                                                                     method):
    losses, backbone, pretrained = _run(world, tmp_path, method)
    assert losses[-1] < 0.8 * losses[0], losses
    moved, (_, naive_moved) = _distance(backbone, pretrained), naive
    assert 0 < moved < naive_moved, (moved, naive_moved)


def test_lora_trains_a_low_rank_update_of_the_dense_layers_only(world, tmp_path):
    losses, backbone, pretrained = _run(world, tmp_path, "lora")
    assert losses[-1] < 0.8 * losses[0], losses
    flat, flat0 = (traverse_util.flatten_dict(t, sep="/") for t in (backbone, pretrained))
    adapted = 0
    for path, w in flat.items():
        update = np.asarray(w, np.float64) - flat0[path]
        if path.endswith("kernel") and ("MlpBlock" in path or "MultiHead" in path):
            n_in = 2 if path.endswith("out/kernel") else 1
            matrix = update.reshape(int(np.prod(update.shape[:n_in])), -1)
            assert np.linalg.matrix_rank(matrix, tol=1e-6) <= recipes.LORA_RANK, path
            adapted += bool(np.abs(update).max() > 0)
        else:  # biases, norms, embeddings: frozen
            np.testing.assert_array_equal(update, 0, err_msg=path)
    assert adapted > 0


def test_a_validation_only_domain_is_scored_and_never_trained(world, tmp_path):
    """The naive objective selected by the paper's 'all': the generic hold-out validated
    (train=False), so methods that train on the target alone are chosen as the full one is."""
    c = train_world.world_config(world, "full")
    c.domains.generic.losses = {}
    c.domains.generic.train = False
    c.domains.target.losses = {"normface": c.domains.target.losses.normface}
    c.train.update(num_steps=8, log_every=4, checkpoint_every=8, eval_every=4, select_by="all")
    summary = loop.train_and_evaluate(c, str(tmp_path))
    assert summary["domains"] == ["target"]
    # an epoch is the trained domains' examples only
    target_train = domains_lib.load(c, "target").train.num_examples
    assert summary["steps_per_epoch"] == target_train // c.data.batch_size
    metrics = train_world.read_metrics(str(tmp_path))
    val = [m for m in metrics if "val/score" in m]
    assert [m["step"] for m in val] == [4, 8]
    for m in val:
        assert m["val/score"] == pytest.approx((m["val/in-domain"] + m["val/out-of-domain"]) / 2)
        assert 0 <= m["val/generic/map@4"] <= 1
    assert not any(k.startswith("generic/") for m in metrics for k in m)
    c.domains.generic.losses = {"feature_mse": config_lib.loss("feature_mse")}
    with pytest.raises(errors.UserError, match="config.domains.generic.losses: the domain is "
                                               "only validated on"):
        config_lib.validate(c)
    c.domains.generic.losses = {}
    c.domains.generic.holdout_fraction = 0.0
    with pytest.raises(errors.UserError, match="config.domains.generic.train: False: the "
                                               "domain is only validated on, and it has no val"):
        config_lib.validate(c)
