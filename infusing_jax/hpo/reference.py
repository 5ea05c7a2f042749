"""The sweep's reference points, measured once on the trials' own validation splits:
the pretrained model, and the baseline run (e.g. naive fine-tuning) with its WiSE-FT
curve, the weight-space mixes (1 - a) * pretrained + a * baseline. The same job
extracts the pretrained model's teacher descriptors once, into DIR/teacher/, for
every trial (`shared_teachers`).

    reference = measure(sweep, run_cfg, workdir)   # -> DIR/reference.json

{"pretrained": {"val": {...}},
 "baseline": {"workdir", "val" (its kept weights), "wise_ft": [{"alpha", "val"}],
              "test": {model: headline} (its results.json)}}      (with sweep.baseline)
Every process takes part (validation is sharded); process 0 writes the file.
"""
import json
import os

import jax
import tensorflow as tf

from infusing_jax import checkpoints
from infusing_jax import errors
from infusing_jax import sharding
from infusing_jax.data import teacher as teacher_lib
from infusing_jax.evaluation import wise_ft
from infusing_jax.training import backbone as backbone_lib
from infusing_jax.training import config as config_lib
from infusing_jax.training import domains as domains_lib
from infusing_jax.training import loop
from infusing_jax.training import run_checkpoints
from infusing_jax.training import validation

ALPHAS = (0.25, 0.5, 0.75, 1.0)
FILE = "reference.json"


def _precomputed(domain) -> bool:
    return any(k in config_lib.DISTILLATION and domain.losses[k].teacher == "precomputed"
               and not domain.teacher_descriptors for k in domain.losses.keys())


def shared_teachers(run_cfg, workdir: str) -> dict:
    """{field path: file} of the teacher descriptors the reference job extracted (or is
    extracting) for the trials: DIR/teacher/<domain>.npz, for every domain with a
    precomputed teacher and no file of its own; only those already written."""
    out = {}
    for name in run_cfg.domains.keys():
        path = os.path.join(workdir, "teacher", f"{name}.npz")
        if _precomputed(run_cfg.domains[name]) and (
                tf.io.gfile.exists(path) or tf.io.gfile.glob(path + ".part*-of-*")):
            out[f"domains.{name}.teacher_descriptors"] = path
    return out


def measure(sweep, run_cfg, workdir: str) -> dict:
    """Extract the trials' teacher descriptors, validate the pretrained model, train and
    validate the baseline (module doc)."""
    model, pretrained, model_cfg = backbone_lib.load_image_tower(run_cfg.model)
    embed = backbone_lib.embed_fn(model)
    names = config_lib.ordered_domains(run_cfg)
    splits = {n: domains_lib.load(run_cfg, n) for n in names}
    encode = jax.jit(lambda images: embed(pretrained, images))
    fingerprint = teacher_lib.fingerprint(checkpoints.to_flat({"img": pretrained}), model_cfg)
    for name in names:
        if _precomputed(run_cfg.domains[name]):
            loop.teacher_descriptors(run_cfg, splits[name].train, name, encode, fingerprint,
                                     workdir)
    validator = validation.Validator(run_cfg, names, splits, embed, sharding.make_mesh(),
                                     pretrained=pretrained)
    out = {"pretrained": {"val": validator.run(pretrained)}}
    if sweep.baseline is not None:
        if sweep.baseline.model.checkpoint != run_cfg.model.checkpoint:
            raise errors.UserError(
                f"config.sweep.baseline.model.checkpoint: {sweep.baseline.model.checkpoint!r}, "
                f"the trials start from {run_cfg.model.checkpoint!r}; compare runs from the same "
                "pretrained model")
        folder = os.path.join(workdir, "baseline")
        loop.train_and_evaluate(sweep.baseline, folder)
        _, kept = run_checkpoints.kept_backbone(sweep.baseline, folder, pretrained)
        curve = [dict(alpha=a, val=validator.run(wise_ft.interpolate(pretrained, kept, a)))
                 for a in ALPHAS]
        out["baseline"] = dict(workdir=folder, val=curve[-1]["val"], wise_ft=curve,
                               test=run_checkpoints.read_headlines(folder))
    run_checkpoints.write_json(os.path.join(workdir, FILE), out)
    return out


def load(workdir: str):
    """DIR/reference.json, or None before it is written."""
    path = os.path.join(workdir, FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
