"""Teacher descriptors: the frozen pretrained model's embeddings of a split, keyed by id.

The authors' precomputed-teacher mode: embed a split once with the pretrained
model (eval views), store the embeddings by example id, and look them up by id
during training. A descriptor file records a fingerprint of the model that made
it; a file from another model, or one that lacks ids the split has, is an error.
"""
import dataclasses
import hashlib
import io
import os
import sys

import jax
import numpy as np
import tensorflow as tf
import tqdm
from jax.sharding import NamedSharding, PartitionSpec

from infusing_jax import errors
from infusing_jax.data import device_put
from infusing_jax.data import schema


@dataclasses.dataclass(frozen=True)
class Descriptors:
    ids: np.ndarray  # (N,) str
    embeddings: np.ndarray  # (N, E) float32
    model: str  # fingerprint of the model that produced them


def fingerprint(flat_params: dict, cfg) -> str:
    """A short hash of the model: family, resolution and every parameter's bytes."""
    h = hashlib.sha256(f"{cfg.family}/{cfg.image_size}".encode())
    for key in sorted(flat_params):
        h.update(key.encode())
        h.update(np.ascontiguousarray(flat_params[key], np.float32).tobytes())
    return h.hexdigest()[:16]


def extract(encode, split: schema.SplitData, preprocess, model: str, batch_size: int = 64,
            process_index: int = 0, process_count: int = 1):
    """-> (Descriptors of this process's shard, ids that could not be decoded).

    encode: jitted (images (B, S, S, 3)) -> (B, E), run sharded over this process's
    devices. preprocess: (image bytes, seed) -> (S, S, 3), the eval view.
    """
    mesh = device_put.data_mesh(jax.local_devices())
    if batch_size % mesh.size:
        raise errors.UserError(f"batch_size {batch_size} is not divisible by the {mesh.size} devices")
    sharding = NamedSharding(mesh, PartitionSpec(device_put.DATA_AXIS))
    all_ids = [x.decode() for x in split.dataset(process_index, process_count)
               .map(lambda ex: ex["id"]).as_numpy_iterator()]
    seed = tf.zeros([2], tf.int64)
    ds = split.dataset(process_index, process_count).map(
        lambda ex: dict(image=preprocess(ex["image"], seed), id=ex["id"]),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().batch(batch_size).prefetch(tf.data.AUTOTUNE)
    ids, embeddings = [], []
    with tqdm.tqdm(total=len(all_ids), desc=f"teacher {split.name}", unit="img",
                   file=sys.stderr) as bar:
        for batch in ds.as_numpy_iterator():
            n = len(batch["id"])
            images = np.zeros((batch_size,) + batch["image"].shape[1:], np.float32)
            images[:n] = batch["image"]
            embeddings.append(np.asarray(encode(jax.device_put(images, sharding)))[:n])
            ids += [x.decode() for x in batch["id"]]
            bar.update(n)
    skipped = sorted(set(all_ids) - set(ids))
    emb = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32)
    return Descriptors(np.asarray(ids, dtype=str), emb.astype(np.float32), model), skipped


def part_path(path: str, process_index: int, process_count: int) -> str:
    """Where process i of n writes its part (the path itself for one process)."""
    return path if process_count == 1 else f"{path}.part{process_index:05d}-of-{process_count:05d}"


def save(path: str, descriptors: Descriptors):
    """An .npz at `path`, local or gs:// (built in memory: object stores cannot seek)."""
    buffer = io.BytesIO()
    np.savez(buffer, ids=descriptors.ids, embeddings=descriptors.embeddings,
             model=np.asarray(descriptors.model))
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())


def load(path: str) -> Descriptors:
    """The file at `path`, or all of its per-process parts, merged."""
    files = ([path] if tf.io.gfile.exists(path)
             else sorted(tf.io.gfile.glob(path + ".part*-of-*")))
    if not files:
        raise errors.UserError(f"{path}: no teacher descriptors (nor parts {path}.partN-of-M)")
    parts = []
    for f in files:
        with tf.io.gfile.GFile(f, "rb") as fh, np.load(io.BytesIO(fh.read()),
                                                       allow_pickle=False) as npz:
            parts.append(Descriptors(npz["ids"], npz["embeddings"], str(npz["model"])))
    models = {p.model for p in parts}
    if len(models) > 1:
        raise errors.UserError(f"{path}: parts come from different models {sorted(models)}")
    return Descriptors(np.concatenate([p.ids for p in parts]),
                       np.concatenate([p.embeddings for p in parts]), parts[0].model)


def check(descriptors: Descriptors, split_ids, model: str, where: str):
    """One-line errors: descriptors of another model, or without some of the split's ids."""
    if descriptors.model != model:
        raise errors.UserError(f"{where}: teacher descriptors were made by model {descriptors.model}, "
                         f"the pretrained model here is {model}; extract them again")
    missing = sorted(set(split_ids) - set(descriptors.ids.tolist()))
    if missing:
        raise errors.UserError(f"{where}: teacher descriptors lack {len(missing)} of the split's ids, "
                         f"e.g. {missing[:3]}; extract them again for this split")


def lookup_fn(descriptors: Descriptors):
    """-> (id tf.string) -> (E,) float32 descriptor; an unknown id fails the pipeline."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(descriptors.ids.tolist()),
                                            tf.range(len(descriptors.ids), dtype=tf.int64)),
        default_value=-1)
    embeddings = tf.constant(descriptors.embeddings)

    def lookup(example_id):
        row = table.lookup(example_id)
        with tf.control_dependencies([tf.debugging.assert_non_negative(
                row, message="example id without a teacher descriptor")]):
            return tf.gather(embeddings, row)

    return lookup
