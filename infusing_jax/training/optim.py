"""The optimiser: AdamW with a head LR and a (smaller) backbone LR, built from optax.

Parameter tree expected by `make_optimizer` (and `param_labels`):

    {'backbone': <Flax image-tower params, e.g. init_params(...)['img']>,
     'heads': {domain_name: (D, C) array, ...}}

and, with LoRA, 'lora' (models/lora.py's adapters). Any other top-level key is an error.

Transformation (all optax):

    chain(clip_by_global_norm(grad_clip_norm)        # only if grad_clip_norm > 0
          multi_transform({label: adamw(schedule_label, b1, b2, weight_decay)}))

Labels: 'heads' for every head leaf; 'backbone' for every backbone leaf, or, with
`layer_decay`, 'backbone_{k}' where k is the leaf's layer id (below).

Learning rates (schedules from optax; `learning_rates` returns them for logging):
  * 'constant':       optax.constant_schedule(peak)
  * 'warmup_cosine':  optax.warmup_cosine_decay_schedule(0, peak, warmup_steps,
                                                         T, end_value=0)
    T = total_steps, or (total_steps = 0, the default) the run's length
  with peak = lr for the heads, lr * backbone_lr_mult for the backbone, and
  lr * backbone_lr_mult * layer_decay ** (L + 1 - k) for backbone layer k.

Layer-wise LR decay (BEiT rule) over a ViT with L = `depth` blocks:
  * layer 0:     top-level `embedding`, `pos_embedding`, `cls`, `pre_norm`
  * layer i + 1: `Transformer/encoderblock_{i}` (i = 0 .. L-1)
  * layer L + 1: everything else (`Transformer/encoder_norm`, `MAPHead_0`, `head`)
  so encoder_norm/MAPHead get the full backbone LR, block i gets
  layer_decay ** (L - i) of it and the embeddings layer_decay ** (L + 1).
  Needs `depth` and the unrolled layout (`scan=False`); the scanned layout's
  stacked `encoderblock` is refused.

Projection towards the pretrained weights (`projection`, training/projection.py), on
the backbone groups only (the heads keep plain AdamW):
  * 'spd': selective projection decay of AdamW's update, strength `spd_strength`;
  * 'ftp': fast trainable projection of AdamW's update, annealing `ftp_k`.
  Both take theta0 from the params the state is initialised with (the pretrained
  weights) and keep a copy of it in the optimiser state.

Freezing the backbone:
  * freeze_backbone_epochs = N > 0: the backbone schedule is multiplied by
    optax.join_schedules([constant 0, constant 1], [N * steps_per_epoch]), so the
    first N * steps_per_epoch updates are exactly zero. optax.adamw applies the
    learning rate after adding the decayed weights, so weight decay is gated too.
    Adam's moments (and its bias-correction count) still see the backbone
    gradients during the frozen steps; pass zero / stop-gradient backbone grads
    if that matters (PyTorch's requires_grad=False would start Adam fresh).
  * freeze_backbone_steps = N > 0: the same, counted in steps (LP-FT's linear probe;
    one of the two may be set).
  * freeze_backbone_epochs = -1: the backbone gets optax.set_to_zero() (no state).
  The global-norm clip is over every gradient passed in, backbone included.

EMA (separate from the optimiser; the trainer keeps the state):
    ema = ema_init(params)                       # a copy of params
    ema = ema_update(ema, new_params, decay)     # ema <- decay*ema + (1-decay)*new
"""
import re
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from infusing_jax import errors
from infusing_jax import fields
from infusing_jax.training import projection

SCHEDULES = ("constant", "warmup_cosine")
PROJECTIONS = ("none", "spd", "ftp")
_INPUT_SIDE = ("embedding", "pos_embedding", "cls", "pre_norm")
_BLOCK = re.compile(r"encoderblock_(\d+)$")


def default_config() -> ml_collections.ConfigDict:
    """The paper's settings (docs/method.md): AdamW(0.9, 0.999), wd 1e-6, constant LR
    1e-3 (heads) / 1e-5 (backbone, multiplier 1e-2), no warm-up, clipping or freezing."""
    cfg = ml_collections.ConfigDict()
    cfg.lr = 1e-3
    cfg.backbone_lr_mult = 1e-2
    cfg.b1 = 0.9
    cfg.b2 = 0.999
    cfg.weight_decay = 1e-6
    cfg.schedule = "constant"
    cfg.warmup_steps = 0
    cfg.total_steps = 0
    cfg.grad_clip_norm = 0.0
    cfg.freeze_backbone_epochs = 0
    cfg.freeze_backbone_steps = 0
    cfg.layer_decay = ml_collections.config_dict.placeholder(float)
    cfg.ema_decay = ml_collections.config_dict.placeholder(float)
    cfg.projection = "none"
    cfg.spd_strength = 1.0
    cfg.ftp_k = 1.0
    return cfg


