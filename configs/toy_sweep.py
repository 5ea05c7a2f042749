"""The toy world, swept: a method's own settings (the full method's distillation and
anchoring weights, SPD's strength, LoRA's rank, ...), the backbone's learning rate and
the length, chosen on the world's validation splits by one protocol for every method
(python -m infusing_jax.sweep). Usage and the :ARG keys: configs/README.md.
"""
import os

from infusing_jax.hpo import config as hpo_config
from infusing_jax.hpo import space
from infusing_jax.training import config as config_lib
from infusing_jax.training import recipes

TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy.py")


def get_config(arg=None):
    arg = recipes.parse_arg(arg, method=recipes.METHODS, world="toy_world", trials=30,
                            steps=800, objectives=("all", "pareto"),
                            sampler=("tpe", "random", "nsga2"), pruner=("none", "median"))
    # Every trial: configs/toy.py's run of the method, validated on the glyph classes of the
    # target's val split and the generic hold-out every steps / 4 steps, the best weights kept
    # by the paper's score 'all'; the generic val images' cosine to the pretrained embeddings
    # ('retention') is recorded too. A method that trains on the glyphs alone validates on
    # the same generic hold-out (a validation-only domain). The test sets run at the end,
    # never used to choose.
    c = recipes.config_from_file(TOY, f"method={arg.method},world={arg.world},"
                                      f"steps={arg.steps}")
    if "generic" not in c.domains:
        c.domains.generic = config_lib.domain(f"folder:{arg.world}/generic", role="generic",
                                              holdout_fraction=0.05, train=False)
    quarter = max(1, arg.steps // 4)
    c.train.update(eval_every=quarter, checkpoint_every=quarter, select_by="all",
                   eval_retention=True, progress=False)

    c.sweep = hpo_config.default_config()
    c.sweep.num_trials = arg.trials
    c.sweep.sampler, c.sweep.pruner = arg.sampler, arg.pruner
    # The paper's selection score, or the front of in-domain val mAP@20 against retention.
    c.sweep.objectives = ("all",) if arg.objectives == "all" else ("in-domain", "retention")
    c.sweep.startup_trials = 8

    # The search space, the same budget for every method: the backbone's LR multiplier (the
    # adapters' for LoRA) and the length, plus the method's own settings. The paper's two
    # weights span several decades (anchoring counts once per step, the same weight in both
    # domains).
    lr_low, lr_high = (0.1, 10.0) if arg.method.endswith("lora") else (0.03, 3.0)
    c.sweep.space.backbone_lr_mult = space.log_uniform(lr_low, lr_high, "optim.backbone_lr_mult")
    c.sweep.space.steps = space.integer(quarter, 4 * quarter, "train.num_steps",
                                        step=max(1, quarter // 2))
    if recipes.paper_losses(arg.method):
        c.sweep.space.distill = space.log_uniform(
            1e2, 1e6, "domains.generic.losses.feature_mse.weight")
        c.sweep.space.anchor = space.log_uniform(
            1e-1, 1e4, "domains.target.losses.anchoring.weight",
            "domains.generic.losses.anchoring.weight")
    extra = arg.method.rpartition("+")[2]
    if extra == "l2sp":
        c.sweep.space.l2sp = space.log_uniform(1e-3, 1e3, "domains.target.losses.anchoring.weight")
    elif extra == "spd":
        c.sweep.space.spd_strength = space.uniform(0.05, 1.0, "optim.spd_strength")
    elif extra == "ftp":
        c.sweep.space.ftp_k = space.uniform(0.0, 1.0, "optim.ftp_k")
    elif extra == "lp_ft":
        # at most half the shortest trial: every trial fine-tunes after its probe
        c.sweep.space.probe = space.integer(max(1, quarter // 8), max(1, quarter // 2),
                                            "optim.freeze_backbone_steps")
    elif extra == "lora":
        # alpha = rank, so s = alpha / rank stays 1 and the LR means the same at every rank
        c.sweep.space.rank = space.categorical((2, 4, 8, 16), "model.lora.rank",
                                               "model.lora.alpha")
    elif extra == "lipsum":
        c.sweep.space.lipsum = space.log_uniform(1e-2, 1e2, "domains.target.losses.lipsum.weight")

    # The baseline beside the trials: the quickstart's naive fine-tuning (400 steps).
    c.sweep.baseline = recipes.config_from_file(TOY, f"method=naive,world={arg.world}")
    c.sweep.baseline.train.progress = False
    return c
