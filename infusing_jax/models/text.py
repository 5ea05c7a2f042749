"""Text tower: big_vision's SigLIP text transformer, OpenAI CLIP's, or TIPS's.

SigLIP: Embed_0 -> + pos_embedding -> bidirectional blocks -> encoder_norm ->
last token -> head (with bias). CLIP: the same with a causal mask, the
end-of-text token (the largest token id, as in OpenAI CLIP) pooled, and a
head without bias. TIPS (Scenic's TextEncoder): Embed_0 x sqrt(width) + a fixed
sinusoid (sin on the first half of the features, cos on the second, timescales
1 to 10^4) -> blocks with ReLU MLPs whose keys at padding (token 0) are masked ->
encoder_norm -> the mean over the tokens that are not padding; no head.
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from infusing_jax.models import transformer


class TextTransformer(nn.Module):
    """tokens (N, L) int -> (embedding (N, out_dim or width), outputs dict).

    outputs: 'pre_norm', 'encoded' (N, L, width); 'pooled' (N, width); 'embedding'.
    """

    vocab_size: int = 32_000
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    pool_type: str = "last"  # 'last' (SigLIP) | 'argmax' (CLIP: the EOT token) | 'first'
    #                          | 'mean' (TIPS: over the tokens that are not padding, id 0)
    posemb: str = "learn"  # 'learn' | 'sinusoid' (TIPS)
    scale_embed: bool = False  # TIPS: token embeddings x sqrt(width)
    causal: bool = False
    out_dim: Optional[int] = None
    head_bias: bool = True
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    scan: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        out = {}
        x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                     param_dtype=self.param_dtype)(tokens)
        n, length, d = x.shape
        if self.scale_embed:
            x = x * np.sqrt(d).astype(np.float32)
        if self.posemb == "sinusoid":
            pos = sinusoid(length, d)
        else:
            pos = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(d)),
                             (1, length, d), self.param_dtype)
        x = x + pos.astype(x.dtype)
        keep = tokens != 0  # (N, L): not padding, for pool 'mean'
        mask = keep[:, None, None, :] if self.pool_type == "mean" else None
        out["pre_norm"], x = transformer.Encoder(
            depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
            act=self.act, ln_eps=self.ln_eps, causal=self.causal, scan=self.scan,
            remat_policy=self.remat_policy, dtype=self.dtype,
            param_dtype=self.param_dtype)(x, mask)
        out["encoded"] = x
        if self.pool_type == "last":
            x = x[:, -1]
        elif self.pool_type == "first":
            x = x[:, 0]
        elif self.pool_type == "argmax":
            x = x[jnp.arange(n), jnp.argmax(tokens, axis=-1)]
        elif self.pool_type == "mean":  # sum over kept tokens / (their count + 1e-8)
            weights = keep[..., None].astype(x.dtype)
            x = jnp.sum(x * weights, axis=1) / (jnp.sum(weights, axis=1) + 1e-8)
        else:
            raise ValueError(f"unknown text pool_type {self.pool_type!r}: use last, argmax, "
                             "first or mean")
        out["pooled"] = x
        if self.out_dim:
            x = nn.Dense(self.out_dim, use_bias=self.head_bias, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="head")(x)
        out["embedding"] = x
        return x, out


def sinusoid(length: int, width: int, max_timescale: float = 10_000.0):
    """(1, length, width) fixed positions (praxis / TIPS): for timescale index i of
    n = width // 2, sin and cos of position * exp(-i log(max_timescale) / max(n - 1, 1)),
    the sines first; a zero column where width is odd."""
    n = width // 2  # in float32 throughout, as TIPS computes it
    increment = jnp.float32(np.log(max_timescale)) / jnp.float32(max(n - 1, 1))
    inv = jnp.exp(jnp.arange(n, dtype=jnp.float32) * -increment)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv[None, :]
    signal = jnp.concatenate([jnp.sin(angles), jnp.cos(angles),
                              jnp.zeros((length, width % 2), jnp.float32)], axis=1)
    return signal[None]
