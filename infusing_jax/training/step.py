"""The fine-tuning train state, the pure train step, and `build`: the step jitted over
the device mesh, once, for the loop and every benchmark.

    built = build(cfg, names, embed, backbone, heads, depth=12, steps_per_epoch=100,
                  num_steps=300, mesh=sharding.make_mesh())
    state = built.init(backbone, heads)
    state, metrics = built.step(state, batch, built.place_reference(backbone))

No input pipeline here (training/loop.py runs the loop), and no TensorFlow in the
imports: benchmarks and accelerator images that lack it build the step as it is.
"""
import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from infusing_jax import sharding
from infusing_jax.models import lora
from infusing_jax.training import objective
from infusing_jax.training import optim


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {'backbone': image tower, 'heads': {domain: {...}}[, 'lora': adapters]}
    opt_state: Any
    ema: Any  # like params, or None
    fisher: Any  # like params['backbone'] (EWC), or None


def create_train_state(backbone, heads, tx: optax.GradientTransformation,
                       ema: bool = False, fisher=None, adapters=None) -> TrainState:
    """adapters: LoRA's (models/lora.py), trained beside the frozen backbone, or None."""
    params = {"backbone": backbone, "heads": heads}
    if adapters is not None:
        params["lora"] = adapters
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
    if ema is not None and "lora" in params:  # the frozen tower: its own value, not an average
        ema = dict(ema, backbone=params["backbone"])
    metrics = dict(terms, loss=loss, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params), update_norm=optax.global_norm(updates))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


@dataclasses.dataclass(frozen=True)
class Built:
    """The train step of a run, jitted over `mesh` with the state's shardings.

    init(backbone, heads, fisher=None, adapters=None) -> the sharded TrainState;
    step(state, batch, reference) -> (state, metrics), donating `state`;
    abstract_state: the state as ShapeDtypeStructs carrying their shardings;
    place_reference(backbone) -> the frozen reference on its shardings, or None
      where no loss needs it (no parameter term, no online teacher);
    learning_rates: {group: schedule}, for the logs.
    """
    mesh: Mesh
    init: Callable
    step: Callable
    abstract_state: TrainState
    reference_shardings: Any
    needs_reference: bool
    learning_rates: Dict[str, optax.Schedule]

    def place_reference(self, backbone):
        return jax.device_put(backbone, self.reference_shardings) if self.needs_reference else None


def build(cfg, names: Sequence[str], embed: Callable, backbone, heads, *, depth: int,
          steps_per_epoch: int, num_steps: int, mesh: Mesh, ewc: bool = False,
          adapters=None, text_banks: dict = None) -> Built:
    """The run's step: config.optim's optimiser, the objective of config.domains (in the
    order `names`), EMA (optim.ema_decay), FSDP (train.fsdp) and LoRA (model.lora) as
    configured.

    backbone, heads: arrays or jax.ShapeDtypeStructs (to compile without materialising);
    embed(backbone, images[, adapters]) -> (B, E); depth: the tower's blocks
    (optim.layer_decay); steps_per_epoch, num_steps: the schedule's
    (optim.freeze_backbone_*, cosine); ewc: the state carries a Fisher like the backbone;
    adapters: LoRA's (models/lora.py init), with model.lora.rank > 0; text_banks:
    {domain: (K, E)} for lipsum losses (frozen_text.lipsum_banks).
    """
    tx = optim.make_optimizer(cfg.optim, steps_per_epoch, depth, num_steps,
                              lora=adapters is not None)
    init = functools.partial(create_train_state, tx=tx, ema=cfg.optim.ema_decay is not None)
    abstract = jax.eval_shape(init, backbone, heads, fisher=backbone if ewc else None,
                              adapters=adapters)
    state_sh = sharding.state_shardings(abstract, mesh, cfg.train.fsdp)
    reference_sh = sharding.state_shardings(jax.eval_shape(lambda: backbone), mesh,
                                            cfg.train.fsdp)
    lora_scale = lora.scale(cfg.model.lora) if adapters is not None else 1.0
    loss_fn = objective.make_loss_fn(cfg.domains, names, cfg.loss_aggregation, embed,
                                     lora_scale, text_banks)
    step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, tx=tx,
                                     ema_decay=cfg.optim.ema_decay),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
    return Built(
        mesh=mesh, init=jax.jit(init, out_shardings=state_sh), step=step,
        abstract_state=jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh),
        reference_shardings=reference_sh,
        needs_reference=objective.needs_reference(cfg.domains, names),
        learning_rates=optim.learning_rates(cfg.optim, steps_per_epoch, depth, num_steps))
