"""Transformer pieces shared by the image and text towers.

Parameter names follow big_vision (`encoderblock_{i}/LayerNorm_0`,
`MultiHeadDotProductAttention_0`, `MlpBlock_0/Dense_0`, `encoder_norm`,
`MAPHead_0/probe`), so big_vision checkpoints load unchanged.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infusing_jax import errors

ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # big_vision / SigLIP
    "gelu": lambda x: nn.gelu(x, approximate=False),  # exact erf GELU
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "relu": nn.relu,  # TIPS's text tower
}

# The MLP kind that is not an activation: MlpBlock's gated SwiGLU.
SWIGLU = "swiglu"

# Width, depth, MLP width and heads of the named big_vision variants.
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "G-opt": (1536, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}


def decode_variant(variant: str) -> dict:
    """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
    name, _, patch = variant.partition("/")
    if name not in VARIANTS:
        raise errors.UserError(f"unknown model variant {variant!r}; known: {sorted(VARIANTS)}")
    width, depth, mlp_dim, num_heads = VARIANTS[name]
    out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    if patch:
        out["patch_size"] = int(patch)
    return out


class MlpBlock(nn.Module):
    """Dense(mlp_dim) -> activation -> Dense(D), on (..., D).

    act 'swiglu' (TIPS g/14, DINOv2's SwiGLU): silu(x W0 + b0) * (x W1 + b1) -> Dense(D),
    the three Dense layers Dense_0, Dense_1, Dense_2; mlp_dim is the gated width.
    """

    mlp_dim: int
    act: str = "gelu_tanh"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda n: nn.Dense(
            n, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6))
        d = x.shape[-1]
        if self.act == SWIGLU:
            gate = nn.silu(dense(self.mlp_dim)(x))
            value = dense(self.mlp_dim)(x)
            return dense(d)(gate * value)
        x = dense(self.mlp_dim)(x)
        x = ACTIVATIONS[self.act](x)
        return dense(d)(x)


def heads_major_attention(query, key, value, mask=None, dropout_rate=0.0, precision=None,
                          force_fp32_for_softmax=False, module=None):
    """softmax(q k^T / sqrt(d), masked) v: (..., Lq, H, d), (..., Lk, H, d) x2 -> (..., Lq, H, d).

    flax's `dot_product_attention` (no dropout), with the products taken on
    (..., H, L, d) copies of q, k, v: for the heads-minor einsums XLA:CPU lays keys
    and values out as (..., H, d, L), and the attention then runs ~1.7x slower
    (~2% of a B/16 train step). `mask`: broadcastable to (..., H, Lq, Lk), True = keep;
    `module` (flax passes it with sow_weights=True) sows the attention weights.
    """
    if dropout_rate:
        raise ValueError("heads_major_attention has no dropout; the towers use none")
    q, k, v = (jnp.swapaxes(t, -3, -2) for t in (query, key, value))
    q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    logits = jnp.einsum("...hqd,...hkd->...hqk", q, k, precision=precision)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    if force_fp32_for_softmax:
        logits = logits.astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1)
    if module is not None:
        module.sow("intermediates", "attention_weights", weights)
    out = jnp.einsum("...hqk,...hkd->...hqd", weights, v, precision=precision)
    return jnp.swapaxes(out, -3, -2)


def _attention(num_heads, dtype, param_dtype):
    return nn.MultiHeadDotProductAttention(
        num_heads=num_heads, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), deterministic=True,
        attention_fn=heads_major_attention)


class Encoder1DBlock(nn.Module):
    """Pre-LN block: x + MHA(LN_0(x)); x + Mlp(LN_1(x)). x: (N, L, D)."""

    mlp_dim: int
    num_heads: int
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    causal: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        """mask: None, or (N, 1, 1, L) True where a key may be attended to."""
        if self.causal:
            mask = nn.make_causal_mask(x[..., 0])
        ln = lambda: nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        y = ln()(x)
        x = x + _attention(self.num_heads, self.dtype, self.param_dtype)(y, y, mask=mask)
        y = ln()(x)
        x = x + MlpBlock(self.mlp_dim, self.act, self.dtype, self.param_dtype)(y)
        return x, None


class Encoder(nn.Module):
    """`depth` blocks then `encoder_norm`. x: (N, L, D) -> (pre_norm, normed), both (N, L, D).

    mask: None or (N, 1, 1, L), the keys each query may attend to (padding masked).

    With `scan`, the blocks are one `encoderblock` module whose parameters have a
    leading depth axis (big_vision's scan layout); otherwise `encoderblock_{i}`.
    `remat_policy` names a `jax.checkpoint_policies` member, or 'none' for no remat.
    """

    depth: int
    mlp_dim: int
    num_heads: int
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    causal: bool = False
    scan: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        block_cls = Encoder1DBlock
        if self.remat_policy != "none":
            policy = getattr(jax.checkpoint_policies, self.remat_policy)
            block_cls = nn.remat(Encoder1DBlock, prevent_cse=not self.scan, policy=policy)
        kwargs = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, act=self.act,
                      ln_eps=self.ln_eps, causal=self.causal, dtype=self.dtype,
                      param_dtype=self.param_dtype)
        if self.scan:
            blocks = nn.scan(block_cls, variable_axes={"params": 0},
                             split_rngs={"params": True}, in_axes=nn.broadcast,
                             length=self.depth)
            x, _ = blocks(name="encoderblock", **kwargs)(x, mask)
        else:
            for i in range(self.depth):
                x, _ = block_cls(name=f"encoderblock_{i}", **kwargs)(x, mask)
        normed = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="encoder_norm")(x)
        return x, normed


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends to x (N, L, D) -> (N, D)."""

    mlp_dim: int
    num_heads: int
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, _, d = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d),
                           self.param_dtype)
        probe = jnp.tile(probe, [n, 1, 1]).astype(x.dtype)
        x = _attention(self.num_heads, self.dtype, self.param_dtype)(probe, x)
        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype,
                         param_dtype=self.param_dtype)(x)
        x = x + MlpBlock(self.mlp_dim, self.act, self.dtype, self.param_dtype)(y)
        return x[:, 0]


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0):
    """Fixed 2D sin-cos position embedding (big_vision), shape (1, h * w, width)."""
    if width % 4:
        raise ValueError(f"sincos2d position embedding needs width % 4 == 0, got {width}")
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / (width // 4 - 1)
    omega = 1.0 / (temperature ** omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(pe, jnp.float32)[None]


def l2_normalize(x, axis: int = -1, eps: float = 1e-8):
    """x / (||x|| + eps), the two-tower convention of big_vision."""
    return x / (jnp.linalg.norm(x, axis=axis, keepdims=True) + eps)


def dtype_of(name: Optional[str]):
    """'float32' | 'bfloat16' -> jnp dtype."""
    return jnp.dtype(name or "float32")
