r"""The offline demo: every step of the toolchain on a tiny model it writes itself.

    python -m infusing_jax.demo --workdir=DIR

1. writes a tiny random SigLIP two-tower as a big_vision `.npz` (the format of
   gs://big_vision/siglip) and trains a sentencepiece tokenizer on captions;
2. draws a folder of images (several colour modes, one broken file);
3. embeds images and captions with `python -m infusing_jax.embed`;
4. converts the checkpoint to Hugging Face and open_clip with
   `python -m infusing_jax.convert`, embeds again from each, and checks that
   every format gives the same embeddings.
The weights are random: this shows the plumbing, not retrieval quality (the
quickstart with a pretrained toy model replaces it). Writes DIR/summary.json.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import sentencepiece
from absl import flags
from PIL import Image, ImageDraw

from infusing_jax import checkpoints
from infusing_jax import cli
from infusing_jax import models

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined when it runs rather than on import: absl keeps one
    global flag namespace, and the package's commands share names (--checkpoint, ...).
    To run `main` from Python: define_flags(); app.run(main, argv)."""
    flags.DEFINE_string("workdir", "demo_out", "Where everything is written.")
    flags.DEFINE_integer("num_images", 48, "How many images to draw.")

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
           "yellow": (230, 210, 40), "purple": (140, 50, 170), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, colour: str, rng) -> Image.Image:
    """One shape of one colour on a light background, at a random place and size."""
    size = int(rng.integers(48, 96))
    image = Image.new("RGB", (size + 16, size), tuple(int(v) for v in rng.integers(200, 255, 3)))
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return image


def write_images(folder: str, n: int, seed: int = 0) -> list:
    """Draw n images in several modes (RGB JPEG, grayscale, RGBA, 16-bit) and one broken file."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    captions = []
    for i in range(n):
        shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
        image = draw(shape, colour, rng)
        name = f"{i:03d}_{colour}_{shape}"
        if i % 4 == 1:
            image.convert("L").save(os.path.join(folder, name + ".png"))
        elif i % 4 == 2:
            image.convert("RGBA").save(os.path.join(folder, name + ".png"))
        elif i % 4 == 3:
            wide = (np.asarray(image.convert("L"), np.uint16) * 257)
            Image.fromarray(wide).save(os.path.join(folder, name + ".png"))
        else:
            image.save(os.path.join(folder, name + ".jpg"), quality=90)
        captions.append(f"a photo of a {colour} {shape}")
    with open(os.path.join(folder, "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return sorted(set(captions))


def write_tokenizer(prefix: str, texts: list) -> str:
    corpus = prefix + "_corpus.txt"
    with open(corpus, "w") as f:
        f.write("\n".join(texts * 4) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=48, hard_vocab_limit=False,
        model_type="unigram", pad_id=-1, unk_id=2, bos_id=-1, eos_id=1, minloglevel=2)
    return prefix + ".model"


def run(*args):
    """Run one of our commands with this Python; stop the demo if it fails."""
    cmd = [sys.executable, "-m", *args]
    print("$ " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def main(argv):
    del argv
    work = FLAGS.workdir
    cli.check_folder("--workdir", work)
    captions = write_images(os.path.join(work, "images"), FLAGS.num_images)
    with open(os.path.join(work, "texts.txt"), "w") as f:
        f.write("\n".join(captions) + "\n")
    tokenizer = write_tokenizer(os.path.join(work, "tokenizer"), captions)

    cfg = models.model_config("siglip", "mu/8", 64, "mu", vocab_size=64, seq_len=16)
    params = models.init_params(cfg, jax.random.PRNGKey(0))
    ckpt = os.path.join(work, "tiny_siglip.npz")
    checkpoints.save(params, cfg, ckpt, "big_vision")
    print(f"wrote {ckpt}: a random tiny SigLIP (big_vision format)")

    copies = {"big_vision": ckpt, "hf": os.path.join(work, "tiny_siglip_hf"),
              "open_clip": os.path.join(work, "tiny_siglip_open_clip.safetensors")}
    for fmt in ("hf", "open_clip"):
        run("infusing_jax.convert", ckpt, copies[fmt], f"--to={fmt}")
    results = {}
    for fmt, path in copies.items():
        out = os.path.join(work, f"embeddings_{fmt}.npz")
        run("infusing_jax.embed", f"--checkpoint={path}", f"--images={work}/images",
            f"--texts={work}/texts.txt", f"--tokenizer={tokenizer}", f"--output={out}")
        results[fmt] = dict(np.load(out))

    ref = results["big_vision"]
    summary = dict(
        images_embedded=len(ref["image_paths"]), images_skipped=ref["skipped_paths"].tolist(),
        texts_embedded=len(ref["texts"]), embedding_dim=int(ref["image_embeddings"].shape[1]),
        max_abs_diff_vs_big_vision={
            fmt: float(max(np.abs(r["image_embeddings"] - ref["image_embeddings"]).max(),
                           np.abs(r["text_embeddings"] - ref["text_embeddings"]).max()))
            for fmt, r in results.items() if fmt != "big_vision"})
    # open_clip's SigLIP runs exact GELU, big_vision / HF the tanh form: ~1e-3 apart.
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    cli.run(main, define_flags)
