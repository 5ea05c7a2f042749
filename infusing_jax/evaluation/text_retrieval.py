r"""Image <-> text retrieval (Flickr30k, COCO): Recall@K with the frozen text tower.

N images, M texts; text j is a caption of image g_j = image_index[j]. Scores are
cosines s_ij (rows L2-normalised here). A key's rank for a query is the number
of keys before it when keys are sorted by score, descending, ties to the lower
key index; a query's rank is the best rank among its positive keys.

    I->T R@K = mean_i [rank of image i's best caption among all M texts < K]
    T->I R@K = mean_j [rank of image g_j among all N images < K]

Exact: float32 matmuls at precision HIGHEST in JAX on the default device. Queries
go `block_size` at a time against all keys, so memory is the keys plus a few
(block_size, keys) slabs; the (N, M) matrix never exists. Measured, E = 768:
25k images x 125k texts in 1.1 s and 1.4 GB peak on one H100 (dense: a 12.5 GB
matrix); COCO's 5k x 25k in 9 s on 2 CPU cores. `first_positive_ranks` also
ranks classes for zero-shot classification (zero_shot.py).

Text embeddings come from the ORIGINAL checkpoint's text tower (`text_embedder`),
or from a file (`load_text_embeddings`), an .npz with:

    embeddings   (M, E) float: one row per text (normalised here, any scale)
    image_index  (M,) int: the position of the text's image in the split's order
                 (a `captions:FILE.json` split: its images sorted by path; TFDS:
                 the order `split.dataset(0, 1)` reads)
"""
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from infusing_jax import errors
from infusing_jax import models
from infusing_jax.evaluation import embedding

KS = (1, 5, 10)
SLAB_BYTES = 2 ** 28  # a (block_size, keys) float32 score slab; sets the default block_size
_EPS = 1e-12


