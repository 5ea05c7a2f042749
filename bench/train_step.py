r"""The trainer's train step against PyTorch, the matmul peak, the method's overheads, FSDP memory.

    python bench/train_step.py [--mode=auto] [--rounds=5] [--steps_per_sample=3]
        [--variant=B/16] [--batch_size=8] [--threads=0] [--xla_cpu_flags=...]

Where JAX has a GPU or TPU (or with --mode=accelerator), the script measures
those devices instead, in bfloat16: see `accelerator_main` (images/s of each
config, the plain step's model FLOP utilisation against the devices' dense
bfloat16 peak, PEAK_BF16_FLOPS or --peak_flops, and against a bfloat16 8192^3
matmul measured beside it; batch --accelerator_batch_size). It needs no
TensorFlow: the step comes from step.py. Not yet run on a GPU here.

Everything below is measured in one run, side by side, on the CPU (--mode=cpu,
or auto without an accelerator): SigLIP B/16 (--variant)
image tower at 224 px, float32 compute and master weights, batch 8, AdamW
(optax through `optim.make_optimizer`, the paper's LRs), batches of random
numbers already on the device (no input pipeline), a target classifier of
9,054 classes (SOP's train classes).

Our step is the trainer's own: `config.default_config()` + `config.domain(...)`,
`step.load_image_tower` (random init), `objective.init_heads` /
`make_loss_fn`, `step.create_train_state`, and `step.train_step` under
`jax.jit(..., out_shardings=..., donate_argnums=(0,))` over `sharding.make_mesh()`,
exactly as `train.train_and_evaluate` builds it. Three configs:
  plain        one target domain, NormFace only (naive fine-tuning);
  precomputed  the method: target (NormFace + anchoring 1e5), generic
               (feature_mse 1000, precomputed teacher in batch['teacher'] +
               anchoring 1e5); timed on a target and on a generic batch;
  online       the same with feature_mse's teacher='online' (the frozen
               reference backbone embeds the generic batch inside the step).
PyTorch: transformers `SiglipVisionModel` from a `SiglipVisionConfig` of the same
sizes (random init, its default attention, SDPA), eager, train mode, the same NormFace
loss (16 * cos(l2norm(pooler_output), W), W (width, C) bias-free, cross-entropy),
`torch.optim.AdamW` with the same two learning rates, weight decay and betas.

Timing: each executable / model is compiled and run once per batch kind
(warm-up, excluded). Then rounds: one sample of every config in turn (PyTorch,
plain, precomputed on a target then a generic batch, online likewise), each
sample the mean of --steps_per_sample (3) consecutive steps, each step timed
alone (block_until_ready; `loss.item()` for PyTorch), each sample followed by
one 4096^2 float32 matmul (jnp, precision 'highest'); then a small sweep of
matmul shapes (1024^3, 2048^3 and the step's own MLP shapes), in JAX and, with
4096^3 added, in PyTorch (MKL). Each round gives its own ratios, from timings
taken within ~2 min of each other; the headline
figures are their medians over rounds (paired, so that the VM's slow drifts,
+-10% over minutes here, cancel in each ratio). Both frameworks run in
this one process, one at a time, on the same cores (torch.set_num_threads = the
cores = XLA's thread pool): one process, so that both see the same machine
state (checked: PyTorch's step is no slower beside JAX than alone),
interleaved step by step, the order reversed every other round, so that slow
drifts of a neighbour's load hit both alike. Our step also computes the global
gradient / parameter / update norms that the trainer logs; PyTorch's does not.
A shared machine is not fair to both, though: under contention PyTorch's
OpenMP step (static splits, barriers) slows down much more than XLA's
(dynamically scheduled thunks), which inflates speedup_vs_pytorch (seen: 1.4
to 1.9 with the two cores over-subscribed by other jobs, 0.96 to 1.01 quiet).
So each timing also records the share of the CPU that OTHER processes used
meanwhile (/proc/stat), a round counts as quiet when that stays <= --max_load
at every timing, up to --extra_rounds rounds are added to get --rounds quiet
ones, and the medians come from the quiet rounds ("quiet": false in the JSON
when there were none: then read speedup_vs_pytorch with care). The process's
CPU seconds per step are recorded too (overheads by CPU time: less moved by
others' load). Even quiet rounds vary by ~10% (the VM's host), so ratios carry
a few % of noise with the default 5 rounds.

JSON (the last line), headline figures: medians over rounds of each round's
  speedup_vs_pytorch       plain step's images/s over PyTorch's
  fraction_of_matmul_peak  plain step's FLOP/s over the best float32 matmul rate
                           measured beside it (jnp, precision 'highest'): the
                           fastest of 4096^2, 2048^3, 1024^3 and the step's own
                           MLP shapes; on XLA:CPU 4096^2 runs ~30% slower than
                           the others (~140 vs ~195 GFLOP/s here), so the
                           fraction of the 4096^2 rate alone
                           (`fraction_of_4096_matmul`, given beside) flatters.
                           FLOPs = the analytic matmul count of the ViT + MAP
                           head + classifier, 3x forward (fwd + bwd); XLA's own
                           count (compiled.cost_analysis()['flops'], elementwise
                           work included) agrees within 0.5% and is given beside
                           it
  online_teacher_overhead, precomputed_teacher_overhead
                           mean(step on a target batch, step on a generic
                           batch) of the method over the plain step
  fsdp_memory_reduction    So400m/14 at 224 px, the method's train state
                           (params + AdamW moments + step) plus the frozen
                           reference, per device, from the train step's
                           compiled `memory_analysis()` (argument bytes less
                           the batch's), 1 device over FSDP on 8 (a subprocess
                           with --xla_force_host_platform_device_count=8 and
                           model.scan, which compiles ~3x faster and holds the
                           same bytes; abstract inputs only, nothing
                           materialised); temp bytes (activations, gathered
                           weights) are listed beside it
then the same ratios from the median ("median") and from the fastest sample
("min") of each timing over all rounds, each round's own ("per_round"), the
bounds `speedup_bound_at_best_matmul` and `speedup_bound_at_torch_matmul`
(PyTorch's step time over the time of the step's FLOPs at XLA's / at MKL's best
float32 matmul rate, `torch_best_matmul_flops_per_s`: no step built on XLA's
dots can beat PyTorch by more than the first, and no float32 implementation on
this CPU, even one that does nothing but matmuls at MKL's rate, by more than the
second),
the overheads by CPU time, and the raw numbers (seconds, images/s, FLOPs,
FLOP/s, bytes, others' load).

Host memory: like `python -m infusing_jax.main`, the bench restarts itself once
with host_memory.TUNABLES in GLIBC_TUNABLES (recorded in the JSON's setup), so
glibc keeps the memory freed after each step instead of unmapping it; both
frameworks run under it. Under glibc's defaults our step page-faults its whole
~2.3 GB scratch buffer in every step (~550k faults, 1-2.5 s of kernel time: the
plain step took ~7 s instead of ~5.1 s in one side-by-side run), PyTorch less
(~50-100k). `median_page_faults` gives the faults per timed step;
`GLIBC_TUNABLES= python bench/train_step.py` measures under glibc's defaults.

What was tried to make our step fast on XLA:CPU (jax 0.10.2, 2 cores AVX-512;
plain step ~6 s quiet; wall and process CPU time, several runs):
  * matmul precision (jax_default_matmul_precision / precision=): no effect on
    CPU, float32 dots are computed in float32 whatever it says (same results
    for 'default' ... 'highest', rel. error 6e-7 against float64).
  * the dot library: the default, YNNPACK dot fusions, is the best. Eigen dots
    (--xla_cpu_experimental_ynn_fusion_type=-dot), --xla_cpu_use_onednn=true,
    --xla_cpu_use_xnnpack=false: the same within noise (+-4%). oneDNN or XNNPACK
    dot fusions (--xla_cpu_experimental_{onednn,xnn}_fusion_type=dot, YNN's
    off): 1.7-1.8x slower (each dot on one core).
  * --xla_cpu_experimental_ynn_fusion_type=+eltwise[,+reduce],
    --xla_cpu_prefer_vector_width=512, --xla_cpu_experimental_xnn_graph_
    fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY[_SLINKY]: no gain. Fast-math
    flags: not used (they change float32 semantics).
  * model.scan=True: compiles ~3x faster, steps ~2-3% slower: unrolled kept.
    remat: off (the default); donation of the state: on, as the trainer.
  * PyTorch side, to be fair to it: AdamW for-loop (CPU default), foreach and
    fused differ by <= 0.15 s (the optimiser is 1-3% of its step); default kept.
So no flag is set by default (--xla_cpu_flags adds some). Where our step's time
goes (profile, quiet): ~80% in YNNPACK dots, at 170-180 GFLOP/s for the MLP's
forward dots but ~120 for the 768x768 attention projections, ~95-110 per dot
for backward dots that run two at a time (one core each), 45-65 for the
per-head attention dots; ~12% in non-matmul fusions that run alone (attention
layout transposes, LayerNorm, GELU, softmax, AdamW); ~7% idle gaps.
  * attention on heads-major copies (transformer.heads_major_attention): the
    attention products ~1.7x faster, the step ~1.5-2% (kept). One fused
    q/k/v projection (a 768x2304 kernel): no gain. A later host (2 cores with
    AMX, 2026-11-23) runs float32 matmuls at 250-300 GFLOP/s: there PyTorch's
    step took 3.3-3.8 s and ours 4.1-4.7 s (0.69-0.71 of the matmul rate): the
    ratios depend on the host the VM lands on.
On that AMX host (2026-11-23, plain step 4.28 s in a profile): XLA's dots are
busy 3.41 s of it at 249 GFLOP/s (0.85 of its best matmul), non-matmul work runs
alone 0.61 s and the cores idle 0.26 s between thunks. A fraction of 0.8 would
need the step in 3.62 s. The biggest losses, by thread time: the attention's
batched (196 x 64) products, ~0.45 s over their time at the matmul rate (alone:
100-137 GFLOP/s in XLA for every layout, dot library and fusion flag tried,
against 240-320 for PyTorch's bmm of the same shapes); the copies that
transpose each kernel for the input-gradient dots, ~0.29 s; AdamW's per-leaf
updates, ~0.24 s (memory bound, ~11 GB/s). MKL runs float32 matmuls at ~320-350
GFLOP/s there against XLA's ~270-295, so even a step made of nothing but matmuls
at MKL's rate would beat PyTorch's ~3.4 s by only ~1.3x
(speedup_bound_at_torch_matmul: 1.34 from the medians, 1.30 from the fastest
samples, in one run). Also tried there, no gain:
--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_{CONCURRENCY,MEMORY}_OPTIMIZED,
--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME,
--xla_cpu_copy_insertion_use_region_analysis (4.30-4.40 s against 4.20-4.35),
--xla_cpu_experimental_enable_tiling_propagation (5.07 s); a custom-VJP attention
with FlashAttention's backward (rowsum(dO * O) instead of the softmax's
Jacobian): the attention core 8% faster, < 1% of the step, not kept.
"""
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags

