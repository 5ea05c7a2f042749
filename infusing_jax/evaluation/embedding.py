"""Embedding a split: the one loop that validation, the test sets (image and text
retrieval, zero-shot) and the teacher extraction run.

    out = embed_split(encode, split, view, batch_size=256, columns=("label", "id"))
    out.embeddings  # (N, E) float32, the decodable images only
    out.columns     # {'position': (N,) int64, 'label': (N,), 'id': (N,) bytes}

encode: images (batch_size, S, S, 3) float32 -> (batch_size, E), jitted (its
parameters bound or closed over). Batches are padded to a fixed size, so encode
compiles once, and placed on `mesh`, split over its devices:
  * mesh None: this process's devices; it reads the split alone (or the `shard`
    it is given: (index, count), e.g. its share for the teacher extraction);
  * a mesh over the devices of every process (multi-host validation): each
    process reads its own shard, batches are global arrays of batch_size rows,
    and every process gets every row back (gathered; numeric columns only).
'position' is an example's place in the shard read (0, 1, 2, ...); images that
cannot be decoded are dropped, and the gaps in 'position' are the dropped ones.
`embed_batches` is the same loop over batches from elsewhere (the embed command
reads files with PIL).
"""
import dataclasses
import sys
from typing import Callable, Iterable, Optional, Sequence

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from infusing_jax import sharding


@dataclasses.dataclass(frozen=True)
class Embedded:
    embeddings: np.ndarray  # (N, E) float32
    columns: dict  # name -> (N,) numpy array; 'captions': N lists of str


def _spans_processes(mesh) -> bool:
    return any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def embed_batches(encode: Callable, batches: Iterable[dict], *, batch_size: int,
                  mesh=None, desc: str = "images", total: Optional[int] = None) -> Embedded:
    """Embed `batches` (dicts of this process's rows: 'image' (n, S, S, 3) and columns
    (n, ...), n <= its share of batch_size) as the module doc says.

    With a mesh over several processes every process must call this with its own
    batches; they may differ in number (the shorter pads with empty batches).
    """
    mesh = mesh if mesh is not None else sharding.make_mesh(jax.local_devices())
    gather = _spans_processes(mesh)
    local = batch_size // jax.process_count() if gather else batch_size
    embeddings, columns = [], {}
    # A bar on process 0, and only on a terminal (None: tqdm's own test), not in logs.
    hidden = None if jax.process_index() == 0 else True
    with tqdm.tqdm(desc=desc, unit="img", total=total, file=sys.stderr, disable=hidden,
                   leave=False) as bar:
        for batch, n in _padded(iter(batches), local, gather):
            images = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh),
                                                            batch.pop("image"))
            out = encode(images)
            valid = np.arange(local) < n
            if gather:
                out = multihost_utils.process_allgather(out, tiled=True)
                valid = multihost_utils.process_allgather(valid, tiled=True)
                batch = {k: multihost_utils.process_allgather(v, tiled=True)
                         for k, v in batch.items()}
            embeddings.append(np.asarray(out, np.float32)[valid])
            for k, v in batch.items():
                columns.setdefault(k, []).extend(row for row, ok in zip(v, valid) if ok)
            bar.update(int(valid.sum()))
    dim = embeddings[0].shape[1] if embeddings else 0
    out = np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)
    return Embedded(out, {k: (v if k == "captions" else np.asarray(v))
                          for k, v in columns.items()})


def _padded(batches, size: int, gather: bool):
    """-> (batch padded to `size` rows, number of real rows); over several processes,
    until every process has run out (collectively decided, batch by batch)."""
    template = None
    while True:
        batch = next(batches, None)
        if gather and not multihost_utils.process_allgather(np.int32(batch is not None)).any():
            return
        if batch is None and not gather:
            return
        if batch is None:
            if template is None:
                raise RuntimeError("embed_batches: this process had no batch at all while "
                                   "others had; it cannot tell the shapes to pad with")
            batch = {k: v[:0] for k, v in template.items()}
        template = template or batch
        n = len(batch["image"])
        yield {k: _pad(v, size) for k, v in batch.items()}, n


def _pad(x, size: int):
    if isinstance(x, list):  # ragged rows (captions)
        return x + [[]] * (size - len(x))
    x = np.asarray(x)
    return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


def embed_split(encode: Callable, split, view, *, batch_size: int,
                columns: Sequence[str] = (), mesh=None, shard=(0, 1),
                desc: str = "images") -> Embedded:
    """Embed every decodable image of `split` (module doc); columns: fields of the
    example schema to return beside 'position' ('captions' as lists of str).

    view: image bytes -> (S, S, 3) float32 (a tf_views eval View).
    """
    import tensorflow as tf  # here, so that embed_batches' users (the embed command) skip it
    mesh = mesh if mesh is not None else sharding.make_mesh(jax.local_devices())
    gather = _spans_processes(mesh)
    index, count = (jax.process_index(), jax.process_count()) if gather else shard
    local = batch_size // jax.process_count() if gather else batch_size

    def prepare(position, ex):
        return dict(image=view(ex["image"]), position=position, **{c: ex[c] for c in columns})

    ds = split.dataset(index, count).enumerate().map(
        prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().ragged_batch(local).prefetch(tf.data.AUTOTUNE)
    total = split.num_examples if count == 1 else None
    out = embed_batches(encode, (_numpy(b) for b in ds.as_numpy_iterator()),
                        batch_size=batch_size, mesh=mesh, desc=desc, total=total)
    if "captions" in out.columns:
        out.columns["captions"] = [[c.decode("utf-8") for c in row]
                                   for row in out.columns["captions"]]
    return out


def _numpy(batch: dict) -> dict:
    """A ragged_batch batch with ragged fields (captions) as lists of arrays."""
    return {k: (list(v) if not isinstance(v, np.ndarray) else v) for k, v in batch.items()}
