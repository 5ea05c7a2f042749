"""infusing_jax.training.optim: per-group LRs, freezing, schedules, clipping, layer decay, EMA."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infusing_jax import models
from infusing_jax.training import optim


@pytest.fixture(scope="module")
def backbone():
    return models.init_params(models.model_config("siglip", "mu/8", 32, None),
                              jax.random.PRNGKey(0))["img"]


def tree(backbone, value=None):
    heads = {"target": jnp.full((32, 5), 0.5), "generic": jnp.full((32, 3), -0.25)}
    p = {"backbone": backbone, "heads": heads}
    if value is not None:
        p = jax.tree.map(lambda x: jnp.full_like(x, value), p)
    return p


def ones_like(p):
    return jax.tree.map(jnp.ones_like, p)


def cfg_with(**kw):
    cfg = optim.default_config()
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def run(tx, params, grads, n):
    state = tx.init(params)
    out = []
    for _ in range(n):
        upd, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, upd)
        out.append(params)
    return out


def test_default_config_is_method_md():
    cfg = optim.default_config()
    optim.validate(cfg)
    assert (cfg.lr, cfg.backbone_lr_mult, cfg.b1, cfg.b2, cfg.weight_decay) == (
        1e-3, 1e-2, 0.9, 0.999, 1e-6)
    assert cfg.schedule == "constant" and cfg.warmup_steps == 0
    assert cfg.grad_clip_norm == 0 and cfg.freeze_backbone_epochs == 0
    assert cfg.layer_decay is None and cfg.ema_decay is None


def test_head_moves_100x_backbone(backbone):
    tx = optim.make_optimizer(optim.default_config(), steps_per_epoch=10)
    # Equal params and gradients everywhere: AdamW's first step is
    # -lr * (g / (|g| + eps) + wd * p), so the ratio is exactly the LR ratio 1e-2.
    params = tree(backbone, value=1.0)
    upd, _ = tx.update(ones_like(params), tx.init(params), params)
    expected = 1.0 / (1.0 + 1e-8) + 1e-6  # float32 Adam arithmetic: ~7e-6 off
    head = np.asarray(upd["heads"]["target"])[0, 0]
    np.testing.assert_allclose(head, -1e-3 * expected, rtol=2e-5)
    for leaf in jax.tree.leaves(upd["heads"]):
        np.testing.assert_array_equal(leaf, head)
    for leaf in jax.tree.leaves(upd["backbone"]):
        np.testing.assert_allclose(np.asarray(leaf) / head, 1e-2, rtol=1e-6)
    # Real init: same ratio up to the 1e-6 weight-decay term.
    params = tree(backbone)
    upd, _ = tx.update(ones_like(params), tx.init(params), params)
    h = np.abs(np.asarray(upd["heads"]["target"])).mean()
    b = np.mean([np.abs(np.asarray(x)).mean() for x in jax.tree.leaves(upd["backbone"])])
    np.testing.assert_allclose(b / h, 1e-2, rtol=1e-4)


def test_frozen_backbone_then_moving(backbone):
    steps_per_epoch = 3
    tx = optim.make_optimizer(cfg_with(freeze_backbone_epochs=1, weight_decay=0.1),
                              steps_per_epoch)
    params = tree(backbone)
    hist = run(tx, params, ones_like(params), steps_per_epoch + 1)
    for p in hist[:steps_per_epoch]:  # weight decay too: backbone bit-identical
        for a, b in zip(jax.tree.leaves(p["backbone"]), jax.tree.leaves(params["backbone"])):
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(p["heads"]["target"], params["heads"]["target"])
    moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(hist[-1]["backbone"]), jax.tree.leaves(params["backbone"]))]
    assert all(moved)


def test_always_frozen(backbone):
    tx = optim.make_optimizer(cfg_with(freeze_backbone_epochs=-1, weight_decay=0.1,
                                       layer_decay=0.5), steps_per_epoch=1)
    params = tree(backbone)
    hist = run(tx, params, ones_like(params), 3)
    for a, b in zip(jax.tree.leaves(hist[-1]["backbone"]), jax.tree.leaves(params["backbone"])):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(hist[-1]["heads"]["target"], params["heads"]["target"])
    assert set(optim.learning_rates(cfg_with(freeze_backbone_epochs=-1), 1)) == {"heads"}


def test_schedules_equal_optax():
    cfg = cfg_with(schedule="warmup_cosine", warmup_steps=10, total_steps=100,
                   freeze_backbone_epochs=2)
    s = optim.learning_rates(cfg, steps_per_epoch=7)
    ref_h = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100, 0.0)
    ref_b = optax.warmup_cosine_decay_schedule(0.0, 1e-5, 10, 100, 0.0)
    for step in [0, 1, 5, 10, 13, 14, 15, 50, 99, 100, 150]:
        np.testing.assert_allclose(s["heads"](step), ref_h(step), rtol=1e-6)
        want = 0.0 if step < 14 else ref_b(step)
        np.testing.assert_allclose(s["backbone"](step), want, rtol=1e-6)
    c = optim.learning_rates(optim.default_config(), 1)
    for step in [0, 1, 1000]:
        np.testing.assert_allclose(c["heads"](step), optax.constant_schedule(1e-3)(step))
        np.testing.assert_allclose(c["backbone"](step), optax.constant_schedule(1e-5)(step))


def test_warmup_cosine_takes_its_length_from_the_run():
    cfg = cfg_with(schedule="warmup_cosine", warmup_steps=10)  # total_steps 0: the run's
    optim.validate(cfg)
    s = optim.learning_rates(cfg, steps_per_epoch=7, num_steps=250)
    ref = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 250, 0.0)
    for step in [0, 5, 10, 100, 249, 250]:
        np.testing.assert_allclose(s["heads"](step), ref(step), rtol=1e-6)
    assert float(s["heads"](250)) == 0.0 and float(s["heads"](125)) > 0
    given = optim.learning_rates(cfg_with(schedule="warmup_cosine", warmup_steps=10,
                                          total_steps=100), 7, num_steps=250)
    np.testing.assert_allclose(given["heads"](100), 0.0, atol=1e-12)  # total_steps wins
    with pytest.raises(ValueError, match=r"^optim\.warmup_steps: 10 warm-up steps leave "):
        optim.make_optimizer(cfg, 7, num_steps=10)


def test_schedule_reaches_the_update(backbone):
    # SGD-like check: with wd 0 the first Adam step is -lr(0) * ~sign(g); lr(0) = 0.
    cfg = cfg_with(schedule="warmup_cosine", warmup_steps=4, total_steps=10, weight_decay=0.0)
    tx = optim.make_optimizer(cfg, 1, num_steps=10)
    params = tree(backbone, value=1.0)
    hist = run(tx, params, ones_like(params), 2)
    np.testing.assert_array_equal(hist[0]["heads"]["target"], params["heads"]["target"])
    step1 = float(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 4, 10)(1))
    np.testing.assert_allclose(hist[1]["heads"]["target"], 1.0 - step1, rtol=1e-6)


def test_clipping_bounds_global_norm(backbone):
    params = tree(backbone)
    grads = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), params)
    clip = optax.clip_by_global_norm(1.0)
    clipped, _ = clip.update(grads, clip.init(params))
    assert float(optax.global_norm(grads)) > 1.0
    np.testing.assert_allclose(float(optax.global_norm(clipped)), 1.0, rtol=1e-5)
    # make_optimizer(clip=1) on g == make_optimizer(no clip) on clip(g), over 2 steps
    # (eps makes Adam see the scale).
    cfg = cfg_with(grad_clip_norm=1.0)
    tx, ref = optim.make_optimizer(cfg, 1), optim.make_optimizer(optim.default_config(), 1)
    s, r = tx.init(params), ref.init(params)
    for g in [grads, jax.tree.map(lambda x: -0.5 * x, grads)]:
        cg, _ = clip.update(g, clip.init(params))
        u, s = tx.update(g, s, params)
        v, r = ref.update(cg, r, params)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


def test_layer_decay_ratios():
    depth = 3
    w = jnp.ones((4,))
    bb = {"embedding": {"kernel": w}, "pos_embedding": w, "cls": w, "pre_norm": {"scale": w},
          "Transformer": {**{f"encoderblock_{i}": {"Dense_0": {"kernel": w}}
                             for i in range(depth)},
                          "encoder_norm": {"scale": w}},
          "MAPHead_0": {"probe": w}, "head": {"kernel": w}}
    params = {"backbone": bb, "heads": {"t": jnp.ones((4, 2))}}
    d = 0.5
    cfg = cfg_with(layer_decay=d, weight_decay=0.0)
    labels = optim.param_labels(params, layer_decay=True, depth=depth)
    assert labels["backbone"]["embedding"]["kernel"] == "backbone_0"
    assert labels["backbone"]["Transformer"]["encoderblock_2"]["Dense_0"]["kernel"] == "backbone_3"
    assert labels["backbone"]["MAPHead_0"]["probe"] == "backbone_4"
    tx = optim.make_optimizer(cfg, 1, depth=depth)
    upd, _ = tx.update(ones_like(params), tx.init(params), params)
    lr_b = 1e-5 / (1 + 1e-8)
    b = upd["backbone"]
    want = {
        "embedding": (b["embedding"]["kernel"], d ** (depth + 1)),
        "pos_embedding": (b["pos_embedding"], d ** (depth + 1)),
        "cls": (b["cls"], d ** (depth + 1)),
        "pre_norm": (b["pre_norm"]["scale"], d ** (depth + 1)),
        "encoder_norm": (b["Transformer"]["encoder_norm"]["scale"], 1.0),
        "MAPHead": (b["MAPHead_0"]["probe"], 1.0),
        "head": (b["head"]["kernel"], 1.0),
    }
    for i in range(depth):
        want[f"block{i}"] = (b["Transformer"][f"encoderblock_{i}"]["Dense_0"]["kernel"],
                             d ** (depth - i))
    top = np.asarray(b["Transformer"]["encoder_norm"]["scale"])
    np.testing.assert_allclose(top, -lr_b, rtol=2e-5)  # float32 Adam arithmetic
    for name, (u, mult) in want.items():
        np.testing.assert_allclose(np.asarray(u) / top, mult, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(upd["heads"]["t"]) / top[0], 100.0, rtol=1e-6)


def test_layer_decay_on_real_tower(backbone):
    params = tree(backbone)
    labels = optim.param_labels(params, layer_decay=True, depth=1)
    assert set(jax.tree.leaves(labels["backbone"])) == {"backbone_0", "backbone_1", "backbone_2"}
    tx = optim.make_optimizer(cfg_with(layer_decay=0.8), 1, depth=1)
    run(tx, params, ones_like(params), 1)
    with pytest.raises(ValueError, match="optim.layer_decay"):
        optim.make_optimizer(cfg_with(layer_decay=0.8), 1)  # no depth
    with pytest.raises(ValueError, match="optim.layer_decay"):
        optim.param_labels({"backbone": {"Transformer": {"encoderblock": {"k": 1}}}}, True, 2)


def test_ema_equals_numpy_recurrence():
    rng = np.random.default_rng(0)
    seq = [{"a": rng.normal(size=(3, 2)).astype(np.float32), "b": {"c": rng.normal(size=4)
                                                                   .astype(np.float32)}}
           for _ in range(5)]
    decay = 0.9
    ema = optim.ema_init(jax.tree.map(jnp.asarray, seq[0]))
    ref = jax.tree.map(np.copy, seq[0])
    upd = jax.jit(optim.ema_update, static_argnums=2)
    for p in seq[1:]:
        ema = upd(ema, jax.tree.map(jnp.asarray, p), decay)
        ref = jax.tree.map(lambda e, x: decay * e + (1 - decay) * x, ref, p)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("field,value", [
    ("lr", 0.0), ("lr", -1.0), ("backbone_lr_mult", -1.0), ("b1", 1.0), ("b2", -0.1),
    ("weight_decay", -1e-6), ("schedule", "linear"), ("warmup_steps", 5),
    ("grad_clip_norm", -1.0), ("freeze_backbone_epochs", -2),
    ("layer_decay", 0.0), ("layer_decay", 1.5), ("ema_decay", 1.0),
])
def test_validate_errors(field, value):
    cfg = optim.default_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=rf"^optim\.{field}: "):
        optim.validate(cfg)


def test_validate_other_errors():
    cfg = cfg_with(schedule="warmup_cosine", warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match=r"^optim\.total_steps: "):
        optim.validate(cfg)
    cfg = optim.default_config()
    cfg.unknown = 1
    with pytest.raises(ValueError, match=r"^optim\.unknown: "):
        optim.validate(cfg)
    with pytest.raises(ValueError, match=r"^optim\.freeze_backbone_epochs: "):
        optim.make_optimizer(cfg_with(freeze_backbone_epochs=1), steps_per_epoch=0)
    with pytest.raises(ValueError, match="extra"):
        optim.param_labels({"backbone": {}, "heads": {}, "other": {}})
