"""Multi-domain training input on tf.data: per-process shards, decode, augment, batch, mix.

Each domain is an infinite stream of its split's examples, shuffled with the run
seed, decoded and augmented with per-example stateless seeds, so a stream is a
deterministic function of (seed, process index, process count). Domains are
mixed per batch (one domain per batch, the authors' way) or per example, by a
schedule that is a deterministic function of the seed and the step.

Undecodable images are dropped by `Dataset.ignore_errors` and counted: each example
carries its position in its stream, and the gaps are the dropped ones
(`SkipCounter`). A domain that drops a whole pass, or MAX_FAILURES_IN_A_ROW images
in a row, stops the stream with an error (`stream_failure` reads it) instead of
spinning for ever; augmentation runs after the drop, so its errors stop the run. The iterator (shuffle buffers, positions) is saved with
`tf.train.Checkpoint`, so a resumed run sees the batches an uninterrupted one
would have.

A domain marked `in_memory` (`memory_plan`: read more than once, within a budget)
is decoded once (`decode_shard`) and its stream read from memory (`_cached_passes`):
the same elements in the same order as from disk, at a fraction of the CPU.
"""
import dataclasses
import json
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from infusing_jax import errors
from infusing_jax.data import mixing
from infusing_jax.data import schema
from infusing_jax.data import teacher


@dataclasses.dataclass(frozen=True)
class Domain:
    """A training domain: its split, its weight for mix='weights', optional precomputed
    teacher descriptors (`teacher.Descriptors`) looked up by id, and whether its train
    images are decoded once and kept in memory (`in_memory`, see `memory_plan`)."""
    name: str
    split: schema.SplitData
    weight: float = 1.0
    descriptors: Optional[object] = None
    in_memory: bool = False


MAX_FAILURES_IN_A_ROW = 1000  # consecutive undecodable images that stop a domain's stream
_FAILED = "input pipeline: domain "  # how a stream's own failure starts its message
EMPTY_SHARD = "a data shard of its train split is empty"  # the reason stream_failure gives


def _example_seed(seed: int, domain: int, position):
    """A stateless-op seed (..., 2) int64 unique to (run seed, domain, stream position);
    position: int (...)."""
    position = tf.cast(position, tf.int64)
    return tf.stack([tf.fill(tf.shape(position), tf.constant(seed * 1000 + domain, tf.int64)),
                     position], axis=-1)


def _blank(spec):
    """A zero element of `spec` (unknown dimensions 0): the end-of-pass record."""
    return tf.nest.map_structure(
        lambda s: tf.zeros([d or 0 for d in s.shape.as_list()], s.dtype), spec)


# Chunks a disk stream decodes at once. tf.data's interleave also decodes twice as many
# ahead, holds them (in iterator checkpoints too) and runs up to four times as many
# threads; its default, every core, would hold ~3 x cores chunks on a big host.
_DECODERS = min(os.cpu_count() or 1, 8)


def _records(split: schema.SplitData, decode: Callable, process_index: int,
             process_count: int):
    """-> (records, decode_record): the shard's records, their 'image' still to be read
    where the split can read later (`SplitData.unread`), and decode_record(image) ->
    decode(the encoded file), read first where it is still to be read."""
    if split.unread is not None:
        return split.unread(process_index, process_count), lambda image: decode(
            split.read(image))
    return split.dataset(process_index, process_count), decode


def _pass_chunks(records: tf.data.Dataset, rows: int) -> tf.data.Dataset:
    """One pass over `records` as chunks of (index (n,), is_end (n,), records (n,)),
    1 <= n <= rows, still to decode: the records, then an end marker row (is_end, index =
    the number of records, a zero record), the last row of the last chunk."""
    records = records.ignore_errors()  # a source's own read errors (TFDS I/O), as before
    tagged = tf.data.Dataset.zip(tf.data.Dataset.from_tensors(False).repeat(), records)
    marker = tf.data.Dataset.from_tensors((True, _blank(records.element_spec)))
    return tagged.concatenate(marker).enumerate().batch(rows)


def _decoded_chunks(records: tf.data.Dataset, decode: Callable, rows: int,
                    decoded_shape: Optional[tuple]) -> tf.data.Dataset:
    """One pass over `records` in chunks (index (n,), is_end (n,), decoded uint8 images
    (n, ...), records (n,)), 1 <= n <= rows, in order; undecodable records dropped. An end
    marker row follows the records (is_end, index = the number of records, a zero image),
    the last row of the last chunk. decoded_shape: decode's one shape, or None (then
    rows must be 1)."""
    return _decoded(_pass_chunks(records, rows), decode, rows, decoded_shape)


