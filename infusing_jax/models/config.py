"""Model configs: a family (siglip | clip | tips), tower sizes, dtypes; and `build`.

A model config is an ml_collections ConfigDict:
  family: 'siglip' | 'clip' | 'tips'
  image_size: int, the resolution the position embedding was trained at
  image: patch_size, width, depth, mlp_dim, num_heads, posemb, pool_type, out_dim
    (TIPS: posemb 'learn_2d' with posemb_grid, num_cls 2; act 'swiglu' for g/14)
  text: vocab_size, seq_len, width, depth, mlp_dim, num_heads, out_dim; or None
  dtype, param_dtype: 'float32' | 'bfloat16'; scan: bool; remat_policy: str
Architecture details that a family fixes (activation, LayerNorm epsilon, CLIP's
cls position and pre-LayerNorm, causal text) come from FAMILIES, and any of them
may be overridden per tower in the config.
"""
from typing import Optional

import ml_collections
import numpy as np

from infusing_jax import errors
from infusing_jax.models import transformer
from infusing_jax.models import two_towers

FAMILIES = {
    "siglip": dict(
        image=dict(act="gelu_tanh", ln_eps=1e-6, patch_bias=True, cls_posemb=False,
                   pre_norm=False, head_bias=True),
        text=dict(act="gelu_tanh", ln_eps=1e-6, causal=False, pool_type="last",
                  head_bias=True),
        logit_bias=True, t_init=float(np.log(10.0)), b_init=-10.0,
    ),
    "clip": dict(
        image=dict(act="quick_gelu", ln_eps=1e-5, patch_bias=False, cls_posemb=True,
                   pre_norm=True, head_bias=False),
        text=dict(act="quick_gelu", ln_eps=1e-5, causal=True, pool_type="argmax",
                  head_bias=False),
        logit_bias=False, t_init=float(np.log(1 / 0.07)), b_init=0.0,
    ),
    # TIPS (Scenic): flax's defaults, tanh GELU and LayerNorm eps 1e-6, no heads; its text
    # tower pools the mean of its non-padding tokens, and a temperature scales the logits.
    "tips": dict(
        image=dict(act="gelu_tanh", ln_eps=1e-6, patch_bias=True, cls_posemb=False,
                   pre_norm=False, head_bias=True),
        text=dict(act="relu", ln_eps=1e-6, causal=False, pool_type="mean",
                  posemb="sinusoid", scale_embed=True, head_bias=True),
        logit_bias=False, temperature=True, t_init=float(np.log(100.0)), b_init=0.0,
    ),
}
# TIPS's sizes by image variant: (width, depth, mlp_dim, heads, MLP act); its g is not
# big_vision's (width 1536, 24 heads, a SwiGLU MLP of Scenic's 2/3 x 6144 = 4096 wide).
TIPS_VARIANTS = {"S": (384, 12, 1536, 6, "gelu_tanh"), "B": (768, 12, 3072, 12, "gelu_tanh"),
                 "L": (1024, 24, 4096, 16, "gelu_tanh"),
                 "So400m": (1152, 27, 4304, 16, "gelu_tanh"),
                 "g": (1536, 40, 4096, 24, transformer.SWIGLU)}

_IMAGE_FIELDS = ("patch_size", "width", "depth", "mlp_dim", "num_heads", "posemb",
                 "posemb_grid", "num_cls", "pool_type", "out_dim", "act", "ln_eps",
                 "patch_bias", "cls_posemb", "pre_norm", "head_bias")
_TEXT_FIELDS = ("vocab_size", "width", "depth", "mlp_dim", "num_heads", "pool_type",
                "out_dim", "act", "ln_eps", "causal", "head_bias", "posemb", "scale_embed")


# OpenAI / open_clip CLIP text towers and embedding widths, by image variant:
# (width, depth, mlp_dim, heads), embed_dim.
CLIP_TEXT = {"B": ((512, 12, 2048, 8), 512), "L": ((768, 12, 3072, 12), 768),
             "H": ((1024, 24, 4096, 16), 1024)}


def model_config(family: str = "siglip", variant: str = "B/16", image_size: int = 224,
                 text_variant: Optional[str] = "B", vocab_size: int = 32_000,
                 seq_len: int = 64, embed_dim: Optional[int] = None,
                 **overrides) -> ml_collections.ConfigDict:
    """A model config by names, e.g. model_config('siglip', 'B/16', 224, 'B').

    SigLIP: the image embedding is the MAP-pooled output (no image head); the
    text head maps to the image width; `text_variant` names a big_vision variant.
    CLIP: both towers project to `embed_dim`; `text_variant` names the image
    variant whose OpenAI text tower and embedding width to use (CLIP_TEXT),
    or a big_vision variant for other sizes (embed_dim then the image width).
    """
    if family not in FAMILIES:
        raise errors.UserError(f"model.family: unknown family {family!r}; use one of "
                               f"{', '.join(FAMILIES)}")
    if family == "tips":
        return _tips_config(variant, image_size, text_variant, overrides)
    img = transformer.decode_variant(variant)
    if family == "siglip":
        img.update(posemb="learn", pool_type="map", out_dim=None)
        out_dim = img["width"]
    elif text_variant in CLIP_TEXT:
        out_dim = embed_dim or CLIP_TEXT[text_variant][1]
    else:
        out_dim = embed_dim or img["width"]
    if family == "clip":
        img.update(posemb="learn", pool_type="tok", out_dim=out_dim)
    txt = None
    if family == "clip" and text_variant in CLIP_TEXT:
        txt = dict(zip(("width", "depth", "mlp_dim", "num_heads"), CLIP_TEXT[text_variant][0]))
    elif text_variant:
        txt = transformer.decode_variant(text_variant)
    if txt is not None:
        txt.update(vocab_size=vocab_size, seq_len=seq_len, out_dim=out_dim)
    cfg = ml_collections.ConfigDict(dict(
        family=family, image_size=image_size, image=img, text=txt,
        dtype="float32", param_dtype="float32", scan=False, remat_policy="none"))
    cfg.update(overrides)
    return cfg


