"""Metric-learning losses on a batch of embeddings x (B, D) with labels (B,).

Pure, jit-able functions with fixed shapes: pairs are selected by masks, never by
boolean indexing. Embeddings are L2-normalised inside, x^_i = x_i / ||x_i||, and
S_ij = x^_i . x^_j is the cosine similarity. Positives of anchor i: j != i with
y_j = y_i; negatives: y_j != y_i. A batch with no positive pair gives a loss of 0
with finite (zero) gradients in supcon, multi_similarity and triplet_batch_hard.
Each function returns a scalar.

mask (B,) bool, optional: the rows that take part (one domain's examples in a
mixed batch). Rows outside it are neither anchors, positives, negatives nor
in any denominator, so the loss equals the loss on the masked rows alone.
"""
import jax
import jax.numpy as jnp

from infusing_jax.losses.classification import l2_normalize

# A masked logit: exp(_MASKED - anything finite) == 0, and gradients stay finite
# (unlike -inf, which gives NaN when a whole row is masked).
_MASKED = -1e9


def _rows(labels, mask):
    """(B,) bool: the rows that take part (all without a mask)."""
    return jnp.ones(labels.shape[0], bool) if mask is None else mask.astype(bool)


def _pairs(labels, mask=None):
    """Masks (B, B) over the rows in `mask`: pos = same label and not self, neg =
    different label."""
    rows = _rows(labels, mask)
    both = rows[:, None] & rows[None, :]
    same = labels[:, None] == labels[None, :]
    return same & ~jnp.eye(labels.shape[0], dtype=bool) & both, ~same & both


def _log1p_sum_exp(a, mask, axis):
    """log(1 + sum_{mask} exp(a)) along `axis`; 0 where the mask is empty."""
    return jax.nn.softplus(jax.nn.logsumexp(jnp.where(mask, a, _MASKED), axis=axis))


def _safe_sqrt(a, eps: float = 1e-12):
    """sqrt(a) for a >= 0, with value and gradient 0 for a <= eps."""
    ok = a > eps
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, a, 1.0)), 0.0)


def supcon(x, labels, temperature: float = 0.1, mask=None):
    """Supervised contrastive loss (Khosla et al. 2020, L^sup_out).

    x (B, D), labels (B,), mask (B,) optional. With P(i) the positives of i and
    A(i) = {j != i} (within the mask):
      l_i = -1/|P(i)| sum_{p in P(i)} log( exp(S_ip / t) / sum_{a in A(i)} exp(S_ia / t) ),
    loss = mean of l_i over the anchors with |P(i)| > 0 (others excluded); 0 if none.
    """
    z = l2_normalize(x)
    pos, _ = _pairs(labels, mask)
    rows = _rows(labels, mask)
    others = rows[None, :] & ~jnp.eye(z.shape[0], dtype=bool)  # A(i)
    logits = jnp.where(others, z @ z.T / temperature, _MASKED)
    log_prob = jax.nn.log_softmax(logits, axis=1)
    num_pos = pos.sum(axis=1)
    per_anchor = -jnp.where(pos, log_prob, 0.0).sum(axis=1) / jnp.maximum(num_pos, 1)
    has_pos = num_pos > 0
    return jnp.where(has_pos, per_anchor, 0.0).sum() / jnp.maximum(has_pos.sum(), 1)


def multi_similarity(x, labels, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                     epsilon: float | None = 0.1, mask=None):
    """Multi-similarity loss with its pair mining (Wang et al. 2019).

    x (B, D), labels (B,). Mining (epsilon not None; no gradient through it) keeps
      positive j of i if S_ij - epsilon < max_{k neg of i} S_ik,
      negative j of i if S_ij + epsilon > min_{k pos of i} S_ik,
    (an anchor with no positives keeps no pairs). With P_i, N_i the kept pairs:
      l_i = 1/alpha log(1 + sum_{P_i} exp(-alpha (S_ij - base)))
          + 1/beta  log(1 + sum_{N_i} exp( beta (S_ij - base))),
    loss = mean_i l_i over all B anchors (empty sets contribute 0), or over the
    masked rows with a mask (B,).
    epsilon=None: no mining, every positive and negative pair is kept.
    """
    z = l2_normalize(x)
    sim = z @ z.T
    pos, neg = _pairs(labels, mask)
    rows = _rows(labels, mask)
    if epsilon is not None:
        s = jax.lax.stop_gradient(sim)
        hardest_neg = jnp.max(jnp.where(neg, s, -jnp.inf), axis=1, keepdims=True)
        hardest_pos = jnp.min(jnp.where(pos, s, jnp.inf), axis=1, keepdims=True)
        pos = pos & (s - epsilon < hardest_neg)
        neg = neg & (s + epsilon > hardest_pos)
    pos_term = _log1p_sum_exp(-alpha * (sim - base), pos, axis=1) / alpha
    neg_term = _log1p_sum_exp(beta * (sim - base), neg, axis=1) / beta
    return jnp.where(rows, pos_term + neg_term, 0.0).sum() / jnp.maximum(rows.sum(), 1)


def triplet_batch_hard(x, labels, margin: float = 0.1, distance: str = "euclidean",
                       mask=None):
    """Batch-hard triplet loss (Hermans et al. 2017) on L2-normalised embeddings.

    x (B, D), labels (B,), mask (B,) optional. distance: "euclidean" d_ij = ||x^_i - x^_j|| = sqrt(2 - 2 S_ij),
    or "cosine" d_ij = 1 - S_ij. Per anchor i with a positive and a negative:
      l_i = max(0, margin + max_{p pos of i} d_ip - min_{n neg of i} d_in),
    loss = mean of l_i over those anchors (others excluded); 0 if there are none.
    """
    z = l2_normalize(x)
    sim = z @ z.T
    if distance == "euclidean":
        dist = _safe_sqrt(jnp.maximum(2.0 - 2.0 * sim, 0.0))
    elif distance == "cosine":
        dist = 1.0 - sim
    else:
        raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
    pos, neg = _pairs(labels, mask)
    valid = pos.any(axis=1) & neg.any(axis=1)
    d_ap = jnp.where(valid, jnp.max(jnp.where(pos, dist, -jnp.inf), axis=1), 0.0)
    d_an = jnp.where(valid, jnp.min(jnp.where(neg, dist, jnp.inf), axis=1), 0.0)
    per_anchor = jax.nn.relu(margin + d_ap - d_an)
    return jnp.where(valid, per_anchor, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def proxy_anchor(x, labels, proxies, alpha: float = 32.0, delta: float = 0.1, mask=None):
    """Proxy-anchor loss (Kim et al. 2020); proxies (C, D) are a trainable parameter.

    x (B, D), labels (B,) int in [0, C), mask (B,) optional. s(x, p) = cosine of
    example and proxy. With X_p+ / X_p- the batch examples (in the mask) of / not
    of proxy p's class, and P+ the proxies with at least one positive in the batch:
      loss = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
           + 1/C    sum_{p}       log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta))).
    """
    sim = l2_normalize(x) @ l2_normalize(proxies).T
    rows = _rows(labels, mask)[:, None]
    one_hot = jax.nn.one_hot(labels, proxies.shape[0], dtype=jnp.bool_)
    pos, neg = one_hot & rows, ~one_hot & rows
    pos_term = _log1p_sum_exp(-alpha * (sim - delta), pos, axis=0)
    neg_term = _log1p_sum_exp(alpha * (sim + delta), neg, axis=0)
    num_with_pos = pos.any(axis=0).sum()
    return pos_term.sum() / jnp.maximum(num_with_pos, 1) + neg_term.mean()