def _decoded(chunks: tf.data.Dataset, decode: Callable, rows: int,
             decoded_shape: Optional[tuple]) -> tf.data.Dataset:
    """_pass_chunks' chunks, their images decoded: (index, is_end, uint8 images (n, ...),
    records), in order; undecodable records dropped, a chunk left with none too.

    A chunk's rows are read and decoded in one call, in turn. On the toy world's generic
    domain (32 px PNGs) its stream then takes 0.14 CPU-ms an image instead of 0.24, and
    0.3 context switches instead of 10, against an image-at-a-time map (bench/README.md).
    A chunk with a broken file fails that call; it is then decoded image by image, the
    broken ones dropped (`Dataset.ignore_errors`).
    """
    shape = decoded_shape or (0, 0, 3)

    def decoded(is_end, image):
        return tf.cond(is_end, lambda: tf.zeros(shape, tf.uint8), lambda: decode(image))

    def whole(index, item):
        is_end, ex = item
        images = tf.map_fn(lambda a: decoded(*a), (is_end, ex["image"]), parallel_iterations=1,
                           fn_output_signature=tf.TensorSpec(decoded_shape or (None, None, 3),
                                                             tf.uint8))
        return index, is_end, images, ex

    def one(index, item):
        is_end, ex = item
        return index, is_end, decoded(is_end, ex["image"]), ex

    def chunk(index, item):
        """Exactly one chunk, with the decodable rows (none: 0 rows, filtered out)."""
        first = tf.data.Dataset.from_tensors((index, item)).map(whole).ignore_errors()
        again = tf.data.Dataset.from_tensor_slices((index, item)).map(one).ignore_errors()
        again = again.batch(rows)
        empty = tf.data.Dataset.from_tensors(_blank(first.element_spec))
        return first.concatenate(again).concatenate(empty).take(1)

    return chunks.interleave(chunk, cycle_length=_DECODERS, block_length=1,
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).filter(
        lambda index, *_: tf.size(index) > 0)


def _passes(records: tf.data.Dataset, domain: int, seed: int, shuffle_buffer: int,
            each_pass: Callable = lambda ds: ds) -> tf.data.Dataset:
    """Endless passes over a domain's records, each reshuffled: pass p's order depends on
    (seed, domain, p, the number of records), not on what the records hold nor on where
    an iterator was restored. each_pass(one reshuffled pass) -> that pass's elements.

    Each pass has its own shuffle seed rather than `reshuffle_each_iteration`: after an
    iterator restore, TF's reshuffle seeds can repeat an earlier pass's order (a disk
    stream of the tests' two domains, restored at 15 points: 4 went astray)."""
    first_seed = tf.constant(seed * 1000 + domain, tf.int64) * _PASSES  # wraps: still distinct

    def one_pass(p):
        return each_pass(records.shuffle(shuffle_buffer, seed=first_seed + p,
                                         reshuffle_each_iteration=False))

    return tf.data.Dataset.range(_PASSES).flat_map(one_pass)


_PASSES = 2 ** 40  # a domain's stream: endless in practice


