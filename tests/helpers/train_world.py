"""A tiny training world on disk for the trainer tests: a pretrained checkpoint and two domains.

  target:   folder:DIR/target/{train,val,test}/<class>/  class = a colour x a stripe direction
  generic:  folder:DIR/generic/{train,test}/<class>/     other colours, wider stripes
  captions: DIR/captions.json (generic test images described by colour words)
  model:    DIR/pretrained.npz, a random 2-block SigLIP two-tower (big_vision format), and
            DIR/spm.model, a sentencepiece tokenizer trained on the captions
"""
import json
import os

import numpy as np
import sentencepiece
from PIL import Image

from infusing_jax import checkpoints
from infusing_jax.training import config as config_lib
from tests.helpers import tiny

CONFIG_FILE = "tests/helpers/world_config.py"  # relative to REPO, where commands using it run
SIZE = 32
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 80, 220), (230, 200, 40), (200, 60, 200),
           (40, 200, 200), (120, 120, 120), (250, 140, 30), (140, 70, 20)]
COLOUR_NAMES = ["red", "green", "blue", "yellow", "magenta", "cyan", "grey", "orange", "brown"]


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
    target = {f"c{i}{'v' if v else 'h'}": (COLOURS[i], v, 3) for i in range(5) for v in (0, 1)}
    names = list(target)
    for split, classes in (("train", names[:6]), ("val", names[6:8]), ("test", names[8:])):
        _write_classes(os.path.join(root, "target", split), {k: target[k] for k in classes},
                       per_class, rng)
    for i in range(broken):
        with open(os.path.join(root, "target", "train", "c0h", f"broken{i}.jpg"), "wb") as f:
            f.write(b"not a jpeg")
    generic = {COLOUR_NAMES[5 + i]: (COLOURS[5 + i], bool(i % 2), 6) for i in range(4)}
    for split in ("train", "test"):
        _write_classes(os.path.join(root, "generic", split), generic, per_class, rng)
    records = [{"image": f"generic/test/{c}/{i}.jpg",
                "captions": [f"a {c} image", f"stripes of {c}"]}
               for c in generic for i in range(per_class)]
    with open(os.path.join(root, "captions.json"), "w") as f:
        json.dump(records, f)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(generic) + "\n")
    corpus = os.path.join(root, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(c for r in records for c in r["captions"]) + "\n")
    with open(os.devnull, "w") as log:
        sentencepiece.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(root, "spm"), vocab_size=24, pad_id=0,
            eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, logstream=log)
    cfg = tiny.tiny_config("siglip")
    checkpoints.save(tiny.random_params(cfg), cfg, os.path.join(root, "pretrained.npz"))
    return root


def world_config(root: str, method: str = "full", teacher: str = "precomputed",
                 tests: str = ""):
    """The paper's recipe shape on the tiny world: 'full' (classifier + distillation +
    anchoring) or 'naive' (classifier only); tests='yes' adds the eval test sets."""
    c = config_lib.default_config()
    c.model.checkpoint = os.path.join(root, "pretrained.npz:img")
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
    if tests:
        c.eval.batch_size = 16
        c.eval.k = 4
        c.eval.tokenizer = os.path.join(root, "spm.model")
        c.eval.retrieval.target = config_lib.retrieval_test(f"folder:{root}/target")
        c.eval.retrieval.generic = config_lib.retrieval_test(f"folder:{root}/generic",
                                                             role="generic")
        c.eval.text_retrieval.captions = config_lib.text_test(f"captions:{root}/captions.json")
        c.eval.zero_shot.colours = config_lib.zero_shot_test(
            f"folder:{root}/generic", class_names=os.path.join(root, "classes.txt"),
            templates=("a {} image",))
    return c


def read_metrics(workdir: str):
    """The lines of a run's metrics.jsonl, as dicts."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def logged_losses(workdir: str):
    """The metrics.jsonl lines that log a loss."""
    return [m for m in read_metrics(workdir) if "loss" in m]


def assert_same_losses(workdir_a: str, workdir_b: str, steps: int, rtol: float = 2e-4,
                       anchoring_rtol: float = 1e-2):
    """Two runs logged steps 1 .. steps with the same loss, loss terms and gradient norm.

    The anchoring terms, weight * ||theta - theta_0||^2, get anchoring_rtol. An attention
    key bias has a zero gradient (softmax ignores a shift shared by a query's logits), so
    its computed gradient is rounding noise, which Adam scales to steps of the learning
    rate in directions the devices' reduction order picks. Those steps move the term, not
    the loss. Between 1 and 8 devices, the key biases held all but 5e-6 of the parameters'
    squared difference; the term differed by 3e-3 after one step and 4e-4 after five,
    while the loss and gradient norm agreed within 1e-6."""
    a, b = logged_losses(workdir_a), logged_losses(workdir_b)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, steps + 1))
    terms = ("/normface", "/feature_mse", "/anchoring")
    for x, y in zip(a, b):
        for key in [k for k in x if k in ("loss", "grad_norm") or k.endswith(terms)]:
            tolerance = anchoring_rtol if key.endswith("/anchoring") else rtol
            np.testing.assert_allclose(x[key], y[key], rtol=tolerance, atol=1e-7, err_msg=key)
