"""Rules for config fields: each field gets a range or a set of choices, and a field
that breaks its rule fails as one UserError that names it.

    RULES = dict(batch_size=fields.integer(1), mix=fields.one_of("round_robin", "weights"))
    fields.check(cfg.data, "config.data", RULES)

`check` also refuses fields the rules do not know (a typo would otherwise be
ignored) and rules whose field is missing.
"""
import dataclasses
import math
from typing import Any, Callable

from infusing_jax import errors


@dataclasses.dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    want: str  # what the value must be, e.g. "an int >= 1"


def fail(field: str, message: str):
    raise errors.UserError(f"{field}: {message}")


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def integer(at_least: int = None) -> Rule:
    want = "an int" + ("" if at_least is None else f" >= {at_least}")
    return Rule(lambda x: is_int(x) and (at_least is None or x >= at_least), want)


def number(above: float = None, at_least: float = None, below: float = None) -> Rule:
    """A finite int or float in the given bounds."""
    bounds = [f"{op} {v}" for op, v in (("> ", above), (">=", at_least), ("< ", below))
              if v is not None]
    want = " ".join(["a number"] + [" and ".join(b.replace("  ", " ") for b in bounds)])
    return Rule(lambda x: is_number(x) and (above is None or x > above)
                and (at_least is None or x >= at_least) and (below is None or x < below),
                want.strip())


def fraction() -> Rule:
    """A number in [0, 1)."""
    return Rule(lambda x: is_number(x) and 0 <= x < 1, "a number in [0, 1)")


def boolean() -> Rule:
    return Rule(lambda x: isinstance(x, bool), "True or False")


def text(nonempty: bool = False) -> Rule:
    return Rule(lambda x: isinstance(x, str) and (bool(x) or not nonempty),
                "a non-empty string" if nonempty else "a string")


def one_of(*choices) -> Rule:
    return Rule(lambda x: isinstance(x, type(choices[0])) and x in choices,
                f"one of {', '.join(repr(c) for c in choices)}")


def optional(rule: Rule) -> Rule:
    """None, or what `rule` allows."""
    return Rule(lambda x: x is None or rule.ok(x), f"None or {rule.want}")


def strings() -> Rule:
    """A tuple or list of strings."""
    return Rule(lambda x: isinstance(x, (tuple, list)) and all(isinstance(s, str) for s in x),
                "a tuple of strings")


def anything() -> Rule:
    """No rule of its own (a sub-group checked elsewhere)."""
    return Rule(lambda x: True, "anything")


def check(group, where: str, rules: dict) -> None:
    """Each field of `group` (a ConfigDict or dict) against its rule; unknown and
    missing fields fail too."""
    for name in group.keys():
        if name not in rules:
            fail(f"{where}.{name}", f"unknown field (known: {', '.join(sorted(rules))})")
    for name, rule in rules.items():
        if name not in group:
            fail(f"{where}.{name}", f"missing; it must be {rule.want}")
        value = group[name]
        if not rule.ok(value):
            fail(f"{where}.{name}", f"must be {rule.want}, got {value!r}")
