"""ViT image tower with big_vision's parameter tree (SigLIP), or OpenAI CLIP's layout.

TIPS (Scenic): posemb 'learn_2d', a (1, G, G, W) grid resized bilinearly (with
antialiasing, jax.image.resize) to the patch grid and added to the patches; then
`num_cls` (2) cls tokens, without position, before them; pool 'tok' is token 0.

SigLIP (big_vision): patch conv with bias -> + pos_embedding -> [cls if pool 'tok']
-> blocks -> encoder_norm -> pool ('map' | 'tok' | 'gap') -> [head].
CLIP (OpenAI): patch conv without bias -> cls first -> + pos_embedding (covers
the cls position) -> pre_norm -> blocks -> encoder_norm -> token 0 -> head
(no bias). CLIP's post-LayerNorm on the class token equals `encoder_norm`
applied to every token and then taking token 0, since LayerNorm is per token.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infusing_jax.models import transformer


class VisionTransformer(nn.Module):
    """images (N, H, W, 3) -> (embedding (N, out_dim or width), outputs dict).

    outputs: 'pre_norm' and 'encoded' (N, tokens, width) before / after
    `encoder_norm`; 'pooled' (N, width); 'embedding' (after the optional head).
    """

    patch_size: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    posemb: str = "learn"  # 'learn' | 'sincos2d' | 'learn_2d'
    posemb_grid: Optional[int] = None  # 'learn_2d': the grid G of its (1, G, G, W) table
    num_cls: int = 1  # cls tokens with pool 'tok' (TIPS: 2); token 0 is pooled
    pool_type: str = "map"  # 'map' | 'tok' | 'gap'
    out_dim: Optional[int] = None  # a final Dense 'head' when set
    head_bias: bool = True
    patch_bias: bool = True
    cls_posemb: bool = False  # CLIP: the position embedding also covers the cls token
    pre_norm: bool = False  # CLIP: LayerNorm before the encoder
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    scan: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        out = {}
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                    use_bias=self.patch_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="embedding")(
                        jnp.asarray(images, self.dtype))
        n, h, w, d = x.shape
        x = jnp.reshape(x, [n, h * w, d])
        has_cls = self.pool_type == "tok"
        if has_cls:
            cls = self.param("cls", nn.initializers.zeros, (1, self.num_cls, d),
                             self.param_dtype)
        if has_cls and self.cls_posemb:
            x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]).astype(x.dtype), x], axis=1)
        x = x + self._posemb(x.shape[1], (h, w), d).astype(x.dtype)
        if has_cls and not self.cls_posemb:
            x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]).astype(x.dtype), x], axis=1)
        if self.pre_norm:
            x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="pre_norm")(x)
        out["pre_norm"], x = transformer.Encoder(
            depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
            act=self.act, ln_eps=self.ln_eps, scan=self.scan,
            remat_policy=self.remat_policy, dtype=self.dtype,
            param_dtype=self.param_dtype, name="Transformer")(x)
        out["encoded"] = x
        if self.pool_type == "map":
            x = transformer.MAPHead(self.mlp_dim, self.num_heads, self.act, self.ln_eps,
                                    self.dtype, self.param_dtype)(x)
        elif self.pool_type == "tok":
            x = x[:, 0]
        elif self.pool_type == "gap":
            x = jnp.mean(x, axis=1)
        else:
            raise ValueError(f"unknown pool_type {self.pool_type!r}: use map, tok or gap")
        out["pooled"] = x
        if self.out_dim:
            x = nn.Dense(self.out_dim, use_bias=self.head_bias, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="head")(x)
        out["embedding"] = x
        return x, out

    def _posemb(self, length, grid, width):
        if self.posemb == "learn":
            init = nn.initializers.normal(stddev=1 / np.sqrt(width))
            return self.param("pos_embedding", init, (1, length, width), self.param_dtype)
        if self.posemb == "learn_2d":
            g = self.posemb_grid
            init = nn.initializers.normal(stddev=1 / np.sqrt(width))
            table = self.param("pos_embedding", init, (1, g, g, width), self.param_dtype)
            if (g, g) != tuple(grid):
                table = jax.image.resize(table, (1, *grid, width), "bilinear")
            return jnp.reshape(table, (1, length, width))
        if self.posemb == "sincos2d":
            if self.cls_posemb:
                raise ValueError("posemb 'sincos2d' cannot cover a cls token (cls_posemb)")
            return transformer.posemb_sincos_2d(*grid, width)
        raise ValueError(f"unknown posemb {self.posemb!r}: use learn, sincos2d or learn_2d")
