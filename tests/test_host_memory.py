"""host_memory: the command restarts once with glibc tunables that keep freed memory."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from infusing_jax import host_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

# Allocates and frees a 256 MB block 4 times; prints the page faults of each round.
_SCRIPT = textwrap.dedent("""
    import os, resource, sys, types
    import numpy as np
    from infusing_jax import host_memory
    if len(sys.argv) > 1:  # as if inside IPython
        sys.modules["IPython"] = types.ModuleType("IPython")
    print("start", os.environ.get("GLIBC_TUNABLES"), flush=True)
    host_memory.restart_with_tunables()
    faults = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = np.ones(64 * 2**20, np.float32)
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print("faults", *faults)
""")


def _run(tmp_path, env_tunables=None, ipython=False):
    script = tmp_path / "child.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if env_tunables is not None:
        env["GLIBC_TUNABLES"] = env_tunables
    args = [sys.executable, str(script)] + (["ipython"] if ipython else [])
    out = subprocess.run(args, env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    starts = [line.split(" ", 1)[1] for line in out if line.startswith("start")]
    faults = [int(x) for x in out[-1].split()[1:]]
    return starts, faults


def test_restarts_once_and_then_reuses_freed_memory(tmp_path):
    starts, faults = _run(tmp_path)
    assert starts == ["None", host_memory.TUNABLES]
    # The first round maps the block; later rounds reuse it without a page fault.
    assert faults[0] > 0 and faults[1:] == [0, 0, 0], faults


def test_own_setting_kept_and_glibc_default_refaults(tmp_path):
    starts, faults = _run(tmp_path, env_tunables="")
    assert starts == [""]
    # glibc's default serves the block with mmap and unmaps it on free: every round faults.
    assert all(f > 0 for f in faults), faults


def test_no_restart_inside_ipython(tmp_path):
    starts, _ = _run(tmp_path, ipython=True)
    assert starts == ["None"]