_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (one step of every config each).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per step.")
_CLASSES = flags.DEFINE_integer("num_classes", 9054, "Target classes (SOP: 9,054).")
_THREADS = flags.DEFINE_integer("threads", 0, "PyTorch threads; 0 = os.cpu_count(), "
                                "the size of XLA's CPU thread pool.")
_XLA_CPU_FLAGS = flags.DEFINE_string(
    "xla_cpu_flags", "", "XLA flags added to XLA_FLAGS for the timed part (see 'What was "
    "tried' in the module docstring).")
_STEPS = flags.DEFINE_integer(
    "steps_per_sample", 3, "Consecutive steps timed as one sample (their mean): less "
    "noise per sample than a single step.")
_EXTRA_ROUNDS = flags.DEFINE_integer(
    "extra_rounds", 1, "Rounds that may be added when others' CPU load exceeded --max_load.")
_MAX_LOAD = flags.DEFINE_float(
    "max_load", 0.1, "A round is 'quiet' when other processes used at most this share of "
    "the CPU during each of its timings; medians come from the quiet rounds if any.")
_SCAN = flags.DEFINE_bool("scan", False, "config.model.scan for the timed steps.")
_MODE = flags.DEFINE_enum(
    "mode", "auto", ["auto", "cpu", "accelerator"], "cpu: the figures above (float32, "
    "JAX on the CPU); accelerator: bfloat16 images/s and model FLOP utilisation on JAX's "
    "default device; auto: accelerator where JAX has a GPU or TPU, else cpu.")