def _decoded_passes(split: schema.SplitData, domain: int, name: str, decode: Callable,
                    seed: int, process_index: int, process_count: int,
                    shuffle_buffer: int, rows: int,
                    decoded_shape: Optional[tuple]) -> tf.data.Dataset:
    """Infinite stream of chunks (position (n,), decoded uint8 images (n, ...), records
    (n,)), 0 <= n <= rows, of reshuffled passes over this process's shard, in order;
    undecodable images dropped, failing the stream (an InvalidArgumentError whose message
    starts with _FAILED) when the shard is empty, or a whole pass or MAX_FAILURES_IN_A_ROW
    images in a row are dropped. decoded_shape: the one shape decode gives, or None,
    where images of several shapes go one a chunk.

    Each pass is cut into chunks of `rows` records and ends with a marker record, so a
    pass never comes out empty (endless empty passes would spin for ever, as would
    ignore_errors over an endless stream of failures) and a chunk
    never spans two passes. The bookkeeping is done a chunk at a time (a scan over
    chunks: on bench/loop.py's toy run 0.05-0.08 CPU-ms an image less than a scan over
    images). Positions count records across passes, dropped ones included: 0, 1, 2, ...
    as SkipCounter expects.
    """
    rows = rows if decoded_shape else 1
    records, decode_record = _records(split, decode, process_index, process_count)
    chunks = _decoded(_passes(records, domain, seed, shuffle_buffer,
                              lambda ds: _pass_chunks(ds, rows)),
                      decode_record, rows, decoded_shape)

    def count(state, chunk):
        """state: (records before this pass, kept in this pass, position of the last kept
        image or -1) -> the chunk's kept rows and their positions; fails as the doc says.
        A marker can only be a chunk's last row; its position is the next pass's first."""
        offset, kept, last = state
        index, is_end, image, ex = chunk
        position, real = offset + index, tf.logical_not(is_end)
        kept_positions = tf.boolean_mask(position, real)
        # Each row's last kept position before it: the dropped ones between are a run.
        before = tf.concat([[last], kept_positions], 0)
        previous = tf.gather(before, tf.cumsum(tf.cast(real, tf.int64), exclusive=True))
        ends = tf.reduce_any(is_end)
        length = tf.reduce_max(tf.where(is_end, index, 0))  # the ending pass's records
        kept = kept + tf.size(kept_positions, out_type=tf.int64)
        check = [
            tf.debugging.Assert(tf.logical_not(ends & tf.equal(length, 0)), [
                f"{_FAILED}{name}: {EMPTY_SHARD} (fewer examples than data shards)"]),
            tf.debugging.Assert(tf.logical_not(ends & (length > 0) & tf.equal(kept, 0)), [
                f"{_FAILED}{name}: no image of a whole pass over its train split could be "
                "decoded"]),
            tf.debugging.Assert(tf.reduce_all(position - previous - 1 < MAX_FAILURES_IN_A_ROW), [
                f"{_FAILED}{name}: {MAX_FAILURES_IN_A_ROW} images in a row could not be "
                "decoded"])]
        with tf.control_dependencies(check):
            kept_positions = tf.identity(kept_positions)
        state = (tf.where(ends, offset + length, offset),
                 tf.where(ends, tf.zeros_like(kept), kept), before[-1])
        return state, (kept_positions, tf.boolean_mask(image, real),
                       tf.nest.map_structure(lambda t: tf.boolean_mask(t, real), ex))

    zero = tf.constant(0, tf.int64)
    return chunks.scan((zero, zero, tf.constant(-1, tf.int64)), count)


@dataclasses.dataclass(frozen=True)
class DecodedShard:
    """A shard's train records, decoded once and kept in memory.

    images: uint8 (K, H, W, 3), the K decodable images in record order; row: int64 (N,),
    each of the shard's N records' row in images, -1 for an undecodable one; label,
    coarse_label: int64 (N,); id: bytes (N,) (-1 and b'' where undecodable).
    """
    images: np.ndarray
    row: np.ndarray
    label: np.ndarray
    coarse_label: np.ndarray
    id: np.ndarray

    @property
    def undecodable(self) -> int:
        return int(np.sum(self.row < 0))

    def usable(self) -> bool:
        """Whether _cached_passes gives exactly what _decoded_passes would: a shard that
        is not empty, has a decodable image and fewer undecodable ones than
        MAX_FAILURES_IN_A_ROW (else the disk stream is the one to fail)."""
        return (len(self.row) > 0 and len(self.images) > 0
                and self.undecodable < MAX_FAILURES_IN_A_ROW)


def decode_shard(split: schema.SplitData, decode: Callable, shape: tuple,
                 process_index: int = 0, process_count: int = 1) -> DecodedShard:
    """Decodes every record of a shard once, in parallel, in record order; `decode` gives
    uint8 images of one `shape`. Takes twice the images' bytes while it stacks them."""
    images, kept, label, coarse_label, ids = [], [], [], [], []
    records, decode_record = _records(split, decode, process_index, process_count)
    for index, is_end, image, ex in _decoded_chunks(
            records, decode_record, CHUNK, shape).as_numpy_iterator():
        real = ~is_end
        images.extend(image[real])
        kept.extend(index[real])
        label.extend(ex["label"][real])
        coarse_label.extend(ex["coarse_label"][real])
        ids.extend(ex["id"][real])
    num_records, kept = index[-1], np.asarray(kept, np.int64)  # the end marker's index
    row = np.full(num_records, -1, np.int64)
    row[kept] = np.arange(len(kept))

    def spread(values, fill, dtype):
        out = np.full(num_records, fill, dtype)
        out[kept] = values
        return out

    stacked = np.stack(images) if images else np.zeros((0,) + tuple(shape), np.uint8)
    return DecodedShard(stacked, row, spread(label, -1, np.int64),
                        spread(coarse_label, -1, np.int64), spread(ids, b"", object))


