"""Validation during training: kNN retrieval on each domain's val split, and the
model-selection score of docs/method.md.

Each val split is its own index (every query left out); mAP@k, R@1 etc. come
from `evaluation.metrics.retrieval_metrics`. Scores (k = train.eval_k):
  in-domain      mean mAP@k over the target domains' val splits
  out-of-domain  mean mAP@k over the generic domains' val splits
  all            the mean of the two (of the one there is, if only one)
`score` is the one `train.select_by` names; the best checkpoint is kept by it.
With eval.validate_text, eval's image<->text sets are run too ('text/<set>/<metric>',
by process 0 on its devices).
"""
import sys

import jax
import numpy as np
import tensorflow as tf
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from infusing_jax.data import device_put
from infusing_jax.data import preprocess
from infusing_jax.evaluation import metrics as metrics_lib
from infusing_jax.evaluation import suite


def embed_split(encode, params, split, preprocess_fn, batch_size: int, mesh, desc: str):
    """-> (embeddings (N, E) float32, labels (N,) int64) of the whole split, every
    process's shard gathered; undecodable images skipped (Validator reports how many
    as '<domain>/skipped'). encode(params, images)."""
    sharding = NamedSharding(mesh, PartitionSpec(device_put.DATA_AXIS))
    local = batch_size // jax.process_count()
    ds = split.dataset(jax.process_index(), jax.process_count()).map(
        lambda ex: dict(image=preprocess_fn(ex["image"]), label=ex["label"]),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().batch(local).prefetch(tf.data.AUTOTUNE)
    embeddings, labels = [], []
    show = jax.process_index() == 0
    with tqdm.tqdm(desc=desc, unit="img", file=sys.stderr, disable=not show, leave=False) as bar:
        for batch in _padded_batches(ds, local):
            images = jax.make_array_from_process_local_data(sharding, batch["image"])
            out = encode(params, images)
            out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
            valid = multihost_utils.process_allgather(batch["valid"], tiled=True)
            lab = multihost_utils.process_allgather(batch["label"], tiled=True)
            embeddings.append(out[valid])
            labels.append(lab[valid])
            bar.update(int(valid.sum()))
    return np.concatenate(embeddings), np.concatenate(labels)


def _padded_batches(ds, batch_size: int):
    """Full batches with a 'valid' mask; every process yields the same number of them."""
    it = ds.as_numpy_iterator()
    while True:
        batch = next(it, None)
        n = 0 if batch is None else len(batch["label"])
        if not multihost_utils.process_allgather(np.int32(n > 0)).any():
            return
        if batch is None:
            batch = dict(image=np.zeros((0,) + _image_shape(ds), np.float32),
                         label=np.zeros((0,), np.int64))
        pad = batch_size - n
        yield dict(image=np.concatenate([batch["image"], np.zeros(
                       (pad,) + batch["image"].shape[1:], np.float32)]),
                   label=np.concatenate([batch["label"], np.zeros((pad,), np.int64)]),
                   valid=np.arange(batch_size) < n)


def _image_shape(ds):
    return tuple(ds.element_spec["image"].shape[1:])


class Validator:
    """Runs the val kNN of every domain that has a val split."""

    def __init__(self, cfg, names, splits, embed, mesh):
        self.cfg, self.mesh = cfg, mesh
        self.domains = [(n, splits[n].role, splits[n].val) for n in names
                        if splits[n].val is not None]
        self.active = bool(self.domains)
        self.encode = jax.jit(embed)
        self.preprocess = preprocess.eval_fn(cfg.model.family, cfg.model.image_size)
        self.texts = None
        if cfg.eval.validate_text and cfg.eval.text_retrieval.keys():
            self.texts = suite.load_text_side(cfg)
            self.active = True

    def run(self, backbone) -> dict:
        """-> {'<domain>/<metric>': ..., 'in-domain', 'out-of-domain', 'all', 'score'}."""
        k = self.cfg.train.eval_k
        out, by_role = {}, {"target": [], "generic": []}
        for name, role, split in self.domains:
            emb, labels = embed_split(self.encode, backbone, split, self.preprocess,
                                      self.cfg.train.eval_batch_size, self.mesh, f"val {name}")
            m = metrics_lib.retrieval_metrics(emb, labels, k=k)
            out.update({f"{name}/{key}": float(v) for key, v in m.items()
                        if np.isscalar(v)})
            if split.num_examples is not None:  # undecodable val images, counted
                out[f"{name}/skipped"] = float(split.num_examples - len(labels))
            by_role[role].append(m[f"map@{k}"])
        if by_role["target"]:
            out["in-domain"] = float(np.mean(by_role["target"]))
        if by_role["generic"]:
            out["out-of-domain"] = float(np.mean(by_role["generic"]))
        parts = [out[r] for r in ("in-domain", "out-of-domain") if r in out]
        if parts:
            out["all"] = float(np.mean(parts))
        if self.cfg.eval.validate_text:
            out.update(self._text(backbone))
        if self.cfg.train.select_by in out:
            out["score"] = out[self.cfg.train.select_by]
        return out

    def _text(self, backbone) -> dict:
        params = multihost_utils.process_allgather(backbone, tiled=True)
        results = {}
        if jax.process_index() == 0:
            local = jax.device_put(params, jax.local_devices()[0])
            sets = suite.text_retrieval_sets(self.cfg, lambda x: self.encode(local, x),
                                             self.texts)
            results = {f"text/{name}/{k}": float(v) for name, m in sets.items()
                       for k, v in m.items()}
        return results
