"""The trainer's own train step, set up on the bench's three configs and random batches.

    steps = build_steps(KINDS, "B/16", num_classes=9054, mesh=sharding.make_mesh())
    run = StepRunner(steps["plain"], batch_size=8, num_classes=9054)
    seconds_per_step = run(0, steps=3)

Configs (`run_config`): a SigLIP image tower at IMAGE_SIZE px, config.optim's
defaults (AdamW at the paper's learning rates), a target classifier of
`num_classes` classes (SOP's train classes: 9,054):
  plain        one target domain, NormFace only (naive fine-tuning);
  precomputed  the method: target (NormFace + anchoring 1e5), generic
               (feature_mse 1000 towards a precomputed teacher in
               batch['teacher'], + anchoring 1e5);
  online       the same with feature_mse's teacher='online' (the frozen
               reference backbone embeds the generic batch inside the step).

The step is `training.step.build`'s, the one the trainer's loop runs (its
optimiser, loss, shardings and state donation); the tower comes from
`backbone.load_image_tower` (random init, or ShapeDtypeStructs when abstract) and
the heads from `objective.init_heads`, as in training/loop.py. Batches are random
numbers already on the devices: no input pipeline is timed.
"""
import dataclasses
import functools
import time
from typing import Any

import jax
import numpy as np

import flop_count
from infusing_jax import sharding
from infusing_jax.training import backbone as backbone_lib
from infusing_jax.training import config as config_lib
from infusing_jax.training import objective
from infusing_jax.training import step as step_lib

IMAGE_SIZE = 224
KINDS = ("plain", "precomputed", "online")
GENERIC_CLASSES = 1000  # ImageNet's; the generic domain's losses have no classifier
# The learning-rate schedule's lengths; the paper's learning rates are constant.
STEPS_PER_EPOCH, NUM_STEPS = 1000, 3000


def run_config(kind: str, variant: str, *, scan: bool = False, dtype: str = "float32",
               fsdp: bool = False):
    """The validated run config of `kind` (module doc); `dtype` is the compute dtype
    (parameters stay float32), `fsdp` config.train.fsdp."""
    cfg = config_lib.default_config()
    cfg.model.variant, cfg.model.image_size = variant, IMAGE_SIZE
    cfg.model.scan, cfg.model.dtype = scan, dtype
    cfg.train.select_by = "last"  # no validation here
    cfg.train.fsdp = fsdp
    anchoring = {} if kind == "plain" else dict(anchoring=dict(weight=1e5))
    cfg.domains.sop = config_lib.domain("tfds:stanford_online_products", "target",
                                        losses=dict(normface=dict(weight=1.0), **anchoring))
    if kind != "plain":
        cfg.domains.imagenet = config_lib.domain(
            "tfds:imagenet2012", "generic",
            losses=dict(feature_mse=dict(weight=1000.0, teacher=kind),
                        anchoring=dict(weight=1e5)))
    config_lib.validate(cfg)
    return cfg


@dataclasses.dataclass(frozen=True)
class Trainee:
    """One config's step as the trainer builds it, and the weights it starts from."""
    kind: str
    built: step_lib.Built
    backbone: Any  # the tower's params: numpy arrays, or ShapeDtypeStructs when abstract
    heads: Any  # {domain: {'classifier': (width, C), ...}}, like `backbone`
    model_cfg: Any  # the tower's models config: image.width, depth, mlp_dim, patch_size


def build_steps(kinds, variant: str, *, num_classes: int, mesh, scan: bool = False,
                dtype: str = "float32", fsdp: bool = False, abstract: bool = False) -> dict:
    """-> {kind: Trainee}, each step built by training.step.build over `mesh`.

    The configs share one tower (same variant, scan and dtype); abstract: the tower
    and heads as ShapeDtypeStructs, nothing initialised (to compile a model too big
    to hold).
    """
    cfgs = {k: run_config(k, variant, scan=scan, dtype=dtype, fsdp=fsdp) for k in kinds}
    model, backbone, model_cfg = backbone_lib.load_image_tower(cfgs[kinds[0]].model,
                                                               abstract=abstract)
    embed = backbone_lib.embed_fn(model)
    trainees = {}
    for kind, cfg in cfgs.items():
        names = config_lib.ordered_domains(cfg)
        classes = {n: num_classes if cfg.domains[n].role == "target" else GENERIC_CLASSES
                   for n in names}
        init_heads = functools.partial(objective.init_heads, cfg.domains, names, classes,
                                       model_cfg.image.width, jax.random.PRNGKey(cfg.seed))
        heads = jax.eval_shape(init_heads) if abstract else jax.device_get(init_heads())
        built = step_lib.build(cfg, names, embed, backbone, heads,
                               depth=model_cfg.image.depth, steps_per_epoch=STEPS_PER_EPOCH,
                               num_steps=NUM_STEPS, mesh=mesh)
        trainees[kind] = Trainee(kind, built, backbone, heads, model_cfg)
    return trainees


