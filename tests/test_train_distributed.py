"""A real two-process training run (jax.distributed, gloo on 127.0.0.1) against one process."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.helpers import REPO
from tests.helpers import processes
from tests.helpers import train_world

COMMON = ("--config.train.num_steps=6", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.train.progress=False",
          "--config.data.num_shards=2")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


def test_two_processes_give_the_losses_of_one(world, tmp_path):
    one = str(tmp_path / "one")
    single = subprocess.run(
        [sys.executable, "-m", "infusing_jax.main", f"--config={train_world.CONFIG_FILE}:{world}",
         f"--workdir={one}", *COMMON], cwd=REPO, env=_env(2), capture_output=True, text=True,
        timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    two = str(tmp_path / "two")
    port = _free_port()
    procs = [processes.start([sys.executable, "-m", "tests.helpers.train_worker", str(i), "2",
                              str(port), world, two, *COMMON], _env(1)) for i in range(2)]
    for p in procs:
        processes.finish(p, timeout=600)
    a = [m for m in train_world.read_metrics(one) if "loss" in m]
    b = [m for m in train_world.read_metrics(two) if "loss" in m]
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b):
        for key in ("loss", "target/normface", "generic/feature_mse", "grad_norm"):
            if key in x:
                np.testing.assert_allclose(x[key], y[key], rtol=2e-4, err_msg=key)
    with open(os.path.join(two, "train_summary.json")) as f:
        assert json.load(f)["step"] == 6
