"""CPU mode: our float32 train step against PyTorch's, the matmul peak and the method's
overheads, measured side by side in one process.

Workloads (`prepare`): the three configs' steps (trainer_steps.py), float32
compute and master weights, on the CPU's one device; the PyTorch reference
(pytorch_step.py) on the plain config's target batch; a 4096^2 jnp matmul
(precision 'highest'); the sweep of matmul_rate.py in JAX and, with 4096^3
added, in PyTorch (MKL). Both frameworks run on the same cores (PyTorch's
threads = the cores = XLA's thread pool), one at a time.

Timing (`measure`): every workload is run once first (warm-up, excluded). Then
rounds: one sample of every step in turn (PyTorch, plain, precomputed on a target
then a generic batch, online likewise; the order reversed every other round, so
that a slow drift of a neighbour's load hits both frameworks alike), a sample
being the mean of `steps_per_sample` steps, each timed alone (block_until_ready;
loss.item() for PyTorch), and every sample followed by one of the 4096^2
matmul; then one sample of each sweep product. Each timing records the
share of the CPU that OTHER processes used meanwhile (timing.Sampler); a round
is quiet when that stays <= max_load at every timing; up to `extra_rounds`
rounds are added to get `rounds` quiet ones, and the figures come from the quiet
rounds (all rounds, with "quiet": false, when none was). Under contention
PyTorch's OpenMP step (static splits, barriers) slows down much more than XLA's
dynamically scheduled thunks, which inflates speedup_vs_pytorch.

JSON (`measure`'s dict). Headline figures, each the median over rounds of the
round's own ratio (paired: a slow drift of the machine cancels in each ratio):
  speedup_vs_pytorch       plain step's images/s over PyTorch's
  fraction_of_matmul_peak  plain step's FLOP/s over the best float32 matmul rate
                           beside it: the fastest of 4096^2 and the JAX sweep
                           (`fraction_of_4096_matmul`: over 4096^2's alone).
                           FLOPs: flop_count.analytic_flops, 3x forward;
                           XLA's own count is `step_flops_xla`
  online_teacher_overhead, precomputed_teacher_overhead
                           trainer_steps.method_overhead: mean(step on a target
                           batch, step on a generic batch) over the plain step
  fsdp_memory_reduction    fsdp_memory.py's, where the caller passes it (else None)
then "median" and "min": the same ratios (and the rest of `_summary`) from the
median and from the fastest sample of each timing over the rounds used;
"per_round": each round's headline ratios; the bounds
  speedup_bound_at_best_matmul   t(PyTorch step) / (step FLOPs / XLA's best matmul
                                 rate): the most a step of XLA dots can beat PyTorch by
  speedup_bound_at_torch_matmul  the same at MKL's best rate
                                 (torch_best_matmul_flops_per_s): the most any float32
                                 step on this CPU can, even one that does nothing but
                                 matmuls;
overheads_by_cpu_time (this process's CPU seconds: less moved by others' load),
median_page_faults per timed step, others_cpu_load, all_s, compile_s, xla_flops,
the FSDP part's details ("fsdp"), torch and setup.
"""
import dataclasses
import os
import statistics
from typing import Callable, Dict, Optional

import jax

import flop_count
import matmul_rate
import pytorch_step
import timing
import trainer_steps

HEADLINE = ("speedup_vs_pytorch", "fraction_of_matmul_peak", "online_teacher_overhead",
            "precomputed_teacher_overhead")


@dataclasses.dataclass(frozen=True)
class Settings:
    """CPU mode's settings: bench/train_step.py's flags of the same names."""
    variant: str = "B/16"
    batch_size: int = 8
    num_classes: int = 9054
    scan: bool = False
    threads: int = 0  # PyTorch's; 0 = os.cpu_count(), XLA's pool
    torch: bool = True  # time PyTorch's step and matmuls
    rounds: int = 5
    extra_rounds: int = 1
    max_load: float = 0.1
    steps_per_sample: int = 3


@dataclasses.dataclass
class Workloads:
    """What `measure` times, each run() -> seconds (per step, per product)."""
    steps: Dict[str, Callable]  # 'torch_plain' (if timed), then trainer_steps.step_timers'
    matmul: Callable  # the 4096^2 product beside every step sample
    sweep: Dict[str, Callable]  # matmul_rate names
    runners: Dict[str, trainer_steps.StepRunner]
    torch_info: Optional[dict]


