"""Knowledge-retention losses for fine-tuning: keep what the pretrained model knew.

Parameter terms (pull the weights theta towards the pretrained theta0):
  anchoring  sum_t mean((theta_t - theta0_t)^2)   the authors' term (or a plain sum)
  ewc        sum_t sum(F_t * (theta_t - theta0_t)^2), F = diagonal empirical Fisher
Feature terms (pull the student embedding f towards the frozen teacher's f0):
  feature_mse, feature_cosine, relational (batch Gram matrices), logit_kl, lipsum
  (the gap in the features' energies against texts of random tokens).

Parameters are nested dicts as Flax makes them; a tensor is named by its
'/'-joined path, e.g. 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'.
The reference values theta0, F, f0 and the teacher logits are constants: every
function stops gradients into them. Loss weights (lambda) are the caller's.
"""
from functools import partial
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

Predicate = Callable[[str], bool]


# ----------------------------------------------------------------------------
# Parameter-space terms
# ----------------------------------------------------------------------------

def exclude_prefixes(*prefixes: str) -> Predicate:
    """A predicate on '/'-joined paths: False under any of `prefixes`, True elsewhere.

    Prefixes match whole path segments: 'head' excludes 'head' and 'head/kernel',
    not 'header/kernel'. E.g. anchoring(p, p0, include=exclude_prefixes('head')).
    """
    prefixes = tuple(p.rstrip("/") for p in prefixes)

    def include(path: str) -> bool:
        return not any(path == p or path.startswith(p + "/") for p in prefixes)

    return include


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def _included(include: Optional[Predicate], params, **refs) -> list:
    """[(path, param, *ref leaves)] over the included paths, sorted; refs must match params there."""
    include = include or (lambda path: True)
    flat = {k: v for k, v in _flat(params).items() if include(k)}
    flat_refs = {}
    for name, tree in refs.items():
        flat_refs[name] = {k: v for k, v in _flat(tree).items() if include(k)}
        if flat_refs[name].keys() != flat.keys():
            missing = sorted(flat.keys() - flat_refs[name].keys())[:5]
            extra = sorted(flat_refs[name].keys() - flat.keys())[:5]
            raise ValueError(f"{name} does not match params on the included paths: "
                             f"missing {missing}, extra {extra}")
    return [(k, flat[k], *(r[k] for r in flat_refs.values())) for k in sorted(flat)]


def _wide(x: jnp.ndarray) -> jnp.ndarray:
    """x in at least float32 (bfloat16 -> float32; float64 stays)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _is_scan_stacked(path: str) -> bool:
    """big_vision's scan layout: one 'encoderblock' whose tensors have a leading depth axis."""
    return "encoderblock" in path.split("/")


def _mean_per_tensor(path: str, sq: jnp.ndarray) -> jnp.ndarray:
    """mean(sq); a scan-stacked tensor counts as `depth` tensors (sum of per-block means)."""
    if _is_scan_stacked(path) and sq.ndim > 0:
        return jnp.sum(jnp.mean(sq.reshape(sq.shape[0], -1), axis=1))
    return jnp.mean(sq)


def anchoring(params, anchor, reduction: str = "mean_per_tensor",
              include: Optional[Predicate] = None) -> jnp.ndarray:
    """Parameter anchoring to the pretrained weights; a scalar (>= float32).

    'mean_per_tensor' (the authors' term): sum_t mean((theta_t - theta0_t)^2).
    'sum': sum_t sum((theta_t - theta0_t)^2) = ||theta - theta0||^2.
    t runs over the tensors whose '/'-joined path passes `include` (default:
    all; the caller excludes heads with exclude_prefixes). Differences are taken
    in at least float32. A tensor in big_vision's scan layout (path segment
    'encoderblock', leading depth axis) counts as one tensor per block, so the
    value is the same in the scan and unrolled layouts. Exactly 0 at
    params == anchor; no gradient flows into `anchor`.
    """
    if reduction not in ("mean_per_tensor", "sum"):
        raise ValueError(f"anchoring: unknown reduction {reduction!r}; use 'mean_per_tensor' or 'sum'")
    anchor = jax.lax.stop_gradient(anchor)
    total = jnp.zeros((), jnp.float32)
    for path, p, a in _included(include, params, anchor=anchor):
        sq = jnp.square(_wide(p) - _wide(a))
        total += _mean_per_tensor(path, sq) if reduction == "mean_per_tensor" else jnp.sum(sq)
    return total