_VARIANT = flags.DEFINE_string("variant", "B/16", "Model variant of the timed steps.")
_ACC_BATCH = flags.DEFINE_integer("accelerator_batch_size", 256,
                                  "Images per step in accelerator mode.")
_ACC_MATMUL = flags.DEFINE_integer("accelerator_matmul_n", 8192, "Accelerator mode: n of "
                                   "the n^3 bfloat16 matmul measured beside the steps.")
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "Accelerator mode: the device's dense "
                           "bfloat16 peak FLOP/s; 0 = PEAK_BF16_FLOPS by device kind.")
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch step (speedup_vs_pytorch).")
_FSDP = flags.DEFINE_bool("fsdp", True, "Measure fsdp_memory_reduction (subprocess).")
_FSDP_VARIANT = flags.DEFINE_string("fsdp_variant", "So400m/14", "Model of the FSDP part.")
_FSDP_DEVICES = flags.DEFINE_integer("fsdp_devices", 8, "Host devices of the FSDP part.")
_FSDP_SCAN = flags.DEFINE_bool("fsdp_scan", True, "config.model.scan for the FSDP part (the "
                               "same per-device state bytes; compiles several times faster).")
_FSDP_CHILD = flags.DEFINE_bool("fsdp_child", False, "Internal: run the FSDP part here.")

IMAGE_SIZE = 224
MATMUL_N = 4096
KINDS = ("plain", "precomputed", "online")
# Dense bfloat16 peak FLOP/s (datasheets, no sparsity) by a substring of the device
# kind, the most specific first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("H200 NVL", 835e12), ("H200", 989e12), ("H800 PCIe", 756e12), ("H800", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4 lite", 138e12), ("TPU v4", 275e12))


# ---------------------------------------------------------------------------- configs


def run_config(kind: str, scan: bool, variant: str, dtype: str = "float32"):
    """The trainer's run config: 'plain' (target NormFace only) or the method with a
    'precomputed' / 'online' teacher for the generic domain's feature_mse; `dtype` is
    the compute dtype (parameters stay float32)."""
    from infusing_jax.training import config as config_lib
    cfg = config_lib.default_config()
    cfg.model.variant, cfg.model.image_size, cfg.model.scan = variant, IMAGE_SIZE, scan
    cfg.model.dtype = dtype
    cfg.train.select_by = "last"  # no validation here
    if kind == "plain":
        cfg.domains.sop = config_lib.domain(
            "tfds:stanford_online_products", "target", losses=dict(normface=dict(weight=1.0)))
    else:
        cfg.domains.sop = config_lib.domain(
            "tfds:stanford_online_products", "target",
            losses=dict(normface=dict(weight=1.0), anchoring=dict(weight=1e5)))
        cfg.domains.imagenet = config_lib.domain(
            "tfds:imagenet2012", "generic",
            losses=dict(feature_mse=dict(weight=1000.0, teacher=kind),
                        anchoring=dict(weight=1e5)))
    return cfg