RULES = dict(
    lr=fields.number(above=0), backbone_lr_mult=fields.number(at_least=0),
    b1=fields.fraction(), b2=fields.fraction(), weight_decay=fields.number(at_least=0),
    schedule=fields.one_of(*SCHEDULES), warmup_steps=fields.integer(0),
    total_steps=fields.integer(0), grad_clip_norm=fields.number(at_least=0),
    freeze_backbone_epochs=fields.integer(-1), freeze_backbone_steps=fields.integer(0),
    layer_decay=fields.optional(fields.Rule(lambda x: fields.is_number(x) and 0 < x <= 1,
                                            "a number in (0, 1]")),
    ema_decay=fields.optional(fields.Rule(lambda x: fields.is_number(x) and 0 < x < 1,
                                          "a number in (0, 1)")),
    projection=fields.one_of(*PROJECTIONS), spd_strength=fields.number(at_least=0),
    ftp_k=fields.Rule(lambda x: fields.is_number(x) and 0 <= x <= 1, "a number in [0, 1]"))


def validate(cfg) -> None:
    """Raises a one-line errors.UserError naming the first bad field (`optim.<field>`)."""
    fields.check(cfg, "optim", RULES)
    if cfg.schedule == "constant" and cfg.warmup_steps != 0:
        fields.fail("optim.warmup_steps", "must be 0 with schedule 'constant' (use "
                    "'warmup_cosine')")
    if cfg.freeze_backbone_steps and cfg.freeze_backbone_epochs:
        fields.fail("optim.freeze_backbone_steps", f"{cfg.freeze_backbone_steps} and "
                    f"freeze_backbone_epochs {cfg.freeze_backbone_epochs} both freeze the "
                    "backbone; set one of them to 0")
    if cfg.schedule == "warmup_cosine" and cfg.total_steps and cfg.total_steps <= cfg.warmup_steps:
        fields.fail("optim.total_steps", f"must be > warmup_steps ({cfg.warmup_steps}) with "
                    f"schedule 'warmup_cosine', or 0 for the run's length; got {cfg.total_steps!r}")


def schedule_steps(cfg, num_steps: int) -> int:
    """The cosine's length: optim.total_steps, or (0) the run's `num_steps`."""
    total = cfg.total_steps or num_steps
    if cfg.schedule == "warmup_cosine" and total <= cfg.warmup_steps:
        fields.fail("optim.warmup_steps", f"{cfg.warmup_steps} warm-up steps leave nothing of "
                    f"the run's {total} steps to decay over; lower it or lengthen the run")
    return total


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def layer_id(path, depth: int) -> int:
    """Layer id (0 .. depth + 1) of a backbone leaf from its key names (see module doc)."""
    names = [_key_name(k) for k in path]
    if names[0] in _INPUT_SIDE:
        return 0
    if len(names) > 1 and names[0] == "Transformer":
        if names[1] == "encoderblock":
            raise errors.UserError("optim.layer_decay: needs the unrolled layout "
                             "(encoderblock_{i}); the scanned 'encoderblock' is stacked")
        m = _BLOCK.match(names[1])
        if m:
            i = int(m.group(1))
            if i >= depth:
                raise errors.UserError(f"optim.layer_decay: found encoderblock_{i} but depth={depth}")
            return i + 1
    return depth + 1


def param_labels(params, layer_decay: bool = False, depth: Optional[int] = None):
    """Labels tree for optax.multi_transform: 'heads', 'backbone' or 'backbone_{k}'; with
    LoRA adapters (params['lora']) they take the backbone's labels and the frozen tower
    'frozen'."""
    extra = set(params) - {"backbone", "heads", "lora"}
    if extra:
        raise errors.UserError(f"optim: params must be {{'backbone', 'heads'}} (and 'lora'), "
                               f"got extra {sorted(extra)}")
    labels = {}
    if "heads" in params:
        labels["heads"] = jax.tree.map(lambda _: "heads", params["heads"])
    trained = "lora" if "lora" in params else "backbone"
    if "lora" in params and "backbone" in params:
        labels["backbone"] = jax.tree.map(lambda _: "frozen", params["backbone"])
    if trained in params:
        if layer_decay:
            labels[trained] = jax.tree_util.tree_map_with_path(
                lambda p, _: f"backbone_{layer_id(p, depth)}", params[trained])
        else:
            labels[trained] = jax.tree.map(lambda _: "backbone", params[trained])
    return labels


