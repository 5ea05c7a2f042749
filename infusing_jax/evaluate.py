"""Evaluate a run, or a pretrained checkpoint, on the config's test sets.

    python -m infusing_jax.evaluate --config=C --workdir=DIR [--wise_ft=0.25,0.5,0.75]
        [--lines=0.1,0.3] [--runs=DIR2,DIR3] [--export=PATH [--export_model=NAME]]
    python -m infusing_jax.evaluate --config=C --workdir=DIR --checkpoint=PATH
    python -m infusing_jax.evaluate --config=C --workdir=DIR --export=PATH --notest

With a trained run in DIR: the checkpoint train.select_by kept (else the last),
the pretrained model (model.checkpoint), and the post-hoc weight-space models
(evaluation/wise_ft.py, evaluation/merging.py):
  wise_ft@a      (1 - a) * pretrained + a * fine-tuned, for each a of --wise_ft
  lines@a        LiNeS: the fine-tuned update scaled by depth from a (the first block)
                 to 1 (the last), for each a of --lines
  uniform_soup, greedy_soup, model_stock
                 with --runs, other runs of the same model (e.g. seeds or
                 hyperparameters of a sweep): the soups over DIR's run and theirs, the
                 greedy one by the config's val score (train.select_by; 'all' for
                 'last'); Model Stock from all of them and the pretrained weights
With --checkpoint: that model alone, as 'pretrained' (no fine-tuning). Writes
DIR/results.json:

    {"step": int, "selected_by": str, "wise_ft": [{"alpha": a, <headline>}, ...],
     "lines": [...], "greedy_soup": {"runs", "val_score"}, "model_stock": {"ratios"},
     "models": {"pretrained" | "fine-tuned" | "wise_ft@a" | ...: <suite.py result>}}

--export writes the image tower --export_model names (any model above; default the
fine-tuned one, mixed with the pretrained at --export_alpha), with the original text
tower where the checkpoint has one, as big_vision .npz, a HF directory or open_clip
file, by the path's form (checkpoints.save). --notest only exports (no test sets
run, results.json left as it is).
"""
import os

import ml_collections
import numpy as np
import tensorflow as tf
from absl import flags
from absl import logging

from infusing_jax.training import run_checkpoints
from infusing_jax import cli
from infusing_jax import checkpoints
from infusing_jax.training import config as config_lib
from infusing_jax import errors
from infusing_jax import paths
from infusing_jax.training import backbone as backbone_lib
from infusing_jax.training import suite
from infusing_jax.training import domains as domains_lib
from infusing_jax.training import validation
from infusing_jax import sharding
from infusing_jax.evaluation import merging
from infusing_jax.evaluation import wise_ft

FLAGS = flags.FLAGS


def define_flags():
    cli.define_config_flag("The run's configs/*.py file (and :ARG).", lock=False)
    cli.define_workdir_flag("The run's workdir; results.json goes here.")
    flags.DEFINE_string("checkpoint", None,
                        "Evaluate this pretrained checkpoint instead of a run.")
    flags.DEFINE_string("wise_ft", "", "Comma-separated WiSE-FT alphas, e.g. 0.25,0.5,0.75.")
    flags.DEFINE_string("lines", "", "Comma-separated LiNeS alphas (the first block's scale "
                        "of the update; the last block keeps all of it), e.g. 0.1,0.3.")
    flags.DEFINE_list("runs", [], "Other runs' workdirs, of the same model: the soups and "
                      "Model Stock over them and --workdir's run.")
    flags.DEFINE_string("export", None, "Write the image tower --export_model names here.")
    flags.DEFINE_string("export_model", "fine-tuned", "The model to export: fine-tuned, "
                        "wise_ft@A, lines@A, uniform_soup, greedy_soup or model_stock.")
    flags.DEFINE_float("export_alpha", 1.0, "WiSE-FT alpha of the exported fine-tuned model "
                       "(1 = as fine-tuned).")
    flags.DEFINE_bool("test", True, "Run the test sets (--notest: only --export).")