def host_batches(kind: str, batch: int, dim: int, num_classes: int, seed: int = 0) -> list:
    """Random numpy batches: [target] for 'plain', [target, generic] for the method."""
    rng = np.random.default_rng(seed)
    out = []
    for domain in range(1 if kind == "plain" else 2):
        teacher = rng.normal(size=(batch, dim)).astype(np.float32)
        out.append(dict(
            image=rng.uniform(-1, 1, (batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
            label=rng.integers(0, num_classes, batch).astype(np.int32),
            domain=np.full((batch,), domain, np.int32),
            teacher=teacher / np.linalg.norm(teacher, axis=1, keepdims=True),
            has_teacher=np.full((batch,), domain == 1)))
    return out


def analytic_flops(model_cfg, batch: int, num_classes: int) -> dict:
    """Matmul FLOPs (2 per multiply-add) of the image tower + NormFace classifier.

    Per image, N patches, width D, MLP width M, L blocks: patch embedding
    N*(p*p*3)*D; per block q/k/v/out projections 4*N*D^2, attention scores and
    values 2*N^2*D, MLP 2*N*D*M; MAP head: query and output projections 2*D^2,
    key/value 2*N*D^2, attention 2*N*D, MLP 2*D*M; classifier D*C. Training =
    3x forward (backward = input and weight gradients, 2x forward), less the patch
    embedding's input gradient (the images are not differentiated).
    """
    img = model_cfg.image
    n = (IMAGE_SIZE // img.patch_size) ** 2
    d, m, depth = img.width, img.mlp_dim, img.depth
    patch_macs = n * img.patch_size ** 2 * 3 * d
    macs = patch_macs + depth * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    macs += 2 * d * d + 2 * n * d * d + 2 * n * d + 2 * d * m
    macs += d * num_classes
    forward = 2 * macs * batch
    return dict(forward=forward, train=3 * forward - 2 * patch_macs * batch)


# ---------------------------------------------------------------------------- JAX


def build_step(kind: str, batch: int, num_classes: int, scan: bool, backbone_cache: dict,
               variant: str, dtype: str = "float32"):
    """Our train step for a config, as train.train_and_evaluate builds it."""
    import jax
    from infusing_jax.training import config as config_lib
    from infusing_jax.training import objective
    from infusing_jax.training import optim
    from infusing_jax import sharding
    from infusing_jax.training import step as step_lib
    from infusing_jax import sharding

    cfg = run_config(kind, scan, variant, dtype)
    config_lib.validate(cfg)
    names = config_lib.ordered_domains(cfg)
    key = (cfg.model.variant, cfg.model.scan, cfg.model.dtype)
    if key not in backbone_cache:
        backbone_cache[key] = step_lib.load_image_tower(cfg.model)
    model, backbone, model_cfg = backbone_cache[key]
    embed = step_lib.embed_fn(model)
    mesh = sharding.make_mesh()
    tx = optim.make_optimizer(cfg.optim, 1000, model_cfg.image.depth)
    dim = model_cfg.image.width
    heads = jax.device_get(objective.init_heads(
        cfg, names, {n: num_classes if cfg.domains[n].role == "target" else 1000
                     for n in names}, dim, jax.random.PRNGKey(cfg.seed)))
    needs_reference = kind != "plain"
    init = functools.partial(step_lib.create_train_state, tx=tx)
    abstract = jax.eval_shape(init, backbone, heads)
    state_sh = sharding.state_shardings(abstract, mesh, cfg.train.fsdp)
    state = jax.jit(init, out_shardings=state_sh)(backbone, heads)
    reference = None
    if needs_reference:
        ref_sh = sharding.state_shardings(jax.eval_shape(lambda: backbone), mesh,
                                          cfg.train.fsdp)
        reference = jax.device_put(backbone, ref_sh)
    loss_fn = objective.make_loss_fn(cfg, names, embed)
    step = jax.jit(functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx,
                                     ema_decay=None),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
    # The fields the input pipeline yields: teacher descriptors only for a precomputed teacher.
    fields = ("image", "label", "domain") + (("teacher", "has_teacher")
                                             if kind == "precomputed" else ())
    batches = [sharding.global_batch({k: v for k, v in b.items() if k in fields}, mesh)
               for b in host_batches(kind, batch, dim, num_classes)]
    start = time.perf_counter()
    compiled = step.lower(state, batches[0], reference).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(compiled=compiled, state=state, reference=reference, batches=batches,
                model_cfg=model_cfg, xla_flops=float(cost.get("flops", float("nan"))),
                compile_s=compile_s)


class JaxRunner:
    """Runs one config's compiled step on its batches, donating and keeping the state."""

    def __init__(self, built: dict):
        self.b = built
        self.state = built["state"]

    def __call__(self, i: int, steps: int = 1) -> float:
        """-> seconds per step of `steps` steps on batch i, dispatched back to back."""
        import jax
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.b["compiled"](self.state, self.b["batches"][i],
                                                     self.b["reference"])
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / steps


def step_timers(runners: dict, steps: int = 1) -> dict:
    """{'jax_plain', 'jax_<kind>_target', 'jax_<kind>_generic': run() -> seconds per step}."""
    timed = {"jax_plain": functools.partial(runners["plain"], 0, steps)}
    for kind in KINDS[1:]:
        timed[f"jax_{kind}_target"] = functools.partial(runners[kind], 0, steps)
        timed[f"jax_{kind}_generic"] = functools.partial(runners[kind], 1, steps)
    return timed


def method_overhead(t: dict, kind: str) -> float:
    """mean(t of the `kind` step on a target and on a generic batch) / t of the plain step,
    for t keyed as step_timers."""
    return (t[f"jax_{kind}_target"] + t[f"jax_{kind}_generic"]) / 2 / t["jax_plain"]


def matmul_runner(m: int, k: int, n: int, reps: int = 1, dtype: str = "float32"):
    """-> run() timing `reps` (m, k) @ (k, n) jnp matmuls in seconds per matmul (float32:
    precision 'highest')."""
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
    b = jnp.asarray(rng.standard_normal((k, n), np.float32), dtype)
    precision = "highest" if dtype == "float32" else None
    f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))

    def run() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            out = f(a, b)
        out.block_until_ready()
        return (time.perf_counter() - start) / reps
    return run


def torch_matmul_runner(m: int, k: int, n: int, reps: int = 1):
    """-> run() timing `reps` (m, k) @ (k, n) float32 torch matmuls (MKL's sgemm on x86)
    in seconds per matmul."""
    import torch
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        return (time.perf_counter() - start) / reps
    return run


class Sampler:
    """Times a callable; also the share of the machine's CPU that OTHER processes used
    meanwhile (busy jiffies of /proc/stat, steal included, less this process's CPU
    time), as a fraction of wall time x cores: ~0 on a quiet machine."""

    def __init__(self):
        self.cores = os.cpu_count()
        self.tick = os.sysconf("SC_CLK_TCK")

    def _busy(self) -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return float("nan")
        return (sum(v) - v[3] - v[4]) / self.tick  # all but idle and iowait

    def __call__(self, run, repeats: int = 1) -> tuple:
        """-> (run()'s seconds, others' CPU load meanwhile, this process's CPU seconds,
        its minor page faults), each the mean over `repeats` consecutive calls."""
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        b0, c0, w0 = self._busy(), time.process_time(), time.perf_counter()
        seconds = sum(run() for _ in range(repeats)) / repeats
        b1, c1, w1 = self._busy(), time.process_time(), time.perf_counter()
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / repeats
        return (seconds, max(0.0, (b1 - b0) - (c1 - c0)) / ((w1 - w0) * self.cores),
                (c1 - c0) / repeats, faults)


# ---------------------------------------------------------------------------- PyTorch


def torch_runner(host_batch: dict, num_classes: int, threads: int, img):
    """transformers' SiglipVisionModel (random init, the sizes of our model config's
    `image`), eager, NormFace, AdamW."""
    import torch
    from transformers import SiglipVisionConfig
    from transformers import SiglipVisionModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=img.width, intermediate_size=img.mlp_dim,
                                num_hidden_layers=img.depth, num_attention_heads=img.num_heads,
                                num_channels=3, image_size=IMAGE_SIZE,
                                patch_size=img.patch_size, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6, attention_dropout=0.0)
    model = SiglipVisionModel(config).train()
    bound = (3.0 / img.width) ** 0.5  # lecun_uniform, as objective.init_heads
    w = torch.nn.Parameter(torch.empty(img.width, num_classes).uniform_(-bound, bound))
    opt = torch.optim.AdamW([dict(params=list(model.parameters()), lr=1e-5),
                             dict(params=[w], lr=1e-3)],
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-6)
    images = torch.from_numpy(np.ascontiguousarray(host_batch["image"].transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(host_batch["label"].astype(np.int64))
    normalize = torch.nn.functional.normalize

    def run() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        f = normalize(model(pixel_values=images).pooler_output, dim=-1)
        logits = 16.0 * f @ normalize(w, dim=0)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        loss.item()
        return time.perf_counter() - start
    info = dict(attn_implementation=getattr(model.config, "_attn_implementation", None),
                threads=torch.get_num_threads(), version=torch.__version__)
    return run, info


# ---------------------------------------------------------------------------- FSDP


def fsdp_child(variant: str, batch: int, num_classes: int, scan: bool) -> dict:
    """Per-device bytes of the method's train step, 1 device vs FSDP over all devices.

    Abstract only: parameters from step.load_image_tower(abstract=True), the train
    state via eval_shape of create_train_state, inputs as ShapeDtypeStructs
    carrying their shardings; the step is lowered and compiled, never run.
    """
    import jax
    from infusing_jax.training import config as config_lib
    from infusing_jax.training import objective
    from infusing_jax.training import optim
    from infusing_jax import sharding
    from infusing_jax.training import step as step_lib

    cfg = run_config("precomputed", scan=scan, variant=variant)
    config_lib.validate(cfg)
    names = config_lib.ordered_domains(cfg)
    model, backbone, model_cfg = step_lib.load_image_tower(cfg.model, abstract=True)
    embed = step_lib.embed_fn(model)
    dim = model_cfg.image.width
    heads = jax.eval_shape(lambda: objective.init_heads(
        cfg, names, {n: num_classes if cfg.domains[n].role == "target" else 1000
                     for n in names}, dim, jax.random.PRNGKey(0)))
    tx = optim.make_optimizer(cfg.optim, 1000, model_cfg.image.depth)
    loss_fn = objective.make_loss_fn(cfg, names, embed)
    host = host_batches("precomputed", batch, dim, num_classes)[0]

    def nbytes(tree) -> int:
        return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                       for x in jax.tree.leaves(tree)))

    out = {}
    for n_dev in sorted({1, len(jax.devices())}):
        mesh = sharding.make_mesh(jax.devices()[:n_dev])
        fsdp = n_dev > 1
        init = functools.partial(step_lib.create_train_state, tx=tx)
        abstract = jax.eval_shape(init, backbone, heads)
        state_sh = sharding.state_shardings(abstract, mesh, fsdp)
        ref_sh = sharding.state_shardings(backbone, mesh, fsdp)
        with_sh = lambda tree, sh: jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
        batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                             sharding=sharding.batch_sharding(mesh))
                     for k, v in host.items()}
        step = jax.jit(functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx,
                                         ema_decay=None),
                       out_shardings=(state_sh, sharding.replicated(mesh)),
                       donate_argnums=(0,))
        start = time.perf_counter()
        compiled = step.lower(with_sh(abstract, state_sh), batch_abs,
                              with_sh(backbone, ref_sh)).compile()
        mem = compiled.memory_analysis()
        batch_bytes = nbytes(host) // n_dev
        out[str(n_dev)] = dict(
            compile_s=round(time.perf_counter() - start, 1),
            argument_bytes=int(mem.argument_size_in_bytes),
            output_bytes=int(mem.output_size_in_bytes),
            alias_bytes=int(mem.alias_size_in_bytes),
            temp_bytes=int(mem.temp_size_in_bytes),
            state_and_reference_bytes=int(mem.argument_size_in_bytes) - batch_bytes,
            global_state_and_reference_bytes=nbytes(abstract) + nbytes(backbone))
    return out


