"""Losses: cosine classifiers and metric losses vs. hand-written numpy loops, and
pytorch-metric-learning (an independent implementation) where it is installed."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infusing_jax.losses import classification as cls
from infusing_jax.losses import metric

# Tiny inputs: 4 examples in 3 dims (2 classes) and 3 in 2 dims (one lone anchor).
X4 = np.array([[1.0, 0.2, -0.3], [0.8, 0.5, 0.1], [-0.4, 1.0, 0.3], [0.6, 0.7, -0.9]])
Y4 = np.array([0, 0, 1, 1])
X3 = np.array([[1.0, 0.3], [0.2, 1.0], [0.9, -0.4]])
Y3 = np.array([0, 0, 1])
TINY = [(X4, Y4), (X3, Y3)]


# ---------------------------------------------------------------- numpy loops
def unit(v):
    return np.asarray(v, np.float64) / np.linalg.norm(v)


def cos_matrix(x):
    z = [unit(v) for v in x]
    return [[float(z[i] @ z[j]) for j in range(len(x))] for i in range(len(x))]


def positives(y, i):
    return [j for j in range(len(y)) if j != i and y[j] == y[i]]


def negatives(y, i):
    return [j for j in range(len(y)) if y[j] != y[i]]


def ref_supcon(x, y, t):
    s, losses = cos_matrix(x), []
    for i in range(len(x)):
        pos = positives(y, i)
        if not pos:
            continue
        denom = sum(math.exp(s[i][a] / t) for a in range(len(x)) if a != i)
        losses.append(-sum(math.log(math.exp(s[i][p] / t) / denom) for p in pos) / len(pos))
    return sum(losses) / len(losses) if losses else 0.0


def ref_multi_similarity(x, y, alpha, beta, base, epsilon):
    s, total = cos_matrix(x), 0.0
    for i in range(len(x)):
        pos, neg = positives(y, i), negatives(y, i)
        if epsilon is not None:
            kept_pos = [j for j in pos if neg and s[i][j] - epsilon < max(s[i][k] for k in neg)]
            kept_neg = [j for j in neg if pos and s[i][j] + epsilon > min(s[i][k] for k in pos)]
            pos, neg = kept_pos, kept_neg
        total += math.log(1 + sum(math.exp(-alpha * (s[i][j] - base)) for j in pos)) / alpha
        total += math.log(1 + sum(math.exp(beta * (s[i][j] - base)) for j in neg)) / beta
    return total / len(x)


def ref_triplet(x, y, margin, distance):
    z, losses = [unit(v) for v in x], []
    d = (lambda a, b: float(np.linalg.norm(a - b))) if distance == "euclidean" else \
        (lambda a, b: 1.0 - float(a @ b))
    for i in range(len(x)):
        pos, neg = positives(y, i), negatives(y, i)
        if pos and neg:
            hard_pos = max(d(z[i], z[p]) for p in pos)
            hard_neg = min(d(z[i], z[n]) for n in neg)
            losses.append(max(0.0, margin + hard_pos - hard_neg))
    return sum(losses) / len(losses) if losses else 0.0


def ref_proxy_anchor(x, y, proxies, alpha, delta):
    z, q = [unit(v) for v in x], [unit(p) for p in proxies]
    pos_total, with_pos, neg_total = 0.0, 0, 0.0
    for c in range(len(proxies)):
        members = [i for i in range(len(x)) if y[i] == c]
        others = [i for i in range(len(x)) if y[i] != c]
        if members:
            with_pos += 1
            pos_total += math.log(
                1 + sum(math.exp(-alpha * (z[i] @ q[c] - delta)) for i in members))
        neg_total += math.log(1 + sum(math.exp(alpha * (z[i] @ q[c] + delta)) for i in others))
    return pos_total / with_pos + neg_total / len(proxies)


def ref_logits(x, w, y, kind, scale, margin, fallback="linear"):
    """Per entry: the angle theta between x_b and w_c, then the margin at the target."""
    out = np.zeros((len(x), w.shape[1]))
    for b in range(len(x)):
        for c in range(w.shape[1]):
            cos = float(unit(x[b]) @ unit(w[:, c]))
            logit = cos
            if c == y[b] and kind == "cosface":
                logit = cos - margin
            if c == y[b] and kind == "arcface":
                theta = math.acos(min(1.0, max(-1.0, cos)))
                if fallback == "easy_margin":
                    logit = math.cos(theta + margin) if theta < math.pi / 2 else cos
                elif fallback == "none":  # the authors' code: cos(theta + m) as it is
                    logit = math.cos(theta + margin)
                else:
                    logit = (math.cos(theta + margin) if theta < math.pi - margin
                             else cos - margin * math.sin(margin))
            out[b, c] = scale * logit
    return out


def ref_cross_entropy(logits, y):
    total = 0.0
    for b in range(len(logits)):
        total += -logits[b][y[b]] + math.log(sum(math.exp(v) for v in logits[b]))
    return total / len(logits)


def central_diff(f, x, h=1e-6):
    x = np.array(x, np.float64)
    g = np.zeros_like(x)
    for k in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[k] += h
        down[k] -= h
        g[k] = (f(up) - f(down)) / (2 * h)
    return g


def grad64(f, x):
    """jax.grad of f at x in float64 (f's arrays become float64 too)."""
    with jax.enable_x64(True):
        return np.asarray(jax.jit(jax.grad(f))(jnp.asarray(x, jnp.float64)))


# (name, jax function of (x, labels), numpy reference of (x, labels))
PA_PROXIES = np.array([[0.9, 0.1, -0.2], [-0.3, 0.8, 0.4]])
METRIC = [
    ("supcon", lambda x, y: metric.supcon(x, y, 0.5), lambda x, y: ref_supcon(x, y, 0.5)),
    ("ms_mined", lambda x, y: metric.multi_similarity(x, y, 2.0, 10.0, 0.5, 0.1),
     lambda x, y: ref_multi_similarity(x, y, 2.0, 10.0, 0.5, 0.1)),
    ("ms_all", lambda x, y: metric.multi_similarity(x, y, 2.0, 10.0, 0.5, None),
     lambda x, y: ref_multi_similarity(x, y, 2.0, 10.0, 0.5, None)),
    ("triplet_euclidean", lambda x, y: metric.triplet_batch_hard(x, y, 0.5, "euclidean"),
     lambda x, y: ref_triplet(x, y, 0.5, "euclidean")),
    ("triplet_cosine", lambda x, y: metric.triplet_batch_hard(x, y, 0.5, "cosine"),
     lambda x, y: ref_triplet(x, y, 0.5, "cosine")),
    ("proxy_anchor", lambda x, y: metric.proxy_anchor(x, y, PA_PROXIES[:, :x.shape[1]], 4.0, 0.1),
     lambda x, y: ref_proxy_anchor(x, y, PA_PROXIES[:, :x.shape[1]], 4.0, 0.1)),
]
METRIC_IDS = [m[0] for m in METRIC]


# ---------------------------------------------------------------- metric losses
@pytest.mark.parametrize("name,fn,ref", METRIC, ids=METRIC_IDS)
@pytest.mark.parametrize("x,y", TINY, ids=["4x3", "3x2_lone"])
def test_metric_value_matches_numpy_loops(name, fn, ref, x, y):
    got = jax.jit(fn)(jnp.asarray(x, jnp.float32), jnp.asarray(y))
    np.testing.assert_allclose(got, ref(x, y), rtol=1e-5, atol=1e-5)
    assert ref(x, y) > 0  # the tiny inputs exercise every term


@pytest.mark.parametrize("name,fn,ref", METRIC, ids=METRIC_IDS)
@pytest.mark.parametrize("x,y", TINY, ids=["4x3", "3x2_lone"])
def test_metric_gradient_matches_central_differences(name, fn, ref, x, y):
    want = central_diff(lambda v: ref(v, y), x)
    got = grad64(lambda v: fn(v, jnp.asarray(y)), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


MASKED = [
    ("supcon", lambda x, y, m: metric.supcon(x, y, 0.5, mask=m)),
    ("ms_mined", lambda x, y, m: metric.multi_similarity(x, y, 2.0, 10.0, 0.5, 0.1, mask=m)),
    ("ms_all", lambda x, y, m: metric.multi_similarity(x, y, 2.0, 10.0, 0.5, None, mask=m)),
    ("triplet", lambda x, y, m: metric.triplet_batch_hard(x, y, 0.2, mask=m)),
    ("proxy_anchor", lambda x, y, m: metric.proxy_anchor(
        x, y, np.eye(3, 6)[:, :x.shape[1]] + 0.1, 4.0, 0.1, mask=m)),
]


@pytest.mark.parametrize("name,fn", MASKED, ids=[m[0] for m in MASKED])
def test_metric_terms_on_a_mixed_batch_equal_the_domain_alone(name, fn):
    # Rows 0-6 are this domain's (classes 0-2, with positives); rows 7-11 another
    # domain's, whose labels the objective sets to 0 (class 0 of this domain).
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 6)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2, 1, 0, 0, 0, 0, 0])
    mask = np.arange(12) < 7
    alone = float(fn(jnp.asarray(x[:7]), jnp.asarray(labels[:7]), None))
    mixed = float(jax.jit(fn)(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(mask)))
    np.testing.assert_allclose(mixed, alone, rtol=1e-5, atol=1e-6)
    unmasked = float(fn(jnp.asarray(x), jnp.asarray(labels), None))
    assert abs(unmasked - alone) > 1e-3  # the other domain's rows would count as class 0
    grad = jax.grad(lambda v: fn(v, jnp.asarray(labels), jnp.asarray(mask)))(jnp.asarray(x))
    assert np.all(np.asarray(grad)[7:] == 0) and np.any(np.asarray(grad)[:7] != 0)
    np.testing.assert_allclose(
        np.asarray(grad)[:7],
        np.asarray(jax.grad(lambda v: fn(v, jnp.asarray(labels[:7]), None))(jnp.asarray(x[:7]))),
        rtol=1e-4, atol=1e-6)