def _normalized(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def default_block_size(num_keys: int) -> int:
    """Queries per block: a power of two in [8, 4096] whose slab is about SLAB_BYTES."""
    return int(min(4096, 2 ** int(math.log2(max(SLAB_BYTES // (4 * max(num_keys, 1)), 8)))))


@jax.jit
def _block_ranks(queries, query_owner, keys, key_owner):
    """Queries (B, E), owners (B,); keys (K, E), owners (K,) -> (B,) first-positive ranks."""
    scores = jnp.matmul(queries, keys.T, precision=lax.Precision.HIGHEST)  # (B, K)
    masked = jnp.where(key_owner[None, :] == query_owner[:, None], scores, -jnp.inf)
    best = masked.max(axis=1, keepdims=True)
    first = jnp.argmax(masked, axis=1)[:, None]  # the lowest key index among the best positives
    column = jnp.arange(keys.shape[0])[None, :]
    ahead = (scores > best) | ((scores == best) & (column < first))
    return ahead.sum(axis=1)


def first_positive_ranks(queries, keys, query_owner, key_owner, block_size: int = None):
    """0-based rank of each query's best positive key; key j is a positive of query i
    iff key_owner[j] == query_owner[i].

    queries (Q, E), keys (K, E): any scale (cosine); owners (Q,), (K,) int.
    Ties go to the lower key index. A query without a positive gets rank K.
    Returns (Q,) int64.
    """
    keys = jax.device_put(_normalized(keys))
    key_owner = jax.device_put(np.asarray(key_owner, np.int32))
    queries, query_owner = _normalized(queries), np.asarray(query_owner, np.int32)
    block = block_size or default_block_size(len(keys))
    ranks = []
    for start in range(0, len(queries), block):
        q = np.zeros((block, queries.shape[1]), np.float32)
        owner = np.full(block, -1, np.int32)
        n = min(block, len(queries) - start)
        q[:n], owner[:n] = queries[start:start + n], query_owner[start:start + n]
        ranks.append(_block_ranks(q, owner, keys, key_owner))  # one compile: fixed shapes
    if not ranks:
        return np.zeros(0, np.int64)
    return np.concatenate([np.asarray(r) for r in ranks])[:len(queries)].astype(np.int64)


def recalls(image_embeddings, text_embeddings, image_index, ks=KS, block_size: int = None):
    """I->T and T->I Recall@K.

    image_embeddings (N, E), text_embeddings (M, E): any scale (cosine);
    image_index (M,) int in [0, N): the image of each text; every image needs a text.
    Returns {'i2t_r{K}', 't2i_r{K}' for K in ks: fractions in [0, 1],
             'num_images': N, 'num_texts': M}.
    """
    images, texts = np.asarray(image_embeddings), np.asarray(text_embeddings)
    owner = np.asarray(image_index)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise errors.UserError(f"text retrieval: image embeddings {images.shape} and text embeddings "
                         f"{texts.shape} must be (N, E) and (M, E)")
    if owner.shape != (len(texts),) or not np.issubdtype(owner.dtype, np.integer):
        raise errors.UserError(f"image_index: shape {owner.shape} {owner.dtype}; want ({len(texts)},) "
                         "int, the image of each text")
    if len(owner) and (owner.min() < 0 or owner.max() >= len(images)):
        raise errors.UserError(f"image_index: values in [{owner.min()}, {owner.max()}] but there are "
                         f"{len(images)} images; want 0 <= image_index < {len(images)}")
    lonely = np.setdiff1d(np.arange(len(images)), owner)
    if len(lonely) or not len(images):
        raise errors.UserError(f"image_index: {len(lonely)} of {len(images)} images have no text "
                         f"(e.g. {lonely[:5].tolist()}); give each image a caption or drop it")
    image_ids = np.arange(len(images))
    i2t = first_positive_ranks(images, texts, image_ids, owner, block_size)
    t2i = first_positive_ranks(texts, images, owner, image_ids, block_size)
    out = {f"i2t_r{k}": float(np.mean(i2t < k)) for k in ks}
    out.update({f"t2i_r{k}": float(np.mean(t2i < k)) for k in ks})
    out.update(num_images=len(images), num_texts=len(texts))
    return out


# ---------------------------------------------------------------- embeddings


def text_embedder(cfg, params, tokenize, batch_size: int = 256):
    """The frozen text tower as a function: texts (M strings) -> (M, E) float32, L2-normalised;
    its `.tokens` takes (M, seq_len) token rows instead.

    cfg, params: the ORIGINAL checkpoint's model config and parameters (fine-tuning
    never changes 'txt'); tokenize: its tokenizer (`tokenizers.load_tokenizer`).
    Batches are padded to batch_size, so the tower compiles once.
    """
    if cfg.get("text") is None:
        raise errors.UserError("model.text: this checkpoint has no text tower; load text embeddings "
                         "from a file instead")
    if tokenize.vocab_size > cfg.text.vocab_size:
        raise errors.UserError(f"tokenizer {tokenize.path}: {tokenize.vocab_size} tokens do not fit the "
                         f"model's vocabulary of {cfg.text.vocab_size}; use the checkpoint's own")
    if tokenize.seq_len != cfg.text.seq_len:
        raise errors.UserError(f"tokenizer {tokenize.path}: seq_len {tokenize.seq_len}, the model's text "
                         f"tower takes {cfg.text.seq_len}; load it with seq_len={cfg.text.seq_len}")
    model = models.build(cfg)
    text_params = jax.device_put({k: v for k, v in params.items() if k != "img"})
    encode = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_texts))

    def embed_tokens(rows) -> np.ndarray:
        """(M, seq_len) token rows -> (M, E)."""
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            tokens = np.zeros((batch_size, tokenize.seq_len), np.int32)
            tokens[:len(chunk)] = chunk
            out.append(np.asarray(encode(text_params, tokens))[:len(chunk)])
        return np.concatenate(out).astype(np.float32)

    def embed(texts) -> np.ndarray:
        texts = list(texts)
        if not texts:
            raise errors.UserError("text_embedder: no texts to embed")
        return embed_tokens(tokenize(texts))
    embed.tokens = embed_tokens
    return embed


def load_text_embeddings(path):
    """An .npz with `embeddings` (M, E) and `image_index` (M,) -> (embeddings, image_index)."""
    want = "want `embeddings` (M, E) and `image_index` (M,)"
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError):
        data = None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise errors.UserError(f"{path}: not an .npz file; {want}")
    with data:
        missing = [k for k in ("embeddings", "image_index") if k not in data]
        if missing:
            raise errors.UserError(f"{path}: no array {missing[0]!r}; {want}")
        embeddings, image_index = data["embeddings"], data["image_index"]
    if embeddings.ndim != 2 or image_index.shape != (len(embeddings),) or \
            not np.issubdtype(image_index.dtype, np.integer):
        raise errors.UserError(f"{path}: embeddings {embeddings.shape}, image_index {image_index.shape} "
                         f"{image_index.dtype}; want (M, E) and (M,) int")
    return embeddings.astype(np.float32), image_index.astype(np.int64)


def evaluate_split(encode_images, split, preprocess_fn, *, embed_texts=None, text_file=None,
                   batch_size: int = 256, ks=KS, block_size: int = None):
    """I->T and T->I Recall@K on an image-text split (`captions:FILE.json`, tfds:coco_captions).

    encode_images: (B, S, S, 3) -> (B, E), the model under test (embedding.embed_split);
    exactly one of embed_texts (texts -> (M, E), e.g. `text_embedder`) for the split's
    captions, or text_file (see the module doc). Texts of undecodable images are dropped.
    Returns `recalls`' dict.
    """
    if (embed_texts is None) == (text_file is None):
        raise errors.UserError("text retrieval: give embed_texts or text_file, exactly one")
    if not split.has_captions and text_file is None:
        raise errors.UserError(f"split {split.name}: has no captions; use an image-text source "
                         "(captions:FILE.json, tfds:coco_captions) or a text_file")
    fields = () if text_file else ("captions",)
    embedded = embedding.embed_split(encode_images, split, preprocess_fn, batch_size=batch_size,
                                     columns=fields)
    images, columns = embedded.embeddings, embedded.columns
    if not len(images):
        raise errors.UserError(f"split {split.name}: no image could be decoded")
    position = columns["position"]
    skipped = (split.num_examples or len(images)) - len(images)
    if skipped:
        print(f"text retrieval: skipped {skipped} undecodable images of split {split.name} and "
              "their texts", file=sys.stderr)
    if text_file is None:
        captions = columns["captions"]
        texts = embed_texts([c for row in captions for c in row])
        image_index = np.repeat(np.arange(len(images)), [len(row) for row in captions])
    else:
        texts, at = load_text_embeddings(text_file)
        if split.num_examples is not None and len(at) and at.max() >= split.num_examples:
            raise errors.UserError(f"{text_file}: image_index up to {at.max()} but split {split.name} "
                             f"has {split.num_examples} images")
        image_index = np.minimum(np.searchsorted(position, at), len(position) - 1)
        kept = position[image_index] == at
        texts, image_index = texts[kept], image_index[kept]
    return recalls(images, texts, image_index, ks, block_size)
