"""The fine-tuning train state and the pure train step (no TensorFlow).

    state = create_train_state(backbone, heads, tx, ema, fisher)
    state, metrics = train_step(state, batch, reference, loss_fn=..., tx=...)

No input pipeline here (train.py runs the loop), so the step and its set-up
(`load_image_tower`, `embed_fn`) import without TensorFlow: benchmarks and
accelerator images that lack it use them as they are.
"""
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from infusing_jax import checkpoints
from infusing_jax import errors
from infusing_jax import models
from infusing_jax import optim


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {'backbone': image tower, 'heads': {domain: {...}}}
    opt_state: Any
    ema: Any  # like params, or None
    fisher: Any  # like params['backbone'] (EWC), or None


def create_train_state(backbone, heads, tx: optax.GradientTransformation,
                       ema: bool = False, fisher=None) -> TrainState:
    params = {"backbone": backbone, "heads": heads}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=optim.ema_init(params) if ema else None, fisher=fisher)


def train_step(state: TrainState, batch: dict, reference, *, loss_fn: Callable,
               tx: optax.GradientTransformation, ema_decay: Optional[float] = None):
    """-> (new state, metrics): one AdamW step on loss_fn(params, reference, fisher, batch).

    metrics: 'loss', each '<domain>/<kind>' term and '<domain>/present', and the
    global norms 'grad_norm', 'param_norm', 'update_norm'.
    """
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, reference, state.fisher, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema if ema_decay is None else optim.ema_update(state.ema, params, ema_decay)
    metrics = dict(terms, loss=loss, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params), update_norm=optax.global_norm(updates))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


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


def embed_fn(model) -> Callable:
    """(backbone params, images (B, S, S, 3)) -> L2-normalised embeddings (B, E)."""
    def embed(backbone, images):
        return model.apply({"params": {"img": backbone}}, images, method=model.encode_images)
    return embed
