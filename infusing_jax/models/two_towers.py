"""The two-tower model: image tower `img`, text tower `txt`, log-scale `t`, bias `b`.

Parameter tree as big_vision's `two_towers` (SigLIP): {'img', 'txt', 't', 'b'}.
CLIP has no `b`. TIPS has a scalar 'temperature' instead of 't' (logits =
similarity / temperature), as its files store it. An image-only model has only 'img'.
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from infusing_jax.models import text as text_lib
from infusing_jax.models import transformer
from infusing_jax.models import vit


class TwoTowers(nn.Module):
    """(images (N, H, W, 3), tokens (M, L)) -> (zimg (N, E), ztxt (M, E), outputs).

    zimg, ztxt are L2-normalised (x / (||x|| + 1e-8)). With both inputs,
    outputs['logits'] = zimg @ ztxt.T * exp(t) + b, shape (N, M).
    Either input may be None; `text` None builds an image-only model.
    """

    image: dict
    text: Optional[dict] = None
    logit_bias: bool = True  # SigLIP's learned b; CLIP has none
    temperature: bool = False  # TIPS: a 'temperature' () in place of the log-scale 't'
    t_init: float = float(np.log(10.0))
    b_init: float = -10.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.img = vit.VisionTransformer(**self.image, **common)
        if self.text is not None:
            self.txt = text_lib.TextTransformer(**self.text, **common)
            if self.temperature:
                self.temp = self.param("temperature", nn.initializers.constant(
                    np.exp(-self.t_init)), (), self.param_dtype)
            else:
                self.t = self.param("t", nn.initializers.constant(self.t_init), (1,),
                                    self.param_dtype)
            if self.logit_bias:
                self.b = self.param("b", nn.initializers.constant(self.b_init), (1,),
                                    self.param_dtype)

    def __call__(self, images=None, tokens=None):
        out, zimg, ztxt = {}, None, None
        if images is not None:
            zimg, out["img"] = self.img(images)
            zimg = transformer.l2_normalize(zimg)
        if tokens is not None:
            if self.text is None:
                raise ValueError("this model has no text tower (image-only checkpoint)")
            ztxt, out["txt"] = self.txt(tokens)
            ztxt = transformer.l2_normalize(ztxt)
        if zimg is not None and ztxt is not None:
            scale = 1 / self.temp if self.temperature else jnp.exp(self.t)
            logits = zimg @ ztxt.T * scale
            out["logits"] = logits + self.b if self.logit_bias else logits
        return zimg, ztxt, out

    def encode_images(self, images):
        """images (N, H, W, 3) -> L2-normalised embeddings (N, E)."""
        return self(images=images)[0]

    def encode_texts(self, tokens):
        """tokens (M, L) -> L2-normalised embeddings (M, E)."""
        return self(tokens=tokens)[1]


def logit_scale(params) -> float:
    """The multiplier of a two-tower model's similarities: exp(t), or 1 / temperature."""
    if "temperature" in params:
        return float(1 / np.asarray(params["temperature"]).reshape(()))
    return float(np.exp(np.asarray(params["t"]).reshape(())))
