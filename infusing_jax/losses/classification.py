"""Cosine classifiers (NormFace, CosFace, ArcFace) and their cross-entropy loss.

Pure functions: the class weights `w` (D, C) and the scale `s` are passed in.
Embeddings `x` (B, D) and the columns of `w` are L2-normalised inside, so the
logits are s * cos(theta_bc), theta_bc the angle between x_b and w_c. The method
(docs/method.md) uses NormFace with a fixed s = 16 on the L2-normalised embedding.

A trainable scale is just another parameter: keep e.g. `log_s` in the params
and call `normface_logits(x, w, jnp.exp(log_s))`; gradients flow to it.
"""
import jax
import jax.numpy as jnp
import optax

KINDS = ("normface", "cosface", "arcface")


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """x / max(||x||, eps) along `axis`, in at least float32; finite gradient at x = 0."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def init_head(rng, dim: int, num_classes: int, dtype=jnp.float32):
    """Bias-free class weights w (dim, num_classes), lecun_uniform like the authors.

    lecun_uniform: w ~ U(-sqrt(3 / dim), sqrt(3 / dim)) (fan_in = dim).
    """
    return jax.nn.initializers.lecun_uniform()(rng, (dim, num_classes), dtype)


def cosine(x, w):
    """cos (B, C) = x_b . w_c / (||x_b|| ||w_c||), x (B, D), w (D, C)."""
    return l2_normalize(x, axis=-1) @ l2_normalize(w, axis=0)


def normface_logits(x, w, scale):
    """NormFace logits (B, C) = s * cos(theta_bc); x (B, D), w (D, C), scale s scalar."""
    return scale * cosine(x, w)


def cosface_logits(x, w, labels, scale, margin):
    """CosFace logits (B, C): s * (cos - m) at the target class y_b, s * cos elsewhere.

    x (B, D), w (D, C), labels (B,) int in [0, C), scale s, margin m.
    """
    cos = cosine(x, w)
    target = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.bool_)
    return scale * jnp.where(target, cos - margin, cos)


ARCFACE_FALLBACKS = ("linear", "none", "easy_margin")


def arcface_logits(x, w, labels, scale, margin, fallback: str = "linear", eps: float = 1e-6):
    """ArcFace logits (B, C): s * phi(theta) at the target class y_b, s * cos elsewhere.

    x (B, D), w (D, C), labels (B,) int in [0, C), scale s, margin m in (0, pi/2).
    cos(theta + m) = cos * cos(m) - sin * sin(m), sin = sqrt(1 - cos^2). It decreases
    with theta only while theta + m <= pi; past that it rises again (a worse match
    would get a larger logit). At the target, by `fallback`:
      'linear' (default, insightface's): phi = cos(theta + m) if theta + m <= pi,
                 else cos - m * sin(m), which keeps phi decreasing and continuous;
      'none' (the authors' code):        phi = cos(theta + m) for every theta;
      'easy_margin':                     phi = cos(theta + m) if cos > 0, else cos.
    d sin / d cos is infinite at |cos| = 1: 1 - cos^2 is clipped to >= eps (1e-6), so
    gradients stay finite (sin >= 1e-3, off by at most 1e-3 * sin(m) when |cos| ~ 1).
    """
    if fallback not in ARCFACE_FALLBACKS:
        raise ValueError(f"arcface fallback {fallback!r}: use one of {ARCFACE_FALLBACKS}")
    cos = cosine(x, w)
    sin = jnp.sqrt(jnp.clip(1.0 - cos * cos, eps, 1.0))
    phi = cos * jnp.cos(margin) - sin * jnp.sin(margin)
    if fallback == "easy_margin":
        phi = jnp.where(cos > 0.0, phi, cos)
    elif fallback == "linear":
        phi = jnp.where(cos > jnp.cos(jnp.pi - margin), phi, cos - margin * jnp.sin(margin))
    target = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.bool_)
    return scale * jnp.where(target, phi, cos)


def cross_entropy(logits, labels):
    """mean_b [ -log softmax(logits_b)[y_b] ]; logits (B, C), labels (B,) int. Scalar."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def cosine_classifier_loss(x, w, labels, kind: str = "normface", scale=16.0, margin: float = 0.0,
                           fallback: str = "linear"):
    """Cross-entropy of a cosine classifier: kind in KINDS; `margin` unused by normface,
    `fallback` by all but arcface.

    x (B, D), w (D, C), labels (B,) int. Scalar.
    """
    if kind == "normface":
        logits = normface_logits(x, w, scale)
    elif kind == "cosface":
        logits = cosface_logits(x, w, labels, scale, margin)
    elif kind == "arcface":
        logits = arcface_logits(x, w, labels, scale, margin, fallback)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return cross_entropy(logits, labels)