def _cached_passes(shard: DecodedShard, domain: int, seed: int, shuffle_buffer: int):
    """_decoded_passes from memory, for a `usable` shard: -> (stream of (position, row),
    fetch(rows) -> (images, records)), which give the same (position, image, record) as
    _decoded_passes' chunks, in the same order. The records are reshuffled as
    _decoded_passes reshuffles them (_passes), and positions run over passes of N
    records, undecodable ones left out.
    Fetching is left to the caller, to do in its own map (one map less per chunk)."""
    images, row = tf.constant(shard.images), tf.constant(shard.row)
    records = {k: tf.constant(getattr(shard, k)) for k in ("label", "coarse_label", "id")}
    order = _passes(tf.data.Dataset.range(len(shard.row)), domain, seed,
                    shuffle_buffer).enumerate()
    if np.any(shard.row < 0):
        order = order.filter(lambda position, i: row[i] >= 0)

    def fetch(i):
        """i: int64 () or (B,) -> (images (..., H, W, 3), records (...))."""
        return tf.gather(images, tf.gather(row, i)), {k: tf.gather(v, i)
                                                      for k, v in records.items()}

    return order, fetch


CHUNK = 64  # rows prepared a map call where a domain's stream is not batched, and
# the most a disk stream decodes in one call


def domain_stream(split: schema.SplitData, domain: int, view, *, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  shuffle_buffer: int = 2048, descriptors=None,
                  teacher_dim: int = 0, name: str = "",
                  decoded: Optional[DecodedShard] = None, batch: int = 0) -> tf.data.Dataset:
    """Infinite stream of {'image' (S, S, 3) float32, 'label', 'coarse_label', 'domain',
    'id', 'position'} for this process's shard; undecodable images dropped.

    view: a tf_views.View: decode(image bytes) -> uint8 image, then augment(image,
    seed (2,) int64) -> float32 (S, S, 3). A broken file is dropped (and counted by
    its position); an augmentation that fails stops the stream, as does a domain
    whose images all fail to decode (_decoded_passes).
    decoded: this shard decoded in memory (`decode_shard`, `usable`): the same stream,
    read from memory instead of decoded on every pass.
    position: the example's index in this stream before dropping (see SkipCounter).
    With teacher_dim > 0, also 'teacher' (teacher_dim,) and 'has_teacher': the
    example's descriptor, or zeros and False for a domain without descriptors.
    batch > 0: the same examples in batches of `batch` (remainder dropped).
    Examples are read and prepared in chunks (from memory `batch` or CHUNK rows, from
    disk at most CHUNK), one map call a chunk: on bench/loop.py's toy run (2 CPU cores) a
    kept domain's batch took 2.7 ms of CPU instead of 7.2 ms (bench/README.md). A view
    whose decoded images vary in shape (no view.decoded_shape; the train views all have
    one) goes one image a chunk, which costs more per image.
    """
    # An id without a descriptor must fail, not vanish.
    lookup = teacher.lookup_fn(descriptors) if descriptors is not None else None

    def prepare(position, image, ex):
        """A chunk: position int64 (n,), uint8 images (n, ...), records (n,)."""
        seeds, n = _example_seed(seed, domain, position), tf.shape(position)
        out = dict(image=tf.map_fn(lambda a: view.augment(*a), (image, seeds),
                                   fn_output_signature=tf.float32, parallel_iterations=1),
                   label=ex["label"], coarse_label=ex["coarse_label"],
                   domain=tf.fill(n, tf.constant(domain, tf.int64)), id=ex["id"],
                   position=position)
        if teacher_dim and lookup is None:
            out.update(teacher=tf.zeros(tf.concat([n, [teacher_dim]], 0)),
                       has_teacher=tf.fill(n, False))
        elif teacher_dim:
            out.update(teacher=lookup(ex["id"]), has_teacher=tf.fill(n, True))
        return out

    rows = batch or CHUNK
    if decoded is None:  # chunks of at most CHUNK: a big batch's decoding spreads over threads
        chunks = _decoded_passes(split, domain, name or f"#{domain}", view.decode, seed,
                                 process_index, process_count, shuffle_buffer,
                                 min(rows, CHUNK), view.decoded_shape)
        element = prepare
    else:
        order, fetch = _cached_passes(decoded, domain, seed, shuffle_buffer)
        chunks, element = order.batch(rows), lambda position, i: prepare(position, *fetch(i))
    chunks = chunks.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return chunks.rebatch(batch, drop_remainder=True) if batch else chunks.unbatch()


