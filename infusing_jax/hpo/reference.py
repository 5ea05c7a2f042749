"""The sweep's reference points, measured once on the trials' own validation splits:
the pretrained model, and the baseline run (e.g. naive fine-tuning) with its WiSE-FT
curve, the weight-space mixes (1 - a) * pretrained + a * baseline.

    reference = measure(sweep, run_cfg, workdir)   # -> DIR/reference.json

{"pretrained": {"val": {...}},
 "baseline": {"workdir", "val" (its kept weights), "wise_ft": [{"alpha", "val"}],
              "test": {model: headline} (its results.json)}}      (with sweep.baseline)
Every process takes part (validation is sharded); process 0 writes the file.
"""
import json
import os

from infusing_jax import errors
from infusing_jax import sharding
from infusing_jax.evaluation import wise_ft
from infusing_jax.training import backbone as backbone_lib
from infusing_jax.training import config as config_lib
from infusing_jax.training import domains as domains_lib
from infusing_jax.training import loop
from infusing_jax.training import run_checkpoints
from infusing_jax.training import validation

ALPHAS = (0.25, 0.5, 0.75, 1.0)
FILE = "reference.json"


def measure(sweep, run_cfg, workdir: str) -> dict:
    """Validate the pretrained model, train and validate the baseline (module doc)."""
    model, pretrained, _ = backbone_lib.load_image_tower(run_cfg.model)
    names = config_lib.ordered_domains(run_cfg)
    validator = validation.Validator(run_cfg, names, {n: domains_lib.load(run_cfg, n)
                                                      for n in names},
                                     backbone_lib.embed_fn(model), sharding.make_mesh(),
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
