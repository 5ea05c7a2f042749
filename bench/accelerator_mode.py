"""Accelerator mode: the three configs' train steps in bfloat16 on JAX's GPUs or TPUs.

bfloat16 compute, float32 master weights (trainer_steps.py's configs with
model.dtype='bfloat16'), the batch split over all devices as the trainer splits
it. Every workload runs once first (warm-up, excluded); then `rounds` samples of
each, a sample being `steps_per_sample` steps dispatched back to back and
synchronised once (a product, for the matmul). Figures from the medians. No
TensorFlow is imported.

JSON (`measure`'s dict):
  images_per_s              batch / t(plain step)
  model_flops_utilization   plain step's FLOP/s / (devices x dense bfloat16 peak),
                            FLOPs from flop_count.analytic_flops; the peak is
                            --peak_flops or PEAK_BF16_FLOPS by device kind (None
                            when neither knows it)
  fraction_of_matmul_peak   plain step's FLOP/s / (devices x a bfloat16 n^3
                            product's rate on one device, 2 * n^3 / t)
  online_teacher_overhead, precomputed_teacher_overhead
                            trainer_steps.method_overhead
  images_per_s_by_step, step_flops, step_flops_per_s, peak_flops_per_device,
  peak_source, matmul_flops_per_s_per_device, seconds (medians), all_s (samples),
  compile_s, setup
"""
import dataclasses
import statistics

import jax

import flop_count
import matmul_rate
import timing
import trainer_steps

# Dense bfloat16 peak FLOP/s (datasheets, no sparsity) by a substring of the device
# kind, the most specific first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("H200 NVL", 835e12), ("H200", 989e12), ("H800 PCIe", 756e12), ("H800", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4 lite", 138e12), ("TPU v4", 275e12))


def peak_bf16_flops(device_kind: str):
    """The datasheet's dense bfloat16 FLOP/s of a device kind, or None if unknown."""
    return next((flops for name, flops in PEAK_BF16_FLOPS if name in device_kind), None)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Accelerator mode's settings: bench/train_step.py's flags (batch_size:
    --accelerator_batch_size, matmul_n: --accelerator_matmul_n)."""
    variant: str = "B/16"
    batch_size: int = 256  # over all devices
    num_classes: int = 9054
    scan: bool = False
    rounds: int = 5
    steps_per_sample: int = 3
    matmul_n: int = 8192
    peak_flops: float = 0.0  # per device; 0 = PEAK_BF16_FLOPS by device kind


def measure(s: Settings, log) -> dict:
    """Builds, compiles and times the workloads (module doc) -> the JSON dict."""
    device, devices = jax.devices()[0], jax.device_count()
    if s.batch_size % devices:
        raise ValueError(f"--accelerator_batch_size={s.batch_size} must be a multiple of the "
                         f"{devices} devices")
    peak = s.peak_flops or peak_bf16_flops(device.device_kind)
    log(f"jax {jax.__version__} on {devices} x {device.device_kind}, bfloat16, batch "
        f"{s.batch_size}")
    runners = trainer_steps.step_runners(s.variant, batch_size=s.batch_size,
                                         num_classes=s.num_classes, scan=s.scan,
                                         dtype="bfloat16", log=log)
    n = s.matmul_n
    timed = dict(trainer_steps.step_timers(runners, s.steps_per_sample),
                 matmul=matmul_rate.jax_matmul(n, n, n, 10, "bfloat16"))
    for run in timed.values():
        run()
    sample = timing.Sampler()
    samples = {name: [] for name in timed}
    for r in range(s.rounds):
        for name, run in timed.items():
            samples[name].append(sample(run)[0])
        log(f"round {r}: " + ", ".join(f"{k} {v[-1]:.4g}s" for k, v in samples.items()))
    t = {k: statistics.median(v) for k, v in samples.items()}
    flops = flop_count.analytic_flops(runners["plain"].model_cfg.image,
                                      trainer_steps.IMAGE_SIZE, s.batch_size,
                                      s.num_classes)["train"]
    plain = t["jax_plain"]
    matmul_flops_per_s = 2 * n ** 3 / t["matmul"]  # one device
    return dict(
        images_per_s=_sig(s.batch_size / plain),
        model_flops_utilization=_sig(flops / plain / (peak * devices)) if peak else None,
        fraction_of_matmul_peak=_sig(flops / plain / (matmul_flops_per_s * devices)),
        online_teacher_overhead=_sig(trainer_steps.method_overhead(t, "online")),
        precomputed_teacher_overhead=_sig(trainer_steps.method_overhead(t, "precomputed")),
        images_per_s_by_step={k: _sig(s.batch_size / v) for k, v in t.items()
                              if k != "matmul"},
        step_flops=flops,
        step_flops_per_s=_sig(flops / plain),
        peak_flops_per_device=peak,
        peak_source="--peak_flops" if s.peak_flops else ("PEAK_BF16_FLOPS" if peak else None),
        matmul_flops_per_s_per_device=_sig(matmul_flops_per_s),
        seconds={k: _sig(v) for k, v in t.items()},
        all_s={k: [_sig(x) for x in v] for k, v in samples.items()},
        compile_s={k: round(r.compile_s, 1) for k, r in runners.items()},
        setup=dict(mode="accelerator", device_kind=device.device_kind,
                   platform=device.platform, devices=devices, variant=s.variant,
                   image_size=trainer_steps.IMAGE_SIZE, batch_size=s.batch_size,
                   num_classes=s.num_classes, dtype="bfloat16", param_dtype="float32",
                   scan=s.scan, steps_per_sample=s.steps_per_sample, matmul_n=n,
                   jax=jax.__version__))


def _sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits."""
    return float(f"{x:.{digits}g}")
