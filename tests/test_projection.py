"""SPD and FTP (training/projection.py) against their update rules, written out in NumPy
from the papers' algorithms (PyTorch's layouts and sign: theta_t = theta - step), on a
tiny quadratic; and as optim.projection settings of the trainer's optimiser."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infusing_jax.training import optim
from infusing_jax.training import projection

LR, B1, B2, EPS = 0.05, 0.9, 0.999, 1e-8


def quadratic(seed=0):
    """f(theta) = sum_t 0.5 |A_t theta_t - b_t|^2 over a (3, 4) 'Dense kernel' and a bias."""
    rng = np.random.default_rng(seed)
    a = {"dense": {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=(4, 4))}}
    b = {"dense": {"kernel": rng.normal(size=(5, 4)), "bias": rng.normal(size=(4,))}}
    theta0 = {"dense": {"kernel": rng.normal(size=(3, 4)) * 0.1, "bias": np.zeros(4)}}

    def grad(theta):
        k, bias = theta["dense"]["kernel"], theta["dense"]["bias"]
        ak, ab = a["dense"]["kernel"], a["dense"]["bias"]
        return {"dense": {"kernel": ak.T @ (ak @ k - b["dense"]["kernel"]),
                          "bias": ab.T @ (ab @ bias - b["dense"]["bias"])}}
    return theta0, grad


class NumpyAdam:
    """PyTorch's Adam step, -> the step s (theta~ = theta - s)."""

    def __init__(self):
        self.m, self.v, self.t = 0.0, 0.0, 0

    def __call__(self, g):
        self.t += 1
        self.m = B1 * self.m + (1 - B1) * g
        self.v = B2 * self.v + (1 - B2) * g * g
        return (LR / (1 - B1 ** self.t)) * self.m / (np.sqrt(self.v / (1 - B2 ** self.t)) + EPS)


def numpy_spd(theta0, grad, strength, steps):
    """AdamSPD per tensor: c = -<g, theta - theta0>; where c < 0, theta~ -= lambda r (theta~ -
    theta0), r = clip((|theta~ - theta0| - |theta - theta0|) / |theta~ - theta0|, 0, 1)."""
    theta = {k: {n: x.copy() for n, x in d.items()} for k, d in theta0.items()}
    adams = {n: NumpyAdam() for n in theta["dense"]}
    path = []
    for _ in range(steps):
        g = grad(theta)["dense"]
        for n, p in theta["dense"].items():
            p0 = theta0["dense"][n]
            tilde = p - adams[n](g[n])
            if -np.sum(g[n] * (p - p0)) < 0:
                d_new, d_old = np.linalg.norm(tilde - p0), np.linalg.norm(p - p0)
                r = np.clip((d_new - d_old) / d_new, 0, 1)
                tilde = tilde - strength * r * (tilde - p0)
            theta["dense"][n] = tilde
        path.append({n: p.copy() for n, p in theta["dense"].items()})
    return path


def numpy_ftp(theta0, grad, k, steps):
    """FTP on AdamP (Adam, no decay), rows in PyTorch's layout: the kernel transposed to
    (out, in), a row per output feature; the bias one row."""
    mu = 1e-2
    theta = {n: (x.T.copy() if n == "kernel" else x.copy()) for n, x in theta0["dense"].items()}
    anchor = {n: x.copy() for n, x in theta.items()}
    adams = {n: NumpyAdam() for n in theta}
    st = {n: dict(gamma=0.0, m=0.0, v=0.0, c=None, n=None) for n in theta}

    def rows(x):
        return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)

    path = []
    for t in range(1, steps + 1):
        as_flax = {n: (x.T if n == "kernel" else x) for n, x in theta.items()}
        g_flax = grad({"dense": as_flax})["dense"]
        g = {n: (x.T if n == "kernel" else x) for n, x in g_flax.items()}
        for n in theta:
            s = st[n]
            c = theta[n] - adams[n](g[n]) - anchor[n]
            norms = np.abs(rows(c)).sum(axis=1) + 1e-8
            if t == 1:
                gamma = 1e-8
            else:
                h = np.sum(np.sum(rows(g[n]) * rows(s["c"]), axis=1) / s["n"])
                if h > 0:
                    h *= k
                s["m"] = 0.9 * s["m"] + 0.1 * h
                s["v"] = 0.999 * s["v"] + 0.001 * h * h
                step = mu * (s["m"] / (1 - 0.9 ** t)) / (np.sqrt(s["v"] / (1 - 0.999 ** t)) + 1e-8)
                gamma = np.clip(s["gamma"] - step, 1e-8, norms.max())
            ratio = np.clip(gamma / norms, 0, 1)
            theta[n] = anchor[n] + (ratio[:, None] * rows(c)).reshape(c.shape)
            s.update(gamma=gamma, c=c, n=norms)
        path.append({n: (x.T.copy() if n == "kernel" else x.copy()) for n, x in theta.items()})
    return path


