"""The search space of a sweep: named distributions over run-config fields.

    c.sweep.space.distill = space.log_uniform(1e2, 1e6, "domains.generic.losses.feature_mse.weight")
    c.sweep.space.anchor = space.log_uniform(1.0, 1e4, "domains.target.losses.anchoring.weight",
                                             "domains.generic.losses.anchoring.weight")
    c.sweep.space.steps = space.integer(100, 400, "train.num_steps", step=50)

Each entry is a ConfigDict: `kind`, its bounds or values, and `fields`, the dotted
paths of the run config it sets (several: one value tied to all of them, e.g. the
anchoring weight that every domain lists). Kinds, as Optuna samples them:

  log_uniform(low, high)       x with log x uniform in [log low, log high], 0 < low
  uniform(low, high)           x uniform in [low, high]
  integer(low, high, step, log)  an int in low, low + step, ..., <= high (log: log-spaced)
  categorical(*choices)        one of the choices (numbers, strings, bools, None)
  grid(*values)                one of the values; the grid sampler runs every combination
"""
import copy
import math

import ml_collections

from infusing_jax import errors

KINDS = ("log_uniform", "uniform", "integer", "categorical", "grid")


def _entry(kind: str, fields, **settings) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(kind=kind, fields=tuple(fields), **settings))


def log_uniform(low: float, high: float, *fields: str) -> ml_collections.ConfigDict:
    return _entry("log_uniform", fields, low=float(low), high=float(high))


def uniform(low: float, high: float, *fields: str) -> ml_collections.ConfigDict:
    return _entry("uniform", fields, low=float(low), high=float(high))


def integer(low: int, high: int, *fields: str, step: int = 1,
            log: bool = False) -> ml_collections.ConfigDict:
    return _entry("integer", fields, low=low, high=high, step=step, log=log)


def categorical(choices, *fields: str) -> ml_collections.ConfigDict:
    return _entry("categorical", fields, choices=tuple(choices))


def grid(values, *fields: str) -> ml_collections.ConfigDict:
    return _entry("grid", fields, values=tuple(values))


# ---------------------------------------------------------------------------- checks


def _fail(where: str, message: str):
    raise errors.UserError(f"{where}: {message}")


def _field(cfg, path: str):
    """The value at a dotted path of the run config; KeyError where it has none."""
    node = cfg
    for part in path.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(space, run_cfg, where: str = "config.sweep.space") -> None:
    """One-line errors.UserError for an entry that cannot be sampled or set: an unknown
    kind, an unknown field path, a field set by two entries, an empty range, a log range
    that is not positive, a value the field cannot hold."""
    if not space.keys():
        _fail(where, "empty; add an entry, e.g. "
                     "space.lr_mult = space.log_uniform(1e-3, 1, 'optim.backbone_lr_mult')")
    owner = {}
    for name in space.keys():
        entry, at = space[name], f"{where}.{name}"
        kind = entry.get("kind") if hasattr(entry, "get") else None
        if kind not in KINDS:
            _fail(f"{at}.kind", f"must be one of {', '.join(KINDS)}, got {kind!r}; build entries "
                                "with hpo.space.log_uniform(...) etc.")
        fields = entry.get("fields")
        if not fields or not all(isinstance(f, str) and f for f in fields):
            _fail(f"{at}.fields", "no run-config field to set; give dotted paths, e.g. "
                                  "'optim.backbone_lr_mult'")
        for path in fields:
            try:
                current = _field(run_cfg, path)
            except KeyError:
                _fail(f"{at}.fields", f"the run config has no field {path!r}")
            if hasattr(current, "keys"):
                _fail(f"{at}.fields", f"{path!r} is a group of fields, not a field")
            if path in owner:
                _fail(f"{at}.fields", f"{path!r} is set by {owner[path]!r} too; tie them in one "
                                      "entry instead")
            owner[path] = name
        _check_values(entry, kind, at)
        for value in _extremes(entry):  # each field can hold what the entry gives it
            try:
                apply(run_cfg, {path: value for path in fields})
            except errors.UserError as e:
                _fail(at, str(e).partition(": ")[2])


