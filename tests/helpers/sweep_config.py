"""A sweep config on the tests' tiny world (tests/helpers/train_world.py):

    --config=tests/helpers/sweep_config.py:root=ROOT,trials=3[,steps=4,min_steps=2,...]

Trials of the full method, `min_steps` to `steps` steps (a multiple of 2), validated
every 2 steps and checkpointed every step; the distillation and anchoring weights and
the length searched by random sampling. `heartbeat`: seconds between a trial's
heartbeats. `tests=true` adds the test sets and a naive baseline.
"""
from infusing_jax.hpo import config as hpo_config
from infusing_jax.hpo import space
from infusing_jax.training import recipes
from tests.helpers import train_world


def get_config(arg: str):
    arg = recipes.parse_arg(arg, root="", trials=3, steps=4, min_steps=2, heartbeat=60,
                            tests=False)
    tests = "yes" if arg.tests else ""
    c = train_world.world_config(arg.root, "full", "precomputed", tests=tests)
    c.train.update(num_steps=arg.steps, eval_every=2, checkpoint_every=1, eval_retention=True)
    c.sweep = hpo_config.default_config()
    c.sweep.update(num_trials=arg.trials, sampler="random", startup_trials=1,
                   heartbeat_seconds=arg.heartbeat)
    c.sweep.space.distill = space.log_uniform(
        1.0, 1e3, "domains.generic.losses.feature_mse.weight")
    c.sweep.space.anchor = space.log_uniform(
        0.1, 100.0, "domains.target.losses.anchoring.weight",
        "domains.generic.losses.anchoring.weight")
    c.sweep.space.steps = space.integer(arg.min_steps, arg.steps, "train.num_steps", step=2)
    if arg.tests:
        c.sweep.baseline = train_world.world_config(arg.root, "naive", tests=tests)
        c.sweep.baseline.train.num_steps = arg.steps
    return c
