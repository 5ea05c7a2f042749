"""Mapping tables between our flat parameters and another format's state dict.

A table is a list of `Rule`s; one table serves both directions:
`export(table, ours) -> theirs` and `import_(table, theirs, heads) -> ours`.
A rule names one or more of our paths (several are fused by concatenation on
axis 0, e.g. q, k, v -> in_proj_weight), their key, and the tensor `kind`.
'{i}' in a rule stands for the transformer block index.
"""
import dataclasses
import re
from typing import Callable

import numpy as np

from infusing_jax import errors


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: tuple  # our flat paths; more than one are fused on axis 0
    theirs: str
    kind: str = "same"


def rule(ours, theirs, kind="same") -> Rule:
    return Rule(tuple(ours) if isinstance(ours, (tuple, list)) else (ours,), theirs, kind)


# kind -> (ours -> theirs, (theirs, heads) -> ours). `heads` is the tower's head count.
_KINDS: dict[str, tuple[Callable, Callable]] = {
    "same": (lambda x: x, lambda y, h: y),
    # Dense kernel (in, out) <-> torch Linear weight (out, in).
    "linear": (lambda x: x.T, lambda y, h: y.T),
    # Conv kernel HWIO <-> torch OIHW.
    "conv": (lambda x: x.transpose(3, 2, 0, 1), lambda y, h: y.transpose(2, 3, 1, 0)),
    # Position embedding (1, N, D) <-> (N, D).
    "pos": (lambda x: x[0], lambda y, h: y[None]),
    # Class token (1, 1, D) <-> (D,).
    "cls": (lambda x: x.reshape(-1), lambda y, h: y.reshape(1, 1, -1)),
    # Logit scale / bias (1,) <-> scalar ().
    "scalar": (lambda x: x.reshape(()), lambda y, h: y.reshape(1)),
    # Attention q/k/v kernel (D, H, hd) <-> weight (H*hd, D).
    "heads_in": (lambda x: x.reshape(x.shape[0], -1).T,
                 lambda y, h: y.T.reshape(y.shape[1], h, -1)),
    # Attention q/k/v bias (H, hd) <-> (H*hd,).
    "heads_bias": (lambda x: x.reshape(-1), lambda y, h: y.reshape(h, -1)),
    # Attention output kernel (H, hd, D) <-> weight (D, H*hd).
    "heads_out": (lambda x: x.reshape(-1, x.shape[-1]).T,
                  lambda y, h: y.T.reshape(h, -1, y.shape[0])),
}


def layer_norm(ours: str, theirs: str) -> list:
    """LayerNorm 'ours/scale', 'ours/bias' <-> 'theirs.weight', 'theirs.bias'."""
    return [rule(f"{ours}/scale", f"{theirs}.weight"), rule(f"{ours}/bias", f"{theirs}.bias")]


def dense(ours: str, theirs: str, bias: bool = True) -> list:
    """Dense 'ours/kernel' (in, out), 'ours/bias' <-> torch Linear 'theirs.weight' (out, in), '.bias'."""
    return [rule(f"{ours}/kernel", f"{theirs}.weight", "linear")] + (
        [rule(f"{ours}/bias", f"{theirs}.bias")] if bias else [])


def block_rules(ours: str, theirs: str, names: dict) -> list:
    """Rules for one pre-LN transformer block, `ours`/`theirs` ending in the block prefix.

    names: their sub-names for 'ln1', 'ln2', 'fc1', 'fc2', 'out' and either
    'q', 'k', 'v' (separate projections) or 'qkv' (one fused projection); each
    is a module prefix to which '.weight' / '.bias' are appended, except that
    a fused 'qkv' may be given as a (weight_key, bias_key) pair.
    """
    a = f"{ours}MultiHeadDotProductAttention_0/"
    rules = []
    for ln, our_ln in (("ln1", "LayerNorm_0"), ("ln2", "LayerNorm_1")):
        rules += layer_norm(f"{ours}{our_ln}", f"{theirs}{names[ln]}")
    if "qkv" in names:
        w, b = names["qkv"] if isinstance(names["qkv"], tuple) else (
            f"{names['qkv']}.weight", f"{names['qkv']}.bias")
        rules += [rule([f"{a}{p}/kernel" for p in ("query", "key", "value")], theirs + w, "heads_in"),
                  rule([f"{a}{p}/bias" for p in ("query", "key", "value")], theirs + b, "heads_bias")]
    else:
        for p, n in (("query", "q"), ("key", "k"), ("value", "v")):
            rules += [rule(f"{a}{p}/kernel", f"{theirs}{names[n]}.weight", "heads_in"),
                      rule(f"{a}{p}/bias", f"{theirs}{names[n]}.bias", "heads_bias")]
    rules += [rule(f"{a}out/kernel", f"{theirs}{names['out']}.weight", "heads_out"),
              rule(f"{a}out/bias", f"{theirs}{names['out']}.bias")]
    for fc, our_dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        rules += dense(f"{ours}MlpBlock_0/{our_dense}", f"{theirs}{names[fc]}")
    return rules


def _expand(table, keys, side):
    """Yield rules with '{i}' replaced by each block index present in `keys`."""
    for r in table:
        template = r.theirs if side == "theirs" else r.ours[0]
        if "{i}" not in template:
            yield r
            continue
        pattern = re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")
        indices = sorted({int(m.group(1)) for k in keys for m in [pattern.match(k)] if m})
        for i in indices:
            yield Rule(tuple(o.replace("{i}", str(i)) for o in r.ours),
                       r.theirs.replace("{i}", str(i)), r.kind)


def _check_consumed(source: dict, used: set, what: str):
    unexpected = sorted(set(source) - used)
    if unexpected:
        raise errors.UserError(f"{what}: {len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")


def export(table, ours: dict, what: str = "export") -> dict:
    """Our flat params -> their state dict (numpy arrays). Every param must be mapped."""
    theirs, used = {}, set()
    for r in _expand(table, ours, "ours"):
        present = [o in ours for o in r.ours]
        if not any(present):
            continue
        if not all(present):
            missing = [o for o, p in zip(r.ours, present) if not p]
            raise errors.UserError(f"{what}: missing keys {missing} needed for {r.theirs}")
        to_theirs = _KINDS[r.kind][0]
        parts = [np.asarray(to_theirs(np.asarray(ours[o]))) for o in r.ours]
        theirs[r.theirs] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        used.update(r.ours)
    _check_consumed(ours, used, what)
    return theirs


def import_(table, theirs: dict, heads: dict, what: str = "import") -> dict:
    """Their state dict -> our flat params. heads: {'img': H, 'txt': H}."""
    ours, used = {}, set()
    for r in _expand(table, theirs, "theirs"):
        if r.theirs not in theirs:
            continue
        to_ours = _KINDS[r.kind][1]
        y = np.asarray(theirs[r.theirs])
        parts = np.split(y, len(r.ours), axis=0) if len(r.ours) > 1 else [y]
        for o, part in zip(r.ours, parts):
            ours[o] = np.ascontiguousarray(to_ours(part, heads.get(o.split("/")[0])))
        used.add(r.theirs)
    _check_consumed(theirs, used, f"{what} (keys no rule maps)")
    return ours
