r"""Image->image retrieval metrics (UnED definitions) for any embeddings.

    python -m infusing_jax.retrieval --queries=Q.npz [--index=I.npz] [--k=20] [--separate] \
        --output=M.json

Q.npz, I.npz: `embeddings` (N, D) and `labels` (N,); optional (N,) `domains`,
`ids`, `coarse_labels`. Without --index the queries are their own index, each
one left out by its id (default: its row). With `domains` a hit needs domain and
label to match, in one index merged over the domains (UnED) or, with
--separate, in each query's own domain only. M.json: `recall@1`, `mmp@K`,
`map@K`, `map@r`, `num_queries`, `lone_queries`, per domain under `domains`,
the same at the coarse granularity under `coarse` (infusing_jax.evaluation.metrics).
With domains the four metrics are UnED's headline, the unweighted mean over the
domains; the mean over all queries is under `over_queries`.
"""
import json
import os
import sys

import numpy as np
from absl import flags

from infusing_jax import cli
from infusing_jax import errors
from infusing_jax import paths
from infusing_jax.evaluation import metrics

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("queries", None, "Query .npz file.")
    flags.DEFINE_string("index", None, "Index .npz file (default: the queries).")
    flags.DEFINE_integer("k", 20, "Rank cut-off of mMP@k and mAP@k.")
    flags.DEFINE_bool("separate", False, "Search each query's own domain only.")
    flags.DEFINE_integer("max_rank", metrics.MAX_RANK,
                         "map@r is null if a query has more positives than this.")
    flags.DEFINE_string("output", None, "Output .json file.")


OPTIONAL = ("domains", "ids", "coarse_labels")


def load(path: str) -> dict:
    """`embeddings`, `labels` and the optional arrays of an .npz file, checked."""
    data = {name: array for name, array in paths.read_npz(path).items()
            if name in ("embeddings", "labels") + OPTIONAL}
    for name in ("embeddings", "labels"):
        if name not in data:
            raise errors.UserError(f"{path}: no `{name}` array")
    x = data["embeddings"]
    if x.ndim != 2 or not len(x) or not np.issubdtype(x.dtype, np.number):
        raise errors.UserError(f"{path}: `embeddings` is {x.dtype} {x.shape}; expected numbers, "
                         "(N, D) with N > 0")
    if not np.all(np.isfinite(x)):
        raise errors.UserError(f"{path}: `embeddings` has NaN or infinite values")
    for name, values in data.items():
        if name != "embeddings" and values.shape != (len(x),):
            raise errors.UserError(f"{path}: `{name}` has shape {values.shape}; expected ({len(x)},), "
                             "one entry per row of `embeddings`")
    return data


def check_pair(queries: dict, index: dict, query_path: str, index_path: str):
    """One-line errors for an index that does not fit its queries."""
    dims = queries["embeddings"].shape[1], index["embeddings"].shape[1]
    if dims[0] != dims[1]:
        raise errors.UserError(f"{index_path}: `embeddings` have dimension {dims[1]}, "
                         f"{query_path}'s have {dims[0]}")
    for name in OPTIONAL:
        if (name in queries) != (name in index):
            has, lacks = (query_path, index_path) if name in queries else (index_path, query_path)
            raise errors.UserError(f"{lacks}: no `{name}` array, but {has} has one; give both or neither")


def main(argv):
    del argv
    for name in ("queries", "output"):
        if not FLAGS[name].value:
            raise errors.UserError(f"--{name}: required")
    if FLAGS.k < 1:
        raise errors.UserError(f"--k={FLAGS.k}: must be positive")
    if FLAGS.max_rank < 1:
        raise errors.UserError(f"--max_rank={FLAGS.max_rank}: must be positive")
    cli.check_output_file("--output", FLAGS.output)
    queries = load(FLAGS.queries)
    index = load(FLAGS.index) if FLAGS.index else None
    if index is not None:
        check_pair(queries, index, FLAGS.queries, FLAGS.index)
    if FLAGS.separate and "domains" not in queries:
        raise errors.UserError(f"--separate: {FLAGS.queries} has no `domains` array")
    index = index or {}
    report = metrics.retrieval_metrics(
        queries["embeddings"], queries["labels"], index.get("embeddings"),
        index.get("labels"), FLAGS.k, query_ids=queries.get("ids"),
        index_ids=index.get("ids"), query_domains=queries.get("domains"),
        index_domains=index.get("domains"), query_coarse_labels=queries.get("coarse_labels"),
        index_coarse_labels=index.get("coarse_labels"), separate=FLAGS.separate,
        max_rank=FLAGS.max_rank)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    k = FLAGS.k
    print(f"wrote {FLAGS.output}: {report['num_queries']} queries "
          f"({report['lone_queries']} lone), R@1 {report['recall@1']:.4f}, "
          f"mAP@{k} {report[f'map@{k}']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main, define_flags)
