"""Multi-domain training input on tf.data: per-process shards, decode, augment, batch, mix.

Each domain is an infinite stream of its split's examples, shuffled with the run
seed, decoded and augmented with per-example stateless seeds, so a stream is a
deterministic function of (seed, process index, process count). Domains are
mixed per batch (one domain per batch, the authors' way) or per example, by a
schedule that is a deterministic function of the seed and the step.

Undecodable images are dropped by `Dataset.ignore_errors` and counted: each example
carries its position in its stream, and the gaps are the dropped ones
(`SkipCounter`). The iterator (shuffle buffers, positions) is saved with
`tf.train.Checkpoint`, so a resumed run sees the batches an uninterrupted one
would have.
"""
import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from infusing_jax import errors
from infusing_jax import config as config_lib
from infusing_jax.data import schema
from infusing_jax.data import teacher


@dataclasses.dataclass(frozen=True)
class Domain:
    """A training domain: its split, its weight for mix='weights', and optional
    precomputed teacher descriptors (`teacher.Descriptors`) looked up by id."""
    name: str
    split: schema.SplitData
    weight: float = 1.0
    descriptors: Optional[object] = None


def _example_seed(seed: int, domain: int, position):
    """A stateless-op seed (2,) int64 unique to (run seed, domain, stream position)."""
    return tf.stack([tf.cast(seed * 1000 + domain, tf.int64), tf.cast(position, tf.int64)])


def domain_stream(split: schema.SplitData, domain: int, preprocess: Callable, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  shuffle_buffer: int = 2048, descriptors=None,
                  teacher_dim: int = 0) -> tf.data.Dataset:
    """Infinite stream of {'image' (S, S, 3) float32, 'label', 'coarse_label', 'domain',
    'id', 'position'} for this process's shard; undecodable images dropped.

    preprocess: (image bytes, seed (2,) int64) -> float32 (S, S, 3).
    position: the example's index in this stream before dropping (see SkipCounter).
    With teacher_dim > 0, also 'teacher' (teacher_dim,) and 'has_teacher': the
    example's descriptor, or zeros and False for a domain without descriptors.
    """
    ds = split.dataset(process_index, process_count)
    ds = ds.shuffle(shuffle_buffer, seed=seed * 1000 + domain, reshuffle_each_iteration=True)
    ds = ds.repeat().enumerate()

    def prepare(position, ex):
        image = preprocess(ex["image"], _example_seed(seed, domain, position))
        return dict(image=image, label=ex["label"], coarse_label=ex["coarse_label"],
                    domain=tf.constant(domain, tf.int64), id=ex["id"], position=position)

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()
    if not teacher_dim:
        return ds
    # After ignore_errors: an id without a descriptor must fail, not vanish.
    lookup = teacher.lookup_fn(descriptors) if descriptors is not None else None

    def add_teacher(ex):
        if lookup is None:
            return dict(ex, teacher=tf.zeros([teacher_dim]), has_teacher=tf.constant(False))
        return dict(ex, teacher=lookup(ex["id"]), has_teacher=tf.constant(True))

    return ds.map(add_teacher, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def mix_weights(domains: Sequence[Domain], mix: str) -> np.ndarray:
    """Sampling probabilities per domain for a mix (round_robin has none: it alternates)."""
    if mix == "balanced" or mix == "round_robin":
        w = np.ones(len(domains))
    elif mix == "dataset_size":
        unknown = [d.name for d in domains if d.split.num_examples is None]
        if unknown:
            raise errors.UserError(f"data.mix 'dataset_size': the sizes of {unknown} are unknown "
                             "(filtered TFDS splits); use mix 'weights'")
        w = np.array([d.split.num_examples for d in domains], np.float64)
    elif mix == "weights":
        w = np.array([d.weight for d in domains], np.float64)
    else:
        raise errors.UserError(f"data.mix: unknown mix {mix!r}; use one of {config_lib.MIXES}")
    if np.any(w < 0) or w.sum() <= 0:
        raise errors.UserError(f"data.mix {mix!r}: domain weights {w.tolist()} must be >= 0 and not all 0")
    return w / w.sum()


def choices(num_domains: int, mix: str, probs: np.ndarray, seed: int) -> tf.data.Dataset:
    """Infinite int64 stream: the domain of step (or example) i, a function of (seed, i)."""
    steps = tf.data.Dataset.range(2 ** 62)
    if mix == "round_robin":
        return steps.map(lambda i: i % num_domains)
    logits = tf.math.log(tf.constant(probs[None], tf.float32))
    return steps.map(lambda i: tf.random.stateless_categorical(
        logits, 1, seed=tf.stack([tf.constant(seed, tf.int64), i]), dtype=tf.int64)[0, 0])


def train_dataset(domains: Sequence[Domain], preprocess: Callable, global_batch_size: int,
                  seed: int, mix: str = "round_robin", one_domain_per_batch: bool = True,
                  process_index: int = 0, process_count: int = 1,
                  shuffle_buffer: int = 2048, num_shards: int = 0) -> tf.data.Dataset:
    """Batches of this process's share (global_batch_size / process_count) of each step.

    one_domain_per_batch: each batch from one domain, chosen by the mix (the
    authors' way); else every example's domain is chosen by the mix.
    num_shards (0 = process_count, a multiple of it): the data is cut into this
    many shards, each with its own stream of global_batch_size / num_shards
    examples per step; a process reads its consecutive num_shards / process_count
    shards and concatenates them. So a run's batches depend on num_shards, not on
    how many processes share the work.
    """
    if not domains:
        raise errors.UserError("data.domains: no training domain configured")
    num_shards = num_shards or process_count
    if num_shards % process_count:
        raise errors.UserError(f"data.num_shards {num_shards} is not a multiple of the "
                         f"{process_count} processes")
    if global_batch_size % num_shards:
        raise errors.UserError(f"data.batch_size {global_batch_size} is not divisible by the "
                         f"{num_shards} data shards (processes)")
    per_process = num_shards // process_count
    shards = [_shard_dataset(domains, preprocess, global_batch_size // num_shards, seed, mix,
                             one_domain_per_batch, s, num_shards, shuffle_buffer)
              for s in range(process_index * per_process, (process_index + 1) * per_process)]
    ds = shards[0] if len(shards) == 1 else tf.data.Dataset.zip(tuple(shards)).map(
        lambda *parts: {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]})
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _shard_dataset(domains, preprocess, batch: int, seed: int, mix: str,
                   one_domain_per_batch: bool, shard: int, num_shards: int,
                   shuffle_buffer: int) -> tf.data.Dataset:
    """The batches (batch, ...) of one shard; the domain schedule is the same for every shard."""
    probs = mix_weights(domains, mix)
    dims = {d.descriptors.embeddings.shape[1] for d in domains if d.descriptors is not None}
    if len(dims) > 1:
        raise errors.UserError(f"data.domains: teacher descriptors of different widths {sorted(dims)}")
    teacher_dim = next(iter(dims), 0)
    streams = [domain_stream(d.split, i, preprocess, seed, shard, num_shards,
                             shuffle_buffer, d.descriptors, teacher_dim)
               for i, d in enumerate(domains)]
    if one_domain_per_batch:
        streams = [s.batch(batch, drop_remainder=True) for s in streams]
        return tf.data.Dataset.choose_from_datasets(streams, choices(len(domains), mix, probs, seed))
    ds = tf.data.Dataset.choose_from_datasets(streams, choices(len(domains), mix, probs, seed))
    return ds.batch(batch, drop_remainder=True)