def ewc(params, anchor, fisher, include: Optional[Predicate] = None) -> jnp.ndarray:
    """Elastic weight consolidation: sum_t sum(F_t * (theta_t - theta0_t)^2); a scalar.

    `fisher` has the tree structure of `params` (e.g. from estimate_fisher);
    `include` as in anchoring. With F == 1 this is anchoring(..., 'sum').
    No gradient flows into `anchor` or `fisher`.
    """
    anchor, fisher = jax.lax.stop_gradient((anchor, fisher))
    total = jnp.zeros((), jnp.float32)
    for _, p, a, f in _included(include, params, anchor=anchor, fisher=fisher):
        sq = jnp.square(_wide(p) - _wide(a))
        total += jnp.sum(_wide(f) * sq)
    return total


def _leading_size(batch) -> int:
    sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"estimate_fisher: batch leaves disagree on the example axis: {sizes}")
    return sizes.pop()


def _sq_grad_of_batch(loss_fn, params, batch):
    """(g^2, 1) with g = grad of the scalar loss_fn(params, batch)."""
    g = jax.grad(loss_fn)(params, batch)
    return jax.tree_util.tree_map(lambda x: jnp.square(_wide(x)), g), 1


def _sq_grads_per_example(loss_fn, params, batch, chunk_size: int):
    """(sum_i g_i^2, B), g_i = grad of loss_fn(params, example i as a batch of one)[0].

    Examples are vmapped `chunk_size` at a time (memory: chunk_size copies of the
    gradient), chunks run in a lax.scan; the last chunk is padded with copies of
    example 0 at weight 0.
    """
    n = _leading_size(batch)
    chunk = max(1, min(chunk_size, n))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n

    def to_chunks(x):
        x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x
        return x.reshape((n_chunks, chunk) + x.shape[1:])

    chunks = jax.tree_util.tree_map(to_chunks, batch)
    weights = (jnp.arange(n_chunks * chunk) < n).astype(jnp.float32).reshape(n_chunks, chunk)

    def sq_grad(example, w):
        one = jax.tree_util.tree_map(lambda x: x[None], example)
        g = jax.grad(lambda p: loss_fn(p, one)[0])(params)
        return jax.tree_util.tree_map(lambda x: w * jnp.square(_wide(x)), g)

    def body(acc, xs):
        sq = jax.vmap(sq_grad)(*xs)
        return jax.tree_util.tree_map(lambda a, s: a + jnp.sum(s, axis=0), acc, sq), None

    acc = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, _wide(p).dtype), params)
    acc, _ = jax.lax.scan(body, acc, (chunks, weights))
    return acc, n


def estimate_fisher(loss_fn: Callable, params, batches: Iterable, chunk_size: int = 8):
    """Diagonal empirical Fisher: mean of squared gradients; a tree like `params` (>= float32).

    loss_fn(params, batch) -> per-example losses (B,) or a scalar; every leaf of
    a batch has the example axis first.
    - Per-example losses (B,) (recommended): F = 1/N sum_i (d loss_i / d theta)^2
      over all N examples of all batches. Each example is run as a batch of one
      (vmapped, `chunk_size` at a time, inside one jit), so loss_i must not
      depend on the other examples (true for a ViT; not for BatchNorm or
      in-batch contrastive losses). This is the empirical Fisher proper: the
      square of a batch-mean gradient is a different, smaller quantity
      ((1/B sum_i g_i)^2 mostly cancels the per-example spread).
    - A scalar loss: F = 1/K sum_k (d loss(batch_k) / d theta)^2 over the K
      batches; the per-example Fisher only when every batch holds one example.
    Caution: at theta0 a loss that is minimised there (e.g. feature distillation
    to the same model on the same views) has zero gradient, hence F == 0.
    """
    total, count, step = None, 0, None
    for batch in batches:
        if step is None:
            out = jax.eval_shape(loss_fn, params, batch)
            if out.ndim == 1:
                step = jax.jit(partial(_sq_grads_per_example, loss_fn, chunk_size=chunk_size))
            elif out.ndim == 0:
                step = jax.jit(partial(_sq_grad_of_batch, loss_fn))
            else:
                raise ValueError(f"estimate_fisher: loss_fn must return a scalar or (B,), got {out.shape}")
        sq, n = step(params, batch)
        total = sq if total is None else jax.tree_util.tree_map(jnp.add, total, sq)
        count += int(n)
    if total is None:
        raise ValueError("estimate_fisher: no batches")
    return jax.tree_util.tree_map(lambda s: s / count, total)


# ----------------------------------------------------------------------------
# Feature-space terms (student f, frozen teacher f0)
# ----------------------------------------------------------------------------

