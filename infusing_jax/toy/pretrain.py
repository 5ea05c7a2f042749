"""SigLIP pretraining of a small two-tower on an image-caption set (the toy world's VLM).

    python -m infusing_jax.toy.pretrain --config=configs/toy_pretrain.py:world=DIR \
        --workdir=DIR/vlm

The whole set is decoded into memory once (it is meant for small sets: the toy
world's 20k images of 32 px take 250 MB); every step draws a batch without
replacement, one random caption per image and a random horizontal flip, and takes
an AdamW step on the sigmoid loss (losses/contrastive.py) over both towers and (t, b).

Writes WORKDIR/pretrained.npz (big_vision format, loadable as
'WORKDIR/pretrained.npz:img'), WORKDIR/metrics.jsonl and WORKDIR/config.json.
"""
if __name__ == "__main__":  # before the heavy imports (see infusing_jax/main.py)
    from infusing_jax import host_memory
    host_memory.restart_with_tunables()

import functools  # noqa: E402
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
import tqdm
from absl import flags

from infusing_jax import cli
from infusing_jax import errors
from infusing_jax import fields
from infusing_jax.training import run_checkpoints
from infusing_jax import checkpoints
from infusing_jax import models
from infusing_jax import tokenizers
from infusing_jax.data import tf_views
from infusing_jax.data import sources
from infusing_jax.losses import contrastive


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.pretrain = ml_collections.ConfigDict(dict(
        captions="",      # an image-text source: 'captions:FILE.json[:SPLIT]'
        data_dir="",      # its image root ('' = the JSON's folder)
        tokenizer="",     # a sentencepiece .model
        output="pretrained.npz"))  # relative to the workdir
    c.model = ml_collections.ConfigDict(dict(
        family="siglip", image_size=32,
        image=dict(patch_size=8, width=96, depth=3, mlp_dim=384, num_heads=4),
        text=dict(seq_len=16, width=96, depth=2, mlp_dim=384, num_heads=4)))
    c.data = ml_collections.ConfigDict(dict(batch_size=128))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=100, weight_decay=1e-4,
                                             grad_clip_norm=1.0))
    c.train = ml_collections.ConfigDict(dict(num_steps=1000, log_every=50, progress=True))
    return c


_TOWER = dict(width=fields.integer(1), depth=fields.integer(1), mlp_dim=fields.integer(1),
              num_heads=fields.integer(1))
RULES = {
    "": dict(seed=fields.integer(0), pretrain=fields.anything(), model=fields.anything(),
             data=fields.anything(), optim=fields.anything(), train=fields.anything()),
    "pretrain": dict(captions=fields.Rule(lambda x: isinstance(x, str) and
                                          x.startswith("captions:"), "'captions:FILE.json'"),
                     data_dir=fields.text(), tokenizer=fields.text(nonempty=True),
                     output=fields.text(nonempty=True)),
    "model": dict(family=fields.one_of("siglip"), image_size=fields.integer(1),
                  image=fields.anything(), text=fields.anything()),
    "model.image": dict(patch_size=fields.integer(1), **_TOWER),
    "model.text": dict(seq_len=fields.integer(2), **_TOWER),
    "data": dict(batch_size=fields.integer(2)),
    "optim": dict(lr=fields.number(above=0), warmup_steps=fields.integer(0),
                  weight_decay=fields.number(at_least=0), grad_clip_norm=fields.number(above=0)),
    "train": dict(num_steps=fields.integer(1), log_every=fields.integer(1),
                  progress=fields.boolean()),
}


def validate(cfg) -> None:
    """Raises errors.UserError('config.<field>: ...') for what cannot work."""
    for group, rules in RULES.items():
        node = cfg
        for name in filter(None, group.split(".")):
            node = node[name]
        fields.check(node, "config" + (f".{group}" if group else ""), rules)
    if not os.path.isfile(cfg.pretrain.tokenizer):
        fields.fail("config.pretrain.tokenizer", f"no such file {cfg.pretrain.tokenizer!r}")
    m = cfg.model
    if m.image_size % m.image.patch_size:
        fields.fail("config.model.image_size", f"{m.image_size} is not a multiple of "
                    f"model.image.patch_size {m.image.patch_size}")
    for tower in ("image", "text"):
        if m[tower].width % m[tower].num_heads:
            fields.fail(f"config.model.{tower}.num_heads", f"{m[tower].num_heads} does not "
                        f"divide the width {m[tower].width}")


def model_config(cfg, vocab_size: int) -> ml_collections.ConfigDict:
    """The two-tower's model config (models/config.py) from config.model."""
    m = cfg.model
    out = models.model_config(m.family, f"Ti/{m.image.patch_size}", m.image_size, "Ti",
                              vocab_size=vocab_size, seq_len=m.text.seq_len)
    out.image.update({k: v for k, v in m.image.items() if k != "patch_size"})
    out.text.update({k: v for k, v in m.text.items() if k != "seq_len"})
    out.image.out_dim, out.text.out_dim = None, m.image.width
    return out


