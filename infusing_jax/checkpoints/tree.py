"""Flat parameter dicts: '/'-joined paths of the big_vision tree, blocks unrolled.

Every converter works on this canonical form: {'img/Transformer/encoderblock_0/
LayerNorm_0/scale': array, ...}. big_vision's scan layout (one `encoderblock`
with a leading depth axis) is converted to and from it here.
"""
import re

import numpy as np
from flax import traverse_util

_SCAN = re.compile(r"^(.*/)encoderblock/(.*)$")
_UNROLLED = re.compile(r"^(.*/)encoderblock_(\d+)/(.*)$")


def flatten(params) -> dict:
    """Nested dict -> {'a/b/c': np.ndarray}."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def unflatten(flat: dict) -> dict:
    """{'a/b/c': x} -> nested dict."""
    return traverse_util.unflatten_dict(flat, sep="/")


def unroll_scan(flat: dict) -> dict:
    """'.../encoderblock/P' (depth, ...) -> '.../encoderblock_{i}/P' for each i."""
    out = {}
    for key, value in flat.items():
        m = _SCAN.match(key)
        if m is None:
            out[key] = value
            continue
        for i, layer in enumerate(value):
            out[f"{m.group(1)}encoderblock_{i}/{m.group(2)}"] = layer
    return out


def roll_scan(flat: dict) -> dict:
    """'.../encoderblock_{i}/P' -> '.../encoderblock/P' stacked over i (the scan layout)."""
    out, layers = {}, {}
    for key, value in flat.items():
        m = _UNROLLED.match(key)
        if m is None:
            out[key] = value
        else:
            layers.setdefault(f"{m.group(1)}encoderblock/{m.group(3)}", {})[int(m.group(2))] = value
    for key, by_layer in layers.items():
        out[key] = np.stack([by_layer[i] for i in range(len(by_layer))])
    return out


def count_blocks(flat: dict, prefix: str) -> int:
    """Number of `encoderblock_{i}` under `prefix` (e.g. 'img/Transformer/')."""
    found = {int(m.group(2)) for k in flat if k.startswith(prefix)
             for m in [_UNROLLED.match(k)] if m}
    return len(found)
