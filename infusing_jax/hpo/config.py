"""A sweep's settings: `config.sweep` beside the run config it searches around.

    c = <a run config>                      # what every trial starts from
    c.sweep = hpo.config.default_config()
    c.sweep.space.distill = hpo.space.log_uniform(1e2, 1e6, "domains.generic.losses.feature_mse.weight")
    c.sweep.num_trials = 30

  space         name -> a distribution over run-config fields (hpo/space.py)
  num_trials    trials to finish (complete, pruned or failed for good); the study's
                length, whichever workers run it and however often they restart
  sampler       'tpe' (Optuna's default), 'random', 'grid' (every combination of grid
                or categorical entries), 'nsga2' (evolutionary, for several objectives)
  seed          the sampler's seed
  objectives    validation metrics to maximise, each a key of the run's validation:
                'all' (the paper's selection score: the mean of in-domain and
                out-of-domain val mAP@k), 'in-domain', 'out-of-domain',
                'retention' (train.eval_retention: the generic val images' cosine
                to the pretrained model's embedding), '<domain>/<metric>' (e.g.
                'target/recall@1'), 'text/<set>/<metric>' (with eval.validate_text);
                several: a Pareto search
  pruner        'none', 'median' (stop a trial whose score at a validation is below the
                median of earlier trials' there) or 'successive_halving'; one
                objective only. Trials validate every train.eval_every steps.
  startup_trials  trials before TPE models the space, and before the median pruner prunes
  study_name    the study's name in the storage (one storage can hold many)
  heartbeat_seconds  how often a running trial says it is alive; a trial silent for 3x
                this is taken over by the next worker (resumed from its checkpoints)
  baseline      None, or a run config (e.g. naive fine-tuning) trained once beside the
                trials, for the Pareto plot and best.json's comparison
"""
import ml_collections

from infusing_jax import errors
from infusing_jax import fields
from infusing_jax.hpo import space as space_lib
from infusing_jax.training import config as run_config

SAMPLERS = ("tpe", "random", "grid", "nsga2")
PRUNERS = ("none", "median", "successive_halving")
ROLE_SCORES = ("all", "in-domain", "out-of-domain", "retention")
RETRIEVAL_METRICS = ("recall@1", "mmp@{k}", "map@{k}", "map@r")
TEXT_METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.space = ml_collections.ConfigDict()
    c.num_trials = 20
    c.sampler = "tpe"
    c.seed = 0
    c.objectives = ("all",)
    c.pruner = "none"
    c.startup_trials = 5
    c.study_name = "sweep"
    c.heartbeat_seconds = 60
    c.baseline = None
    return c


RULES = dict(
    space=fields.anything(), num_trials=fields.integer(1), sampler=fields.one_of(*SAMPLERS),
    seed=fields.integer(0),
    objectives=fields.Rule(lambda x: isinstance(x, (tuple, list)) and len(x) > 0 and
                           all(isinstance(o, str) and o for o in x),
                           "a non-empty tuple of validation metric names, e.g. ('all',)"),
    pruner=fields.one_of(*PRUNERS), startup_trials=fields.integer(0),
    study_name=fields.text(nonempty=True), heartbeat_seconds=fields.integer(1),
    baseline=fields.anything())


def validate(sweep, run_cfg) -> None:
    """One-line errors.UserError naming the first bad field of `config.sweep` (and of
    the run config and the baseline, which must be valid run configs themselves)."""
    fields.check(sweep, "config.sweep", RULES)
    run_config.validate(run_cfg)
    space_lib.validate(sweep.space, run_cfg)
    for name in sweep.objectives:
        _check_objective(name, run_cfg)
    if len(set(sweep.objectives)) != len(sweep.objectives):
        fields.fail("config.sweep.objectives", f"lists one twice: {list(sweep.objectives)}")
    if len(sweep.objectives) > 1 and sweep.pruner != "none":
        fields.fail("config.sweep.pruner", f"{sweep.pruner!r} prunes by one score; a search over "
                    f"{len(sweep.objectives)} objectives needs pruner 'none'")
    if sweep.pruner != "none" and not run_cfg.train.eval_every:
        fields.fail("config.sweep.pruner", f"{sweep.pruner!r} stops trials at their validations, "
                    "and train.eval_every is 0 (validation at the end only); set it")
    if sweep.sampler == "grid":
        combinations = space_lib.num_combinations(sweep.space)
        if sweep.num_trials > combinations:
            fields.fail("config.sweep.num_trials", f"{sweep.num_trials} trials, but the grid has "
                        f"{combinations} combinations; give at most that many")
    if sweep.baseline is not None:
        if not hasattr(sweep.baseline, "keys"):
            fields.fail("config.sweep.baseline", "must be None or a run config (e.g. configs/"
                        "toy.py's with method=naive)")
        try:
            run_config.validate(sweep.baseline)
        except errors.UserError as e:
            raise errors.UserError(f"config.sweep.baseline.{str(e).removeprefix('config.')}"
                                   ) from None


def _check_objective(name: str, run_cfg) -> None:
    where = "config.sweep.objectives"
    k = run_cfg.train.eval_k
    needs = {"all": ("target", "generic"), "in-domain": ("target",),
             "out-of-domain": ("generic",), "retention": ("generic",)}
    if name in needs:
        if not any(run_config.validated_by(run_cfg, role) for role in needs[name]):
            fields.fail(where, f"{name!r}: no {' or '.join(needs[name])} domain has a val split")
        if name == "retention" and not run_cfg.train.eval_retention:
            fields.fail(where, "'retention' needs train.eval_retention=True")
        return
    head, _, metric = name.partition("/")
    if head == "text":
        sets = run_cfg.eval.text_retrieval.keys()
        text_set, _, metric = metric.partition("/")
        if not run_cfg.eval.validate_text or text_set not in sets:
            fields.fail(where, f"{name!r}: validates text retrieval on eval.text_retrieval sets "
                        f"({', '.join(sets) or 'none'}) with eval.validate_text=True")
        if metric not in TEXT_METRICS:
            fields.fail(where, f"{name!r}: the metric must be one of {', '.join(TEXT_METRICS)}")
        return
    metrics = [m.format(k=k) for m in RETRIEVAL_METRICS]
    domain = run_cfg.domains[head] if head in run_cfg.domains else None
    if domain is None or not run_config.validated_by_domain(domain):
        fields.fail(where, f"{name!r}: use {', '.join(map(repr, ROLE_SCORES))}, "
                    "'<domain>/<metric>' of a domain with a val split, or 'text/<set>/<metric>'")
    if domain.role == "generic" and run_cfg.train.eval_retention:
        metrics.append("retention")
    if metric not in metrics:
        fields.fail(where, f"{name!r}: the metric must be one of {', '.join(metrics)}")
