"""Teacher descriptors: the frozen pretrained model's embeddings of a split, keyed by id.

The authors' precomputed-teacher mode: embed a split once with the pretrained
model (eval views), store the embeddings by example id, and look them up by id
during training. A descriptor file records a fingerprint of the model that made
it and the ids whose images could not be decoded (the input pipeline drops those
too); a file from another model, or one that lacks other ids the split has, is an
error.
"""
import dataclasses
import hashlib
import io
import os

import jax
import numpy as np
import tensorflow as tf

from infusing_jax import errors
from infusing_jax import paths
from infusing_jax.data import schema
from infusing_jax.evaluation import embedding


@dataclasses.dataclass(frozen=True)
class Descriptors:
    ids: np.ndarray  # (N,) str
    embeddings: np.ndarray  # (N, E) float32
    model: str  # fingerprint of the model that produced them
    # (S,) str: ids whose images could not be decoded
    skipped: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, str))


def fingerprint(flat_params: dict, cfg) -> str:
    """A short hash of the model: family, resolution and every parameter's bytes."""
    h = hashlib.sha256(f"{cfg.family}/{cfg.image_size}".encode())
    for key in sorted(flat_params):
        h.update(key.encode())
        h.update(np.ascontiguousarray(flat_params[key], np.float32).tobytes())
    return h.hexdigest()[:16]


def extract(encode, split: schema.SplitData, view, model: str, batch_size: int = 64,
            process_index: int = 0, process_count: int = 1):
    """-> (Descriptors of this process's shard, ids that could not be decoded).

    encode: jitted (images (B, S, S, 3)) -> (B, E), run sharded over this process's
    devices. view: image bytes -> (S, S, 3), the eval view.
    """
    devices = len(jax.local_devices())
    if batch_size % devices:
        raise errors.UserError(f"batch_size {batch_size} is not divisible by the {devices} "
                               "devices")
    if split.ids is not None and process_count == 1:  # known up front: files read once
        all_ids = [str(i) for i in split.ids]
    else:
        all_ids = [x.decode() for x in split.dataset(process_index, process_count)
                   .map(lambda ex: ex["id"]).as_numpy_iterator()]
    out = embedding.embed_split(encode, split, view, batch_size=batch_size, columns=("id",),
                                shard=(process_index, process_count),
                                desc=f"teacher {split.name}")
    ids = [x.decode() for x in out.columns.get("id", [])]
    skipped = sorted(set(all_ids) - set(ids))
    return Descriptors(np.asarray(ids, dtype=str), out.embeddings.astype(np.float32),
                       model, np.asarray(skipped, dtype=str)), skipped


def part_path(path: str, process_index: int, process_count: int) -> str:
    """Where process i of n writes its part (the path itself for one process)."""
    return path if process_count == 1 else f"{path}.part{process_index:05d}-of-{process_count:05d}"


def save(path: str, descriptors: Descriptors):
    """An .npz at `path`, local or gs:// (built in memory: object stores cannot seek),
    written whole under another name first, so a reader never sees half a file."""
    buffer = io.BytesIO()
    np.savez(buffer, ids=descriptors.ids, embeddings=descriptors.embeddings,
             model=np.asarray(descriptors.model), skipped=np.asarray(descriptors.skipped, str))
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def load(path: str) -> Descriptors:
    """The file at `path`, or all of its per-process parts, merged."""
    files = ([path] if tf.io.gfile.exists(path)
             else sorted(tf.io.gfile.glob(path + ".part*-of-*")))
    if not files:
        raise errors.UserError(f"{path}: no teacher descriptors (nor parts {path}.partN-of-M)")
    parts = []
    for f in files:
        arrays = paths.read_npz(f)
        missing = [k for k in ("ids", "embeddings", "model") if k not in arrays]
        if missing:
            raise errors.UserError(f"{f}: not a teacher descriptors file (no {missing[0]!r})")
        parts.append(Descriptors(arrays["ids"], arrays["embeddings"], str(arrays["model"]),
                                 arrays.get("skipped", np.zeros(0, str))))
    models = {p.model for p in parts}
    if len(models) > 1:
        raise errors.UserError(f"{path}: parts come from different models {sorted(models)}")
    return Descriptors(np.concatenate([p.ids for p in parts]),
                       np.concatenate([p.embeddings for p in parts]), parts[0].model,
                       np.concatenate([p.skipped for p in parts]))


def check(descriptors: Descriptors, split_ids, model: str, where: str):
    """One-line errors: descriptors of another model, or without some of the split's ids
    (other than those whose images could not be decoded)."""
    if descriptors.model != model:
        raise errors.UserError(f"{where}: teacher descriptors were made by model {descriptors.model}, "
                         f"the pretrained model here is {model}; extract them again")
    missing = sorted(set(split_ids) - set(descriptors.ids.tolist())
                     - set(descriptors.skipped.tolist()))
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
