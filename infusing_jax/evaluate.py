"""Evaluate a run, or a pretrained checkpoint, on the config's test sets.

    python -m infusing_jax.evaluate --config=C --workdir=DIR [--wise_ft=0.25,0.5,0.75]
        [--export=PATH --export_alpha=A]
    python -m infusing_jax.evaluate --config=C --workdir=DIR --checkpoint=PATH
    python -m infusing_jax.evaluate --config=C --workdir=DIR --export=PATH --notest

With a trained run in DIR: the checkpoint train.select_by kept (else the last),
the pretrained model (model.checkpoint), and the WiSE-FT mixtures
(1 - a) * pretrained + a * fine-tuned for each a of --wise_ft. With --checkpoint:
that model alone, as 'pretrained' (no fine-tuning). Writes DIR/results.json:

    {"step": int, "selected_by": str, "wise_ft": [{"alpha": a, <headline>}, ...],
     "models": {"pretrained" | "fine-tuned" | "wise_ft@a": <evaluation/suite.py result>}}

--export writes the image tower at --export_alpha (with the original text tower,
where the checkpoint has one) as big_vision .npz, a HF directory or open_clip
file, by the path's form (checkpoints.save). --notest only exports (no test sets
run, results.json left as it is).
"""
import os

import jax
import numpy as np
import tensorflow as tf
from absl import flags
from absl import logging

from infusing_jax.training import run_checkpoints
from infusing_jax import cli
from infusing_jax import checkpoints
from infusing_jax.training import config as config_lib
from infusing_jax import errors
from infusing_jax.training import backbone as backbone_lib
from infusing_jax.training import suite
from infusing_jax.evaluation import wise_ft

FLAGS = flags.FLAGS


def define_flags():
    cli.define_config_flag("The run's configs/*.py file (and :ARG).", lock=False)
    cli.define_workdir_flag("The run's workdir; results.json goes here.")
    flags.DEFINE_string("checkpoint", None,
                        "Evaluate this pretrained checkpoint instead of a run.")
    flags.DEFINE_string("wise_ft", "", "Comma-separated WiSE-FT alphas, e.g. 0.25,0.5,0.75.")
    flags.DEFINE_string("export", None, "Write the image tower at --export_alpha here.")
    flags.DEFINE_float("export_alpha", 1.0, "WiSE-FT alpha of the export (1 = fine-tuned).")
    flags.DEFINE_bool("test", True, "Run the test sets (--notest: only --export).")


def evaluate(cfg, workdir: str, checkpoint=None, alphas=(), export=None,
             export_alpha: float = 1.0, run_tests: bool = True) -> dict:
    """-> results.json's content ({} with run_tests False: export only)."""
    if not run_tests and not export:
        raise errors.UserError("--notest: nothing to do without --export")
    if checkpoint:
        cfg.model.checkpoint = checkpoint
    config_lib.validate(cfg)
    run_checkpoints.check_workdir(workdir)
    model, pretrained, model_cfg = backbone_lib.load_image_tower(cfg.model)
    if run_tests:
        suite.check(cfg)
    embed = backbone_lib.embed_fn(model)
    backbones, step = {"pretrained": pretrained}, 0
    finetuned = None
    if not checkpoint:
        step, finetuned = run_checkpoints.kept_backbone(cfg, workdir, pretrained)
        backbones["fine-tuned"] = finetuned
        for a in alphas:
            if 0.0 < a < 1.0:
                backbones[f"wise_ft@{a:g}"] = wise_ft.interpolate(pretrained, finetuned, a)
    if run_tests and not suite.has_tests(cfg):
        if not export:
            raise errors.UserError("config.eval: no test set configured; nothing to evaluate "
                                   "(add eval.retrieval, text_retrieval or zero_shot sets, or "
                                   "give --export to only export)")
        logging.info("config.eval has no test set: only exporting")
        run_tests = False
    if export:
        if finetuned is None:
            raise errors.UserError("--export needs a trained run in --workdir (not --checkpoint)")
        _export(cfg, wise_ft.interpolate(pretrained, finetuned, export_alpha), export)
    if not run_tests:
        return {}
    results = dict(step=step, selected_by=cfg.train.select_by,
                   weights="ema" if config_lib.uses_ema(cfg) else "raw",
                   models=suite.evaluate_models(cfg, embed, backbones))
    curve = {0.0: "pretrained", 1.0: "fine-tuned", **{a: f"wise_ft@{a:g}" for a in alphas}}
    results["wise_ft"] = [dict(alpha=a, **results["models"][name]["headline"])
                          for a, name in sorted(curve.items()) if name in results["models"]]
    tf.io.gfile.makedirs(workdir)
    run_checkpoints.write_json(os.path.join(workdir, "results.json"), results)
    return results


def _export(cfg, backbone, path: str):
    """The original checkpoint with its image tower replaced, saved in the path's format."""
    params, model_cfg = suite.load_text_checkpoint(cfg, image_size=cfg.model.image_size)
    params = dict(params, img=backbone)
    checkpoints.save(params, model_cfg, path)


def main(argv):
    del argv
    cli.check_folder("--workdir", FLAGS.workdir)
    if FLAGS.export:
        cli.check_output_file("--export", FLAGS.export,
                              folder=checkpoints.format_of(FLAGS.export) == "hf")
    if not 0.0 <= FLAGS.export_alpha <= 1.0:
        raise errors.UserError(f"--export_alpha={FLAGS.export_alpha}: must be in [0, 1]")
    alphas = wise_ft.parse_alphas(FLAGS.wise_ft)
    evaluate(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint, alphas, FLAGS.export,
             FLAGS.export_alpha, FLAGS.test)


if __name__ == "__main__":
    cli.run(main, define_flags)