def start_fsdp_subprocess(variant: str, devices: int, batch: int, num_classes: int,
                          scan: bool, xla_flags: str) -> subprocess.Popen:
    """This script with --fsdp_child on `devices` host devices; see fsdp_child."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (xla_flags +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, os.path.abspath(__file__), "--fsdp_child",
           f"--fsdp_variant={variant}", f"--batch_size={batch}", f"--num_classes={num_classes}",
           f"--fsdp_scan={scan}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish_fsdp_subprocess(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"FSDP subprocess failed ({proc.returncode}):\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- accelerator


def peak_bf16_flops(device_kind: str):
    """The datasheet's dense bfloat16 FLOP/s of a device kind, or None if unknown."""
    return next((flops for name, flops in PEAK_BF16_FLOPS if name in device_kind), None)


def accelerator_main(elapsed) -> dict:
    """bfloat16 compute (float32 master weights) on JAX's devices (the batch split over
    all of them, as the trainer does): each config's images/s, the plain step's model
    FLOP utilisation (analytic_flops over the step time, over the devices' summed peak)
    and its fraction of the devices' summed bfloat16 n^3 matmul rate (measured on one).
    Medians over --rounds samples of --steps_per_sample steps each, dispatched back to
    back and synchronised once."""
    import jax
    device, devices = jax.devices()[0], jax.device_count()
    batch, classes, variant = _ACC_BATCH.value, _CLASSES.value, _VARIANT.value
    if batch % devices:
        raise ValueError(f"--accelerator_batch_size={batch} must be a multiple of the "
                         f"{devices} devices")
    peak = _PEAK.value or peak_bf16_flops(device.device_kind)
    print(f"jax {jax.__version__} on {devices} x {device.device_kind}, bfloat16, batch "
          f"{batch}", flush=True)
    cache, built, runners = {}, {}, {}
    for kind in KINDS:
        built[kind] = build_step(kind, batch, classes, _SCAN.value, cache, variant, "bfloat16")
        runners[kind] = JaxRunner(built[kind])
        print(f"{elapsed()} compiled {kind}: {built[kind]['compile_s']:.1f} s", flush=True)
    n = _ACC_MATMUL.value
    timed = dict(step_timers(runners, _STEPS.value),
                 matmul=matmul_runner(n, n, n, 10, "bfloat16"))
    for run in timed.values():  # warm-up, excluded
        run()
    sample = Sampler()
    samples = {name: [] for name in timed}
    for r in range(_ROUNDS.value):
        for name, run in timed.items():
            samples[name].append(sample(run)[0])
        print(f"{elapsed()} round {r}: " + ", ".join(f"{k} {v[-1]:.4g}s"
                                                    for k, v in samples.items()), flush=True)
    t = {k: statistics.median(v) for k, v in samples.items()}
    flops = analytic_flops(built["plain"]["model_cfg"], batch, classes)["train"]
    plain = t["jax_plain"]
    matmul_flops_per_s = 2 * n ** 3 / t["matmul"]  # one device
    return dict(
        images_per_s=_sig(batch / plain),
        model_flops_utilization=_sig(flops / plain / (peak * devices)) if peak else None,
        fraction_of_matmul_peak=_sig(flops / plain / (matmul_flops_per_s * devices)),
        online_teacher_overhead=_sig(method_overhead(t, "online")),
        precomputed_teacher_overhead=_sig(method_overhead(t, "precomputed")),
        images_per_s_by_step={k: _sig(batch / v) for k, v in t.items() if k != "matmul"},
        step_flops=flops,
        step_flops_per_s=_sig(flops / plain),
        peak_flops_per_device=peak,
        peak_source="--peak_flops" if _PEAK.value else ("PEAK_BF16_FLOPS" if peak else None),
        matmul_flops_per_s_per_device=_sig(matmul_flops_per_s),
        seconds={k: _sig(v) for k, v in t.items()},
        all_s={k: [_sig(x) for x in v] for k, v in samples.items()},
        compile_s={k: round(b["compile_s"], 1) for k, b in built.items()},
        setup=dict(mode="accelerator", device_kind=device.device_kind,
                   platform=device.platform, devices=devices, variant=variant,
                   image_size=IMAGE_SIZE, batch_size=batch, num_classes=classes,
                   dtype="bfloat16", param_dtype="float32", scan=_SCAN.value,
                   steps_per_sample=_STEPS.value, matmul_n=n, jax=jax.__version__))


