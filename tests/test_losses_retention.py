"""Retention losses against numpy loops written out independently, finite differences and stop-gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infusing_jax import models
from infusing_jax.checkpoints import tree
from infusing_jax.losses import retention as R


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def tower_params(depth: int = 1):
    """A tiny SigLIP image tower's params (nested dict)."""
    cfg = models.model_config("siglip", "mu/8", 32, None)
    cfg.image.depth = depth
    return models.init_params(cfg, jax.random.PRNGKey(0))["img"]


def perturb(params, seed: int = 1, std: float = 0.01):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: x + rng.normal(0, std, x.shape).astype(np.float32), params)


def np_anchoring(params, anchor, reduction, skip=()):
    flat, flat0 = tree.flatten(params), tree.flatten(anchor)
    total = 0.0
    for k in flat:
        if any(k.startswith(s + "/") for s in skip):
            continue
        d = flat[k].astype(np.float64) - flat0[k].astype(np.float64)
        s = float(np.sum(d * d))
        total += s / d.size if reduction == "mean_per_tensor" else s
    return total


def np_normalize(v):
    n = 0.0
    for x in v:
        n += x * x
    return v / max(np.sqrt(n), 1e-12)


def finite_diff(fn, x, h=1e-6):
    """Central differences of scalar fn at every entry of x (float64)."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (float(fn(jnp.asarray(x + e))) - float(fn(jnp.asarray(x - e)))) / (2 * h)
    return g


RNG = np.random.default_rng(0)
F = RNG.normal(size=(4, 3))
F0 = RNG.normal(size=(4, 3))
MASK = np.array([True, False, True, True])


# ----------------------------------------------------------------------------
# anchoring / EWC
# ----------------------------------------------------------------------------

def test_exclude_prefixes_matches_whole_segments():
    keep = R.exclude_prefixes("head", "img/MAPHead_0/")
    assert not keep("head") and not keep("head/kernel") and not keep("img/MAPHead_0/probe")
    assert keep("header/kernel") and keep("img/MAPHead_01/probe") and keep("img/embedding/kernel")


@pytest.mark.parametrize("reduction", ["mean_per_tensor", "sum"])
def test_anchoring_zero_at_pretrained_and_numpy_after_perturbation(reduction):
    p0 = tower_params()
    assert float(R.anchoring(p0, p0, reduction)) == 0.0
    p = perturb(p0)
    got = float(R.anchoring(p, p0, reduction))
    np.testing.assert_allclose(got, np_anchoring(p, p0, reduction), rtol=1e-6)
    # quadratic: theta0 + t * d gives t^2 times the value at theta0 + d
    half = jax.tree_util.tree_map(lambda a, b: b + 0.5 * (a - b), p, p0)
    np.testing.assert_allclose(float(R.anchoring(half, p0, reduction)), got / 4, rtol=1e-5)


def test_anchoring_authors_value_on_a_tiny_tree():
    p0 = {"a": np.zeros((2, 2), np.float32), "b": {"c": np.zeros(3, np.float32)}}
    p = {"a": np.array([[1, 2], [3, 4]], np.float32), "b": {"c": np.array([1, 1, 1], np.float32)}}
    # mean_per_tensor: (1+4+9+16)/4 + 3/3 = 8.5 ; sum: 30 + 3 = 33
    assert float(R.anchoring(p, p0)) == pytest.approx(8.5, abs=1e-6)
    assert float(R.anchoring(p, p0, "sum")) == pytest.approx(33.0, abs=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        R.anchoring(p, p0, "mean")


def test_anchoring_excludes_heads_via_exclude_prefixes():
    img0 = tower_params()
    head0 = {"kernel": np.zeros((32, 5), np.float32)}
    p0 = {"img": img0, "head": head0}
    p = {"img": perturb(img0), "head": {"kernel": np.ones((32, 5), np.float32)}}
    no_head = R.exclude_prefixes("head")
    np.testing.assert_allclose(float(R.anchoring(p, p0, include=no_head)),
                               np_anchoring(p, p0, "mean_per_tensor", skip=("head",)), rtol=1e-6)
    np.testing.assert_allclose(float(R.anchoring(p, p0, include=no_head)),
                               float(R.anchoring(p["img"], img0)), rtol=1e-6)
    assert float(R.anchoring(p, p0)) > float(R.anchoring(p, p0, include=no_head)) + 0.99
    # the head may even be missing from the anchor when it is excluded
    assert float(R.anchoring({"img": img0, "head": head0}, {"img": img0}, include=no_head)) == 0.0
    with pytest.raises(ValueError, match="anchor does not match"):
        R.anchoring({"img": img0, "head": head0}, {"img": img0})


def test_anchoring_same_in_scan_and_unrolled_layouts():
    p0 = tower_params(depth=2)
    p = perturb(p0)
    rolled = lambda t: tree.unflatten(tree.roll_scan(tree.flatten(t)))
    assert "encoderblock" in rolled(p)["Transformer"]
    for reduction in ("mean_per_tensor", "sum"):
        np.testing.assert_allclose(float(R.anchoring(rolled(p), rolled(p0), reduction)),
                                   float(R.anchoring(p, p0, reduction)), rtol=1e-6)


def test_anchoring_bfloat16_params_differ_in_float32():
    p0 = {"w": jnp.asarray([1.0, 2.0], jnp.bfloat16)}
    p = {"w": jnp.asarray([1.0078125, 2.0], jnp.bfloat16)}  # one bf16 ulp above 1
    assert float(R.anchoring(p, p0)) == pytest.approx(0.0078125 ** 2 / 2, rel=1e-6)


def test_ewc_with_unit_fisher_is_sum_anchoring_and_matches_numpy():
    p0 = tower_params()
    p = perturb(p0)
    ones = jax.tree_util.tree_map(jnp.ones_like, p0)
    np.testing.assert_allclose(float(R.ewc(p, p0, ones)), float(R.anchoring(p, p0, "sum")), rtol=1e-6)
    fisher = perturb(jax.tree_util.tree_map(jnp.zeros_like, p0), seed=2, std=1.0)
    fisher = jax.tree_util.tree_map(jnp.abs, fisher)
    flat, flat0, flatf = tree.flatten(p), tree.flatten(p0), tree.flatten(fisher)
    want = 0.0
    for k in flat:
        d = flat[k].astype(np.float64) - flat0[k].astype(np.float64)
        want += float(np.sum(flatf[k].astype(np.float64) * d * d))
    np.testing.assert_allclose(float(R.ewc(p, p0, fisher)), want, rtol=1e-6)
    keep = R.exclude_prefixes("MAPHead_0")
    np.testing.assert_allclose(float(R.ewc(p, p0, ones, include=keep)),
                               float(R.anchoring(p, p0, "sum", include=keep)), rtol=1e-6)


# ----------------------------------------------------------------------------
# Fisher on linear regression: loss_i = 0.5 (w.x_i + b - y_i)^2, r_i = w.x_i + b - y_i
#   d loss_i / d w_j = r_i x_ij,  d loss_i / d b = r_i
#   per-example Fisher: F_wj = mean_i x_ij^2 r_i^2,  F_b = mean_i r_i^2
#   scalar (batch-mean) loss: F_wj = mean_k (mean_{i in k} r_i x_ij)^2, F_b = mean_k (mean_{i in k} r_i)^2
# ----------------------------------------------------------------------------

def _regression():
    rng = np.random.default_rng(3)
    params = {"w": rng.normal(size=3).astype(np.float32), "b": np.array(0.3, np.float32)}
    batches = [{"x": rng.normal(size=(n, 3)).astype(np.float32), "y": rng.normal(size=n).astype(np.float32)}
               for n in (5, 3)]

    def per_example(p, batch):
        return 0.5 * jnp.square(batch["x"] @ p["w"] + p["b"] - batch["y"])

    return params, batches, per_example


def test_estimate_fisher_per_example_is_the_analytic_diagonal():
    params, batches, per_example = _regression()
    fw, fb, n = np.zeros(3), 0.0, 0
    for batch in batches:
        for x, y in zip(batch["x"].astype(np.float64), batch["y"].astype(np.float64)):
            r = float(np.dot(x, params["w"]) + params["b"] - y)
            fw += x ** 2 * r ** 2
            fb += r ** 2
            n += 1
    for chunk in (1, 2, 8):  # 2 pads the 5- and 3-example batches
        fisher = R.estimate_fisher(per_example, params, batches, chunk_size=chunk)
        np.testing.assert_allclose(fisher["w"], fw / n, rtol=1e-6)
        np.testing.assert_allclose(fisher["b"], fb / n, rtol=1e-6)


def test_estimate_fisher_scalar_loss_squares_the_batch_gradient():
    params, batches, per_example = _regression()
    fisher = R.estimate_fisher(lambda p, b: jnp.mean(per_example(p, b)), params, iter(batches))
    fw, fb = np.zeros(3), 0.0
    for batch in batches:
        gw, gb = np.zeros(3), 0.0
        for x, y in zip(batch["x"].astype(np.float64), batch["y"].astype(np.float64)):
            r = float(np.dot(x, params["w"]) + params["b"] - y)
            gw += r * x / len(batch["y"])
            gb += r / len(batch["y"])
        fw += gw ** 2 / len(batches)
        fb += gb ** 2 / len(batches)
    np.testing.assert_allclose(fisher["w"], fw, rtol=1e-5)
    np.testing.assert_allclose(fisher["b"], fb, rtol=1e-5)
    with pytest.raises(ValueError, match="no batches"):
        R.estimate_fisher(per_example, params, [])


# ----------------------------------------------------------------------------
# feature terms against numpy loops
# ----------------------------------------------------------------------------

def np_feature_mse(f, f0, mask):
    tot, cnt = 0.0, 0
    for b in range(f.shape[0]):
        if mask[b]:
            tot += sum((f[b, d] - f0[b, d]) ** 2 for d in range(f.shape[1])) / f.shape[1]
            cnt += 1
    return tot / max(cnt, 1)


def np_feature_cosine(f, f0, mask):
    tot, cnt = 0.0, 0
    for b in range(f.shape[0]):
        if mask[b]:
            tot += 1.0 - float(np.dot(np_normalize(f[b]), np_normalize(f0[b])))
            cnt += 1
    return tot / max(cnt, 1)


def np_relational(f, f0, mask):
    n = [np_normalize(v) for v in f]
    n0 = [np_normalize(v) for v in f0]
    tot, cnt = 0.0, 0
    for i in range(len(f)):
        for j in range(len(f)):
            if mask[i] and mask[j]:
                tot += (float(np.dot(n[i], n[j])) - float(np.dot(n0[i], n0[j]))) ** 2
                cnt += 1
    return tot / max(cnt, 1)


def np_logit_kl(s, t, temp, mask, teacher_temp=None, t2=True):
    teacher_temp = temp if teacher_temp is None else teacher_temp
    tot, cnt = 0.0, 0
    for b in range(s.shape[0]):
        if mask[b]:
            p = np.exp(t[b] / teacher_temp) / np.exp(t[b] / teacher_temp).sum()
            q = np.exp(s[b] / temp) / np.exp(s[b] / temp).sum()
            tot += sum(p[c] * (np.log(p[c]) - np.log(q[c])) for c in range(len(p)))
            cnt += 1
    return (temp * teacher_temp if t2 else 1.0) * tot / max(cnt, 1)


ALL = np.ones(4, bool)
CASES = [
    (R.feature_mse, np_feature_mse, {}),
    (R.feature_cosine, np_feature_cosine, {}),
    (R.relational, np_relational, {}),
    (R.logit_kl, lambda s, t, m: np_logit_kl(s, t, 2.0, m),
     {"student_temperature": 2.0, "teacher_temperature": 2.0}),
    (R.logit_kl, lambda s, t, m: np_logit_kl(s, t, 2.0, m, teacher_temp=0.5, t2=False),
     {"student_temperature": 2.0, "teacher_temperature": 0.5, "scale_by_t2": False}),
    (R.logit_kl, lambda s, t, m: np_logit_kl(s, t, 1.5, m, teacher_temp=4.0),
     {"student_temperature": 1.5, "teacher_temperature": 4.0}),
]
IDS = ["mse", "cosine", "relational", "logit_kl", "logit_kl_authors", "logit_kl_two_t"]


@pytest.mark.parametrize("fn,ref,kw", CASES, ids=IDS)
def test_feature_losses_match_numpy_with_and_without_mask(fn, ref, kw):
    f, f0 = F.astype(np.float32), F0.astype(np.float32)
    np.testing.assert_allclose(float(fn(f, f0, **kw)), ref(F, F0, ALL), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(fn(f, f0, mask=MASK, **kw)), ref(F, F0, MASK), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(fn(f, f0, mask=ALL, **kw)), float(fn(f, f0, **kw)), rtol=1e-6)


@pytest.mark.parametrize("fn,ref,kw", CASES, ids=IDS)
def test_feature_losses_zero_at_teacher(fn, ref, kw):
    if kw.get("student_temperature") != kw.get("teacher_temperature"):
        pytest.skip("two temperatures: the student's softmax differs from the teacher's")
    f = F.astype(np.float32)
    assert abs(float(fn(f, f, **kw))) < 1e-6
    if fn is R.feature_mse:
        assert float(fn(f, f)) == 0.0


def test_feature_mse_by_hand():
    f = np.array([[1.0, 2.0], [0.0, 0.0]], np.float32)
    f0 = np.array([[0.0, 0.0], [3.0, 1.0]], np.float32)
    # rows: (1 + 4) / 2 = 2.5, (9 + 1) / 2 = 5 -> mean 3.75; masked to row 1 only: 5
    assert float(R.feature_mse(f, f0)) == pytest.approx(3.75, abs=1e-6)
    assert float(R.feature_mse(f, f0, np.array([False, True]))) == pytest.approx(5.0, abs=1e-6)
    # cosine: row 0 against the zero vector is cos 0; row 1 of zeros likewise -> 1 each
    assert float(R.feature_cosine(f, f0)) == pytest.approx(1.0, abs=1e-6)
    assert float(R.feature_cosine(f0[1:], 2 * f0[1:])) == pytest.approx(0.0, abs=1e-6)
    assert float(R.feature_cosine(f0[1:], -f0[1:])) == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("fn,ref,kw", CASES, ids=IDS)
def test_empty_mask_gives_zero_and_finite_grads_and_nan_teacher_rows_do_not_leak(fn, ref, kw):
    f = jnp.asarray(F, jnp.float32)
    none = np.zeros(4, bool)
    val, g = jax.value_and_grad(lambda x: fn(x, F0.astype(np.float32), mask=none, **kw))(f)
    assert float(val) == 0.0 and np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0)
    bad = F0.astype(np.float32).copy()
    bad[~MASK] = np.nan  # "no teacher" rows filled with NaN
    val, g = jax.value_and_grad(lambda x: fn(x, bad, mask=MASK, **kw))(f)
    np.testing.assert_allclose(float(val), ref(F, F0, MASK), rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~MASK] == 0)


# ----------------------------------------------------------------------------
# gradients: central finite differences (float64) and no flow into the constants
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("fn,ref,kw", CASES, ids=IDS)
@pytest.mark.parametrize("mask", [None, MASK], ids=["nomask", "mask"])
def test_feature_grads_match_finite_differences(fn, ref, kw, mask):
    with jax.enable_x64(True):
        loss = lambda x: fn(x, jnp.asarray(F0), mask=mask, **kw)
        g = np.asarray(jax.grad(loss)(jnp.asarray(F)))
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, finite_diff(loss, F), rtol=1e-6, atol=1e-8)


def test_parameter_grads_match_finite_differences():
    rng = np.random.default_rng(5)
    p0 = {"a": rng.normal(size=(2, 3)), "b": {"encoderblock": {"k": rng.normal(size=(2, 2))}}}
    p = jax.tree_util.tree_map(lambda x: x + rng.normal(size=x.shape), p0)
    fisher = jax.tree_util.tree_map(lambda x: np.abs(rng.normal(size=x.shape)), p0)
    with jax.enable_x64(True):
        for loss in (lambda t: R.anchoring(t, p0), lambda t: R.anchoring(t, p0, "sum"),
                     lambda t: R.ewc(t, p0, fisher)):
            g = jax.grad(loss)(p)
            for path in (("a",), ("b", "encoderblock", "k")):
                def along(x, path=path):
                    t = {"a": p["a"], "b": {"encoderblock": {"k": p["b"]["encoderblock"]["k"]}}}
                    if path == ("a",):
                        t["a"] = x
                    else:
                        t["b"]["encoderblock"]["k"] = x
                    return loss(t)
                leaf = p[path[0]] if len(path) == 1 else p["b"]["encoderblock"]["k"]
                got = g[path[0]] if len(path) == 1 else g["b"]["encoderblock"]["k"]
                np.testing.assert_allclose(np.asarray(got), finite_diff(along, leaf), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("fn,ref,kw", CASES, ids=IDS)
def test_no_gradient_into_teacher(fn, ref, kw):
    f, f0 = jnp.asarray(F, jnp.float32), jnp.asarray(F0, jnp.float32)
    g_teacher = jax.grad(lambda t: fn(f, t, **kw))(f0)
    assert np.all(np.asarray(g_teacher) == 0)
    # and the student's gradient is not zero, so the test is not vacuous
    assert np.any(np.asarray(jax.grad(lambda s: fn(s, f0, **kw))(f)) != 0)


def test_no_gradient_into_anchor_or_fisher():
    p0 = tower_params()
    p = perturb(p0)
    fisher = jax.tree_util.tree_map(jnp.ones_like, p0)
    zero = lambda g: all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(g))
    assert zero(jax.grad(lambda a: R.anchoring(p, a))(p0))
    assert zero(jax.grad(lambda a: R.ewc(p, a, fisher))(p0))
    assert zero(jax.grad(lambda fi: R.ewc(p, p0, fi))(fisher))
    assert not zero(jax.grad(lambda t: R.anchoring(t, p0))(p))


def test_losses_jit():
    p0 = tower_params()
    p = perturb(p0)
    keep = R.exclude_prefixes("MAPHead_0")
    got = jax.jit(lambda t, a: R.anchoring(t, a, include=keep))(p, p0)
    np.testing.assert_allclose(float(got), float(R.anchoring(p, p0, include=keep)), rtol=1e-6)
    f, f0 = F.astype(np.float32), F0.astype(np.float32)
    for fn in (R.feature_mse, R.feature_cosine, R.relational, R.logit_kl):
        np.testing.assert_allclose(float(jax.jit(fn)(f, f0, mask=MASK)), float(fn(f, f0, mask=MASK)), rtol=1e-6)