def test_multi_similarity_mining_drops_pairs_on_the_tiny_input():
    # Otherwise ms_mined above would not test the mining.
    mined = ref_multi_similarity(X4, Y4, 2.0, 10.0, 0.5, 0.1)
    assert abs(mined - ref_multi_similarity(X4, Y4, 2.0, 10.0, 0.5, None)) > 1e-3


def test_proxy_anchor_gradient_wrt_proxies():
    f = lambda p: ref_proxy_anchor(X4, Y4, p, 4.0, 0.1)
    got = grad64(lambda p: metric.proxy_anchor(jnp.asarray(X4), jnp.asarray(Y4), p, 4.0, 0.1),
                 PA_PROXIES)
    np.testing.assert_allclose(got, central_diff(f, PA_PROXIES), rtol=1e-5, atol=1e-6)


def test_proxy_anchor_averages_positive_term_over_proxies_present_in_batch():
    proxies = np.concatenate([PA_PROXIES, [[0.1, -0.5, 0.7]]])  # class 2: no example
    got = metric.proxy_anchor(jnp.asarray(X4, jnp.float32), jnp.asarray(Y4), proxies, 4.0, 0.1)
    np.testing.assert_allclose(got, ref_proxy_anchor(X4, Y4, proxies, 4.0, 0.1), rtol=1e-5)


