"""Validation during training: kNN retrieval on each domain's val split, and the
model-selection score of docs/method.md.

Each val split is its own index (every query left out); mAP@k, R@1 etc. come
from `evaluation.metrics.retrieval_metrics`. Scores (k = train.eval_k):
  in-domain      mean mAP@k over the target domains' val splits
  out-of-domain  mean mAP@k over the generic domains' val splits
  all            the mean of the two (of the one there is, if only one)
  retention      with train.eval_retention: the mean over the generic domains' val
                 images of cos(f, f0), each image's embedding against the pretrained
                 model's (`<domain>/retention` per domain). 1 where nothing moved; unlike
                 kNN scores it sees a rotation of the embedding space, which breaks the
                 alignment with the frozen text tower. It needs no labels.
A domain without classes (an `images:` source) has no kNN score: its retention stands
in for its mAP@k in the in-domain / out-of-domain means. Where there is one, retention
is computed as with train.eval_retention, for every generic domain.
`score` is the one `train.select_by` names; the best checkpoint is kept by it.
With eval.validate_text, eval's image<->text sets are run too ('text/<set>/<metric>',
by process 0 on its devices).
"""
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from infusing_jax import errors
from infusing_jax.data import pipeline
from infusing_jax.data import tf_views
from infusing_jax.evaluation import embedding
from infusing_jax.evaluation import metrics as metrics_lib
from infusing_jax.training import suite


# The domains' roles that each train.select_by scores by val kNN.
SCORED_ROLES = {"in-domain": ("target",), "out-of-domain": ("generic",),
                "all": ("target", "generic"), "retention": (), "last": ()}


def val_field(domain) -> str:
    """The config field that chose a domain's val split (config.domains.<name>.<field>)."""
    return next(k for k in ("val_split", "val_classes_fraction", "holdout_fraction")
                if domain[k])


class Validator:
    """Runs the val kNN of every domain that has a val split."""

    def __init__(self, cfg, names, splits, embed, mesh, pretrained=None):
        """pretrained: the pretrained backbone, for train.eval_retention. The val splits
        are checked here, before any work (check_splits)."""
        self.cfg, self.mesh = cfg, mesh
        self.domains = [(n, splits[n].role, splits[n].val) for n in names
                        if splits[n].val is not None]
        self.active = bool(self.domains)
        self.encode = jax.jit(embed)
        self.preprocess = tf_views.eval_fn(cfg.model.family, cfg.model.image_size)
        self.check_splits()
        unlabelled = any(split.num_classes == 0 for _, _, split in self.domains)
        self.pretrained = pretrained if cfg.train.eval_retention or unlabelled else None
        self.anchors = {}  # generic domain -> the pretrained model's val embeddings
        self.texts = None
        if cfg.eval.validate_text and cfg.eval.text_retrieval.keys():
            self.texts = suite.load_text_side(cfg)
            self.active = True

    def check_splits(self) -> None:
        """One UserError for a val split none of whose first images decodes, or whose
        queries are all lone (each class one image: every score 0) where the score that
        train.select_by keeps the best checkpoint by rests on such splits alone; a one-line
        warning for other all-lone splits and for train.eval_k >= a val split's size."""
        lone, k = {}, self.cfg.train.eval_k
        for name, _, split in self.domains:
            where = f"config.domains.{name}.{val_field(self.cfg.domains[name])}"
            pipeline.check_decodable(split, self.preprocess.decode, where, "val")
            if split.num_classes and split.labels is not None and len(split.labels):
                if np.unique(split.labels, return_counts=True)[1].max() == 1:
                    lone[name] = (f"{where}: each class of its {len(split.labels)} val images "
                                  "has one image, so every val query is lone and scores 0; "
                                  "give >= 2 images per class")
            if split.num_examples is not None and k >= split.num_examples:
                logging.warning("config.train.eval_k: %d is not less than the %d val images "
                                "of domain %s; its mAP@%d is over all of each query's "
                                "positives", k, split.num_examples, name, k)
        scored = [n for n, role, _ in self.domains
                  if role in SCORED_ROLES[self.cfg.train.select_by]]
        if scored and all(n in lone for n in scored):
            raise errors.UserError(f"{lone[scored[0]]}, or another train.select_by than "
                                   f"{self.cfg.train.select_by!r}, which keeps the best "
                                   "checkpoint by these scores")
        for message in lone.values():
            logging.warning("%s", message)

    def run(self, backbone) -> dict:
        """-> {'<domain>/<metric>': ..., 'in-domain', 'out-of-domain', 'all', 'score'}."""
        k = self.cfg.train.eval_k
        out, by_role = {}, {"target": [], "generic": []}
        retention = []
        for name, role, split in self.domains:
            out_split = self._embed(backbone, split, name)
            labelled = split.num_classes > 0
            if (role == "generic" or not labelled) and self.pretrained is not None:
                if name not in self.anchors:
                    self.anchors[name] = self._embed(self.pretrained, split, name).embeddings
                cos = np.sum(out_split.embeddings * self.anchors[name], axis=1)
                out[f"{name}/retention"] = float(np.mean(cos))
                retention.append(out[f"{name}/retention"])
            if labelled:
                m = metrics_lib.retrieval_metrics(out_split.embeddings,
                                                  out_split.columns["label"], k=k)
                out.update({f"{name}/{key}": float(v) for key, v in m.items()
                            if np.isscalar(v)})
            by_role[role].append(m[f"map@{k}"] if labelled else out[f"{name}/retention"])
            if split.num_examples is not None:  # undecodable val images, counted
                out[f"{name}/skipped"] = float(split.num_examples - len(out_split.embeddings))
        if by_role["target"]:
            out["in-domain"] = float(np.mean(by_role["target"]))
        if by_role["generic"]:
            out["out-of-domain"] = float(np.mean(by_role["generic"]))
        parts = [out[r] for r in ("in-domain", "out-of-domain") if r in out]
        if parts:
            out["all"] = float(np.mean(parts))
        if retention:
            out["retention"] = float(np.mean(retention))
        if self.cfg.eval.validate_text:
            out.update(self._text(backbone))
        if self.cfg.train.select_by in out:
            out["score"] = out[self.cfg.train.select_by]
        return out

    def _embed(self, backbone, split, name: str):
        return embedding.embed_split(
            lambda images: self.encode(backbone, images), split, self.preprocess,
            batch_size=self.cfg.train.eval_batch_size, columns=("label",), mesh=self.mesh,
            desc=f"val {name}")

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
