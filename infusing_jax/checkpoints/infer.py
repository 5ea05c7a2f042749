"""Model configs inferred from parameter tensors, and position-embedding resampling.

Formats store few or no hyperparameters; width, depth, heads, MLP width, patch,
resolution, pooling and vocabulary all follow from the canonical flat params.
"""
import math

import jax
import ml_collections
import numpy as np
import scipy.ndimage
from flax import traverse_util

from infusing_jax import errors
from infusing_jax.checkpoints import tree
from infusing_jax.models import config as model_config_lib
from infusing_jax.models import transformer


def heads_for_width(width: int) -> int:
    """Head count of the big_vision variant with this width, else 64-wide heads."""
    by_width = {w: h for w, _, _, h in transformer.VARIANTS.values()}
    return by_width.get(width, max(1, width // 64))


def _family(flat, hints):
    if hints.get("family"):
        return hints["family"]
    if "img/pos_embedding" in flat and flat["img/pos_embedding"].ndim == 4:
        return "tips"  # a (1, G, G, W) position grid
    return "clip" if "img/pre_norm/scale" in flat else "siglip"


def _block(flat, prefix):
    attn = flat[f"{prefix}encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
    mlp = flat[f"{prefix}encoderblock_0/MlpBlock_0/Dense_0/kernel"]
    out = dict(depth=tree.count_blocks(flat, prefix), num_heads=int(attn.shape[1]),
               mlp_dim=int(mlp.shape[1]))
    if f"{prefix}encoderblock_0/MlpBlock_0/Dense_2/kernel" in flat:
        out["act"] = transformer.SWIGLU  # a gated MLP: three Dense layers
    return out


def _image(flat, hints):
    kernel = flat["img/embedding/kernel"]
    patch, width = int(kernel.shape[0]), int(kernel.shape[3])
    out = dict(patch_size=patch, width=width, **_block(flat, "img/Transformer/"))
    out["pool_type"] = ("map" if "img/MAPHead_0/probe" in flat else
                        "tok" if "img/cls" in flat else "gap")
    posemb = flat.get("img/pos_embedding")
    out["posemb"] = ("sincos2d" if posemb is None else
                     "learn_2d" if posemb.ndim == 4 else "learn")
    if out["posemb"] == "learn_2d":  # TIPS: the grid is resized to any input
        out["posemb_grid"] = int(posemb.shape[1])
    if out["pool_type"] == "tok" and flat["img/cls"].shape[1] > 1:
        out["num_cls"] = int(flat["img/cls"].shape[1])  # TIPS: 2
    out["out_dim"] = int(flat["img/head/kernel"].shape[1]) if "img/head/kernel" in flat else None
    out["patch_bias"] = "img/embedding/bias" in flat
    if out["out_dim"]:
        out["head_bias"] = "img/head/bias" in flat
    out["pre_norm"] = "img/pre_norm/scale" in flat
    image_size = hints.get("image_size")
    if out["posemb"] == "learn":
        tokens = flat["img/pos_embedding"].shape[1]
        grid = math.isqrt(tokens)
        out["cls_posemb"] = grid * grid != tokens
        if out["cls_posemb"]:
            grid = math.isqrt(tokens - 1)
        if not image_size or image_size // patch != grid:
            image_size = grid * patch  # e.g. So400m/14 at 384 px: a 27 x 27 grid
    else:
        out["cls_posemb"] = False
        if out["posemb"] == "learn_2d" and not image_size:
            image_size = out["posemb_grid"] * patch
    return out, image_size or 224


def _text(flat):
    if "txt/Embed_0/embedding" not in flat:
        return None
    vocab, width = flat["txt/Embed_0/embedding"].shape
    pos = flat.get("txt/pos_embedding")  # TIPS: fixed sinusoids, 64 tokens
    seq_len = int(pos.shape[1]) if pos is not None else 64
    out = dict(vocab_size=int(vocab), width=int(width), seq_len=seq_len,
               **_block(flat, "txt/Encoder_0/"))
    out["out_dim"] = int(flat["txt/head/kernel"].shape[1]) if "txt/head/kernel" in flat else None
    if out["out_dim"]:
        out["head_bias"] = "txt/head/bias" in flat
    return out


def infer_config(flat: dict, hints: dict = None, where: str = "checkpoint"
                 ) -> ml_collections.ConfigDict:
    """Canonical flat params (+ what the format did store) -> a model config.

    hints: optional 'family', 'image_size', and per tower ('img', 'txt') dicts
    whose non-None entries (act, ln_eps) override the family's defaults.
    """
    hints = hints or {}
    family = _family(flat, hints)
    try:
        image, image_size = _image(flat, hints)
        text = _text(flat)
    except KeyError as e:
        raise errors.UserError(f"{where}: parameter {e.args[0]} is missing; the file is not a "
                         "complete SigLIP / CLIP / TIPS checkpoint") from None
    for tower, name in ((image, "img"), (text, "txt")):
        if tower is not None:
            tower.update({k: v for k, v in hints.get(name, {}).items()
                          if v is not None and k != "num_heads"})
    return ml_collections.ConfigDict(dict(
        family=family, image_size=image_size, image=image, text=text,
        dtype="float32", param_dtype="float32", scan=False, remat_policy="none"))


def expected_shapes(cfg) -> dict:
    """{flat path: shape} of the parameters a config's model has (unrolled)."""
    images, tokens = model_config_lib.dummy_inputs(cfg)
    unrolled = ml_collections.ConfigDict(cfg.to_dict())
    unrolled.scan = False
    model = model_config_lib.build(unrolled)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def resample_posemb(posemb: np.ndarray, new_grid: int, has_cls: bool) -> np.ndarray:
    """(1, [1 +] g*g, D) -> (1, [1 +] new_grid^2, D): big_vision's bilinear zoom of the grid.

    scipy.ndimage.zoom(order=1), as big_vision's `resample_posemb`: the grid's
    corner values stay in the corners. A cls position is kept as it is.
    """
    cls, grid = (posemb[:, :1], posemb[:, 1:]) if has_cls else (posemb[:, :0], posemb)
    g = math.isqrt(grid.shape[1])
    d = grid.shape[-1]
    grid = np.asarray(grid, np.float32).reshape(g, g, d)
    grid = scipy.ndimage.zoom(grid, (new_grid / g, new_grid / g, 1), order=1)
    out = grid.reshape(1, new_grid * new_grid, d).astype(posemb.dtype)
    return np.concatenate([cls, out], axis=1)


def resample_image_posemb(flat: dict, cfg, image_size: int):
    """-> (flat, cfg) for running at `image_size`: the learned image position
    embedding resampled when the patch grid changes, cfg.image_size updated."""
    patch = cfg.image.patch_size
    if image_size < patch:
        raise errors.UserError(f"image_size {image_size} is smaller than the patch size {patch}")
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    flat = dict(flat)
    if cfg.image.posemb == "learn" and image_size // patch != cfg.image_size // patch:
        flat["img/pos_embedding"] = resample_posemb(
            flat["img/pos_embedding"], image_size // patch, cfg.image.cls_posemb)
    cfg.image_size = image_size
    return flat, cfg
