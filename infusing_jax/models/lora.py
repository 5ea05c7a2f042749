r"""LoRA (Hu et al., ICLR 2022): a trainable low-rank update of the image tower's Dense
layers, the pretrained weights frozen.

For a Dense kernel W with input axes `in` and output axes `out` (Flax layouts: an MLP
Dense (D, F); an attention q/k/v projection (D, heads, head_dim); its output
projection (heads, head_dim, D)):

    A: (*in, r),   B: (r, *out),   s = alpha / r
    unmerged (training):  y = x W + s (x A) B
    merged (evaluation, WiSE-FT, export):  W' = W + s A B,  y = x W'

A starts uniform in +-1/sqrt(fan_in), B at zero, so training starts at the pretrained
model. The adapters are a tree of their own beside the tower, {..module path..:
{'lora_a', 'lora_b'}}, mirroring the paths of the Dense modules they adapt:
'attention' takes every MultiHeadDotProductAttention's query, key, value and out,
'mlp' every MlpBlock's two Dense layers (the encoder blocks' and the MAP head's).
The unmerged forward pass intercepts those modules' calls (flax's
`nn.intercept_methods`); the tower's own code is untouched. It needs the unrolled
layout (model.scan=False).
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from infusing_jax import errors
from infusing_jax import fields

LAYERS = {"attention": "MultiHeadDotProductAttention", "mlp": "MlpBlock"}


def default_config() -> ml_collections.ConfigDict:
    """rank 0: no LoRA (every weight trains)."""
    return ml_collections.ConfigDict(dict(rank=0, alpha=8.0, layers=("attention", "mlp")))


RULES = dict(
    rank=fields.integer(0), alpha=fields.number(above=0),
    layers=fields.Rule(lambda x: isinstance(x, (tuple, list)) and len(x) > 0 and all(
        v in LAYERS for v in x), f"a non-empty tuple of {sorted(LAYERS)}"))


def scale(cfg) -> float:
    """s = alpha / rank (model.lora)."""
    return cfg.alpha / cfg.rank


def _targets(backbone, layers: Sequence[str]) -> dict:
    """{path of an adapted module (tuple of names): its kernel}."""
    parents = tuple(LAYERS[layer] for layer in layers)
    out = {}
    for path, leaf in traverse_util.flatten_dict(backbone).items():
        if path[-1] == "kernel" and any(p.startswith(parents) for p in path[:-1]):
            out[path[:-1]] = leaf
    return out


def init(rng, backbone, cfg):
    """The adapters of `backbone` (a tower, arrays or ShapeDtypeStructs) for model.lora
    `cfg`: A uniform in +-1/sqrt(fan_in), B zero, in float32."""
    targets = _targets(backbone, cfg.layers)
    flat = {}
    for i, (path, kernel) in enumerate(sorted(targets.items())):
        n_in = 2 if path[-1] == "out" else 1
        shape = tuple(kernel.shape)
        fan_in = int(np.prod(shape[:n_in]))
        bound = 1.0 / np.sqrt(fan_in)
        flat[path + ("lora_a",)] = jax.random.uniform(
            jax.random.fold_in(rng, i), shape[:n_in] + (cfg.rank,), jnp.float32, -bound, bound)
        flat[path + ("lora_b",)] = jnp.zeros((cfg.rank,) + shape[n_in:], jnp.float32)
    return traverse_util.unflatten_dict(flat)


def _update(a, b, s):
    """s A B with the shape of the kernel: (*in, r) x (r, *out) -> (*in, *out)."""
    return s * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def merge(backbone, adapters, s: float):
    """W' = W + s A B for every adapted kernel; the other leaves as they are. Works on
    numpy and jax trees (the result: jax arrays in each kernel's dtype)."""
    flat = traverse_util.flatten_dict(backbone)
    for path, pair in traverse_util.flatten_dict(adapters, is_leaf=lambda _, v: isinstance(
            v, dict) and "lora_a" in v).items():
        kernel = flat[path + ("kernel",)]
        flat[path + ("kernel",)] = (jnp.asarray(kernel, jnp.float32) + _update(
            pair["lora_a"], pair["lora_b"], s)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def merged_params(params: dict, cfg) -> dict:
    """{'backbone', 'heads'[, 'lora']} -> {'backbone': the tower with the adapters merged
    (model.lora `cfg`), 'heads'}; params without adapters as they are."""
    if "lora" not in params:
        return params
    if cfg is None or not cfg.rank:
        raise errors.UserError("the run trained LoRA adapters, and the config given has none "
                               "(model.lora.rank 0); evaluate with the run's own config")
    ranks = {a.shape[-1] for path, a in traverse_util.flatten_dict(params["lora"]).items()
             if path[-1] == "lora_a"}
    if ranks != {cfg.rank}:
        raise errors.UserError(f"model.lora.rank: {cfg.rank}, but the run's adapters have rank "
                               f"{sorted(ranks)}; evaluate with the run's own config")
    rest = {k: v for k, v in params.items() if k not in ("backbone", "lora")}
    return dict(rest, backbone=merge(params["backbone"], params["lora"], scale(cfg)))


def intercept(adapters, s: float, root: tuple):
    """An interceptor for nn.intercept_methods: a Dense / DenseGeneral `__call__` at
    `root + path` of an adapter returns x W + s (x A) B (module doc)."""
    by_path = {root + path: pair for path, pair in traverse_util.flatten_dict(
        adapters, is_leaf=lambda _, v: isinstance(v, dict) and "lora_a" in v).items()}

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(
                module, (nn.Dense, nn.DenseGeneral)):
            return y
        pair = by_path.get(tuple(module.path))
        if pair is None:
            return y
        x = args[0] if args else kwargs["inputs"]
        a = pair["lora_a"].astype(y.dtype)
        b = pair["lora_b"].astype(y.dtype)
        low = jnp.tensordot(x.astype(y.dtype), a, axes=a.ndim - 1)
        return y + s * jnp.tensordot(low, b, axes=1)
    return interceptor
