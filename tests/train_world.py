"""A tiny training world on disk for the trainer tests: a pretrained checkpoint and two domains.

  target:  folder:DIR/target/{train,val}/<class>/  classes = a colour x a stripe direction
  generic: folder:DIR/generic/<class>/             other colours, noise textures
  model:   DIR/pretrained.npz, a random 2-block SigLIP image tower (big_vision format)
"""
import os

import numpy as np
from PIL import Image

import conftest
from infusing_jax import checkpoints
from infusing_jax import config as config_lib

SIZE = 32
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 80, 220), (230, 200, 40), (200, 60, 200),
           (40, 200, 200), (120, 120, 120), (250, 140, 30)]


def _image(rng, colour, vertical: bool, period: int):
    x = np.arange(48)
    stripes = ((x[None, :] if vertical else x[:, None]) // period) % 2
    stripes = np.broadcast_to(stripes, (48, 48))[..., None]
    base = np.array(colour, np.float32) * (0.6 + 0.4 * stripes)
    noise = rng.normal(0, 12, (48, 48, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _write_classes(root, classes, per_class: int, rng):
    for name, (colour, vertical, period) in classes.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            _image(rng, colour, vertical, period).save(os.path.join(root, name, f"{i}.jpg"))


def make_world(root: str, per_class: int = 8, broken: int = 0) -> str:
    """Writes the world under `root`; `broken` undecodable files go into the target's train."""
    rng = np.random.default_rng(0)
    target = {f"c{i}{'v' if v else 'h'}": (COLOURS[i], v, 3) for i in range(4) for v in (0, 1)}
    train = {k: target[k] for k in list(target)[:6]}
    val = {k: target[k] for k in list(target)[6:]}
    _write_classes(os.path.join(root, "target", "train"), train, per_class, rng)
    _write_classes(os.path.join(root, "target", "val"), val, per_class, rng)
    for i in range(broken):
        with open(os.path.join(root, "target", "train", "c0h", f"broken{i}.jpg"), "wb") as f:
            f.write(b"not a jpeg")
    generic = {f"g{i}": (COLOURS[4 + i], bool(i % 2), 6) for i in range(4)}
    _write_classes(os.path.join(root, "generic"), generic, per_class, rng)
    cfg = conftest.tiny_config("siglip", text=False)
    params = conftest.random_params(cfg)
    checkpoints.save(params, cfg, os.path.join(root, "pretrained.npz"))
    return root


def world_config(root: str, method: str = "full", teacher: str = "precomputed"):
    """The paper's recipe shape on the tiny world: 'full' (classifier + distillation +
    anchoring) or 'naive' (classifier only)."""
    c = config_lib.default_config()
    c.model.checkpoint = os.path.join(root, "pretrained.npz")
    c.model.image_size = SIZE
    c.data.batch_size = 8
    c.data.shuffle_buffer = 64
    target_losses = dict(normface=dict())
    if method == "full":
        target_losses["anchoring"] = dict(weight=10.0)
    c.domains.target = config_lib.domain(
        f"folder:{root}/target", role="target", val_split="val", losses=target_losses)
    if method == "full":
        c.domains.generic = config_lib.domain(
            f"folder:{root}/generic", role="generic", holdout_fraction=0.25,
            losses=dict(feature_mse=dict(weight=100.0, teacher=teacher),
                        anchoring=dict(weight=10.0)))
    c.optim.lr = 1e-2
    c.optim.backbone_lr_mult = 0.1
    c.train.num_steps = 12
    c.train.log_every = 4
    c.train.checkpoint_every = 4
    c.train.eval_every = 6
    c.train.eval_batch_size = 16
    c.train.eval_k = 4
    c.train.progress = False
    return c
