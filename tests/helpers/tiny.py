"""Tiny models with every parameter random, and random inputs for them."""
import jax
import numpy as np

from infusing_jax import models
from infusing_jax.checkpoints import tree

TEXT_LEN = 8
VOCAB = 100


def tiny_config(family: str, text: bool = True):
    """A 2-block model on 32 px images with 8 px patches and 2 heads per tower.

    SigLIP: width 32 (big_vision's 'mu'); CLIP: width 128, since open_clip
    stores no head count and its CLIP towers always use 64-wide heads.
    """
    cfg = models.model_config(family, "mu/8", 32, "mu" if text else None,
                              vocab_size=VOCAB, seq_len=TEXT_LEN)
    for tower in [cfg.image] + ([cfg.text] if text else []):
        tower.depth = 2
        if family == "clip":
            tower.width, tower.mlp_dim, tower.out_dim = 128, 256, 48
    return cfg


def randomize(params, seed: int = 0, std: float = 0.2):
    """Every leaf random: LayerNorm scales around 1, everything else ~ N(0, std^2)."""
    flat = tree.flatten(params)
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in flat.items():
        noise = rng.normal(0.0, std, v.shape).astype(np.float32)
        out[k] = 1.0 + noise if k.endswith("/scale") else noise
    return tree.unflatten(out)


def random_params(cfg, seed: int = 0, std: float = None):
    """Random params; std defaults to 0.2 * sqrt(32 / width), keeping activations O(1)."""
    std = std or 0.2 * np.sqrt(32 / cfg.image.width)
    return randomize(models.init_params(cfg, jax.random.PRNGKey(seed)), seed, std)


def random_images(n: int, size: int = 32, seed: int = 0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def random_tokens(n: int, family: str, seed: int = 0):
    """Token ids; for CLIP each row ends its text with the EOT id (vocab - 1) then pads with 0."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB - 2, (n, TEXT_LEN)).astype(np.int32)
    if family == "clip":
        for i in range(n):
            end = rng.integers(2, TEXT_LEN)
            tokens[i, end] = VOCAB - 1
            tokens[i, end + 1:] = 0
    return tokens
