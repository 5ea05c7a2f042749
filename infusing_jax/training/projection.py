r"""Optimisers that hold each tensor near its pretrained value by projection: SPD and FTP.

Both wrap an inner optax transformation (our AdamW) and post-process its update `u`
(optax's sign: theta_t = theta + u) tensor by tensor, against theta0, the parameters
that `init` sees (the pretrained weights: the trainer initialises its state with
them). The state keeps theta0, one more copy of the wrapped parameters.

SPD, selective projection decay (Tian et al., NeurIPS 2024; AdamSPD). Per tensor,
with g the gradient, theta the parameter before the step, theta~ = theta + u:

    conflict = <g, theta - theta0> > 0       (the step's descent direction moves
                                              the tensor back towards theta0 less
                                              than the update drifts away)
    r = clip((|theta~ - theta0| - |theta - theta0|) / |theta~ - theta0|, 0, 1)
    theta_t = theta~ - lambda * r * (theta~ - theta0)   where conflict, else theta~

|.| is the Frobenius norm of the whole tensor; r = 0 where theta~ = theta0. With
lambda = 1 a conflicting tensor ends at exactly its previous distance from theta0
(theta~ - theta0 scaled by |theta - theta0| / |theta~ - theta0|); lambda is not
multiplied by the learning rate.

FTP, fast trainable projection (Tian et al., NeurIPS 2023). Per tensor, a radius
gamma learnt by its own Adam; at step t (from 1), with c_t = theta + u - theta0:

    n_t    = per-unit L1 norms of c_t, + 1e-8    (a unit: one output feature of a
             kernel, its slice over the input axes; any other tensor is one unit)
    h_t    = sum_units <g, c_{t-1}> / n_{t-1}     (t >= 2; h_t *= k where h_t > 0)
    gamma  = Adam(mu=1e-2, betas 0.9, 0.999, eps 1e-8) step on h_t, bias-corrected
             with t; then clip(gamma, 1e-8, max n_t).  gamma_1 = 1e-8
    theta_t = theta0 + clip(gamma / n_t, 0, 1) * c_t   (per unit: |theta_t - theta0|_1
                                                        <= gamma)

k in [0, 1] anneals the hypergradients that shrink gamma (k = 1: strongest).
mu, the betas and the epsilons are the authors' fixed values. gamma starts at
1e-8, so a tensor starts pinned to theta0 and its radius grows by about mu a step.

Units of a kernel (Flax layouts): a Dense (in, out) or a q/k/v projection (D, heads,
head_dim) reduces over axis 0; the attention output (heads, head_dim, D) and the patch
embedding (h, w, in, out) over all axes but the last. Biases, norms, the positional
embedding and the MAP probe are one unit each.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

FTP_MU, FTP_BETAS, FTP_EPS = 1e-2, (0.9, 0.999), 1e-8


def _wide(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _copy(params):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params)


# ----------------------------------------------------------------------------- SPD


class SPDState(NamedTuple):
    inner: Any
    anchor: Any  # theta0, like the params


def spd_update(g, u, theta, theta0, strength: float):
    """One tensor's SPD update (module doc): -> the update replacing `u`."""
    g, u, theta, theta0 = map(_wide, (g, u, theta, theta0))
    moved = theta - theta0
    new = moved + u
    conflict = jnp.vdot(g, moved) > 0
    d_new, d_old = jnp.linalg.norm(new), jnp.linalg.norm(moved)
    r = jnp.where(d_new > 0, jnp.clip((d_new - d_old) / jnp.where(d_new > 0, d_new, 1.0),
                                      0.0, 1.0), 0.0)
    return jnp.where(conflict, u - strength * r * new, u)


def selective_projection_decay(inner: optax.GradientTransformation,
                               strength: float) -> optax.GradientTransformation:
    """`inner`'s update, decayed towards theta0 where it conflicts (module doc, SPD)."""
    def init(params):
        return SPDState(inner.init(params), _copy(params))

    def update(grads, state, params):
        if params is None:
            raise ValueError("selective_projection_decay needs the params")
        u, inner_state = inner.update(grads, state.inner, params)
        out = jax.tree.map(lambda g, v, p, p0: spd_update(g, v, p, p0, strength).astype(v.dtype),
                           grads, u, params, state.anchor)
        return out, SPDState(inner_state, state.anchor)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- FTP