def run_optax(tx, theta0, grad, steps):
    params = jax.tree.map(jnp.asarray, theta0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    path = []
    for _ in range(steps):
        g = jax.tree.map(jnp.asarray, grad(jax.tree.map(np.asarray, params)))
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        path.append(jax.tree.map(np.asarray, params["dense"]))
    return path


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("strength", [1.0, 0.3])
def test_spd_follows_adamspd_on_a_quadratic(strength):
    theta0, grad = quadratic()
    ours = run_optax(projection.selective_projection_decay(optax.adam(LR, B1, B2, EPS),
                                                           strength), theta0, grad, 40)
    theirs = numpy_spd(theta0, grad, strength, 40)
    for a, b in zip(ours, theirs):
        for n in a:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-9, atol=1e-12)
    plain = run_optax(optax.adam(LR, B1, B2, EPS), theta0, grad, 40)
    moved = lambda p: np.linalg.norm(p["kernel"] - theta0["dense"]["kernel"])
    assert moved(ours[-1]) < moved(plain[-1])  # the decay held the kernel nearer theta0


def test_spd_one_step_by_hand():
    """theta0 = 0, theta = (3, 4): |theta| = 5. A conflicting step to (4, 4) ends at distance
    5 with lambda = 1, at 5 + 0.5 * (sqrt(32) - 5) with 0.5; a non-conflicting one is kept."""
    theta0, theta = jnp.zeros(2), jnp.array([3.0, 4.0])
    u = jnp.array([1.0, 0.0])
    conflicting = jnp.array([1.0, 0.0])  # <g, theta - theta0> = 3 > 0
    for lam, want in ((1.0, 5.0), (0.5, 5.0 + 0.5 * (np.sqrt(32.0) - 5.0))):
        new = theta + projection.spd_update(conflicting, u, theta, theta0, lam)
        np.testing.assert_allclose(np.linalg.norm(new), want, rtol=1e-12)
        np.testing.assert_allclose(new / np.linalg.norm(new), np.array([4, 4]) / np.sqrt(32))
    agreeing = jnp.array([-1.0, 0.0])
    np.testing.assert_array_equal(projection.spd_update(agreeing, u, theta, theta0, 1.0), u)
    # a step towards theta0 is never decayed (r = 0), and theta = theta0 gives no conflict
    np.testing.assert_array_equal(projection.spd_update(conflicting, -u, theta, theta0, 1.0), -u)
    np.testing.assert_array_equal(projection.spd_update(conflicting, u, theta0, theta0, 1.0), u)


@pytest.mark.parametrize("k", [1.0, 0.5])
def test_ftp_follows_its_algorithm_on_a_quadratic(k):
    theta0, grad = quadratic(1)
    ours = run_optax(projection.trainable_projection(optax.adam(LR, B1, B2, EPS), k),
                     theta0, grad, 60)
    theirs = numpy_ftp(theta0, grad, k, 60)
    for a, b in zip(ours, theirs):
        for n in a:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-8, atol=1e-12)
    # after step 1 every row is pinned to theta0 (L1 radius 1e-8), then the radius grows
    first = ours[0]["kernel"] - theta0["dense"]["kernel"]
    assert np.abs(first).sum(axis=0).max() <= 1.01e-8
    last = ours[-1]["kernel"] - theta0["dense"]["kernel"]
    assert np.abs(last).sum(axis=0).max() > 1e-3


def test_ftp_units():
    assert projection.unit_axes("Dense_0/kernel", 2) == (0,)
    assert projection.unit_axes("MultiHeadDotProductAttention_0/query/kernel", 3) == (0,)
    assert projection.unit_axes("MultiHeadDotProductAttention_0/out/kernel", 3) == (0, 1)
    assert projection.unit_axes("embedding/kernel", 4) == (0, 1, 2)
    assert projection.unit_axes("MultiHeadDotProductAttention_0/query/bias", 2) == (0, 1)
    assert projection.unit_axes("pos_embedding", 3) == (0, 1, 2)


def _params():
    rng = np.random.default_rng(0)
    return {"backbone": {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(6, 5))),
                                     "bias": jnp.zeros(5)}},
            "heads": {"target": {"classifier": jnp.asarray(rng.normal(size=(5, 3)))}}}


@pytest.mark.parametrize("kind", ["spd", "ftp"])
def test_optim_projection_wraps_the_backbone_only(kind):
    cfg = optim.default_config()
    cfg.update(projection=kind, lr=0.1, backbone_lr_mult=1.0)
    params = _params()
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
    plain = optim.make_optimizer(_with(lr=0.1, backbone_lr_mult=1.0), 1)
    ours = optim.make_optimizer(cfg, 1)
    s_plain, s_ours = plain.init(params), ours.init(params)
    for i in range(3):  # the third gradient turns back: SPD's conflict; FTP acts throughout
        grads = jax.tree.map(lambda g: -g, grads) if i == 2 else grads
        u_plain, s_plain = plain.update(grads, s_plain, params)
        u_ours, s_ours = ours.update(grads, s_ours, params)
        np.testing.assert_array_equal(u_ours["heads"]["target"]["classifier"],
                                      u_plain["heads"]["target"]["classifier"])
        params = optax.apply_updates(params, u_ours)
    assert not np.allclose(u_ours["backbone"]["Dense_0"]["kernel"],
                           u_plain["backbone"]["Dense_0"]["kernel"])


def _with(**kw):
    cfg = optim.default_config()
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("field,value,message", [
    ("projection", "lora", "optim.projection"),
    ("spd_strength", -1.0, "optim.spd_strength"),
    ("ftp_k", 2.0, "optim.ftp_k"),
])
def test_optim_projection_fields_are_checked(field, value, message):
    with pytest.raises(Exception, match=message):
        optim.validate(_with(**{field: value}))
