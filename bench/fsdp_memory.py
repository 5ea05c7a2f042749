r"""FSDP's memory saving: the method's train state and frozen reference per device, on
one device against FSDP over N host devices.

    python bench/fsdp_memory.py [--variant=So400m/14] [--devices=8] [--scan=true]
        [--batch_size=8] [--num_classes=9054]

The method's 'precomputed' config (trainer_steps.py) with train.fsdp, its step
built by training.step.build over a mesh of 1 and of N CPU devices, lowered and
compiled on abstract inputs only (built.abstract_state; a batch of
ShapeDtypeStructs split by sharding.batch_sharding; the reference as
ShapeDtypeStructs on built.reference_shardings), never run: nothing is
materialised, so a model bigger than the machine's memory can be measured. The N
devices are XLA:CPU host devices: the script sets
XLA_FLAGS=--xla_force_host_platform_device_count=N and the CPU platform for
itself before JAX starts (`host_devices_env`). model.scan (the default here)
compiles several times faster than the unrolled tower and holds the same bytes.

JSON (the last line):
  fsdp_memory_reduction     state_and_reference_bytes on 1 device / on N
  variant, devices, scan, batch_size, num_classes
  "1", "N"                  per device, from the compiled step's memory_analysis():
    argument_bytes, output_bytes, alias_bytes (donated), temp_bytes (XLA's
    scratch: activations, gathered weights), compile_s,
    state_and_reference_bytes          argument bytes less the batch's share: the
                                       train state (params, AdamW moments, step)
                                       and the frozen reference
    global_state_and_reference_bytes   the same, unsharded (the trees' nbytes)

bench/train_step.py runs it as a subprocess (`start`, `finish`), beside its own
timed steps on the real devices.
"""
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

import trainer_steps
from infusing_jax import sharding

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def host_devices_env(env, devices: int) -> dict:
    """`env` with XLA_FLAGS asking XLA:CPU for `devices` host devices (replacing any
    count it asked for) and JAX_PLATFORMS=cpu."""
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith(DEVICE_COUNT_FLAG + "=")]
    return dict(env, XLA_FLAGS=" ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"]),
                JAX_PLATFORMS="cpu")


def measure(variant: str, devices: int, *, scan: bool, batch_size: int,
            num_classes: int) -> dict:
    """-> the JSON dict (module doc); needs `devices` JAX devices."""
    kind = "precomputed"
    per_device = {}
    for n in sorted({1, devices}):  # on one device FSDP splits nothing: the baseline
        mesh = sharding.make_mesh(jax.devices()[:n])
        trainee = trainer_steps.build_steps((kind,), variant, num_classes=num_classes,
                                            mesh=mesh, scan=scan, fsdp=True,
                                            abstract=True)[kind]
        built = trainee.built
        dim = trainee.model_cfg.image.width
        host_batch = trainer_steps.host_batches(kind, batch_size, dim, num_classes)[0]
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
                 for k, v in host_batch.items()}
        reference = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 trainee.backbone, built.reference_shardings)
        reference = reference if built.needs_reference else None
        start = time.perf_counter()
        compiled = built.step.lower(built.abstract_state, batch, reference).compile()
        mem = compiled.memory_analysis()
        per_device[str(n)] = dict(
            compile_s=round(time.perf_counter() - start, 1),
            argument_bytes=int(mem.argument_size_in_bytes),
            output_bytes=int(mem.output_size_in_bytes),
            alias_bytes=int(mem.alias_size_in_bytes),
            temp_bytes=int(mem.temp_size_in_bytes),
            state_and_reference_bytes=int(mem.argument_size_in_bytes) - _nbytes(host_batch) // n,
            global_state_and_reference_bytes=(_nbytes(built.abstract_state) +
                                              _nbytes(reference)))
    one, many = per_device["1"], per_device[str(devices)]
    return dict(fsdp_memory_reduction=round(one["state_and_reference_bytes"] /
                                            many["state_and_reference_bytes"], 3),
                variant=variant, devices=devices, scan=scan, batch_size=batch_size,
                num_classes=num_classes, **per_device)


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def start(variant: str, devices: int, *, scan: bool, batch_size: int, num_classes: int,
          env=None) -> subprocess.Popen:
    """This script in a subprocess, on `devices` host devices (host_devices_env of `env`,
    default os.environ); its JSON comes from `finish`."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--variant={variant}",
           f"--devices={devices}", f"--scan={scan}", f"--batch_size={batch_size}",
           f"--num_classes={num_classes}"]
    return subprocess.Popen(cmd, env=host_devices_env(os.environ if env is None else env,
                                                      devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    """Waits for `start`'s subprocess -> its JSON; RuntimeError with its stderr if it failed."""
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"bench/fsdp_memory.py failed ({proc.returncode}):\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    f = flags.FLAGS
    os.environ.update(host_devices_env(os.environ, f.devices))  # read when the backend starts
    jax.config.update("jax_platforms", "cpu")
    if jax.device_count() < f.devices:
        sys.exit(f"error: --devices={f.devices}, but JAX started with {jax.device_count()} "
                 f"devices; run with XLA_FLAGS={DEVICE_COUNT_FLAG}={f.devices}")
    out = measure(f.variant, f.devices, scan=f.scan, batch_size=f.batch_size,
                  num_classes=f.num_classes)
    for n in ("1", str(f.devices)):
        print(f"{f.variant} on {n} device(s): train state + reference "
              f"{out[n]['state_and_reference_bytes'] / 2**20:.0f} MiB per device, temp "
              f"{out[n]['temp_bytes'] / 2**20:.0f} MiB, compiled in {out[n]['compile_s']} s")
    print(json.dumps(out))


def define_flags():
    """This entry's flags, defined when it runs (bench/train_step.py imports this module
    and has flags of the same names)."""
    flags.DEFINE_string("variant", "So400m/14", "Model variant.")
    flags.DEFINE_integer("devices", 8, "Host devices of the FSDP mesh.")
    flags.DEFINE_bool("scan", True, "config.model.scan (the same per-device state bytes; "
                      "compiles several times faster).")
    flags.DEFINE_integer("batch_size", 8, "Images per step, over all devices.")
    flags.DEFINE_integer("num_classes", 9054, "Target classes (SOP: 9,054).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
