r"""Input pipeline throughput next to the trainer's train step's, measured in one run.

    python bench/input_pipeline.py [--num_images=256] [--batch_size=8] [--steps=3]
        [--variant=B/16]

Pipeline: 224 px train views (squash-resize 256, random crop, flip, SigLIP
normalisation) of generated ~500x375 JPEGs read from a folder source, through
`pipeline.train_dataset` (decode, augment, batch, prefetch). Train step: the
trainer's own (trainer_steps.py's plain config: a SigLIP image tower at 224 px,
float32, NormFace on 100 classes, AdamW), the mean of --steps steps dispatched
back to back after one warm-up step. The last line is JSON with
`pipeline_images_per_s`, `train_step_images_per_s`, `pipeline_vs_train_step`.
"""
import json
import os
import tempfile
import time

import numpy as np
from absl import app
from absl import flags
from PIL import Image

import trainer_steps
from infusing_jax import sharding
from infusing_jax.data import pipeline
from infusing_jax.data import sources
from infusing_jax.data import tf_views

_NUM_IMAGES = flags.DEFINE_integer("num_images", 256, "Generated JPEGs (8 classes).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per batch / train step.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps after one warm-up.")
_VARIANT = flags.DEFINE_string("variant", "B/16", "Model variant of the train step.")
NUM_CLASSES = 100  # the train step's classifier


def write_jpegs(root: str, n: int, seed: int = 0):
    """n photo-like 500x375 JPEGs (smooth colour fields plus noise) in 8 class folders."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:375, :500] / 100.0
    for i in range(n):
        folder = os.path.join(root, f"class_{i % 8}")
        os.makedirs(folder, exist_ok=True)
        a, b, c = rng.uniform(0.5, 3.0, 3)
        base = np.stack([np.sin(a * xx + c), np.cos(b * yy), np.sin(a * xx + b * yy)], -1)
        pixels = (base * 90 + 128 + rng.normal(0, 12, base.shape)).clip(0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"),
                                                      quality=90)


def pipeline_images_per_s(root: str, batch: int) -> float:
    split = sources.load_source(f"folder:{root}").split("train")
    ds = pipeline.train_dataset([pipeline.Domain("bench", split)],
                                tf_views.train_fn("siglip", 224), global_batch_size=batch, seed=0,
                                shuffle_buffer=256)
    it = ds.as_numpy_iterator()
    for _ in range(4):  # warm-up: tracing, thread pools, file cache
        next(it)
    n_batches = max(8, 2 * split.num_examples // batch)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - start)


def train_step_images_per_s(variant: str, batch: int, steps: int) -> float:
    """The trainer's plain step (trainer_steps.py: NormFace, AdamW) on random batches."""
    trainee = trainer_steps.build_steps(("plain",), variant, num_classes=NUM_CLASSES,
                                        mesh=sharding.make_mesh())["plain"]
    run = trainer_steps.StepRunner(trainee, batch, NUM_CLASSES)
    run(0)  # warm-up
    return batch / run(0, steps)


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, _NUM_IMAGES.value)
        pipe = pipeline_images_per_s(root, _BATCH.value)
    train = train_step_images_per_s(_VARIANT.value, _BATCH.value, _STEPS.value)
    print(f"pipeline: {pipe:.1f} images/s; SigLIP {_VARIANT.value} train step: {train:.2f} "
          "images/s")
    print(json.dumps(dict(pipeline_images_per_s=round(pipe, 2),
                          train_step_images_per_s=round(train, 3),
                          pipeline_vs_train_step=round(pipe / train, 2))))


if __name__ == "__main__":
    app.run(main)
