"""The image tower a run fine-tunes: its Flax module, its parameters and its embedding.

    model, backbone, model_cfg = load_image_tower(config.model)
    embed = embed_fn(model)          # embed(backbone, images) -> (B, E), L2-normalised
    embed(backbone, images, adapters)  # with LoRA adapters (models/lora.py), unmerged

No TensorFlow in its imports (the step and the benchmarks use it as it is).
"""
from typing import Callable

import flax.linen as nn
import jax

from infusing_jax import checkpoints
from infusing_jax import errors
from infusing_jax import models
from infusing_jax.models import lora


def load_image_tower(model_cfg, abstract: bool = False):
    """-> (Flax module, backbone params (numpy tree), model config) for config.model.

    abstract: the params as jax.ShapeDtypeStructs; without a checkpoint nothing is
    initialised (to compile for a model too big to hold, e.g. the FSDP memory bench).
    """
    m = model_cfg
    if m.checkpoint:
        try:
            params, cfg = checkpoints.load(m.checkpoint, image_size=m.image_size,
                                           act=m.act or None, scan=m.scan,
                                           param_dtype=m.param_dtype)
        except checkpoints.ArgumentError as e:
            raise errors.UserError(f"config.model.{e.argument}: {e}") from None
        except (errors.UserError, OSError) as e:
            raise errors.UserError(f"config.model.checkpoint: {e}") from None
        if "img" not in params:
            raise errors.UserError(f"config.model.checkpoint: {m.checkpoint} has no image tower")
        if cfg.family != m.family:
            raise errors.UserError(f"config.model.family: {m.family!r}, but {m.checkpoint} is a "
                                   f"{cfg.family} model (its preprocessing differs); set "
                                   f"model.family={cfg.family!r}")
        if m.image_size % cfg.image.patch_size:
            raise errors.UserError(f"config.model.image_size: {m.image_size} is not a multiple "
                                   f"of {m.checkpoint}'s patch size {cfg.image.patch_size}")
        backbone = params["img"]
    else:
        cfg = models.model_config(m.family, m.variant, m.image_size, None, scan=m.scan,
                                  param_dtype=m.param_dtype)
        backbone = None
    cfg.text = None
    cfg.dtype, cfg.remat_policy = m.dtype, m.remat_policy
    model = models.build(cfg)
    if backbone is None:
        init = lambda: models.init_params(cfg, jax.random.PRNGKey(0))["img"]
        backbone = jax.eval_shape(init) if abstract else jax.device_get(init())
    elif abstract:
        backbone = jax.eval_shape(lambda: backbone)
    return model, backbone, cfg


def embed_fn(model, lora_scale: float = 1.0) -> Callable:
    """(backbone params, images (B, S, S, 3), adapters=None) -> L2-normalised embeddings
    (B, E); with LoRA `adapters` (models/lora.py, scale alpha / rank = `lora_scale`) the
    tower runs unmerged, x W + s (x A) B in every adapted Dense layer."""
    def embed(backbone, images, adapters=None):
        def run():
            return model.apply({"params": {"img": backbone}}, images,
                               method=model.encode_images)
        if adapters is None:
            return run()
        with nn.intercept_methods(lora.intercept(adapters, lora_scale, root=("img",))):
            return run()
    return embed