DEGENERATE = {
    "identical": (np.tile([[0.3, -0.4, 0.5]], (4, 1)), np.array([0, 0, 1, 1])),
    "one_label": (X4, np.zeros(4, int)),
    "all_distinct": (X4, np.arange(4)),  # no positive pair
    "single": (X4[:1], np.zeros(1, int)),
}


@pytest.mark.parametrize("name,fn,ref", METRIC, ids=METRIC_IDS)
@pytest.mark.parametrize("case", list(DEGENERATE))
def test_metric_degenerate_batches_have_finite_gradients(name, fn, ref, case):
    x, y = DEGENERATE[case]
    value, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(x, jnp.float32), jnp.asarray(y))
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # No positive pair: 0. Not for ms_all (no mining keeps the negative term, as its formula
    # says) nor proxy_anchor (every example has its proxy as a positive).
    if case in ("all_distinct", "single") and name not in ("ms_all", "proxy_anchor"):
        assert value == 0 and np.all(grad == 0)
    np.testing.assert_allclose(value, ref(x, y), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- cosine classifiers
RNG = np.random.default_rng(0)
XC, WC, YC = RNG.normal(size=(6, 3)), RNG.normal(size=(3, 4)), np.array([0, 1, 2, 3, 1, 2])
XC[5] = -WC[:, 2] + 0.05 * RNG.normal(size=3)  # target angle > pi - m: ArcFace's fallback


def _logits(kind, x, w, y, scale, margin, fallback="linear"):
    if kind == "normface":
        return cls.normface_logits(x, w, scale)
    if kind == "cosface":
        return cls.cosface_logits(x, w, y, scale, margin)
    return cls.arcface_logits(x, w, y, scale, margin, fallback)


@pytest.mark.parametrize("kind,fallback", [("normface", "linear"), ("cosface", "linear"),
                                           ("arcface", "linear"), ("arcface", "none"),
                                           ("arcface", "easy_margin")])
def test_classifier_logits_match_numpy_formula(kind, fallback):
    args = (jnp.asarray(XC, jnp.float32), jnp.asarray(WC, jnp.float32), jnp.asarray(YC))
    got = jax.jit(lambda x, w, y: _logits(kind, x, w, y, 16.0, 0.5, fallback))(*args)
    np.testing.assert_allclose(got, ref_logits(XC, WC, YC, kind, 16.0, 0.5, fallback),
                               rtol=1e-5, atol=1e-5)


def test_arcface_fallback_branch_is_exercised():
    cos = float(unit(XC[5]) @ unit(WC[:, 2]))
    assert cos < math.cos(math.pi - 0.5)
    # Past pi - m the three settings differ at that row's target logit.
    args = (jnp.asarray(XC, jnp.float32), jnp.asarray(WC, jnp.float32), jnp.asarray(YC), 1.0, 0.5)
    target = {f: float(cls.arcface_logits(*args, fallback=f)[5, 2]) for f in cls.ARCFACE_FALLBACKS}
    theta = math.acos(cos)
    assert target["none"] == pytest.approx(math.cos(theta + 0.5), abs=1e-5)
    assert target["none"] > math.cos(math.pi)  # rises again past pi: a worse match scores more
    assert target["linear"] == pytest.approx(cos - 0.5 * math.sin(0.5), abs=1e-5)
    assert target["easy_margin"] == pytest.approx(cos, abs=1e-5)


@pytest.mark.parametrize("kind", ["cosface", "arcface"])
def test_margin_only_at_the_target_class(kind):
    x, w = jnp.asarray(XC, jnp.float32), jnp.asarray(WC, jnp.float32)
    plain = np.asarray(cls.normface_logits(x, w, 16.0))
    margin = np.asarray(_logits(kind, x, w, jnp.asarray(YC), 16.0, 0.3))
    target = np.eye(4, dtype=bool)[YC]
    np.testing.assert_array_equal(margin[~target], plain[~target])
    assert np.all(margin[target] < plain[target])


def test_normface_scale_16_is_the_authors_formula():
    x = XC / np.linalg.norm(XC, axis=1, keepdims=True)  # the L2-normalised embedding
    authors = 16.0 * (x @ WC) / np.linalg.norm(WC, axis=0)  # s <x, w_c> / ||w_c||
    got = cls.normface_logits(jnp.asarray(x, jnp.float32), jnp.asarray(WC, jnp.float32), 16.0)
    np.testing.assert_allclose(got, authors, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", cls.KINDS)
def test_classifier_loss_value_and_gradients(kind):
    x, w, y = X4, np.array([[0.5, -0.2], [0.1, 0.9], [-0.7, 0.3]]), np.array([0, 1, 1, 0])
    ref = lambda x_, w_: ref_cross_entropy(ref_logits(x_, w_, y, kind, 4.0, 0.3), y)
    loss = lambda x_, w_: cls.cosine_classifier_loss(x_, w_, jnp.asarray(y), kind, 4.0, 0.3)
    got = jax.jit(loss)(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got, ref(x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad64(lambda v: loss(v, jnp.asarray(w)), x),
                               central_diff(lambda v: ref(v, w), x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad64(lambda v: loss(jnp.asarray(x), v), w),
                               central_diff(lambda v: ref(x, v), w), rtol=1e-5, atol=1e-6)


def test_cross_entropy_matches_numpy():
    logits = RNG.normal(size=(5, 4)) * 3
    y = np.array([0, 3, 1, 1, 2])
    got = cls.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(y))
    np.testing.assert_allclose(got, ref_cross_entropy(logits, y), rtol=1e-5)


def test_trainable_scale_gets_the_right_gradient():
    x, w, y = X4, np.array([[0.5, -0.2], [0.1, 0.9], [-0.7, 0.3]]), np.array([0, 1, 1, 0])
    ref = lambda log_s: ref_cross_entropy(ref_logits(x, w, y, "normface", math.exp(log_s[0]), 0), y)
    got = grad64(lambda log_s: cls.cosine_classifier_loss(
        jnp.asarray(x), jnp.asarray(w), jnp.asarray(y), "normface", jnp.exp(log_s[0])),
        np.array([math.log(16.0)]))
    np.testing.assert_allclose(got, central_diff(ref, [math.log(16.0)]), rtol=1e-5)


@pytest.mark.parametrize("kind", cls.KINDS)
def test_classifier_finite_gradients_at_cos_plus_minus_one(kind):
    w = jnp.asarray(WC, jnp.float32)
    x = jnp.stack([w[:, 0], -w[:, 1], w[:, 2], w[:, 2]])  # cos = +1, -1, and identical rows
    y = jnp.array([0, 1, 2, 2])
    for labels in (y, jnp.zeros(4, int)):
        f = jax.jit(jax.value_and_grad(
            lambda x_, w_: cls.cosine_classifier_loss(x_, w_, labels, kind, 64.0, 0.5), (0, 1)))
        value, (gx, gw) = f(x, w)
        assert np.isfinite(value) and np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))


def test_unknown_kind_raises():
    with pytest.raises(ValueError):
        cls.cosine_classifier_loss(jnp.ones((2, 3)), jnp.ones((3, 2)), jnp.array([0, 1]), "softmax")


def test_init_head_is_lecun_uniform():
    w = cls.init_head(jax.random.PRNGKey(0), 256, 1000)
    assert w.shape == (256, 1000) and w.dtype == jnp.float32
    bound = math.sqrt(3 / 256)
    assert float(jnp.abs(w).max()) <= bound and float(jnp.abs(w).max()) > 0.99 * bound
    np.testing.assert_allclose(float(w.var()), 1 / 256, rtol=0.02)


# ---------------------------------------------------------------- pytorch-metric-learning
def _pml_batch(seed=0, lone=True):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1, 2, 3], [6, 5, 4, 1] if lone else [4, 4, 4, 4])
    return rng.normal(size=(16, 8)).astype(np.float32), rng.permutation(labels)