class SkipCounter:
    """Counts dropped (undecodable) examples per domain from the positions batches carry.

    In a domain's stream, example positions run 0, 1, 2, ...; a dropped example
    leaves a gap. After a batch, dropped = last position + 1 - examples seen.
    Counts occurrences: a broken file is counted once per epoch it comes up in.
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.seen = [0] * len(names)
        self.last = [-1] * len(names)

    def update(self, batch) -> None:
        """batch: a dict with 'domain' and 'position' arrays (N,)."""
        for d, p in zip(np.asarray(batch["domain"]), np.asarray(batch["position"])):
            self.seen[d] += 1
            self.last[d] = max(self.last[d], int(p))

    def skipped(self) -> dict:
        """{domain name: examples dropped so far}."""
        return {n: self.last[i] + 1 - self.seen[i] if self.seen[i] else 0
                for i, n in enumerate(self.names)}

    def state(self) -> dict:
        return dict(seen=self.seen, last=self.last)

    def restore(self, state: dict) -> None:
        self.seen, self.last = list(state["seen"]), list(state["last"])


def save_iterator(iterator, counter: SkipCounter, directory: str, process_index: int = 0):
    """Write the tf.data iterator state and the skip counts of this process."""
    prefix = os.path.join(directory, f"data_process_{process_index}")
    tf.train.Checkpoint(iterator=iterator).write(prefix)
    with tf.io.gfile.GFile(prefix + ".skips.json", "w") as f:
        f.write(json.dumps(counter.state()))


def restore_iterator(iterator, counter: SkipCounter, directory: str, process_index: int = 0):
    """Restore what `save_iterator` wrote into a freshly built iterator of the same pipeline."""
    prefix = os.path.join(directory, f"data_process_{process_index}")
    if not tf.io.gfile.exists(prefix + ".skips.json"):
        raise errors.UserError(f"{prefix}: no saved input-pipeline state")
    tf.train.Checkpoint(iterator=iterator).read(prefix).assert_consumed()
    with tf.io.gfile.GFile(prefix + ".skips.json") as f:
        counter.restore(json.loads(f.read()))
