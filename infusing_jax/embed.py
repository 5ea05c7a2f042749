r"""Embed a folder of images (and optionally texts) with a SigLIP / CLIP checkpoint.

    python -m infusing_jax.embed --checkpoint=SRC --images=DIR --output=OUT.npz \
        [--texts=FILE --tokenizer=FILE] [--batch_size=64]

OUT.npz: `image_embeddings` (N, E) float32, L2-normalised; `image_paths` (N,)
relative to DIR; `skipped_paths` (files that could not be decoded); with
--texts, `text_embeddings` (M, E) and `texts` (M,); and how they were made,
for `infusing_jax.search`: `checkpoint`, `image_size`, `act`, `tokenizer`, `root`
(DIR) as strings ('' where not given). Images get the family's eval
preprocessing at the checkpoint's resolution. Exit status 0 unless no image
could be embedded.
"""
import concurrent.futures
import functools
import os
import sys

import jax
import numpy as np
from absl import flags

from infusing_jax import checkpoints
from infusing_jax import cli
from infusing_jax import errors
from infusing_jax.models import transformer
from infusing_jax import models
from infusing_jax.data import pil_views
from infusing_jax.evaluation import embedding
from infusing_jax import tokenizers

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("checkpoint", None, "Checkpoint (any supported format).")
    flags.DEFINE_string("images", None, "Folder of images, searched recursively.")
    flags.DEFINE_string("output", None, "Output .npz file.")
    flags.DEFINE_string("texts", None, "Optional text file, one text per line.")
    flags.DEFINE_string("tokenizer", None, "Tokenizer file for --texts.")
    flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
    flags.DEFINE_integer("image_size", None, "Run at this resolution (default: the "
                         "checkpoint's; TIPS files: their position grid x 14).")
    flags.DEFINE_enum(
        "act", None, sorted(transformer.ACTIVATIONS),
        "Activation, for checkpoints that do not record it (open_clip CLIP files).")
    flags.DEFINE_enum(
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
            if name.lower().endswith(pil_views.IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(directory, name), root))
            else:
                others += 1
    return found, others


def _decode(path, size, family):
    try:
        return pil_views.eval_view(pil_views.load_rgb(path), size, family)
    except Exception:  # pylint: disable=broad-except  # any undecodable file is skipped
        return None


def embed_images(encode, root, paths, size, family, batch_size):
    """-> (embeddings (N, E), embedded paths, skipped paths): the files decoded with PIL
    by a thread pool, a batch at a time, through embedding.embed_batches."""
    skipped = []

    def batches(pool):
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            views = list(pool.map(lambda p: _decode(os.path.join(root, p), size, family), chunk))
            skipped.extend(p for p, v in zip(chunk, views) if v is None)
            kept = [(p, v) for p, v in zip(chunk, views) if v is not None]
            if kept:
                yield dict(image=np.stack([v for _, v in kept]),
                           path=np.asarray([p for p, _ in kept], dtype=str))

    with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        out = embedding.embed_batches(encode, batches(pool), batch_size=batch_size,
                                      desc="images", total=len(paths))
    return out.embeddings, [str(p) for p in out.columns.get("path", [])], skipped


