"""A run's domains from its config: each domain's train split and validation split.

Validation follows docs/method.md: a split the dataset has (`val_split`), else
classes carved from train (`val_classes_fraction`, class-disjoint), else
examples held out of train (`holdout_fraction`, the generic 80/20). A domain
with none of these is not validated.
"""
import dataclasses
from typing import Optional

from infusing_jax import errors
from infusing_jax.training import config as config_lib
from infusing_jax.data import schema
from infusing_jax.data import sources
from infusing_jax.data import splits


@dataclasses.dataclass(frozen=True)
class DomainSplits:
    name: str
    role: str
    train: schema.SplitData
    val: Optional[schema.SplitData]


def load(cfg, name: str) -> DomainSplits:
    """The splits of config.domains[name]; errors name the config field."""
    d = cfg.domains[name]
    where = f"config.domains.{name}"
    try:
        source = sources.load_source(d.source, config_lib.data_dir(cfg, d))
    except (errors.UserError, OSError) as e:
        raise errors.UserError(f"{where}.source: {e}") from None
    if d.train_split not in source.splits:
        raise errors.UserError(f"{where}.train_split: {d.source} has no split {d.train_split!r}; "
                         f"it has {', '.join(source.splits)}")
    train = source.split(d.train_split)
    if train.num_examples == 0:
        raise errors.UserError(f"{where}: split {d.train_split!r} of {d.source} is empty")
    val = None
    if d.val_split:
        if d.val_split not in source.splits:
            raise errors.UserError(f"{where}.val_split: {d.source} has no split {d.val_split!r}; "
                             f"it has {', '.join(source.splits)}")
        val = source.split(d.val_split)
    elif d.val_classes_fraction:
        if train.num_classes == 0:
            raise errors.UserError(f"{where}.val_classes_fraction: {d.source} has no classes "
                                   "to carve; hold images out with holdout_fraction instead")
        train, val = splits.carve_val(train, d.val_classes_fraction, d.val_seed)
    elif d.holdout_fraction:
        train, val = splits.holdout(train, d.holdout_fraction, d.val_seed)
    needs_labels = [k for k in d.losses.keys() if k in config_lib.NEEDS_LABELS]
    if needs_labels and train.num_classes == 0:
        raise errors.UserError(f"{where}.losses: {needs_labels} need class labels, and {d.source} "
                         "has none")
    return DomainSplits(name, d.role, train, val)

