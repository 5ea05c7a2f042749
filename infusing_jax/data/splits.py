"""The paper's validation design: class-disjoint val (target), an 80/20 holdout (generic set).

Both are deterministic functions of (the split, the seed): the same on every run and process,
and every example lands in exactly one side. Filtering happens in tf.data, per shard, so a
process still reads only its own shard.

num_examples of a filtered split is exact where the labels / ids are known without a pass
(file sources: `ids` set); otherwise None (TFDS splits: counting needs a full read).
"""
import dataclasses
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from infusing_jax.data.schema import SplitData

_HASH_BUCKETS = 1_000_000


def carve_val(split: SplitData, fraction: float, seed: int) -> Tuple[SplitData, SplitData]:
    """-> (train, val), class-disjoint: round(fraction * C) of the split's C classes go to val.

    The classes are those present in split.labels when known, else 0..num_classes-1; a
    permutation seeded by `seed` picks the val ones. Labels are NOT renumbered: both sides
    keep num_classes and the original label values (a classifier over the train side has
    rows for val classes that never get a positive).
    """
    _check_fraction(fraction)
    if split.num_classes == 0:
        raise ValueError(f"carve_val: split {split.name!r} has no class labels")
    classes = np.unique(split.labels) if split.labels is not None else np.arange(split.num_classes)
    val_classes = np.random.default_rng(seed).permutation(classes)[:round(fraction * len(classes))]
    is_val = np.zeros(split.num_classes, dtype=bool)
    is_val[val_classes] = True

    def in_val(ex):
        return tf.gather(is_val, ex["label"])

    def in_train(ex):
        return tf.logical_not(in_val(ex))

    mask = None if split.labels is None else is_val[split.labels]
    return (_filtered(split, split.name, in_train, _not(mask)),
            _filtered(split, f"{split.name}-val", in_val, mask))


def holdout(split: SplitData, fraction: float = 0.2, seed: int = 42) -> Tuple[SplitData, SplitData]:
    """-> (kept, held_out), example-level: an example is held out iff the hash of its id and
    the seed (tf.strings.to_hash_bucket_fast, FarmHash64) falls in the first `fraction` of
    the buckets. About fraction of the examples are held out; which ones depends only on ids."""
    _check_fraction(fraction)

    def held(ex):
        return _is_held_out(ex["id"], fraction, seed)

    def kept(ex):
        return tf.logical_not(held(ex))

    # Exact counts where the ids are known up front (file sources): the same tf op, eagerly.
    mask = None
    if split.ids is not None:
        mask = _is_held_out(tf.constant(list(split.ids), tf.string), fraction, seed).numpy()
    return (_filtered(split, split.name, kept, _not(mask)),
            _filtered(split, f"{split.name}-heldout", held, mask))


def _is_held_out(ids: tf.Tensor, fraction: float, seed: int) -> tf.Tensor:
    """ids: tf.string (...) -> tf.bool (...)."""
    buckets = tf.strings.to_hash_bucket_fast(tf.strings.join([ids, str(seed)], separator=":"),
                                             _HASH_BUCKETS)
    return buckets < round(fraction * _HASH_BUCKETS)


def _filtered(split: SplitData, name: str, keep, mask: Optional[np.ndarray]) -> SplitData:
    """split with only the examples where keep(ex) (a tf.bool); mask: keep per example, if known."""
    def dataset(shard_index: int, num_shards: int) -> tf.data.Dataset:
        return split.dataset(shard_index, num_shards).filter(keep)

    def unread(shard_index: int, num_shards: int) -> tf.data.Dataset:
        return split.unread(shard_index, num_shards).filter(keep)

    changes = dict(name=name, dataset=dataset, num_examples=None, labels=None, ids=None,
                   unread=unread if split.unread else None)
    if mask is not None:
        changes["num_examples"] = int(mask.sum())
        if split.labels is not None:
            changes["labels"] = split.labels[mask]
        if split.ids is not None:
            changes["ids"] = split.ids[mask]
    return dataclasses.replace(split, **changes)


def _not(mask: Optional[np.ndarray]) -> Optional[np.ndarray]:
    return None if mask is None else ~mask


def _check_fraction(fraction: float):
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