def _pml_cases():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses, miners, reducers
    cos = distances.CosineSimilarity
    ms = dict(alpha=2.0, beta=50.0, base=0.5)
    return {
        "supcon": (lambda e, l: losses.SupConLoss(temperature=0.1)(e, l),
                   lambda x, y: metric.supcon(x, y, 0.1)),
        "ms_mined": (lambda e, l: losses.MultiSimilarityLoss(**ms)(
                         e, l, miners.MultiSimilarityMiner(epsilon=0.1)(e, l)),
                     lambda x, y: metric.multi_similarity(x, y, **ms, epsilon=0.1)),
        "ms_all": (lambda e, l: losses.MultiSimilarityLoss(**ms)(e, l),
                   lambda x, y: metric.multi_similarity(x, y, **ms, epsilon=None)),
        # Hermans et al. average over anchors: MeanReducer, not PML's default AvgNonZeroReducer.
        "triplet_euclidean": (
            lambda e, l: losses.TripletMarginLoss(margin=0.2, reducer=reducers.MeanReducer())(
                e, l, miners.BatchHardMiner()(e, l)),
            lambda x, y: metric.triplet_batch_hard(x, y, 0.2, "euclidean")),
        "triplet_cosine": (
            lambda e, l: losses.TripletMarginLoss(margin=0.2, distance=cos(),
                                                  reducer=reducers.MeanReducer())(
                e, l, miners.BatchHardMiner(distance=cos())(e, l)),
            lambda x, y: metric.triplet_batch_hard(x, y, 0.2, "cosine")),
    }