def load_pairs(cfg, tokenizer):
    """-> images float32 (N, S, S, 3) in the model's input range, tokens int32 (N, C, L)
    (C captions per image, a short list repeated), counts (N,) of distinct captions."""
    p = cfg.pretrain
    try:
        source = sources.load_source(p.captions, p.data_dir or None)
    except errors.UserError as e:
        raise errors.UserError(f"config.pretrain.captions: {e}") from None
    split = source.split(source.splits[0])
    view = tf_views.eval_fn(cfg.model.family, cfg.model.image_size)
    ds = split.dataset(0, 1).map(lambda ex: (view(ex["image"]), ex["captions"]),
                                 num_parallel_calls=tf.data.AUTOTUNE)
    images, captions = [], []
    try:
        for image, caps in ds.as_numpy_iterator():
            images.append(image)
            captions.append([c.decode() for c in caps])
    except tf.errors.OpError as e:
        raise errors.UserError(f"config.pretrain.captions: image {len(images) + 1} of "
                               f"{p.captions} cannot be decoded ({e.message.splitlines()[0]})"
                               ) from None
    if not images:
        raise errors.UserError(f"config.pretrain.captions: {p.captions} has no images")
    width = max(len(c) for c in captions)
    tokens = np.stack([tokenizer([c[i % len(c)] for i in range(width)]) for c in captions])
    counts = np.array([len(c) for c in captions], np.int32)
    return np.stack(images), tokens, counts


def sample(rng, num: int, batch_size: int):
    """An endless stream of index batches (N,), each epoch a new permutation."""
    while True:
        order = rng.permutation(num)
        for i in range(0, num - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


def train_step(params, opt_state, images, tokens, flips, *, model, tx):
    """-> (params, opt_state, loss): one AdamW step on the sigmoid loss.

    images (B, S, S, 3), tokens (B, L), flips (B,) bool: flip image i left-right.
    """
    images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)

    def loss_fn(p):
        zimg, ztxt, _ = model.apply({"params": p}, images, tokens)
        return contrastive.sigmoid_loss(zimg, ztxt, p["t"][0], p["b"][0])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def pretrain(cfg, workdir: str) -> str:
    """Train the two-tower of config.model on config.pretrain.captions -> the .npz path."""
    validate(cfg)
    try:
        tokenizer = tokenizers.SigLIPTokenizer(cfg.pretrain.tokenizer, cfg.model.text.seq_len)
    except errors.UserError as e:
        raise errors.UserError(f"config.pretrain.tokenizer: {e}") from None
    model_cfg = model_config(cfg, tokenizer.vocab_size)
    model = models.build(model_cfg)
    images, tokens, counts = load_pairs(cfg, tokenizer)
    tf.io.gfile.makedirs(workdir)
    run_checkpoints.write_json(os.path.join(workdir, "config.json"),
                               json.loads(cfg.to_json_best_effort()))
    steps, batch_size = cfg.train.num_steps, min(cfg.data.batch_size, len(images))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.optim.lr, cfg.optim.warmup_steps,
                                                  max(steps, cfg.optim.warmup_steps + 1))
    tx = optax.chain(optax.clip_by_global_norm(cfg.optim.grad_clip_norm),
                     optax.adamw(schedule, weight_decay=cfg.optim.weight_decay))
    params = models.init_params(model_cfg, jax.random.PRNGKey(cfg.seed))
    opt_state = tx.init(params)
    step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx), donate_argnums=(0, 1))
    rng = np.random.default_rng(cfg.seed)
    batches = sample(rng, len(images), batch_size)
    log_path = os.path.join(workdir, "metrics.jsonl")
    bar = tqdm.tqdm(total=steps, desc="pretrain", unit="step", file=sys.stderr,
                    disable=not cfg.train.progress, dynamic_ncols=True)
    window = []
    with tf.io.gfile.GFile(log_path, "w") as log:
        for step in range(1, steps + 1):
            idx = next(batches)
            caption = rng.integers(0, counts[idx])
            params, opt_state, loss = step_fn(params, opt_state, images[idx],
                                              tokens[idx, caption], rng.random(len(idx)) < 0.5)
            window.append(loss)
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == steps:
                mean = float(np.mean(jax.device_get(window)))
                if not np.isfinite(mean):
                    raise errors.UserError(f"config.optim.lr: the pretraining loss is {mean} "
                                           f"at step {step}; lower the learning rate")
                log.write(json.dumps(dict(step=step, loss=mean, lr=float(schedule(step - 1))))
                          + "\n")
                log.flush()
                bar.set_postfix(loss=f"{mean:.4g}", refresh=False)
                window = []
    bar.close()
    path = os.path.join(workdir, cfg.pretrain.output)
    checkpoints.save(jax.device_get(params), model_cfg, path)
    return path


def define_flags():
    cli.define_config_flag("configs/toy_pretrain.py (and :ARG).")
    cli.define_workdir_flag("pretrained.npz, metrics.jsonl and config.json go here.")


def main(argv):
    del argv
    cli.check_folder("--workdir", flags.FLAGS.workdir)
    pretrain(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main, define_flags)