def _tips_config(variant, image_size, text_variant, overrides):
    """TIPS, e.g. ('B/14', 'B'): v1's 16 x 16 position grid (v2: posemb_grid=32). Its text
    tower has the width, MLP and heads of the variant text_variant names, and 12 layers
    (Scenic's TextEncoder; its PyTorch So400m text tower has 27), 32k tokens of 64."""
    name, _, patch = variant.partition("/")
    if name not in TIPS_VARIANTS:
        raise errors.UserError(f"unknown TIPS variant {variant!r}; known: "
                               f"{', '.join(v + '/14' for v in TIPS_VARIANTS)}")
    width, depth, mlp_dim, heads, act = TIPS_VARIANTS[name]
    img = dict(patch_size=int(patch or 14), width=width, depth=depth, mlp_dim=mlp_dim,
               num_heads=heads, act=act, posemb="learn_2d", posemb_grid=16, num_cls=2,
               pool_type="tok", out_dim=None)
    txt = None
    if text_variant:
        if text_variant not in TIPS_VARIANTS:
            raise errors.UserError(f"unknown TIPS text variant {text_variant!r}; known: "
                                   f"{', '.join(TIPS_VARIANTS)}")
        t_width, _, t_mlp, t_heads, t_act = TIPS_VARIANTS[text_variant]
        if t_act == transformer.SWIGLU:
            t_mlp = 6144  # g's text MLP is a plain one, of Scenic's mlp_dim
        txt = dict(width=t_width, depth=12, mlp_dim=t_mlp, num_heads=t_heads,
                   vocab_size=32_000, seq_len=64, out_dim=None)
    cfg = ml_collections.ConfigDict(dict(
        family="tips", image_size=image_size, image=img, text=txt,
        dtype="float32", param_dtype="float32", scan=False, remat_policy="none"))
    cfg.update(overrides)
    return cfg


def validate(cfg) -> None:
    """Raises ValueError naming the config field that cannot work."""
    if cfg.family not in FAMILIES:
        raise errors.UserError(f"model.family: unknown family {cfg.family!r}; use one of "
                               f"{', '.join(FAMILIES)}")
    for tower in ("image", "text"):
        t = cfg.get(tower)
        if t is None:
            continue
        if t.width % t.num_heads:
            raise errors.UserError(f"model.{tower}: width {t.width} is not divisible by "
                             f"num_heads {t.num_heads}")
    if cfg.image_size < cfg.image.patch_size:
        raise errors.UserError(f"model.image_size {cfg.image_size} is smaller than "
                         f"model.image.patch_size {cfg.image.patch_size}")


def _tower_kwargs(tower_cfg, defaults, fields, cfg):
    kw = dict(defaults)
    kw.update({k: v for k, v in tower_cfg.items() if k in fields})
    kw.update(scan=cfg.scan, remat_policy=cfg.remat_policy)
    return kw


def resolved_towers(cfg):
    """(image kwargs, text kwargs or None): the config's towers with the family defaults."""
    fam = FAMILIES[cfg.family]
    image = _tower_kwargs(cfg.image, fam["image"], _IMAGE_FIELDS, cfg)
    text = None
    if cfg.get("text") is not None:
        text = _tower_kwargs(cfg.text, fam["text"], _TEXT_FIELDS, cfg)
    return image, text


def build(cfg) -> two_towers.TwoTowers:
    """The Flax module for a model config."""
    validate(cfg)
    fam = FAMILIES[cfg.family]
    image, text = resolved_towers(cfg)
    return two_towers.TwoTowers(
        image=image, text=text, logit_bias=fam["logit_bias"],
        temperature=fam.get("temperature", False), t_init=fam["t_init"],
        b_init=fam["b_init"], dtype=transformer.dtype_of(cfg.dtype),
        param_dtype=transformer.dtype_of(cfg.param_dtype))


def dummy_inputs(cfg, batch: int = 1):
    """Zero images (batch, S, S, 3) and tokens (batch, seq_len) for init / eval_shape."""
    images = np.zeros((batch, cfg.image_size, cfg.image_size, 3), np.float32)
    tokens = None
    if cfg.get("text") is not None:
        tokens = np.zeros((batch, cfg.text.seq_len), np.int32)
    return images, tokens


def init_params(cfg, rng):
    """Random parameters of the model (a nested dict), e.g. for tests."""
    images, tokens = dummy_inputs(cfg)
    return build(cfg).init(rng, images, tokens)["params"]
