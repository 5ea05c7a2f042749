r"""The trainer's loop against its own step: how busy the loop keeps the device.

    python bench/loop.py --world=quickstart_out/world [--rounds=3] [--steps=120]
        [--device_prefetch=2] [--keep_decoded_mb=2048]

The run is configs/toy.py's full recipe (the quickstart's: two domains in turn,
NormFace, distillation to precomputed features, anchoring; batches of 64 at 32 px)
on a toy world (`bash launch/quickstart.sh` writes one), without validation or
tests. Each round, in this one process:
  loop   `loop.train_and_evaluate` for --steps steps in a fresh folder, logging every
         steps/6: its images/s is the mean of the log windows after the first (which
         holds compilation and the input pipeline's start-up);
  step   the step that run built (`step.build`'s, captured as the loop calls it: the
         same jitted function, its shardings and donation), on the run's last batch,
         resident on the devices, as many steps back to back; after rounds 1+ also
         before the loop (the previous round's, the same program), and the two averaged,
         as the VM's speed drifts over a round.
Compiled programs are kept in JAX's persistent cache (a temporary folder), so
rounds after the first do not compile again.

Last line, JSON: `loop_images_per_s` and `step_images_per_s` (medians over rounds),
`loop_vs_step` (the median of the rounds' ratios; target >= 0.9), `spread` (max -
min of the rounds' ratios), `rounds` (each round's figures and the other processes'
CPU load during it, ~0 on a quiet machine), `setup`.
"""
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import jax
from absl import app
from absl import flags

import timing
from infusing_jax.training import loop
from infusing_jax.training import recipes
from infusing_jax.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORLD = flags.DEFINE_string("world", "quickstart_out/world", "A toy world with its "
                             "pretrained VLM (bash launch/quickstart.sh writes one).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of (loop, step).")
_STEPS = flags.DEFINE_integer("steps", 120, "Steps per round; a multiple of 6.")
_PREFETCH = flags.DEFINE_integer("device_prefetch", 2, "config.data.device_prefetch.")
_KEEP = flags.DEFINE_integer("keep_decoded_mb", 2048, "config.data.keep_decoded_mb (0: off).")


def run_config(world: str, steps: int, prefetch: int, keep_decoded_mb: int = 2048):
    cfg = recipes.config_from_file(os.path.join(REPO, "configs", "toy.py"),
                                   f"method=full,world={world},steps={steps}")
    cfg.train.update(log_every=steps // 6, checkpoint_every=steps, eval_every=0,
                     select_by="last", progress=False)
    cfg.domains.target.val_split = ""
    cfg.domains.generic.holdout_fraction = 0.0
    for tests in (cfg.eval.retrieval, cfg.eval.text_retrieval, cfg.eval.zero_shot):
        for name in list(tests.keys()):
            del tests[name]
    cfg.data.update(device_prefetch=prefetch, keep_decoded_mb=keep_decoded_mb)
    return cfg


class StepCapture:
    """Wraps step.build so that the built step records its last call's output state, batch
    and reference: what the step-alone timing runs on."""

    def __init__(self):
        self.real_build, self.last = step_lib.build, None

    def build(self, *args, **kwargs):
        built = self.real_build(*args, **kwargs)

        def step(state, batch, reference):
            state, metrics = built.step(state, batch, reference)
            self.last = (built.step, state, batch, reference)
            return state, metrics
        return dataclasses.replace(built, step=step)


def loop_images_per_s(workdir: str) -> float:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        windows = [json.loads(line)["images_per_s"] for line in f if "images_per_s" in line]
    return statistics.mean(windows[1:])


def step_images_per_s(capture: StepCapture, steps: int, batch_size: int) -> float:
    """Times capture.last's step; its state is donated, so the last one is kept instead."""
    step, state, batch, reference = capture.last
    state, _ = step(state, batch, reference)  # warm: the first call after the loop's
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch, reference)
    jax.block_until_ready((state, metrics))
    capture.last = (step, state, batch, reference)
    return steps * batch_size / (time.perf_counter() - start)


def main(argv):
    del argv
    world, steps = os.path.abspath(_WORLD.value), _STEPS.value
    if not os.path.exists(os.path.join(world, "vlm", "pretrained.npz")):
        sys.exit(f"error: --world={_WORLD.value}: no toy world with a pretrained VLM there; "
                 "bash launch/quickstart.sh writes one (quickstart_out/world)")
    if steps < 12 or steps % 6:
        sys.exit(f"error: --steps={steps}: give a multiple of 6, >= 12")
    log = timing.progress_log()
    scratch = tempfile.mkdtemp(prefix="bench_loop_")
    jax.config.update("jax_compilation_cache_dir", os.path.join(scratch, "compile_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cfg = run_config(world, steps, _PREFETCH.value, _KEEP.value)
    capture = StepCapture()
    step_lib.build = capture.build
    sampler, rounds = timing.Sampler(), []

    def measured(fn):
        """-> (fn(), the other processes' CPU load while it ran)."""
        out = []
        load = sampler(lambda: out.append(fn()) or 0.0)[1]
        return out[0], load

    step_alone = lambda: measured(lambda: step_images_per_s(
        capture, steps, cfg.data.batch_size))
    for r in range(_ROUNDS.value):
        workdir = os.path.join(scratch, f"run{r}")
        before = step_alone() if capture.last else None  # the last round's step: the same
        _, load_loop = measured(lambda: loop.train_and_evaluate(cfg, workdir))
        looped = loop_images_per_s(workdir)
        after = step_alone()
        # The step timed on both sides of the loop where it can be: the VM's speed drifts.
        timed = [t for t in (before, after) if t]
        stepped = statistics.mean(images_per_s for images_per_s, _ in timed)
        rounds.append(dict(loop_images_per_s=looped, step_images_per_s=stepped,
                           loop_vs_step=looped / stepped,
                           others_load=max([load_loop] + [load for _, load in timed])))
        log(f"round {r}: loop {looped:.0f} images/s, step {stepped:.0f} images/s, "
            f"ratio {looped / stepped:.3f}")
    ratios = [r["loop_vs_step"] for r in rounds]
    print(json.dumps(dict(
        loop_images_per_s=statistics.median(r["loop_images_per_s"] for r in rounds),
        step_images_per_s=statistics.median(r["step_images_per_s"] for r in rounds),
        loop_vs_step=statistics.median(ratios), spread=max(ratios) - min(ratios),
        rounds=rounds, setup=dict(
            steps=steps, batch_size=cfg.data.batch_size, image_size=cfg.model.image_size,
            device_prefetch=cfg.data.device_prefetch,
            keep_decoded_mb=cfg.data.keep_decoded_mb, devices=jax.device_count(),
            platform=jax.devices()[0].platform, cpu=timing.cpu_name(),
            jax=jax.__version__))))


if __name__ == "__main__":
    app.run(main)