def stream_failure(error: Exception) -> Optional[tuple]:
    """-> (domain name, one-line reason) of a domain stream's own failure (see
    _decoded_passes), or None for any other error."""
    message = getattr(error, "message", str(error))
    if _FAILED not in message:
        return None
    line = message[message.index(_FAILED) + len(_FAILED):].splitlines()[0].rstrip("]\" ")
    name, _, reason = line.partition(": ")
    return name, reason


def first_decode_error(split: schema.SplitData, decode: Callable, limit: int = 64):
    """-> (record id, the first line of its error) of the first of `limit` records of the
    split that do not decode (eagerly, in order), or None if they all decode."""
    for ex in split.dataset(0, 1).take(limit):
        try:
            decode(ex["image"])
        except (tf.errors.OpError, ValueError) as e:
            return ex["id"].numpy().decode(), str(getattr(e, "message", e)).splitlines()[0]
    return None


def check_decodable(split: schema.SplitData, decode: Callable, where: str, what: str,
                    limit: int = 64):
    """-> (the decoded image, its record) of the first of `limit` records of the split that
    decodes; none: one UserError `<where>: none of the N <what> images tried can be
    decoded; the first, <id>: <why>`."""
    error, tried = None, 0
    for ex in split.dataset(0, 1).take(limit):
        tried += 1
        try:
            return decode(ex["image"]), ex
        except (tf.errors.OpError, ValueError) as e:
            error = error or (ex["id"].numpy().decode(), str(getattr(e, "message", e)))
    if error is None:
        raise errors.UserError(f"{where}: its {what} split is empty")
    raise errors.UserError(f"{where}: none of the {tried} {what} images tried can be decoded; "
                           f"the first, {error[0]}: {error[1].splitlines()[0]}")


def check_views(domains: Sequence["Domain"], view, limit: int = 64) -> None:
    """Before training: each domain's first decodable image (of its first `limit`) goes
    through `view.augment`; one UserError names the domain whose images cannot be read
    (check_decodable), or whose augmentation fails (a setting that cannot work, e.g. a
    crop larger than the image)."""
    seed = tf.zeros([2], tf.int64)
    for d in domains:
        image, ex = check_decodable(d.split, view.decode, f"config.domains.{d.name}.source",
                                    "train", limit)
        try:
            view.augment(image, seed)
        except (tf.errors.OpError, ValueError) as e:
            raise errors.UserError(f"config.domains.{d.name}: its train augmentation fails on "
                                   f"{ex['id'].numpy().decode()}, a {image.shape[1]}x"
                                   f"{image.shape[0]} image: "
                                   f"{str(getattr(e, 'message', e)).splitlines()[0]}; check "
                                   "data.resize and model.image_size") from None


def choices(num_domains: int, mix: str, probs: np.ndarray, seed: int) -> tf.data.Dataset:
    """Infinite int64 stream: the domain of step (or example) i, a function of (seed, i)."""
    steps = tf.data.Dataset.range(2 ** 62)
    if mix == "round_robin":
        return steps.map(lambda i: i % num_domains)
    logits = tf.math.log(tf.constant(probs[None], tf.float32))
    return steps.map(lambda i: tf.random.stateless_categorical(
        logits, 1, seed=tf.stack([tf.constant(seed, tf.int64), i]), dtype=tf.int64)[0, 0])