def _masked_mean(values: jnp.ndarray, mask: Optional[jnp.ndarray]) -> jnp.ndarray:
    """Mean of `values` (B,) over mask-true rows; 0 (finite gradients) when none is."""
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(bool)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(values.dtype)


def _teacher(f0: jnp.ndarray, mask: Optional[jnp.ndarray]) -> jnp.ndarray:
    """stop_gradient(f0), masked-out rows zeroed (a NaN placeholder cannot leak in)."""
    f0 = jax.lax.stop_gradient(f0)
    if mask is None:
        return f0
    return jnp.where(mask.astype(bool).reshape((-1,) + (1,) * (f0.ndim - 1)), f0, 0.0)


def _l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    """x / max(||x||, eps) along the last axis; finite gradients at x == 0."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def feature_mse(f: jnp.ndarray, f0: jnp.ndarray, mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Feature distillation (the authors'): mean_b( mean_d( (f[b,d] - f0[b,d])^2 ) ).

    f, f0: (B, D) student and teacher embeddings; mask: optional (B,) bool, the
    mean is over rows with mask true (0 if none). No gradient into f0.
    """
    f0 = _teacher(f0, mask)
    return _masked_mean(jnp.mean(jnp.square(f - f0), axis=-1), mask)


def lipsum(f: jnp.ndarray, f0: jnp.ndarray, texts: jnp.ndarray,
           mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Lipsum-FT's energy gap: mean_b( (1/(2K)) sum_k (<f[b], t_k> - <f0[b], t_k>)^2 ).

    f, f0: (B, D) student and teacher image embeddings (L2-normalised); texts: (K, D)
    the frozen text tower's embeddings of K random token sequences; mask as in
    feature_mse. No gradient into f0 or the texts.
    """
    f0 = _teacher(f0, mask)
    gap = (f - f0) @ jax.lax.stop_gradient(texts).T.astype(f.dtype)
    return _masked_mean(0.5 * jnp.mean(jnp.square(gap), axis=-1), mask)


def feature_cosine(f: jnp.ndarray, f0: jnp.ndarray, mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """mean_b( 1 - cos(f[b], f0[b]) ), in [0, 2].

    f, f0: (B, D); cos(u, v) = <u, v> / (max(||u||, eps) max(||v||, eps)).
    mask: optional (B,) bool as in feature_mse. No gradient into f0.
    """
    f0 = _teacher(f0, mask)
    cos = jnp.sum(_l2_normalize(f) * _l2_normalize(f0), axis=-1)
    return _masked_mean(1.0 - cos, mask)


def relational(f: jnp.ndarray, f0: jnp.ndarray, mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Similarity distillation: mean_{i,j} (G[i,j] - G0[i,j])^2 over the (B, B) Gram matrices.

    G = n(f) n(f)^T, G0 = n(f0) n(f0)^T, n = row-wise L2 normalisation; f, f0:
    (B, D). mask: optional (B,) bool; the mean is over pairs (i, j) with both
    rows masked in (0 if none). No gradient into f0.
    """
    f0 = _teacher(f0, mask)
    n, n0 = _l2_normalize(f), _l2_normalize(f0)
    sq = jnp.square(n @ n.T - n0 @ n0.T)
    if mask is None:
        return jnp.mean(sq)
    pair = mask.astype(bool)[:, None] & mask.astype(bool)[None, :]
    return jnp.sum(jnp.where(pair, sq, 0.0)) / jnp.maximum(jnp.sum(pair), 1).astype(sq.dtype)


def logit_kl(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
             student_temperature: float = 1.0, teacher_temperature: float = 1.0,
             scale_by_t2: bool = True, mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Logit distillation: c * mean_b KL( softmax(t_b / T_t) || softmax(s_b / T_s) ).

    student_logits, teacher_logits: (B, C); KL(p || q) = sum_c p_c (log p_c - log q_c).
    T_s, T_t: the student's and the teacher's temperatures (the authors' code takes
    them apart). c = T_s * T_t with scale_by_t2 (Hinton et al.'s T^2 when they are
    equal: it keeps gradient sizes comparable across T), else 1 (the authors').
    mask: optional (B,) bool as in feature_mse. No gradient into the teacher.
    """
    teacher_logits = _teacher(teacher_logits, mask)
    log_q = jax.nn.log_softmax(student_logits / student_temperature, axis=-1)
    p = jax.nn.softmax(teacher_logits / teacher_temperature, axis=-1)
    kl = optax.losses.kl_divergence(log_q, p)
    scale = student_temperature * teacher_temperature if scale_by_t2 else 1.0
    return scale * _masked_mean(kl, mask)
