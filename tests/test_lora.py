"""LoRA (models/lora.py): the merge by hand, the merged forward pass against the unmerged
one on the tiny towers, the adapters' layout, the config's checks, and a LoRA run with
FSDP on 8 host devices giving the losses of 1 device, exported as plain weights."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from infusing_jax import checkpoints
from infusing_jax import errors
from infusing_jax import models
from infusing_jax.models import lora
from infusing_jax.training import backbone as backbone_lib
from infusing_jax.training import config as config_lib
from tests.helpers import REPO
from tests.helpers import tiny
from tests.helpers import train_world


def _cfg(rank=4, alpha=2.0, layers=("attention", "mlp")):
    c = lora.default_config()
    c.update(rank=rank, alpha=alpha, layers=layers)
    return c


def _tower(family):
    cfg = tiny.tiny_config(family, text=False)
    return cfg, tiny.random_params(cfg)["img"]


def _random_adapters(backbone, cfg, seed=1):
    """Adapters with B non-zero too (init's B is zero), so the update is not 0."""
    adapters = lora.init(jax.random.PRNGKey(seed), backbone, cfg)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, jnp.float32),
                        adapters)


def test_merge_adds_s_a_b_to_each_kernel_in_its_layout():
    backbone = {"Dense_0": {"kernel": np.ones((3, 5), np.float32), "bias": np.zeros(5)},
                "out": {"kernel": np.zeros((2, 4, 6), np.float32)}}
    rng = np.random.default_rng(0)
    a1, b1 = rng.normal(size=(3, 2)), rng.normal(size=(2, 5))
    a2, b2 = rng.normal(size=(2, 4, 2)), rng.normal(size=(2, 6))
    adapters = {"Dense_0": {"lora_a": a1, "lora_b": b1}, "out": {"lora_a": a2, "lora_b": b2}}
    merged = lora.merge(backbone, adapters, 0.5)
    np.testing.assert_allclose(merged["Dense_0"]["kernel"], 1 + 0.5 * a1 @ b1, rtol=1e-5)
    np.testing.assert_allclose(merged["out"]["kernel"],
                               0.5 * (a2.reshape(8, 2) @ b2).reshape(2, 4, 6), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(merged["Dense_0"]["bias"], backbone["Dense_0"]["bias"])


@pytest.mark.parametrize("layers", [("attention", "mlp"), ("mlp",), ("attention",)])
def test_the_adapters_mirror_the_chosen_dense_layers(layers):
    cfg, backbone = _tower("siglip")
    adapters = lora.init(jax.random.PRNGKey(0), backbone, _cfg(layers=layers))
    flat = traverse_util.flatten_dict(adapters, sep="/")
    modules = sorted({k.rsplit("/", 1)[0] for k in flat})
    blocks = cfg.image.depth + 1  # the encoder blocks and the MAP head
    assert len(modules) == blocks * (4 * ("attention" in layers) + 2 * ("mlp" in layers))
    kernels = traverse_util.flatten_dict(backbone, sep="/")
    for module in modules:
        kernel = kernels[module + "/kernel"]
        a, b = flat[module + "/lora_a"], flat[module + "/lora_b"]
        n_in = 2 if module.endswith("/out") else 1
        assert a.shape == kernel.shape[:n_in] + (4,) and b.shape == (4,) + kernel.shape[n_in:]
        assert not np.any(b) and np.abs(a).max() <= 1 / np.sqrt(np.prod(kernel.shape[:n_in]))


def test_merged_and_unmerged_forward_passes_agree(family):
    cfg, backbone = _tower(family)
    model = models.build(cfg)
    settings = _cfg()
    embed = backbone_lib.embed_fn(model, lora.scale(settings))
    images = tiny.random_images(4)
    adapters = _random_adapters(backbone, settings)
    unmerged = embed(backbone, images, adapters)
    merged = embed(lora.merge(backbone, adapters, lora.scale(settings)), images)
    plain = embed(backbone, images)
    np.testing.assert_allclose(unmerged, merged, atol=2e-5)
    assert np.abs(np.asarray(unmerged) - np.asarray(plain)).max() > 1e-2  # the update acts
    # B = 0 at init: the adapted tower is the pretrained one
    zero = lora.init(jax.random.PRNGKey(0), backbone, settings)
    np.testing.assert_array_equal(embed(backbone, images, zero), plain)


@pytest.mark.parametrize("edit, words", [
    (dict(rank=-1), "config.model.lora.rank: must be an int >= 0"),
    (dict(layers=("conv",)), "config.model.lora.layers"),
    (dict(alpha=0.0), "config.model.lora.alpha"),
])
def test_bad_lora_settings_name_the_field(edit, words):
    c = train_world.world_config("/w", "naive")
    c.model.lora.update(dict(dict(rank=4), **edit))
    with pytest.raises(errors.UserError, match=words.replace("(", r"\(")):
        config_lib.validate(c)


def test_lora_needs_the_unrolled_layout():
    c = train_world.world_config("/w", "naive")
    c.model.lora.rank = 4
    c.model.scan = True
    with pytest.raises(errors.UserError, match="config.model.lora.rank: LoRA needs the "
                                               "unrolled layout; set model.scan=False"):
        config_lib.validate(c)


def _main(workdir, root, *overrides, devices=1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "infusing_jax.main", f"--config={train_world.CONFIG_FILE}:{root}",
           f"--workdir={workdir}", "--config.train.progress=False", *overrides]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_a_lora_run_with_fsdp_on_8_devices_matches_1_device_and_exports_plain_weights(
        world, tmp_path):
    common = ("--config.train.num_steps=6", "--config.train.log_every=1",
              "--config.train.eval_every=0", "--config.model.lora.rank=4",
              "--config.optim.backbone_lr_mult=1.0")
    _main(str(tmp_path / "one"), world, *common)
    _main(str(tmp_path / "eight"), world, *common, "--config.train.fsdp=True", devices=8)
    train_world.assert_same_losses(str(tmp_path / "one"), str(tmp_path / "eight"), 6)
    one = train_world.logged_losses(str(tmp_path / "one"))
    # anchoring sees the merged tower: 0 at step 1 (B = 0), > 0 once the adapters moved
    anchoring = [m["target/anchoring"] for m in one if "target/anchoring" in m]
    assert anchoring[0] == 0 and anchoring[-1] > 0
    export = str(tmp_path / "export.npz")
    run = subprocess.run(
        [sys.executable, "-m", "infusing_jax.evaluate", f"--config={train_world.CONFIG_FILE}:"
         f"{world}", f"--workdir={tmp_path / 'eight'}", f"--export={export}", "--notest",
         "--config.model.lora.rank=4"], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert run.returncode == 0, run.stderr[-3000:]
    exported = checkpoints.to_flat(checkpoints.load(export)[0])
    original = checkpoints.to_flat(checkpoints.load(os.path.join(world, "pretrained.npz"))[0])
    assert set(exported) == set(original)  # plain weights: no adapter in the file
    changed = [k for k in original if not np.array_equal(exported[k], original[k])]
    assert changed and all(k.endswith("kernel") for k in changed), changed


def test_remat_gives_the_adapters_the_same_gradients(family):
    cfg, backbone = _tower(family)
    settings = _cfg()
    adapters = _random_adapters(backbone, settings)
    images = tiny.random_images(2)

    def grads(remat_policy):
        cfg.remat_policy = remat_policy
        embed = backbone_lib.embed_fn(models.build(cfg), lora.scale(settings))
        return jax.grad(lambda a: jnp.sum(embed(backbone, images, a) ** 2))(adapters)
    plain, remat = grads("none"), grads("nothing_saveable")
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain)) > 0