def _extremes(entry) -> list:
    if entry.kind in ("log_uniform", "uniform", "integer"):
        middle = (entry.low + entry.high) / 2
        return [entry.low, entry.high] + ([] if entry.kind == "integer" else [middle])
    return list(entry.choices if entry.kind == "categorical" else entry.values)


def _check_values(entry, kind: str, at: str) -> None:
    if kind in ("log_uniform", "uniform", "integer"):
        low, high = entry.get("low"), entry.get("high")
        if not (_is_number(low) and _is_number(high)):
            _fail(at, f"low and high must be finite numbers, got {low!r} and {high!r}")
        if low > high:
            _fail(at, f"empty range: low {low!r} > high {high!r}")
        if (kind == "log_uniform" or entry.get("log")) and low <= 0:
            _fail(f"{at}.low", f"a log range must be positive, got low {low!r}")
        if kind == "integer":
            step = entry.get("step")
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step)):
                _fail(at, f"integer needs int low, high and step, got {low!r}, {high!r}, {step!r}")
            if step < 1:
                _fail(f"{at}.step", f"must be >= 1, got {step!r}")
            if entry.get("log") and step != 1:
                _fail(f"{at}.step", "a log-spaced integer range takes step 1")
    else:
        values = entry.get("choices" if kind == "categorical" else "values")
        if not values:
            _fail(at, f"{kind} needs at least one value")
        if len(set(map(repr, values))) != len(values):
            _fail(at, f"{kind} lists a value twice: {list(values)}")
        bad = [v for v in values if not (v is None or isinstance(v, (bool, int, float, str)))]
        if bad:
            _fail(at, f"{kind} values must be numbers, strings, bools or None, got {bad[0]!r}")


# ---------------------------------------------------------------------------- sampling


def suggest(trial, name: str, entry):
    """The trial's value for a space entry (Optuna's suggest_*; a retried or enqueued
    trial gets its fixed value back)."""
    kind = entry.kind
    if kind == "log_uniform":
        return trial.suggest_float(name, entry.low, entry.high, log=True)
    if kind == "uniform":
        return trial.suggest_float(name, entry.low, entry.high)
    if kind == "integer":
        return trial.suggest_int(name, entry.low, entry.high, step=entry.step, log=entry.log)
    values = entry.choices if kind == "categorical" else entry.values
    return trial.suggest_categorical(name, list(values))


def grid_of(space) -> dict:
    """{name: values} for Optuna's GridSampler; every entry must be a grid or categorical."""
    out = {}
    for name in space.keys():
        entry = space[name]
        if entry.kind not in ("grid", "categorical"):
            raise errors.UserError(f"config.sweep.space.{name}: the grid sampler needs grid or "
                                   f"categorical entries, this one is {entry.kind}")
        out[name] = list(entry.values if entry.kind == "grid" else entry.choices)
    return out


def num_combinations(space) -> int:
    return math.prod(len(v) for v in grid_of(space).values())


def assignments(space, params: dict) -> dict:
    """{field path: value} that a trial's {name: value} sets."""
    return {path: params[name] for name in space.keys() for path in space[name].fields}


def apply(run_cfg, values: dict):
    """A copy of the run config with {field path: value} set (ints where the field holds
    an int and the value is integral; one-line error where the type cannot be held)."""
    cfg = copy.deepcopy(run_cfg)
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        current = node[leaf]
        if isinstance(current, int) and not isinstance(current, bool) and \
                isinstance(value, float) and value.is_integer():
            value = int(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise errors.UserError(f"config.sweep.space: {path} holds a "
                                   f"{type(current).__name__}, not {value!r}") from None
    return cfg