class FTPTensor(NamedTuple):
    gamma: jax.Array       # () the radius
    m: jax.Array           # () Adam's moments of gamma
    v: jax.Array
    offset: jax.Array      # c_{t-1}, like the param (float32)
    norms: jax.Array       # n_{t-1}, one per unit


class FTPState(NamedTuple):
    inner: Any
    count: jax.Array       # steps taken
    anchor: Any            # theta0
    tensors: Any           # an FTPTensor per param


def _name(path) -> str:
    return "/".join(str(getattr(q, "key", getattr(q, "name", q))) for q in path)


def unit_axes(path: str, ndim: int) -> tuple:
    """The axes a unit's L1 norm reduces over (module doc): () means the whole tensor."""
    names = path.split("/")
    if names[-1] != "kernel" or ndim < 2:
        return tuple(range(ndim))
    if names[-2] in ("out", "embedding"):
        return tuple(range(ndim - 1))
    return (0,)


def _unit_norms(c, axes):
    return jnp.sum(jnp.abs(c), axis=axes, keepdims=True) + FTP_EPS


def ftp_update(g, u, theta, theta0, t, prev: FTPTensor, axes: tuple, k: float):
    """One tensor's FTP update at step t >= 1 (module doc): -> (update, its FTPTensor)."""
    g, u, theta, theta0 = map(_wide, (g, u, theta, theta0))
    c = theta + u - theta0
    n = _unit_norms(c, axes)
    h = jnp.sum(g * prev.offset / prev.norms)
    h = jnp.where(h > 0, k * h, h)
    b1, b2 = FTP_BETAS
    m = b1 * prev.m + (1 - b1) * h
    v = b2 * prev.v + (1 - b2) * h * h
    tf = t.astype(h.dtype)
    step = FTP_MU * (m / (1 - b1 ** tf)) / (jnp.sqrt(v / (1 - b2 ** tf)) + FTP_EPS)
    gamma = jnp.clip(prev.gamma - step, FTP_EPS, jnp.max(n))
    first = t == 1
    gamma = jnp.where(first, FTP_EPS, gamma)
    m, v = jnp.where(first, 0.0, m), jnp.where(first, 0.0, v)
    projected = theta0 + jnp.clip(gamma / n, 0.0, 1.0) * c
    return projected - theta, FTPTensor(gamma, m, v, c, n)


def trainable_projection(inner: optax.GradientTransformation,
                         k: float = 1.0) -> optax.GradientTransformation:
    """`inner`'s update, projected per tensor into an L1 ball around theta0 whose radius
    is learnt (module doc, FTP)."""
    def init(params):
        def tensor(path, p):
            axes = unit_axes(_name(path), p.ndim)
            zero = jnp.zeros((), jnp.float32)
            norms = jnp.ones([1 if i in axes else d for i, d in enumerate(p.shape)],
                             jnp.float32)
            return FTPTensor(zero, zero, zero, jnp.zeros(p.shape, jnp.float32), norms)
        return FTPState(inner.init(params), jnp.zeros((), jnp.int32), _copy(params),
                        jax.tree_util.tree_map_with_path(tensor, params))

    def update(grads, state, params):
        if params is None:
            raise ValueError("trainable_projection needs the params")
        u, inner_state = inner.update(grads, state.inner, params)
        t = state.count + 1
        paths = jax.tree_util.tree_map_with_path(lambda path, _: _name(path), params)
        is_tensor = lambda x: isinstance(x, FTPTensor)
        pairs = jax.tree.map(
            lambda path, g, v, p, p0, prev: ftp_update(g, v, p, p0, t, prev,
                                                       unit_axes(path, p.ndim), k),
            paths, grads, u, params, state.anchor, state.tensors, is_leaf=is_tensor)
        is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and is_tensor(x[1])
        out = jax.tree.map(lambda pr, v: pr[0].astype(v.dtype), pairs, u, is_leaf=is_pair)
        tensors = jax.tree.map(lambda pr: pr[1], pairs, is_leaf=is_pair)
        return out, FTPState(inner_state, t, state.anchor, tensors)

    return optax.GradientTransformation(init, update)