PML_NAMES = ["supcon", "ms_mined", "ms_all", "triplet_euclidean", "triplet_cosine"]


@pytest.mark.parametrize("name", PML_NAMES)
@pytest.mark.parametrize("seed,lone", [(0, True), (1, False), (2, True)])
def test_parity_with_pytorch_metric_learning(name, seed, lone):
    cases = _pml_cases()
    import torch
    ref_fn, fn = cases[name]
    x, y = _pml_batch(seed, lone)
    emb = torch.tensor(x, requires_grad=True)
    want = ref_fn(emb, torch.tensor(y))
    want.backward()
    got, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(got, want.item(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, emb.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_classes", [4, 6])  # 6: two proxies without examples
@pytest.mark.parametrize("seed,lone", [(0, True), (1, False)])
def test_proxy_anchor_parity_with_pytorch_metric_learning(num_classes, seed, lone):
    _pml_cases()
    import torch
    from pytorch_metric_learning import losses
    x, y = _pml_batch(seed, lone)
    proxies = np.random.default_rng(seed + 10).normal(size=(num_classes, 8)).astype(np.float32)
    loss = losses.ProxyAnchorLoss(num_classes, 8, margin=0.1, alpha=32.0)
    loss.proxies.data = torch.tensor(proxies)
    emb = torch.tensor(x, requires_grad=True)
    want = loss(emb, torch.tensor(y))
    want.backward()
    got, (gx, gp) = jax.jit(jax.value_and_grad(
        lambda x_, p_: metric.proxy_anchor(x_, jnp.asarray(y), p_, 32.0, 0.1), (0, 1)))(
        jnp.asarray(x), jnp.asarray(proxies))
    np.testing.assert_allclose(got, want.item(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, emb.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gp, loss.proxies.grad.numpy(), rtol=1e-4, atol=1e-5)
