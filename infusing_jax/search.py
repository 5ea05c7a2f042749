r"""Search an `embed` index with a photo or a text: the nearest images, with their scores.

    python -m infusing_jax.search --index=embeddings.npz --query=photo.jpg [--k=10]
    python -m infusing_jax.search --index=embeddings.npz --text="a red coupe" [--k=10]

The query is embedded by the model the index was made with (`embed` records its
checkpoint, resolution, activation and tokenizer; --checkpoint / --tokenizer
override them, e.g. for a moved file). Prints one line per neighbour, best
first: rank, cosine similarity, the image's path (relative to the folder that
was embedded).
"""
import os

import jax
import numpy as np
from absl import flags

from infusing_jax import checkpoints
from infusing_jax import cli
from infusing_jax import errors
from infusing_jax import models
from infusing_jax import paths
from infusing_jax import tokenizers
from infusing_jax.data import pil_views

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("index", None, "An .npz that `python -m infusing_jax.embed` wrote.")
    flags.DEFINE_string("query", None, "An image file to search with.")
    flags.DEFINE_string("text", None, "A text to search with (needs a text tower).")
    flags.DEFINE_integer("k", 10, "Neighbours to print.")
    flags.DEFINE_string("checkpoint", None, "The model (default: the one the index records).")
    flags.DEFINE_string("tokenizer", None, "For --text (default: the one the index records).")


def read_index(path: str) -> dict:
    """The index's arrays, and what `embed` recorded of how it made them ('' if nothing)."""
    index = paths.read_npz(path) if paths.exists(path) else None
    if index is None:
        raise errors.UserError(f"--index={path}: no such file; give the .npz that "
                               "python -m infusing_jax.embed wrote")
    for key in ("image_embeddings", "image_paths"):
        if key not in index:
            raise errors.UserError(f"--index={path}: no {key!r}; give the .npz that "
                                   "python -m infusing_jax.embed wrote")
    recorded = {k: str(index[k]) if k in index else "" for k in
                ("checkpoint", "image_size", "act", "tokenizer")}
    return dict(index, **recorded)


def top_k(embeddings: np.ndarray, query: np.ndarray, k: int):
    """-> (indices, scores) of the k rows of `embeddings` (N, E) most similar to the
    L2-normalised `query` (E,), best first."""
    scores = embeddings @ query
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best], kind="stable")]
    return best, scores[best]


def _model(index: dict):
    source = FLAGS.checkpoint or index["checkpoint"]
    if not source:
        raise errors.UserError(f"--index={FLAGS.index} records no checkpoint; give "
                               "--checkpoint, the model it was embedded with")
    try:
        params, cfg = checkpoints.load(source, act=index["act"] or None,
                                       image_size=int(index["image_size"] or 0) or None)
    except errors.UserError as e:
        flag = "--checkpoint" if FLAGS.checkpoint else f"--index={FLAGS.index}'s checkpoint"
        raise errors.UserError(f"{flag}: {e}") from None
    width = np.shape(index["image_embeddings"])[-1]
    dims = cfg.image.out_dim or cfg.image.width
    if dims != width:
        raise errors.UserError(f"--checkpoint={source}: embeds to {dims} dimensions, the "
                               f"index holds {width}; give the model the index was embedded "
                               "with")
    return params, cfg, models.build(cfg)


def _embed_query(index, params, cfg, model) -> np.ndarray:
    if FLAGS.query:
        try:
            view = pil_views.eval_view(pil_views.load_rgb(FLAGS.query), cfg.image_size,
                                       cfg.family)
        except Exception as e:  # pylint: disable=broad-except  # any unreadable image
            raise errors.UserError(f"--query={FLAGS.query}: not a readable image ({e})") from None
        return np.asarray(model.apply({"params": params}, view[None],
                                      method=model.encode_images))[0]
    if cfg.get("text") is None:
        raise errors.UserError("--text: the model has no text tower; search with --query")
    path = FLAGS.tokenizer or index["tokenizer"]
    if not path:
        raise errors.UserError("--text: the index records no tokenizer; give --tokenizer")
    try:
        tokenize = tokenizers.load_tokenizer(path, tokenizers.convention(cfg), cfg.text.seq_len)
    except errors.UserError as e:
        raise errors.UserError(f"--tokenizer: {e}") from None
    return np.asarray(model.apply({"params": params}, tokenize([FLAGS.text]),
                                  method=model.encode_texts))[0]


def main(argv):
    del argv
    if not FLAGS.index:
        raise errors.UserError("--index: required, the .npz that infusing_jax.embed wrote")
    if bool(FLAGS.query) == bool(FLAGS.text):
        raise errors.UserError("--query, --text: give one of them (an image file or a text)")
    if FLAGS.k < 1:
        raise errors.UserError(f"--k={FLAGS.k}: must be >= 1")
    if FLAGS.query and not os.path.isfile(FLAGS.query):
        raise errors.UserError(f"--query={FLAGS.query}: no such file")
    index = read_index(FLAGS.index)
    jax.config.update("jax_default_matmul_precision", "highest")
    query = _embed_query(index, *_model(index))
    best, scores = top_k(np.asarray(index["image_embeddings"], np.float32), query, FLAGS.k)
    for rank, (i, score) in enumerate(zip(best, scores), 1):
        print(f"{rank}\t{score:.4f}\t{index['image_paths'][i]}")


if __name__ == "__main__":
    cli.run(main, define_flags)