def prepare(s: Settings, log) -> Workloads:
    """Builds, compiles and initialises every workload (slow: minutes for B/16)."""
    runners = trainer_steps.step_runners(s.variant, batch_size=s.batch_size,
                                         num_classes=s.num_classes, scan=s.scan, log=log)
    img = runners["plain"].model_cfg.image
    tokens = s.batch_size * (trainer_steps.IMAGE_SIZE // img.patch_size) ** 2
    shapes = matmul_rate.sweep_shapes(tokens, img.width, img.mlp_dim)
    sweep = {matmul_rate.name(m, k, n): matmul_rate.jax_matmul(m, k, n, reps)
             for m, k, n, reps in shapes}
    steps = trainer_steps.step_timers(runners)
    big, torch_info = matmul_rate.BIG_N, None
    if s.torch:
        host_batch = trainer_steps.host_batches("plain", s.batch_size, img.width,
                                                s.num_classes)[0]
        torch_run, torch_info = pytorch_step.runner(
            host_batch, s.num_classes, s.threads or os.cpu_count(), img,
            trainer_steps.IMAGE_SIZE)
        steps = {"torch_plain": torch_run, **steps}
        sweep.update({matmul_rate.name(m, k, n, "torch"): matmul_rate.torch_matmul(m, k, n, reps)
                      for m, k, n, reps in ((big, big, big, 1), *shapes)})
    return Workloads(steps=steps, matmul=matmul_rate.jax_matmul(big, big, big), sweep=sweep,
                     runners=runners, torch_info=torch_info)


def measure(w: Workloads, s: Settings, log, fsdp: Optional[dict] = None) -> dict:
    """Warm-up, the rounds, and the JSON dict (module doc); fsdp: fsdp_memory.py's JSON."""
    for run in (w.matmul, *w.sweep.values(), *w.steps.values()):
        run()
    log("warmed up")
    rounds = _rounds(w, s, log)
    quiet = [r for r in rounds if r["quiet"]]
    used = quiet or rounds
    # {timing: [(seconds, others' load, CPU seconds, page faults), ...]} over the rounds used
    samples = {k: [x for r in used for x in r["samples"][k]] for k in used[0]["samples"]}
    img = w.runners["plain"].model_cfg.image
    flops = flop_count.analytic_flops(img, trainer_steps.IMAGE_SIZE, s.batch_size,
                                      s.num_classes)["train"]
    xla_flops = w.runners["plain"].xla_flops
    median = _summary(samples, statistics.median, w, s, flops, xla_flops)
    fastest = _summary(samples, min, w, s, flops, xla_flops)
    per_round = [_summary(r["samples"], statistics.median, w, s, flops, xla_flops)
                 for r in used]
    paired = {k: (round(statistics.median(r[k] for r in per_round), 3)
                  if per_round[0][k] is not None else None) for k in HEADLINE}
    steps_only = {k: v for k, v in samples.items() if k not in w.sweep}
    cpu = {k: statistics.median(x[2] for x in v) for k, v in steps_only.items()}
    out = dict(
        **paired,
        fsdp_memory_reduction=fsdp["fsdp_memory_reduction"] if fsdp else None,
        quiet=bool(quiet),
        quiet_rounds=len(quiet),
        rounds=len(rounds),
        others_cpu_load={k: round(statistics.median(x[1] for x in v), 3)
                         for k, v in samples.items()},
        flops_counted="analytic matmul FLOPs of the ViT + MAP head + classifier, 3x forward "
                      "less the patch embedding's input gradient",
        step_flops_analytic=flops,
        step_flops_xla=xla_flops,
        median=median,
        min=fastest,  # the least disturbed sample of each: less noisy on a shared machine
        per_round={k: [r[k] for r in per_round] for k in HEADLINE},
        # Comparable between our configs (one runtime), not with PyTorch (OpenMP threads
        # spin while they wait).
        overheads_by_cpu_time={k: round(trainer_steps.method_overhead(cpu, k), 3)
                               for k in trainer_steps.KINDS[1:]},
        median_cpu_s={k: round(v, 3) for k, v in cpu.items()},
        median_page_faults={k: round(statistics.median(x[3] for x in v))
                            for k, v in steps_only.items()},
        all_s={k: [round(x[0], 3) for x in v] for k, v in steps_only.items()},
        compile_s={k: round(r.compile_s, 1) for k, r in w.runners.items()},
        xla_flops={k: r.xla_flops for k, r in w.runners.items()},
        fsdp={k: v for k, v in fsdp.items() if k != "fsdp_memory_reduction"} if fsdp else None,
        torch=w.torch_info,
        setup=dict(mode="cpu", variant=s.variant, image_size=trainer_steps.IMAGE_SIZE,
                   batch_size=s.batch_size, num_classes=s.num_classes, dtype="float32",
                   scan=s.scan, threads=s.threads or os.cpu_count(),
                   steps_per_sample=s.steps_per_sample, jax=jax.__version__,
                   xla_flags=os.environ.get("XLA_FLAGS", ""),
                   glibc_tunables=os.environ.get("GLIBC_TUNABLES"),
                   cpu=timing.cpu_name(), cores=os.cpu_count()))
    _print_summary(out, s)
    return out


def _rounds(w: Workloads, s: Settings, log) -> list:
    """-> [{'samples': {timing: [Sampler tuple, ...]}, 'load': max others' load,
    'quiet': bool}, ...]: `rounds` quiet ones, or all `rounds + extra_rounds`."""
    sample = timing.Sampler()
    rounds = []
    while len(rounds) < s.rounds + s.extra_rounds:
        samples = {name: [] for name in (*w.steps, "matmul", *w.sweep)}
        order = list(w.steps.items())
        for name, run in order[::-1] if len(rounds) % 2 else order:
            samples[name].append(sample(run, s.steps_per_sample))
            samples["matmul"].append(sample(w.matmul))  # after every step: the same load
        for name, run in w.sweep.items():
            samples[name].append(sample(run))
        load = max(x[1] for v in samples.values() for x in v)
        rounds.append(dict(samples=samples, load=load, quiet=load <= s.max_load))
        log(f"round {len(rounds) - 1} (others' CPU load up to {load:.2f}): " +
            ", ".join(f"{k} {v[-1][0]:.2f}s" for k, v in samples.items() if k not in w.sweep))
        if sum(r["quiet"] for r in rounds) >= s.rounds:
            break
    return rounds


def _summary(samples: dict, stat, w: Workloads, s: Settings, flops: float,
             xla_flops: float) -> dict:
    """The ratios and rates from one statistic (median, min) of each timing's seconds."""
    t = {k: stat([x[0] for x in v]) for k, v in samples.items()}
    plain = t["jax_plain"]
    step_flops_per_s = flops / plain
    big = matmul_rate.BIG_N
    matmul_4096 = 2 * big ** 3 / t["matmul"]
    jax_sweep = [k for k in w.sweep if not k.startswith("torch_")]
    best_matmul = max(matmul_4096, *(matmul_rate.flops(k) / t[k] for k in jax_sweep))
    figures = dict(
        fraction_of_matmul_peak=round(step_flops_per_s / best_matmul, 3),
        online_teacher_overhead=round(trainer_steps.method_overhead(t, "online"), 3),
        precomputed_teacher_overhead=round(trainer_steps.method_overhead(t, "precomputed"), 3),
        fraction_of_4096_matmul=round(step_flops_per_s / matmul_4096, 3),
        jax_images_per_s=round(s.batch_size / plain, 3),
        step_flops_per_s=round(step_flops_per_s),
        step_xla_flops_per_s=round(xla_flops / plain),
        matmul_4096_flops_per_s=round(matmul_4096),
        best_matmul_flops_per_s=round(best_matmul),
        matmul_sweep_flops_per_s={k: round(matmul_rate.flops(k) / t[k]) for k in w.sweep},
        seconds={k: round(v, 4) for k, v in t.items() if k not in w.sweep})
    return dict(**_torch_figures(t, w, s, flops, best_matmul), **figures)


def _torch_figures(t: dict, w: Workloads, s: Settings, flops: float,
                   best_matmul: float) -> dict:
    """PyTorch's figures from seconds `t` (step FLOPs / best_matmul: the step's time at
    XLA's best matmul rate); all None where PyTorch was not timed."""
    names = ("speedup_vs_pytorch", "speedup_bound_at_best_matmul",
             "speedup_bound_at_torch_matmul", "torch_images_per_s", "torch_flops_per_s",
             "torch_best_matmul_flops_per_s")
    if "torch_plain" not in t:
        return dict.fromkeys(names)
    torch_s = t["torch_plain"]
    torch_matmul = max(matmul_rate.flops(k) / t[k] for k in w.sweep if k.startswith("torch_"))
    return dict(zip(names, (
        round(torch_s / t["jax_plain"], 3),
        round(torch_s / (flops / best_matmul), 3),
        round(torch_s / (flops / torch_matmul), 3),
        round(s.batch_size / torch_s, 3),
        round(flops / torch_s),
        round(torch_matmul))))


def _print_summary(out: dict, s: Settings) -> None:
    med = out["median"]
    if not out["quiet"]:
        print(f"WARNING: no round ran with other processes below {s.max_load:.0%} of the "
              "CPU; PyTorch's OpenMP step suffers more than XLA's from contention, so "
              "speedup_vs_pytorch is unreliable (see others_cpu_load)", flush=True)
    print(f"plain step: {med['jax_images_per_s']:.2f} images/s, PyTorch "
          f"{med['torch_images_per_s']}; {med['step_flops_per_s'] / 1e9:.1f} GFLOP/s vs "
          f"best matmul {med['best_matmul_flops_per_s'] / 1e9:.1f}, {matmul_rate.BIG_N}^2 "
          f"matmul {med['matmul_4096_flops_per_s'] / 1e9:.1f}; method / plain: precomputed "
          f"{out['precomputed_teacher_overhead']}, online {out['online_teacher_overhead']} "
          "(medians of the rounds' own ratios)", flush=True)
    if med["torch_best_matmul_flops_per_s"]:
        print(f"PyTorch's (MKL) best matmul {med['torch_best_matmul_flops_per_s'] / 1e9:.1f} "
              f"GFLOP/s; speedup_vs_pytorch can be at most "
              f"{med['speedup_bound_at_best_matmul']} at XLA's best matmul rate, "
              f"{med['speedup_bound_at_torch_matmul']} at MKL's (no other work)", flush=True)