def test_merging_with_another_rank_is_refused():
    _, backbone = _tower("siglip")
    adapters = lora.init(jax.random.PRNGKey(0), backbone, _cfg(rank=4))
    params = {"backbone": backbone, "lora": adapters, "heads": {}}
    with pytest.raises(errors.UserError, match=r"model.lora.rank: 8, but the run's adapters "
                                               r"have rank \[4\]"):
        lora.merged_params(params, _cfg(rank=8))
    assert set(lora.merged_params(params, _cfg(rank=4))) == {"backbone", "heads"}


def test_with_an_ema_the_frozen_tower_stays_exactly_pretrained(world, tmp_path):
    c = train_world.world_config(world, "naive")
    c.model.lora.rank = 4
    c.optim.update(ema_decay=0.9, backbone_lr_mult=1.0)
    c.train.update(num_steps=4, log_every=2, checkpoint_every=4, eval_every=0,
                   select_by="last")
    from infusing_jax.training import loop
    from infusing_jax.training import run_checkpoints
    loop.train_and_evaluate(c, str(tmp_path))
    state = run_checkpoints.restore_item(run_checkpoints.manager(str(tmp_path), 1, False), 4,
                                         "state")
    pretrained = checkpoints.load(os.path.join(world, "pretrained.npz"))[0]["img"]
    for a, b in zip(jax.tree.leaves(state["ema"]["backbone"]), jax.tree.leaves(pretrained)):
        np.testing.assert_array_equal(a, b)
    moved = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()),
                         state["ema"]["lora"], state["params"]["lora"])
    assert max(jax.tree.leaves(moved)) > 0  # the adapters are averaged, not copied
