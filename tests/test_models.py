"""Model invariants: layouts, remat, dtypes, variants, position embeddings, config errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infusing_jax import checkpoints
from infusing_jax import models
from infusing_jax.checkpoints import tree
from infusing_jax.models import transformer

from tests.helpers.tiny import random_images, random_params, random_tokens, tiny_config


def _apply(cfg, params, images, tokens=None):
    model = models.build(cfg)
    return jax.jit(lambda p: model.apply({"params": p}, images, tokens))(params)


def test_scan_and_remat_give_the_same_outputs_and_gradients(family):
    cfg = tiny_config(family)
    params = random_params(cfg)
    images, tokens = random_images(2), random_tokens(3, family)
    ref = _apply(cfg, params, images, tokens)[2]["logits"]

    def grad(p, c):
        model = models.build(c)
        loss = lambda p: jnp.sum(model.apply({"params": p}, images, tokens)[2]["logits"] ** 2)
        return checkpoints.to_flat(jax.jit(jax.grad(loss))(p))

    grads = grad(params, cfg)
    for scan, remat in ((True, "none"), (False, "nothing_saveable"), (True, "dots_saveable")):
        c = tiny_config(family)
        c.scan, c.remat_policy = scan, remat
        p = tree.unflatten(tree.roll_scan(checkpoints.to_flat(params))) if scan else params
        np.testing.assert_allclose(_apply(c, p, images, tokens)[2]["logits"], ref,
                                   rtol=1e-5, atol=1e-5)
        g = grad(p, c)
        for k in grads:
            np.testing.assert_allclose(g[k], grads[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_bfloat16_compute_and_params(family):
    cfg = tiny_config(family)
    params = random_params(cfg, std=0.05)
    images, tokens = random_images(2), random_tokens(2, family)
    zimg, ztxt, _ = _apply(cfg, params, images, tokens)
    cfg.dtype = "bfloat16"
    zimg16, ztxt16, out = _apply(cfg, params, images, tokens)
    assert out["img"]["encoded"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(zimg16, np.float32), zimg, atol=0.05)
    np.testing.assert_allclose(np.asarray(ztxt16, np.float32), ztxt, atol=0.05)
    cfg.param_dtype = "bfloat16"
    p16 = models.init_params(cfg, jax.random.PRNGKey(0))
    assert {x.dtype for x in jax.tree_util.tree_leaves(p16)} == {jnp.dtype(jnp.bfloat16)}


def test_named_variants():
    assert transformer.decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072,
                                                      num_heads=12, patch_size=16)
    assert transformer.decode_variant("So400m/14")["mlp_dim"] == 4304
    shapes = jax.eval_shape(lambda: models.init_params(
        models.model_config("siglip", "L/16", 256, "L"), jax.random.PRNGKey(0)))
    flat = {k: v.shape for k, v in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    n = sum(int(np.prod(s)) for s in flat.values())
    assert 650e6 < n < 700e6  # SigLIP L/16 two-tower: ~652M (image ~316M)
    # OpenAI CLIP ViT-B/16 and ViT-L/14 at 336 px: 149.6M and 427.9M parameters.
    for variant, size, text, expected in (("B/16", 224, "B", 149.6e6), ("L/14", 336, "L", 427.9e6)):
        cfg = models.model_config("clip", variant, size, text, vocab_size=49408, seq_len=77)
        shapes = jax.eval_shape(lambda c=cfg: models.init_params(c, jax.random.PRNGKey(0)))
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
        assert abs(n - expected) < 0.1e6, (variant, n)
    with pytest.raises(ValueError, match="unknown model variant 'Q/16'"):
        transformer.decode_variant("Q/16")


def test_sincos2d_posemb_is_the_2d_fourier_features():
    pe = np.asarray(transformer.posemb_sincos_2d(3, 4, 8))[0]
    assert pe.shape == (12, 8)
    omega = 1.0 / 10_000 ** (np.arange(2) / 1)
    row, col = 1 * 4 + 2, (1, 2)  # token at grid row 1, column 2
    expected = np.concatenate([np.sin(col[1] * omega), np.cos(col[1] * omega),
                               np.sin(col[0] * omega), np.cos(col[0] * omega)])
    np.testing.assert_allclose(pe[row], expected, rtol=1e-6)


def test_pooling_choices_and_embedding_norms():
    for pool in ("map", "tok", "gap"):
        cfg = tiny_config("siglip", text=False)
        cfg.image.pool_type = pool
        params = random_params(cfg)
        zimg, _, out = _apply(cfg, params, random_images(3))
        np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1, atol=1e-5)
        if pool == "gap":
            np.testing.assert_allclose(out["img"]["pooled"],
                                       np.mean(out["img"]["encoded"], axis=1), atol=1e-6)
        if pool == "tok":
            assert out["img"]["encoded"].shape[1] == 17  # 16 patches + cls


def test_config_errors_name_the_field():
    cfg = tiny_config("siglip")
    cfg.image.num_heads = 3
    with pytest.raises(ValueError, match=r"model.image: width 32 is not divisible by num_heads 3"):
        models.build(cfg)
    cfg = tiny_config("siglip")
    cfg.image_size = 6
    with pytest.raises(ValueError, match=r"model.image_size 6 is smaller than "
                                         r"model.image.patch_size 8"):
        models.build(cfg)
    with pytest.raises(ValueError, match=r"model.family: unknown family 'blip'"):
        models.model_config("blip")


@pytest.mark.parametrize("causal", [False, True])
def test_heads_major_attention_is_flax_dot_product_attention(causal):
    """Our attention_fn: flax's math (values and gradients), causal mask included."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 7, 3, 8)), jnp.float32) for _ in range(3))
    mask = jnp.tril(jnp.ones((1, 1, 7, 7), bool)) if causal else None

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, mask=mask)))

    grads = [jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2))(q, k, v)
             for fn in (transformer.heads_major_attention, nn.dot_product_attention)]
    for ours, ref in zip(*grads):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    for fp32_softmax in (False, True):
        args = [t.astype(jnp.bfloat16) for t in (q, k, v)]
        kw = dict(mask=mask, force_fp32_for_softmax=fp32_softmax)
        ours = transformer.heads_major_attention(*args, **kw)
        ref = nn.dot_product_attention(*args, **kw)
        assert ours.dtype == ref.dtype
        np.testing.assert_allclose(ours.astype(np.float32), ref.astype(np.float32), atol=2e-2)
    with pytest.raises(ValueError, match="dropout"):
        transformer.heads_major_attention(q, k, v, dropout_rate=0.1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_our_attention_module_matches_flax_default(dtype):
    """The towers' attention (same parameters) against flax's default attention_fn;
    with sow_weights the weights are sown as flax sows them."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 16)), jnp.float32)
    ours = transformer._attention(4, dtype, jnp.float32)
    ref = nn.MultiHeadDotProductAttention(num_heads=4, dtype=dtype, deterministic=True)
    params = ours.init(jax.random.PRNGKey(0), x, x)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(ours.apply(params, x, x), np.float32),
                               np.asarray(ref.apply(params, x, x), np.float32), atol=tol)
    _, sown = ours.apply(params, x, x, sow_weights=True, mutable=["intermediates"])
    _, sown_ref = ref.apply(params, x, x, sow_weights=True, mutable=["intermediates"])
    np.testing.assert_allclose(
        np.asarray(sown["intermediates"]["attention_weights"][0], np.float32),
        np.asarray(sown_ref["intermediates"]["attention_weights"][0], np.float32), atol=tol)
