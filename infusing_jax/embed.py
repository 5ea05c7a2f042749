r"""Embed a folder of images (and optionally texts) with a SigLIP / CLIP checkpoint.

    python -m infusing_jax.embed --checkpoint=SRC --images=DIR --output=OUT.npz \
        [--texts=FILE --tokenizer=FILE] [--batch_size=64]

OUT.npz: `image_embeddings` (N, E) float32, L2-normalised; `image_paths` (N,)
relative to DIR; `skipped_paths` (files that could not be decoded); with
--texts, `text_embeddings` (M, E) and `texts` (M,). Images get the family's
eval preprocessing at the checkpoint's resolution. Exit status 0 unless no
image could be embedded.
"""
import concurrent.futures
import functools
import os
import sys

import jax
import numpy as np
import tqdm
from absl import app
from absl import flags

from infusing_jax import checkpoints
from infusing_jax.models import transformer
from infusing_jax import models
from infusing_jax import preprocessing
from infusing_jax import tokenizers

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint (any supported format).")
_IMAGES = flags.DEFINE_string("images", None, "Folder of images, searched recursively.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .npz file.")
_TEXTS = flags.DEFINE_string("texts", None, "Optional text file, one text per line.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer file for --texts.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
_ACT = flags.DEFINE_enum(
    "act", None, sorted(transformer.ACTIVATIONS),
    "Activation, for checkpoints that do not record it (open_clip CLIP files).")
_PRECISION = flags.DEFINE_enum(
    "matmul_precision", "highest", ["default", "high", "highest"],
    "JAX matmul precision. 'highest' is true float32 (matches PyTorch to ~1e-6); "
    "'default' uses TF32 / bf16 passes on GPU / TPU (~1e-3, faster).")


def find_images(root: str):
    """-> (image file paths relative to root, sorted; number of other files ignored)."""
    found, others = [], 0
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            if name.lower().endswith(preprocessing.IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(directory, name), root))
            else:
                others += 1
    return found, others


def _decode(path, size, family):
    try:
        return preprocessing.eval_view(preprocessing.load_rgb(path), size, family)
    except Exception:  # pylint: disable=broad-except  # any undecodable file is skipped
        return None


def embed_images(encode, root, paths, size, family, batch_size):
    """-> (list of (n_i, E) embedding arrays, embedded paths, skipped paths).

    Every batch is padded to `batch_size` so that `encode` compiles once.
    """
    embeddings, kept, skipped = [], [], []
    with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool, \
            tqdm.tqdm(total=len(paths), desc="images", unit="img", file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            views = list(pool.map(lambda p: _decode(os.path.join(root, p), size, family), chunk))
            batch = [v for v in views if v is not None]
            skipped += [p for p, v in zip(chunk, views) if v is None]
            kept += [p for p, v in zip(chunk, views) if v is not None]
            if batch:
                x = np.zeros((batch_size, size, size, 3), np.float32)
                x[:len(batch)] = batch
                embeddings.append(np.asarray(encode(x))[:len(batch)])
            bar.update(len(chunk))
    return embeddings, kept, skipped


def _texts_and_tokenizer(cfg):
    """--texts lines and the --tokenizer, checked against the model before any work."""
    if cfg.get("text") is None:
        raise ValueError(f"--texts: {_CHECKPOINT.value} has no text tower")
    with open(_TEXTS.value, encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        raise ValueError(f"--texts={_TEXTS.value}: no non-empty line")
    tokenize = tokenizers.load_tokenizer(_TOKENIZER.value, cfg.family, cfg.text.seq_len)
    if tokenize.vocab_size > cfg.text.vocab_size:
        raise ValueError(f"--tokenizer={_TOKENIZER.value}: its {tokenize.vocab_size} tokens do "
                         f"not fit the model's vocabulary of {cfg.text.vocab_size}; use the "
                         "checkpoint's own tokenizer")
    return texts, tokenize


def main(argv):
    del argv
    for flag in (_CHECKPOINT, _IMAGES, _OUTPUT):
        if not flag.value:
            sys.exit(f"error: --{flag.name} is required")
    if bool(_TEXTS.value) != bool(_TOKENIZER.value):
        sys.exit("error: --texts and --tokenizer go together")
    if not os.path.isdir(_IMAGES.value):
        sys.exit(f"error: --images={_IMAGES.value}: no such folder")
    jax.config.update("jax_default_matmul_precision", _PRECISION.value)
    try:
        params, cfg = checkpoints.load(_CHECKPOINT.value, act=_ACT.value)
        texts, tokenize = _texts_and_tokenizer(cfg) if _TEXTS.value else (None, None)
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
    model = models.build(cfg)
    # Parameters are arguments, not closed-over constants baked into the program.
    encode_images = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_images))
    encode = functools.partial(encode_images, params)

    paths, others = find_images(_IMAGES.value)
    if others:
        print(f"ignored {others} files without an image extension in {_IMAGES.value}",
              file=sys.stderr)
    embeddings, kept, skipped = embed_images(encode, _IMAGES.value, paths, cfg.image_size,
                                             cfg.family, _BATCH_SIZE.value)
    out = dict(image_embeddings=(np.concatenate(embeddings) if embeddings else
                                 np.zeros((0, 0), np.float32)),
               image_paths=np.asarray(kept, dtype=str), skipped_paths=np.asarray(skipped, dtype=str))
    if skipped:
        print(f"skipped {len(skipped)} of {len(paths)} images that could not be decoded "
              f"(listed in skipped_paths), e.g. {skipped[:3]}", file=sys.stderr)

    if texts is not None:
        encode_text = jax.jit(lambda p, t: model.apply({"params": p}, t,
                                                       method=model.encode_texts))
        out["text_embeddings"] = np.concatenate(
            [np.asarray(encode_text(params, tokenize(texts[i:i + _BATCH_SIZE.value])))
             for i in range(0, len(texts), _BATCH_SIZE.value)])
        out["texts"] = np.asarray(texts, dtype=str)

    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    np.savez(_OUTPUT.value, **out)
    print(f"wrote {_OUTPUT.value}: {len(kept)} image embeddings"
          + (f", {len(out['texts'])} text embeddings" if _TEXTS.value else ""), file=sys.stderr)
    if not kept:
        sys.exit(f"error: no image in {_IMAGES.value} could be embedded")


if __name__ == "__main__":
    app.run(main)