def evaluate(cfg, workdir: str, checkpoint=None, alphas=(), export=None,
             export_alpha: float = 1.0, run_tests: bool = True, lines_alphas=(), runs=(),
             export_model: str = "fine-tuned", export_format: str = None) -> dict:
    """-> results.json's content ({} with run_tests False: export only). export_format:
    checkpoints.EXPORT_FORMATS, default the export path's."""
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
    backbones, step, merges = {"pretrained": pretrained}, 0, {}
    if checkpoint and (export or runs or lines_alphas):
        raise errors.UserError("--export, --runs and --lines need a trained run in --workdir "
                               "(not --checkpoint)")
    if not checkpoint:
        step, finetuned = run_checkpoints.kept_backbone(cfg, workdir, pretrained)
        backbones["fine-tuned"] = finetuned
        kind, _, value = export_model.partition("@") if export else ("", "", "")
        for a in sorted(set(alphas) | ({float(value)} if kind == "wise_ft" else set())):
            if 0.0 < a < 1.0:
                backbones[f"wise_ft@{a:g}"] = wise_ft.interpolate(pretrained, finetuned, a)
        for a in sorted(set(lines_alphas) | ({float(value)} if kind == "lines" else set())):
            backbones[f"lines@{a:g}"] = merging.lines(pretrained, finetuned,
                                                      model_cfg.image.depth, a)
        if runs:
            merges = _merge_runs(cfg, embed, pretrained, workdir, finetuned, runs, backbones)
    if run_tests and not suite.has_tests(cfg):
        if not export:
            raise errors.UserError("config.eval: no test set configured; nothing to evaluate "
                                   "(add eval.retrieval, text_retrieval or zero_shot sets, or "
                                   "give --export to only export)")
        logging.info("config.eval has no test set: only exporting")
        run_tests = False
    if export:
        if export_model == "fine-tuned":
            exported = wise_ft.interpolate(pretrained, backbones["fine-tuned"], export_alpha)
        elif export_model in backbones and export_model != "pretrained":
            exported = backbones[export_model]
        else:
            raise errors.UserError(
                f"--export_model={export_model}: not a model of this evaluation; give "
                "fine-tuned, wise_ft@A, lines@A, or with --runs uniform_soup, greedy_soup "
                "or model_stock")
        _export(cfg, exported, export, export_format)
    if not run_tests:
        return {}
    results = dict(step=step, selected_by=cfg.train.select_by,
                   weights="ema" if config_lib.uses_ema(cfg) else "raw",
                   models=suite.evaluate_models(cfg, embed, backbones), **merges)
    curve = {0.0: "pretrained", 1.0: "fine-tuned", **{a: f"wise_ft@{a:g}" for a in alphas}}
    results["wise_ft"] = [dict(alpha=a, **results["models"][name]["headline"])
                          for a, name in sorted(curve.items()) if name in results["models"]]
    results["lines"] = [dict(alpha=a, **results["models"][f"lines@{a:g}"]["headline"])
                        for a in sorted(set(lines_alphas))]
    tf.io.gfile.makedirs(workdir)
    run_checkpoints.write_json(os.path.join(workdir, "results.json"), results)
    return results


def _other_run(workdir: str, pretrained):
    """The image tower another run keeps, as its own config says (select_by, EMA)."""
    run_checkpoints.check_workdir(workdir)
    config = run_checkpoints.read_json(os.path.join(workdir, "config.json"))
    if config is None:
        raise errors.UserError(f"--runs: {workdir} has no config.json; give the workdir of a "
                               "run of python -m infusing_jax.main")
    return run_checkpoints.kept_backbone(ml_collections.ConfigDict(config), workdir,
                                         pretrained)[1]


def val_scorer(cfg, embed, pretrained):
    """-> score(backbone): the config's val score, train.select_by's ('all' for 'last')."""
    names = config_lib.ordered_domains(cfg)
    splits = {n: domains_lib.load(cfg, n) for n in names}
    validator = validation.Validator(cfg, names, splits, embed, sharding.make_mesh(),
                                     pretrained=pretrained)
    key = "all" if cfg.train.select_by == "last" else cfg.train.select_by

    def score(backbone) -> float:
        out = validator.run(backbone)
        if key not in out:
            raise errors.UserError(f"--runs: the greedy soup picks runs by the val score "
                                   f"{key!r}, and no domain of the config has the val split "
                                   "it needs (val_split, val_classes_fraction or "
                                   "holdout_fraction)")
        return out[key]
    return score