def _base_schedule(cfg, peak: float, num_steps: int) -> optax.Schedule:
    if cfg.schedule == "constant":
        return optax.constant_schedule(peak)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=cfg.warmup_steps,
        decay_steps=schedule_steps(cfg, num_steps), end_value=0.0)


def learning_rates(cfg, steps_per_epoch: int, depth: Optional[int] = None,
                   num_steps: int = 0) -> Dict[str, optax.Schedule]:
    """label -> LR schedule (step -> LR) for every trainable group; num_steps: the run's
    length, the cosine's unless optim.total_steps is set.

    Always-frozen backbone groups are absent (they get optax.set_to_zero())."""
    validate(cfg)
    out = {"heads": _base_schedule(cfg, cfg.lr, num_steps)}
    if cfg.freeze_backbone_epochs == -1:
        return out
    peak = cfg.lr * cfg.backbone_lr_mult
    if cfg.layer_decay is None:
        peaks = {"backbone": peak}
    else:
        if not fields.is_int(depth) or depth < 0:
            raise errors.UserError(f"optim.layer_decay: make_optimizer needs depth=<number of "
                             f"encoder blocks>, got {depth!r}")
        peaks = {f"backbone_{k}": peak * cfg.layer_decay ** (depth + 1 - k)
                 for k in range(depth + 2)}
    freeze = cfg.freeze_backbone_steps or cfg.freeze_backbone_epochs * steps_per_epoch
    if freeze > 0:
        gate = optax.join_schedules(
            [optax.constant_schedule(0.0), optax.constant_schedule(1.0)], [freeze])
    for label, p in peaks.items():
        base = _base_schedule(cfg, p, num_steps)
        if freeze > 0:
            out[label] = (lambda b: lambda step: gate(step) * b(step))(base)
        else:
            out[label] = base
    return out


def make_optimizer(cfg, steps_per_epoch: int, depth: Optional[int] = None,
                   num_steps: int = 0, lora: bool = False) -> optax.GradientTransformation:
    """The optax transformation for {'backbone': ..., 'heads': {...}} (module doc); with
    `lora`, for {'backbone', 'lora', 'heads'}: the adapters train as the backbone would,
    the tower is frozen (optax.set_to_zero()).

    `steps_per_epoch` turns freeze_backbone_epochs into steps; `depth` (the image
    tower's number of encoder blocks) is needed only with layer_decay; `num_steps`
    (the run's length) is the cosine's length unless optim.total_steps is set."""
    validate(cfg)
    if cfg.freeze_backbone_epochs > 0 and (not fields.is_int(steps_per_epoch) or steps_per_epoch < 1):
        raise errors.UserError(f"optim.freeze_backbone_epochs: needs steps_per_epoch >= 1, "
                         f"got {steps_per_epoch!r}")
    scheds = learning_rates(cfg, steps_per_epoch, depth, num_steps)
    txs = {label: _projected(cfg, label, optax.adamw(s, b1=cfg.b1, b2=cfg.b2,
                                                      weight_decay=cfg.weight_decay))
           for label, s in scheds.items()}
    # Always frozen: one 'backbone' label whatever layer_decay says.
    layer_decay = cfg.layer_decay is not None and cfg.freeze_backbone_epochs != -1
    if cfg.freeze_backbone_epochs == -1:
        txs["backbone"] = optax.set_to_zero()
    if lora:
        txs["frozen"] = optax.set_to_zero()
    tx = optax.multi_transform(
        txs, lambda params: param_labels(params, layer_decay, depth))
    if cfg.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx


def _projected(cfg, label: str, tx: optax.GradientTransformation):
    """tx wrapped in optim.projection for the backbone groups; the heads' as it is."""
    if label == "heads" or cfg.projection == "none":
        return tx
    if cfg.projection == "spd":
        return projection.selective_projection_decay(tx, cfg.spd_strength)
    return projection.trainable_projection(tx, cfg.ftp_k)


def ema_init(params):
    """EMA state: a copy of params (so the EMA starts at the initial weights)."""
    return jax.tree.map(jnp.array, params)


def ema_update(ema, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params (optax.incremental_update)."""
    return optax.incremental_update(params, ema, 1.0 - decay)