def train_dataset(domains: Sequence[Domain], view, *, global_batch_size: int, seed: int,
                  mix: str = "round_robin", one_domain_per_batch: bool = True,
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
        raise errors.UserError("config.domains: no training domain configured")
    num_shards = num_shards or process_count
    if num_shards % process_count:
        raise errors.UserError(f"config.data.num_shards: {num_shards} is not a multiple of "
                               f"the {process_count} processes")
    if global_batch_size % num_shards:
        raise errors.UserError(f"config.data.batch_size: {global_batch_size} is not divisible "
                               f"by the {num_shards} data shards (processes)")
    per_process = num_shards // process_count
    shards = [_shard_dataset(domains, view, batch=global_batch_size // num_shards, seed=seed,
                             mix=mix, one_domain_per_batch=one_domain_per_batch, shard=s,
                             num_shards=num_shards, shuffle_buffer=shuffle_buffer)
              for s in range(process_index * per_process, (process_index + 1) * per_process)]
    ds = shards[0] if len(shards) == 1 else tf.data.Dataset.zip(tuple(shards)).map(
        lambda *parts: {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]})
    options = tf.data.Options()
    options.deterministic = True
    # Each pass's shuffle (_passes) is made inside flat_map with a seed of its own; tf.data
    # counts its (unused) seed generator as external state and would refuse to save the
    # iterator. The shuffle's iterator saves and restores its buffer and draws itself
    # (tests: test_resume_gives_the_batches_an_uninterrupted_run_sees).
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _shard_dataset(domains, view, *, batch: int, seed: int, mix: str,
                   one_domain_per_batch: bool, shard: int, num_shards: int,
                   shuffle_buffer: int) -> tf.data.Dataset:
    """The batches (batch, ...) of one shard; the domain schedule is the same for every shard."""
    probs = mixing.weights(domains, mix)
    dims = {d.descriptors.embeddings.shape[1] for d in domains if d.descriptors is not None}
    if len(dims) > 1:
        raise errors.UserError(f"config.domains: teacher descriptors of different widths "
                               f"{sorted(dims)}; make them with one model")
    teacher_dim = next(iter(dims), 0)
    streams = [domain_stream(d.split, i, view, seed=seed, process_index=shard,
                             process_count=num_shards, shuffle_buffer=shuffle_buffer,
                             descriptors=d.descriptors, teacher_dim=teacher_dim, name=d.name,
                             decoded=_in_memory(d, view, shard, num_shards),
                             batch=batch if one_domain_per_batch else 0)
               for i, d in enumerate(domains)]
    if one_domain_per_batch:
        return tf.data.Dataset.choose_from_datasets(streams, choices(len(domains), mix, probs, seed))
    ds = tf.data.Dataset.choose_from_datasets(streams, choices(len(domains), mix, probs, seed))
    return ds.batch(batch, drop_remainder=True)