def _merge_runs(cfg, embed, pretrained, workdir, finetuned, runs, backbones) -> dict:
    """The soups and Model Stock over workdir's run and `runs` into `backbones`; -> what
    results.json records of them."""
    names = [workdir, *runs]
    ingredients = [finetuned] + [_other_run(d, pretrained) for d in runs]
    backbones["uniform_soup"] = merging.uniform_soup(ingredients)
    soup, kept, best = merging.greedy_soup(ingredients, val_scorer(cfg, embed, pretrained))
    backbones["greedy_soup"] = soup
    backbones["model_stock"], ratios = merging.model_stock(pretrained, ingredients)
    t = np.array(list(ratios.values()))
    logging.info("greedy soup: %d of %d runs, val %.4f; Model Stock ratio t: mean %.3f, "
                 "min %.3f, max %.3f", len(kept), len(names), best, t.mean(), t.min(), t.max())
    return dict(greedy_soup=dict(runs=[names[i] for i in kept], val_score=best),
                model_stock=dict(ratios=ratios))


def _export(cfg, backbone, path: str, fmt: str = None):
    """The original checkpoint with its image tower replaced, saved as fmt (default: the
    path's format)."""
    params, model_cfg = suite.load_text_checkpoint(cfg, image_size=cfg.model.image_size)
    params = dict(params, img=backbone)
    checkpoints.save(params, model_cfg, path, fmt)


def main(argv):
    del argv
    cli.check_folder("--workdir", FLAGS.workdir)
    for run in FLAGS.runs:
        if not paths.is_remote(run) and not os.path.isdir(run):
            raise errors.UserError(f"--runs={run}: no such folder; give the workdirs of other "
                                   "runs of the same model, comma-separated")
    if FLAGS.export:
        cli.check_output_file("--export", FLAGS.export,
                              folder=checkpoints.format_of(FLAGS.export) == "hf")
    if not 0.0 <= FLAGS.export_alpha <= 1.0:
        raise errors.UserError(f"--export_alpha={FLAGS.export_alpha}: must be in [0, 1]")
    if FLAGS.export_alpha != 1.0 and FLAGS.export_model != "fine-tuned":
        raise errors.UserError(f"--export_alpha mixes the fine-tuned model; with "
                               f"--export_model={FLAGS.export_model} leave it at 1")
    export_model = export_model_name(FLAGS.export_model, bool(FLAGS.runs))
    alphas = wise_ft.parse_alphas(FLAGS.wise_ft)
    lines_alphas = wise_ft.parse_alphas(FLAGS.lines, "--lines")
    evaluate(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint, alphas, FLAGS.export,
             FLAGS.export_alpha, FLAGS.test, lines_alphas, FLAGS.runs, export_model)


MERGED = ("uniform_soup", "greedy_soup", "model_stock")


def export_model_name(name: str, runs: bool) -> str:
    """--export_model as the model's name in results.json ('wise_ft@.50' -> 'wise_ft@0.5',
    'wise_ft@1' -> 'fine-tuned'); a one-line error for a name no evaluation makes."""
    kind, at, value = name.partition("@")
    want = ("give fine-tuned, wise_ft@A, lines@A (A in [0, 1]), or with --runs uniform_soup, "
            "greedy_soup or model_stock")
    if name == "fine-tuned" or (name in MERGED and runs):
        return name
    if name in MERGED:
        raise errors.UserError(f"--export_model={name}: needs --runs, the other runs to merge")
    if not (at and kind in ("wise_ft", "lines")):
        raise errors.UserError(f"--export_model={name}: unknown; {want}")
    alpha = wise_ft.parse_alphas(value, "--export_model")
    if len(alpha) != 1:
        raise errors.UserError(f"--export_model={name}: give one alpha, e.g. {kind}@0.5")
    if kind == "wise_ft" and alpha[0] == 0.0:
        raise errors.UserError("--export_model=wise_ft@0: that is the pretrained model; export "
                               "the original checkpoint instead")
    if kind == "wise_ft" and alpha[0] == 1.0:
        return "fine-tuned"
    return f"{kind}@{alpha[0]:g}"


if __name__ == "__main__":
    cli.run(main, define_flags)
