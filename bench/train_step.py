r"""The trainer's train step timed: against PyTorch, the matmul peak, the method's
overheads, FSDP memory.

    python bench/train_step.py [--mode=auto] [--rounds=5] [--steps_per_sample=3]
        [--variant=B/16] [--batch_size=8] [--threads=0] [--xla_cpu_flags=...]

The steps timed are the trainer's own (trainer_steps.py: training.step.build on
three configs, plain, precomputed and online, random batches on the devices).
--mode:
  cpu          cpu_mode.py: float32 on the CPU, ours against PyTorch's
               (pytorch_step.py), the fraction of the best matmul rate
               (matmul_rate.py), the method's overheads; and fsdp_memory.py's
               figure (--fsdp_variant So400m/14, 1 device against FSDP on
               --fsdp_devices 8 host devices), run as a subprocess while this
               process compiles, over before anything is timed (--nofsdp:
               skipped, None);
  accelerator  accelerator_mode.py: bfloat16 on JAX's GPUs or TPUs, images/s and
               model FLOP utilisation; needs no TensorFlow;
  auto         accelerator where JAX has a GPU or TPU, else cpu.

Like `python -m infusing_jax.main`, it restarts itself once with
host_memory.TUNABLES in GLIBC_TUNABLES (in the JSON's setup) so that glibc keeps
the scratch memory XLA:CPU frees after each step; `GLIBC_TUNABLES= python
bench/train_step.py` measures under glibc's defaults.

The last line is JSON: cpu_mode.py's (headline: speedup_vs_pytorch,
fraction_of_matmul_peak, online_teacher_overhead, precomputed_teacher_overhead,
fsdp_memory_reduction) or accelerator_mode.py's; their docstrings say what each
field means. Figures measured on particular hosts, and what was tried to make
the step fast: bench/README.md.
"""
if __name__ == "__main__":  # before the heavy imports: glibc reads tunables only at exec
    from infusing_jax import host_memory
    host_memory.restart_with_tunables()

import json  # noqa: E402 (after the restart above)
import os  # noqa: E402

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import accelerator_mode  # noqa: E402
import cpu_mode  # noqa: E402
import fsdp_memory  # noqa: E402
import timing  # noqa: E402

_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (one step of every config each).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per step.")
_CLASSES = flags.DEFINE_integer("num_classes", 9054, "Target classes (SOP: 9,054).")
_THREADS = flags.DEFINE_integer("threads", 0, "PyTorch threads; 0 = os.cpu_count(), "
                                "the size of XLA's CPU thread pool.")
_XLA_CPU_FLAGS = flags.DEFINE_string(
    "xla_cpu_flags", "", "XLA flags added to XLA_FLAGS for the timed part (see 'What was "
    "tried' in bench/README.md).")
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
    "mode", "auto", ["auto", "cpu", "accelerator"], "cpu: float32, JAX on the CPU against "
    "PyTorch; accelerator: bfloat16 images/s and model FLOP utilisation on JAX's default "
    "devices; auto: accelerator where JAX has a GPU or TPU, else cpu.")
_VARIANT = flags.DEFINE_string("variant", "B/16", "Model variant of the timed steps.")
_ACC_BATCH = flags.DEFINE_integer("accelerator_batch_size", 256,
                                  "Images per step in accelerator mode.")
_ACC_MATMUL = flags.DEFINE_integer("accelerator_matmul_n", 8192, "Accelerator mode: n of "
                                   "the n^3 bfloat16 matmul measured beside the steps.")
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "Accelerator mode: the device's dense "
                           "bfloat16 peak FLOP/s; 0 = PEAK_BF16_FLOPS by device kind.")
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch step (speedup_vs_pytorch).")
_FSDP = flags.DEFINE_bool("fsdp", True, "Measure fsdp_memory_reduction (bench/fsdp_memory.py "
                          "in a subprocess).")
_FSDP_VARIANT = flags.DEFINE_string("fsdp_variant", "So400m/14", "Model of the FSDP part.")
_FSDP_DEVICES = flags.DEFINE_integer("fsdp_devices", 8, "Host devices of the FSDP part.")
_FSDP_SCAN = flags.DEFINE_bool("fsdp_scan", True, "config.model.scan for the FSDP part (the "
                               "same per-device state bytes; compiles several times faster).")


def main(argv):
    del argv
    log = timing.progress_log()
    xla_flags = os.environ.get("XLA_FLAGS", "")  # the FSDP part's: no --xla_cpu_flags
    if _XLA_CPU_FLAGS.value:  # read when the backend starts, below
        os.environ["XLA_FLAGS"] = (xla_flags + " " + _XLA_CPU_FLAGS.value).strip()
    if _MODE.value == "cpu":
        jax.config.update("jax_platforms", "cpu")
    if _MODE.value == "accelerator" or (_MODE.value == "auto" and
                                        jax.default_backend() != "cpu"):
        print(json.dumps(accelerator_mode.measure(accelerator_mode.Settings(
            variant=_VARIANT.value, batch_size=_ACC_BATCH.value, num_classes=_CLASSES.value,
            scan=_SCAN.value, rounds=_ROUNDS.value, steps_per_sample=_STEPS.value,
            matmul_n=_ACC_MATMUL.value, peak_flops=_PEAK.value), log)))
        return

    fsdp = None
    if _FSDP.value:  # compiles while this process builds its steps
        fsdp = fsdp_memory.start(_FSDP_VARIANT.value, _FSDP_DEVICES.value, scan=_FSDP_SCAN.value,
                                 batch_size=_BATCH.value, num_classes=_CLASSES.value,
                                 env=dict(os.environ, XLA_FLAGS=xla_flags))
    settings = cpu_mode.Settings(
        variant=_VARIANT.value, batch_size=_BATCH.value, num_classes=_CLASSES.value,
        scan=_SCAN.value, threads=_THREADS.value, torch=_TORCH.value, rounds=_ROUNDS.value,
        extra_rounds=_EXTRA_ROUNDS.value, max_load=_MAX_LOAD.value,
        steps_per_sample=_STEPS.value)
    print(f"jax {jax.__version__} on {jax.devices()}, XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}, {settings.threads or os.cpu_count()} threads",
          flush=True)
    workloads = cpu_mode.prepare(settings, log)
    log("built everything")
    if fsdp is not None:  # over before anything is timed
        fsdp = fsdp_memory.finish(fsdp)
        one, many = fsdp["1"], fsdp[str(fsdp["devices"])]
        log(f"FSDP {fsdp['variant']}: train state + reference per device "
            f"{one['state_and_reference_bytes'] / 2**20:.0f} MiB on 1 device, "
            f"{many['state_and_reference_bytes'] / 2**20:.0f} MiB on {fsdp['devices']}: "
            f"x{fsdp['fsdp_memory_reduction']}")
    print(json.dumps(cpu_mode.measure(workloads, settings, log, fsdp)))


if __name__ == "__main__":
    app.run(main)