def memory_plan(domains: Sequence[Domain], reads: Sequence[float], image_bytes: int,
                budget_bytes: int, process_count: int = 1):
    """-> (domains, one log line each): in_memory set on the domains whose decoded train
    images to keep in memory.

    A domain qualifies when the run reads its split more than once (reads: examples
    read over the run, (D,)) and its size is known. Qualifying domains are taken, the
    most often read first, while this process's share of their images,
    ceil(num_examples / process_count) * image_bytes, fits in what is left of
    budget_bytes.
    """
    lines, out, left = [], list(domains), budget_bytes
    passes = [r / d.split.num_examples if d.split.num_examples else 0.0
              for d, r in zip(domains, reads)]
    for i in sorted(range(len(domains)), key=lambda i: -passes[i]):
        d = domains[i]
        need = -(-(d.split.num_examples or 0) // process_count) * image_bytes
        why = ("its size is unknown" if d.split.num_examples is None else
               f"the run reads it {passes[i]:.2f} times" if passes[i] <= 1 else
               f"its {need / 2**20:.1f} MB of decoded images exceed the "
               f"{left / 2**20:.1f} MB left of data.keep_decoded_mb" if need > left else "")
        if why:
            lines.append(f"{d.name}: decoded as read ({why})")
            continue
        left -= need
        out[i] = dataclasses.replace(d, in_memory=True)
        lines.append(f"{d.name}: decoded once and kept in memory ({need / 2**20:.1f} MB; "
                     f"the run reads it {passes[i]:.1f} times)")
    return out, lines


def _in_memory(domain: Domain, view, shard: int, num_shards: int) -> Optional[DecodedShard]:
    """The domain's shard decoded in memory where the domain asks for it and the shard is
    `usable`, else None (it is then decoded as read); logged either way."""
    if not domain.in_memory:
        return None
    start = time.perf_counter()
    decoded = decode_shard(domain.split, view.decode, view.decoded_shape, shard, num_shards)
    where = f"input pipeline: {domain.name}, shard {shard} of {num_shards}"
    if not decoded.usable():
        logging.info("%s: %d of %d images undecodable; decoded as read", where,
                     decoded.undecodable, len(decoded.row))
        return None
    logging.info("%s: %d images decoded into memory (%.1f MB, %d undecodable) in %.1f s",
                 where, len(decoded.images), decoded.images.nbytes / 2**20,
                 decoded.undecodable, time.perf_counter() - start)
    return decoded


class SkipCounter:
    """Counts dropped (undecodable) examples per domain from the positions batches carry.

    In each shard's stream of a domain, example positions run 0, 1, 2, ...; a dropped
    example leaves a gap. After a batch, dropped = last position + 1 - examples seen,
    per (shard, domain), summed over the shards. A process's batch holds its `shards`
    shards' parts one after another, in equal parts (train_dataset). Counts
    occurrences: a broken file is counted once per epoch it comes up in.
    """

    def __init__(self, names: Sequence[str], shards: int = 1):
        self.names, self.shards = list(names), shards
        self.seen = [0] * (shards * len(names))  # index: shard * len(names) + domain
        self.last = [-1] * (shards * len(names))

    def update(self, batch) -> None:
        """batch: a dict with 'domain' and 'position' arrays (N,), N a multiple of shards."""
        domains, positions = np.asarray(batch["domain"]), np.asarray(batch["position"])
        shard = np.arange(len(domains)) // (len(domains) // self.shards)
        keys = shard * len(self.names) + domains
        seen = np.bincount(keys, minlength=len(self.seen))
        last = np.full(len(self.seen), -1, np.int64)
        np.maximum.at(last, keys, positions)
        self.seen = [a + int(b) for a, b in zip(self.seen, seen)]
        self.last = [max(a, int(b)) for a, b in zip(self.last, last)]

    def skipped(self) -> dict:
        """{domain name: examples dropped so far}."""
        dropped = [last + 1 - seen if seen else 0 for seen, last in zip(self.seen, self.last)]
        return {n: sum(dropped[s * len(self.names) + i] for s in range(self.shards))
                for i, n in enumerate(self.names)}

    def state(self) -> dict:
        return dict(seen=self.seen, last=self.last)

    def restore(self, state: dict) -> None:
        self.seen, self.last = list(state["seen"]), list(state["last"])


class StateMismatch(Exception):
    """A saved iterator state of another pipeline (other batch shapes or structure)."""


def _shapes(iterator) -> dict:
    return {k: spec.shape.as_list() for k, spec in iterator.element_spec.items()}


def save_iterator(iterator, counter: SkipCounter, directory: str, process_index: int = 0):
    """Write the tf.data iterator state, its batch shapes and the skip counts of this
    process."""
    prefix = os.path.join(directory, f"data_process_{process_index}")
    tf.train.Checkpoint(iterator=iterator).write(prefix)
    with tf.io.gfile.GFile(prefix + ".skips.json", "w") as f:
        f.write(json.dumps(dict(counter.state(), shapes=_shapes(iterator))))


def restore_iterator(iterator, counter: SkipCounter, directory: str, process_index: int = 0):
    """Restore what `save_iterator` wrote into a freshly built iterator of the same pipeline;
    StateMismatch where it is another pipeline's (other batch shapes: data.batch_size, the
    number of processes; another structure)."""
    prefix = os.path.join(directory, f"data_process_{process_index}")
    if not tf.io.gfile.exists(prefix + ".skips.json"):
        raise errors.UserError(f"{prefix}: no saved input-pipeline state")
    with tf.io.gfile.GFile(prefix + ".skips.json") as f:
        state = json.loads(f.read())
    saved, shapes = state.get("shapes"), _shapes(iterator)
    if saved is not None and saved != shapes:
        raise StateMismatch(f"it made batches of images {saved['image']}, this run makes "
                            f"{shapes['image']} on each process")
    try:
        tf.train.Checkpoint(iterator=iterator).read(prefix).assert_consumed()
    except AssertionError as e:
        raise StateMismatch(f"another input pipeline ({str(e).splitlines()[0][:200]})") from None
    except tf.errors.OpError as e:  # how tf.data says the saved stages are not these
        if "Failed to restore dataset iterator" not in str(e):
            raise
        raise StateMismatch("another input pipeline (its saved stages are not this "
                            "version's)") from None
    counter.restore(state)