def _texts_and_tokenizer(cfg):
    """--texts lines and the --tokenizer, checked against the model before any work."""
    if cfg.get("text") is None:
        raise errors.UserError(f"--texts: {FLAGS.checkpoint} has no text tower")
    try:
        with open(FLAGS.texts, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise errors.UserError(f"--texts={FLAGS.texts}: cannot read it as UTF-8 text ({e})")
    if not texts:
        raise errors.UserError(f"--texts={FLAGS.texts}: no non-empty line")
    try:
        tokenize = tokenizers.load_tokenizer(FLAGS.tokenizer, tokenizers.convention(cfg),
                                             cfg.text.seq_len)
    except errors.UserError as e:
        raise errors.UserError(f"--tokenizer: {e}") from None
    if tokenize.vocab_size > cfg.text.vocab_size:
        raise errors.UserError(f"--tokenizer={FLAGS.tokenizer}: its {tokenize.vocab_size} tokens do "
                         f"not fit the model's vocabulary of {cfg.text.vocab_size}; use the "
                         "checkpoint's own tokenizer")
    return texts, tokenize


def main(argv):
    del argv
    for name in ("checkpoint", "images", "output"):
        if not FLAGS[name].value:
            raise errors.UserError(f"--{name}: required")
    if bool(FLAGS.texts) != bool(FLAGS.tokenizer):
        raise errors.UserError("--texts, --tokenizer: give both or neither")
    if not os.path.isdir(FLAGS.images):
        raise errors.UserError(f"--images={FLAGS.images}: no such folder")
    if FLAGS.batch_size < 1:
        raise errors.UserError(f"--batch_size={FLAGS.batch_size}: must be >= 1")
    if FLAGS.image_size is not None and FLAGS.image_size < 1:
        raise errors.UserError(f"--image_size={FLAGS.image_size}: must be >= 1 (pixels, a "
                               "multiple of the patch size); leave it out for the checkpoint's")
    cli.check_output_file("--output", FLAGS.output)
    jax.config.update("jax_default_matmul_precision", FLAGS.matmul_precision)
    try:
        params, cfg = checkpoints.load(FLAGS.checkpoint, act=FLAGS.act,
                                       image_size=FLAGS.image_size)
    except checkpoints.ArgumentError as e:
        raise errors.UserError(f"--{e.argument}: {e}") from None
    if FLAGS.image_size and FLAGS.image_size % cfg.image.patch_size:
        raise errors.UserError(f"--image_size={FLAGS.image_size}: not a multiple of "
                               f"{FLAGS.checkpoint}'s patch size {cfg.image.patch_size}")
    texts, tokenize = _texts_and_tokenizer(cfg) if FLAGS.texts else (None, None)
    model = models.build(cfg)
    # Parameters are arguments, not closed-over constants baked into the program.
    encode_images = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_images))
    encode = functools.partial(encode_images, params)

    paths, others = find_images(FLAGS.images)
    if others:
        print(f"ignored {others} files without an image extension in {FLAGS.images}",
              file=sys.stderr)
    embeddings, kept, skipped = embed_images(encode, FLAGS.images, paths, cfg.image_size,
                                             cfg.family, FLAGS.batch_size)
    out = dict(image_embeddings=embeddings, image_paths=np.asarray(kept, dtype=str),
               skipped_paths=np.asarray(skipped, dtype=str),
               checkpoint=np.asarray(os.path.abspath(FLAGS.checkpoint)
                                     if os.path.exists(FLAGS.checkpoint.split(":")[0])
                                     else FLAGS.checkpoint),
               image_size=np.asarray(str(cfg.image_size)), act=np.asarray(FLAGS.act or ""),
               tokenizer=np.asarray(os.path.abspath(FLAGS.tokenizer) if FLAGS.tokenizer
                                    else ""),
               root=np.asarray(os.path.abspath(FLAGS.images)))
    if skipped:
        print(f"skipped {len(skipped)} of {len(paths)} images that could not be decoded "
              f"(listed in skipped_paths), e.g. {skipped[:3]}", file=sys.stderr)

    if texts is not None:
        encode_text = jax.jit(lambda p, t: model.apply({"params": p}, t,
                                                       method=model.encode_texts))
        out["text_embeddings"] = np.concatenate(
            [np.asarray(encode_text(params, tokenize(texts[i:i + FLAGS.batch_size])))
             for i in range(0, len(texts), FLAGS.batch_size)])
        out["texts"] = np.asarray(texts, dtype=str)

    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    np.savez(FLAGS.output, **out)
    print(f"wrote {FLAGS.output}: {len(kept)} image embeddings"
          + (f", {len(out['texts'])} text embeddings" if FLAGS.texts else ""), file=sys.stderr)
    if not kept:
        raise errors.UserError(f"--images: no image in {FLAGS.images} could be embedded")


if __name__ == "__main__":
    cli.run(main, define_flags)
