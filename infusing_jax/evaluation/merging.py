r"""Post-hoc weight-space methods: image towers made from fine-tuned runs and the
pretrained weights theta0, without training. (WiSE-FT, the line between theta0 and one
run, is wise_ft.py.) Trees are numpy image towers of one structure; every sum is in
float32 and each result leaf takes the first run's dtype.

Model soups (Wortsman et al., ICML 2022), over runs theta_1 .. theta_N:
    uniform   mean_i theta_i
    greedy    the runs sorted by val score, best first; the soup starts as the best and
              takes each next run in turn (one pass) where the soup with it, the
              uniform mean of its runs, scores strictly higher on val

Model Stock (Jang et al., ECCV 2024), per tensor, with updates d_i = theta_i - theta0:
    cos = mean over pairs i < j of <d_i, d_j> / (|d_i| |d_j|)       (0 where a d is 0)
    t   = N cos / (1 + (N - 1) cos)              (two runs: 2 cos / (1 + cos))
    theta = t * mean_i theta_i + (1 - t) * theta0
  cos is clipped at 0: a tensor whose runs moved apart keeps theta0 (t = 0). The
  authors' ratio goes negative there and diverges as cos -> -1 / (N - 1).

LiNeS (Wang et al., ICLR 2025), one run's update tau = theta1 - theta0 scaled by depth:
    theta = theta0 + lambda(l) * tau,   lambda(l) = alpha + beta * (l - 1) / (L - 1)
  for block l = 1 .. L (optim.layer_id's encoderblock_{l-1}); the input side (patch and
  position embeddings, cls, pre-norm) takes block 1's alpha and the output side (the
  final norm, the MAP head or projection) block L's alpha + beta. The authors' single-
  task setting ties beta = 1 - alpha, so the last block keeps its whole update.
  (Their code gives everything outside the blocks alpha, the output side included.)
"""
import itertools
from typing import Callable, Sequence

import jax
import numpy as np

from infusing_jax import errors
from infusing_jax.training import optim


def _check(trees: Sequence, what: str) -> None:
    first = jax.tree.structure(trees[0])
    for tree in trees[1:]:
        if jax.tree.structure(tree) != first:
            raise errors.UserError(f"{what}: the runs' image towers differ in structure; "
                                   "give runs of the same model")
        for a, b in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(tree)):
            if np.shape(a) != np.shape(b):
                raise errors.UserError(f"{what}: the runs' image towers differ in shape "
                                       f"({np.shape(a)} and {np.shape(b)}); give runs of the "
                                       "same model at the same image size")


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def uniform_soup(runs: Sequence):
    """mean_i theta_i, leafwise."""
    _check(runs, "uniform soup")
    return jax.tree.map(lambda *xs: np.mean([_f32(x) for x in xs], axis=0).astype(
        np.asarray(xs[0]).dtype), *runs)


def greedy_soup(runs: Sequence, score: Callable, scores: Sequence[float] = None):
    """-> (soup, indices of the runs in it, its val score). score(tree) -> float, higher
    is better; scores: the runs' own, where already known (else score(run) each)."""
    _check(runs, "greedy soup")
    scores = [score(r) for r in runs] if scores is None else list(scores)
    order = sorted(range(len(runs)), key=lambda i: -scores[i])
    kept, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        candidate = uniform_soup([runs[j] for j in kept + [i]])
        value = score(candidate)
        if value > best:
            kept, best = kept + [i], value
    return uniform_soup([runs[j] for j in kept]), kept, best


def stock_ratio(pretrained, runs: Sequence) -> np.ndarray:
    """t for one tensor (module doc): pretrained and each run's values of it."""
    deltas = [(_f32(r) - _f32(pretrained)).ravel() for r in runs]
    cosines = []
    for a, b in itertools.combinations(deltas, 2):
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        cosines.append(float(a @ b) / norm if norm > 0 else 0.0)
    cos = max(float(np.mean(cosines)), 0.0)
    n = len(runs)
    return n * cos / (1 + (n - 1) * cos)


def model_stock(pretrained, runs: Sequence):
    """-> (merged tree, {tensor path: t}): Model Stock over >= 2 runs (module doc)."""
    if len(runs) < 2:
        raise errors.UserError(f"Model Stock needs >= 2 fine-tuned runs, got {len(runs)}")
    _check([pretrained, *runs], "Model Stock")
    ratios = {}

    def merge(path, p0, *xs):
        t = stock_ratio(p0, xs)
        ratios["/".join(str(getattr(k, "key", k)) for k in path)] = t
        mean = np.mean([_f32(x) for x in xs], axis=0)
        return (t * mean + (1 - t) * _f32(p0)).astype(np.asarray(xs[0]).dtype)
    merged = jax.tree_util.tree_map_with_path(merge, pretrained, *runs)
    return merged, ratios


def lines_scale(path, shape, depth: int, alpha: float, beta: float):
    """lambda(l) for the leaf at `path` (module doc) of a tower with `depth` blocks: a
    float, or for the scanned layout's stacked blocks (depth, 1, ...) one per block."""
    def at(block):
        return alpha + beta * (block - 1) / max(depth - 1, 1)
    names = [str(getattr(k, "key", k)) for k in path]
    if len(names) > 1 and names[:2] == ["Transformer", "encoderblock"]:
        return at(np.arange(1, depth + 1, dtype=np.float32)).reshape(
            (depth,) + (1,) * (len(shape) - 1))
    layer = optim.layer_id(path, depth)  # 0: input side, 1..depth: blocks, depth + 1: output
    return at(min(max(layer, 1), depth))


def lines(pretrained, finetuned, depth: int, alpha: float, beta: float = None):
    """theta0 + lambda(l) (theta1 - theta0) leafwise; beta None: 1 - alpha (module doc)."""
    beta = 1.0 - alpha if beta is None else beta
    _check([pretrained, finetuned], "LiNeS")

    def scaled(path, p0, p1):
        lam = lines_scale(path, np.shape(p0), depth, alpha, beta)
        return (_f32(p0) + lam * (_f32(p1) - _f32(p0))).astype(np.asarray(p1).dtype)
    return jax.tree_util.tree_map_with_path(scaled, pretrained, finetuned)
