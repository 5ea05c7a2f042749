"""The input pipeline over 8 CPU devices, and as a real two-process run (gloo on 127.0.0.1)."""
import json
import os
import socket
import subprocess
import sys

from tests.helpers import REPO
from tests.helpers import processes

WORKER = [sys.executable, "-m", "tests.helpers.data_worker"]
STEPS = 4


def _env(devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_feed_the_global_batch_one_process_would():
    single = subprocess.run([*WORKER, "0", "1", "0", str(STEPS)], cwd=REPO, env=_env(8),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    reference = json.loads(single.stdout.strip().splitlines()[-1])
    assert reference[0]["devices"] == 8 and reference[0]["shape"] == [8, 8, 8, 3]

    port = _free_port()
    procs = [processes.start([*WORKER, str(i), "2", str(port), str(STEPS)], _env(4))
             for i in range(2)]
    results = []
    for p in procs:
        stdout, _ = processes.finish(p, timeout=300)
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    for step in range(STEPS):
        ref = reference[step]
        for r in results:  # every process sees the same global reductions
            assert r[step]["devices"] == 8 and r[step]["shape"] == [8, 8, 8, 3]
            assert abs(r[step]["image_sum"] - ref["image_sum"]) <= 1e-3 * abs(ref["image_sum"])
            assert r[step]["label_sum"] == ref["label_sum"]
        ids = [r[step]["ids"] for r in results]
        assert not set(ids[0]) & set(ids[1])  # each process read only its shard
        assert sorted(ids[0] + ids[1]) == ref["ids"]
