r"""Input pipeline throughput next to the SigLIP B/16 training step's, measured in one run.

    python bench/input_pipeline.py [--num_images=256] [--batch_size=8] [--steps=3]

Pipeline: 224 px train views (squash-resize 256, random crop, flip, SigLIP
normalisation) of generated ~500x375 JPEGs read from a folder source, through
`pipeline.train_dataset` (decode, augment, batch, prefetch). Train step: SigLIP
B/16 image tower at 224 px, float32, forward + backward + AdamW on a NormFace
loss (a stand-in until the trainer's own step lands). The last line is JSON with
`pipeline_images_per_s`, `train_step_images_per_s`, `pipeline_vs_train_step`.
"""
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from PIL import Image

from infusing_jax import models
from infusing_jax.data import pipeline
from infusing_jax.data import tf_views
from infusing_jax.data import sources

_NUM_IMAGES = flags.DEFINE_integer("num_images", 256, "Generated JPEGs (8 classes).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per batch / train step.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps after one warm-up.")


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


def train_step_images_per_s(batch: int, steps: int) -> float:
    cfg = models.model_config("siglip", "B/16", 224, text_variant=None)
    model = models.build(cfg)
    params = {"backbone": models.init_params(cfg, jax.random.PRNGKey(0)),
              "head": jax.random.normal(jax.random.PRNGKey(1), (768, 100)) * 0.02}
    tx = optax.adamw(1e-5, weight_decay=1e-6)
    opt_state = tx.init(params)

    def loss_fn(p, images, labels):
        z = model.apply({"params": p["backbone"]}, images)[0]  # L2-normalised
        w = p["head"] / jnp.linalg.norm(p["head"], axis=0, keepdims=True)
        return optax.softmax_cross_entropy_with_integer_labels(16.0 * z @ w, labels).mean()

    @jax.jit
    def step(p, s, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(p, images, labels)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    images = jax.random.normal(jax.random.PRNGKey(2), (batch, 224, 224, 3))
    labels = jnp.arange(batch) % 100
    params, opt_state, loss = step(params, opt_state, images, labels)  # compile
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, images, labels)
    loss.block_until_ready()
    return steps * batch / (time.perf_counter() - start)


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, _NUM_IMAGES.value)
        pipe = pipeline_images_per_s(root, _BATCH.value)
    train = train_step_images_per_s(_BATCH.value, _STEPS.value)
    print(f"pipeline: {pipe:.1f} images/s; SigLIP B/16 train step: {train:.2f} images/s")
    print(json.dumps(dict(pipeline_images_per_s=round(pipe, 2),
                          train_step_images_per_s=round(train, 3),
                          pipeline_vs_train_step=round(pipe / train, 2))))


if __name__ == "__main__":
    app.run(main)
