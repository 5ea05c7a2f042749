"""Text tower: big_vision's SigLIP text transformer, or OpenAI CLIP's.

SigLIP: Embed_0 -> + pos_embedding -> bidirectional blocks -> encoder_norm ->
last token -> head (with bias). CLIP: the same with a causal mask, the
end-of-text token (the largest token id, as in OpenAI CLIP) pooled, and a
head without bias.
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
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(d)),
                         (1, length, d), self.param_dtype)
        x = x + pos.astype(x.dtype)
        out["pre_norm"], x = transformer.Encoder(
            depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
            act=self.act, ln_eps=self.ln_eps, causal=self.causal, scan=self.scan,
            remat_policy=self.remat_policy, dtype=self.dtype,
            param_dtype=self.param_dtype)(x)
        out["encoded"] = x
        if self.pool_type == "last":
            x = x[:, -1]
        elif self.pool_type == "first":
            x = x[:, 0]
        elif self.pool_type == "argmax":
            x = x[jnp.arange(n), jnp.argmax(tokens, axis=-1)]
        else:
            raise ValueError(f"unknown text pool_type {self.pool_type!r}: use last, argmax or first")
        out["pooled"] = x
        if self.out_dim:
            x = nn.Dense(self.out_dim, use_bias=self.head_bias, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="head")(x)
        out["embedding"] = x
        return x, out