def host_batches(kind: str, batch_size: int, dim: int, num_classes: int, seed: int = 0) -> list:
    """Random numpy batches with the fields the input pipeline yields for `kind`:
    [target] for 'plain', [target, generic] for the method.

    image (B, S, S, 3) uniform in [-1, 1], label (B,) in [0, num_classes), domain (B,)
    (0 target, 1 generic); for 'precomputed' also teacher (B, dim), unit rows, and
    has_teacher (B,), true on the generic batch.
    """
    fields = ("image", "label", "domain") + (
        ("teacher", "has_teacher") if kind == "precomputed" else ())
    rng = np.random.default_rng(seed)
    batches = []
    for domain in range(1 if kind == "plain" else 2):
        teacher = rng.normal(size=(batch_size, dim)).astype(np.float32)
        batch = dict(
            image=rng.uniform(-1, 1, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
            label=rng.integers(0, num_classes, batch_size).astype(np.int32),
            domain=np.full((batch_size,), domain, np.int32),
            teacher=teacher / np.linalg.norm(teacher, axis=1, keepdims=True),
            has_teacher=np.full((batch_size,), domain == 1))
        batches.append({k: batch[k] for k in fields})
    return batches


class StepRunner:
    """A Trainee's step compiled for its batches and run on them, keeping the state it
    donates.

    compile_s: seconds to lower and compile; xla_flops: XLA's count for one step.
    """

    def __init__(self, trainee: Trainee, batch_size: int, num_classes: int):
        built = trainee.built
        self.model_cfg = trainee.model_cfg
        self.state = built.init(trainee.backbone, trainee.heads)
        self.reference = built.place_reference(trainee.backbone)
        self.batches = [sharding.global_batch(b, built.mesh) for b in host_batches(
            trainee.kind, batch_size, trainee.model_cfg.image.width, num_classes)]
        start = time.perf_counter()
        self.compiled = built.step.lower(self.state, self.batches[0], self.reference).compile()
        self.compile_s = time.perf_counter() - start
        self.xla_flops = flop_count.xla_flops(self.compiled)

    def __call__(self, batch_index: int, steps: int = 1) -> float:
        """-> seconds per step of `steps` steps on one batch, dispatched back to back and
        synchronised once."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.compiled(self.state, self.batches[batch_index],
                                                self.reference)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / steps


def step_runners(variant: str, *, batch_size: int, num_classes: int, scan: bool = False,
                 dtype: str = "float32", log=print) -> dict:
    """-> {kind: StepRunner} of the three configs over all devices, compiled and
    initialised (minutes for B/16 on a CPU)."""
    trainees = build_steps(KINDS, variant, num_classes=num_classes, mesh=sharding.make_mesh(),
                           scan=scan, dtype=dtype)
    runners = {}
    for kind, trainee in trainees.items():
        runners[kind] = StepRunner(trainee, batch_size, num_classes)
        log(f"compiled {kind}: {runners[kind].compile_s:.1f} s, XLA flops "
            f"{runners[kind].xla_flops / 1e9:.1f} G")
    return runners


def step_timers(runners: dict, steps: int = 1) -> dict:
    """{'jax_plain', 'jax_<kind>_target', 'jax_<kind>_generic': run() -> seconds per step}
    for runners keyed by kind."""
    timers = {"jax_plain": functools.partial(runners["plain"], 0, steps)}
    for kind in KINDS[1:]:
        timers[f"jax_{kind}_target"] = functools.partial(runners[kind], 0, steps)
        timers[f"jax_{kind}_generic"] = functools.partial(runners[kind], 1, steps)
    return timers


def method_overhead(seconds: dict, kind: str) -> float:
    """mean(t(kind on a target batch), t(kind on a generic batch)) / t(plain), for
    seconds keyed as step_timers."""
    return ((seconds[f"jax_{kind}_target"] + seconds[f"jax_{kind}_generic"]) / 2
            / seconds["jax_plain"])