def _sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits."""
    return float(f"{x:.{digits}g}")


# ---------------------------------------------------------------------------- main


def main(argv):
    del argv
    t0 = time.perf_counter()
    elapsed = lambda: f"[{time.perf_counter() - t0:.0f} s]"
    if _FSDP_CHILD.value:
        print(json.dumps(fsdp_child(_FSDP_VARIANT.value, _BATCH.value, _CLASSES.value,
                                    _FSDP_SCAN.value)))
        return
    xla_flags = os.environ.get("XLA_FLAGS", "")  # the FSDP part's: no --xla_cpu_flags
    if _XLA_CPU_FLAGS.value:  # read when the backend starts, below
        os.environ["XLA_FLAGS"] = (xla_flags + " " + _XLA_CPU_FLAGS.value).strip()
    import jax
    if _MODE.value == "cpu":
        jax.config.update("jax_platforms", "cpu")
    if _MODE.value == "accelerator" or (_MODE.value == "auto" and
                                        jax.default_backend() != "cpu"):
        print(json.dumps(accelerator_main(elapsed)))
        return
    batch, classes = _BATCH.value, _CLASSES.value
    threads = _THREADS.value or os.cpu_count()
    report = {}

    # The FSDP part compiles (in a subprocess) while this process builds its steps; it
    # is over before anything is timed.
    fsdp_proc = (start_fsdp_subprocess(_FSDP_VARIANT.value, _FSDP_DEVICES.value, batch,
                                       classes, _FSDP_SCAN.value, xla_flags)
                 if _FSDP.value else None)
    print(f"jax {jax.__version__} on {jax.devices()}, XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}, {threads} threads", flush=True)

    cache, built, runners = {}, {}, {}
    for kind in KINDS:
        built[kind] = build_step(kind, batch, classes, _SCAN.value, cache, _VARIANT.value)
        runners[kind] = JaxRunner(built[kind])
        print(f"{elapsed()} compiled {kind}: {built[kind]['compile_s']:.1f} s, XLA flops "
              f"{built[kind]['xla_flops'] / 1e9:.1f} G", flush=True)
    img = built["plain"]["model_cfg"].image
    matmul = matmul_runner(MATMUL_N, MATMUL_N, MATMUL_N)
    # The "best matmul": a few sizes incl. the step's own MLP shapes; smaller ones often
    # block better in cache than 4096^2 on XLA CPU, so this is the stricter peak.
    tokens, d, m = batch * (IMAGE_SIZE // img.patch_size) ** 2, img.width, img.mlp_dim
    shapes = ((1024, 1024, 1024, 16), (2048, 2048, 2048, 2), (tokens, d, m, 4),
              (d, tokens, m, 4), (tokens, m, d, 4))
    sweep = {f"{a}x{b}x{c}": matmul_runner(a, b, c, reps) for a, b, c, reps in shapes}
    timed = step_timers(runners)
    if _TORCH.value:
        torch_run, torch_info = torch_runner(host_batches("plain", batch, d, classes)[0],
                                             classes, threads, img)
        timed = {"torch_plain": torch_run, **timed}
        # The same shapes in PyTorch (MKL): the fastest float32 matmul this CPU runs.
        sweep.update({f"torch_{a}x{b}x{c}": torch_matmul_runner(a, b, c, reps)
                      for a, b, c, reps in ((MATMUL_N, MATMUL_N, MATMUL_N, 1), *shapes)})

    print(f"{elapsed()} built everything", flush=True)
    if fsdp_proc is not None:
        mem = finish_fsdp_subprocess(fsdp_proc)
        one, many = mem["1"], mem[str(_FSDP_DEVICES.value)]
        report["fsdp_memory_reduction"] = round(
            one["state_and_reference_bytes"] / many["state_and_reference_bytes"], 3)
        report["fsdp"] = dict(variant=_FSDP_VARIANT.value, devices=_FSDP_DEVICES.value,
                              scan=_FSDP_SCAN.value, **mem)
        print(f"{elapsed()} FSDP {_FSDP_VARIANT.value}: train state + reference per device "
              f"{one['state_and_reference_bytes'] / 2**20:.0f} MiB on 1 device, "
              f"{many['state_and_reference_bytes'] / 2**20:.0f} MiB on "
              f"{_FSDP_DEVICES.value}: x{report['fsdp_memory_reduction']}", flush=True)
    for run in (matmul, *sweep.values(), *timed.values()):  # warm-up, excluded
        run()
    print(f"{elapsed()} warmed up", flush=True)
    sample = Sampler()
    rounds = []  # each {name: [(seconds, foreign load), ...]}
    while len(rounds) < _ROUNDS.value + _EXTRA_ROUNDS.value:
        r = {name: [] for name in (*timed, "matmul", *sweep)}
        order = list(timed.items())
        for name, run in order[::-1] if len(rounds) % 2 else order:  # alternate the order
            r[name].append(sample(run, _STEPS.value))
            r["matmul"].append(sample(matmul))  # a matmul after every step: the same load
        for name, run in sweep.items():
            r[name].append(sample(run))
        r_load = max(x[1] for v in r.values() for x in v)
        rounds.append(dict(samples=r, load=r_load, quiet=r_load <= _MAX_LOAD.value))
        print(f"{elapsed()} round {len(rounds) - 1} (others' CPU load up to {r_load:.2f}): " +
              ", ".join(f"{k} {v[-1][0]:.2f}s" for k, v in r.items() if k not in sweep),
              flush=True)
        if sum(x["quiet"] for x in rounds) >= _ROUNDS.value:
            break
    quiet = [x for x in rounds if x["quiet"]]
    used = quiet or rounds  # the quiet rounds if any, else all (flagged below)
    times = {k: [s for x in used for s in x["samples"][k]] for k in used[0]["samples"]}
    flops = analytic_flops(built["plain"]["model_cfg"], batch, classes)
    shape_flops = {k: 2 * np.prod([int(d) for d in k.split("_")[-1].split("x")])
                   for k in sweep}
    jax_sweep = [k for k in sweep if not k.startswith("torch_")]
    torch_sweep = [k for k in sweep if k.startswith("torch_")]

    def summary(stat, times=times) -> dict:
        """The ratios from one statistic of each timing's samples."""
        t = {k: stat([x[0] for x in v]) for k, v in times.items()}
        plain = t["jax_plain"]
        step_flops_per_s = flops["train"] / plain
        matmul_4096 = 2 * MATMUL_N ** 3 / t["matmul"]
        best_matmul = max(matmul_4096, *(shape_flops[k] / t[k] for k in jax_sweep))
        torch_s = t.get("torch_plain")
        torch_matmul = max((shape_flops[k] / t[k] for k in torch_sweep), default=None)
        return dict(
            speedup_vs_pytorch=round(torch_s / plain, 3) if torch_s else None,
            fraction_of_matmul_peak=round(step_flops_per_s / best_matmul, 3),
            online_teacher_overhead=round(method_overhead(t, "online"), 3),
            precomputed_teacher_overhead=round(method_overhead(t, "precomputed"), 3),
            fraction_of_4096_matmul=round(step_flops_per_s / matmul_4096, 3),
            speedup_bound_at_best_matmul=(round(torch_s / (flops["train"] / best_matmul), 3)
                                          if torch_s else None),
            speedup_bound_at_torch_matmul=(round(torch_s / (flops["train"] / torch_matmul), 3)
                                           if torch_s else None),
            jax_images_per_s=round(batch / plain, 3),
            torch_images_per_s=round(batch / torch_s, 3) if torch_s else None,
            step_flops_per_s=round(step_flops_per_s),
            step_xla_flops_per_s=round(built["plain"]["xla_flops"] / plain),
            torch_flops_per_s=round(flops["train"] / torch_s) if torch_s else None,
            matmul_4096_flops_per_s=round(matmul_4096),
            best_matmul_flops_per_s=round(best_matmul),
            torch_best_matmul_flops_per_s=round(torch_matmul) if torch_s else None,
            matmul_sweep_flops_per_s={k: round(shape_flops[k] / t[k]) for k in sweep},
            seconds={k: round(v, 4) for k, v in t.items() if k not in sweep})

    med, best = summary(statistics.median), summary(min)
    per_round = [summary(statistics.median, x["samples"]) for x in used]
    headline = ("speedup_vs_pytorch", "fraction_of_matmul_peak", "online_teacher_overhead",
                "precomputed_teacher_overhead")
    paired = {k: (round(statistics.median(r[k] for r in per_round), 3)
                  if per_round[0][k] is not None else None) for k in headline}
    cpu = {k: statistics.median(x[2] for x in v) for k, v in times.items() if k not in sweep}
    out = dict(
        **paired,
        fsdp_memory_reduction=report.get("fsdp_memory_reduction"),
        quiet=bool(quiet),
        quiet_rounds=len(quiet),
        rounds=len(rounds),
        others_cpu_load={k: round(statistics.median(x[1] for x in v), 3)
                         for k, v in times.items()},
        flops_counted="analytic matmul FLOPs of the ViT + MAP head + classifier, 3x forward "
                      "less the patch embedding's input gradient",
        step_flops_analytic=flops["train"],
        step_flops_xla=built["plain"]["xla_flops"],
        median=med,
        min=best,  # the least disturbed sample of each: less noisy on a shared machine
        per_round={k: [r[k] for r in per_round] for k in headline},
        # CPU seconds of this process: comparable between our configs (same runtime),
        # not with PyTorch (OpenMP threads spin while waiting).
        overheads_by_cpu_time={k: round(method_overhead(cpu, k), 3) for k in KINDS[1:]},
        median_cpu_s={k: round(v, 3) for k, v in cpu.items()},
        median_page_faults={k: round(statistics.median(x[3] for x in v))
                            for k, v in times.items() if k not in sweep},
        all_s={k: [round(x[0], 3) for x in v] for k, v in times.items() if k not in sweep},
        compile_s={k: round(b["compile_s"], 1) for k, b in built.items()},
        xla_flops={k: b["xla_flops"] for k, b in built.items()},
        fsdp=report.get("fsdp"),
        torch=torch_info if _TORCH.value else None,
        setup=dict(mode="cpu", variant=_VARIANT.value, image_size=IMAGE_SIZE,
                   batch_size=batch, num_classes=classes, dtype="float32", scan=_SCAN.value,
                   threads=threads, steps_per_sample=_STEPS.value, jax=jax.__version__,
                   xla_flags=os.environ.get("XLA_FLAGS", ""),
                   glibc_tunables=os.environ.get("GLIBC_TUNABLES"),
                   cpu=_cpu_name(), cores=os.cpu_count()))
    if not quiet:
        print(f"WARNING: no round ran with other processes below {_MAX_LOAD.value:.0%} of the "
              "CPU; PyTorch's OpenMP step suffers more than XLA's from contention, so "
              "speedup_vs_pytorch is unreliable (see others_cpu_load)", flush=True)
    print(f"plain step: {med['jax_images_per_s']:.2f} images/s, PyTorch "
          f"{med['torch_images_per_s']}; {med['step_flops_per_s'] / 1e9:.1f} GFLOP/s vs "
          f"best matmul {med['best_matmul_flops_per_s'] / 1e9:.1f}, {MATMUL_N}^2 matmul "
          f"{med['matmul_4096_flops_per_s'] / 1e9:.1f}; method / plain: precomputed "
          f"{paired['precomputed_teacher_overhead']}, online "
          f"{paired['online_teacher_overhead']} (medians of the rounds' own ratios)", flush=True)
    if med["torch_best_matmul_flops_per_s"]:
        print(f"PyTorch's (MKL) best matmul {med['torch_best_matmul_flops_per_s'] / 1e9:.1f} "
              f"GFLOP/s; speedup_vs_pytorch can be at most "
              f"{med['speedup_bound_at_best_matmul']} at XLA's best matmul rate, "
              f"{med['speedup_bound_at_torch_matmul']} at MKL's (no other work)", flush=True)
    print(json.dumps(out))


def _cpu_info(field: str) -> str:
    """The first `field` line of /proc/cpuinfo ('model name', 'flags'), or ''."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_name() -> str:
    """The model name and the vector / matrix extensions that set the matmul rate (VMs
    often report only 'Intel(R) Xeon(R) Processor', whatever the host)."""
    features = set(_cpu_info("flags").split()) & {"avx2", "avx512f", "avx512_bf16",
                                                  "amx_tile", "amx_bf16"}
    return " ".join([_cpu_info("model name"), *sorted(features)])


if __name__ == "__main__":
    from infusing_jax import host_memory
    host_memory.restart_with_tunables()  # as `python -m infusing_jax.main` does
    app.run(main)
