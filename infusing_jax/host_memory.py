"""Host memory: let glibc keep the memory that XLA:CPU frees after every step.

XLA:CPU allocates a step's scratch buffer (activations and gradients, ~2.3 GB for a
B/16 step at batch 8) as one block and frees it when the step ends. glibc serves
such blocks with mmap and hands them back with munmap, so each step page-faults
and zeroes the whole block again: ~550k page faults per B/16 step, a fifth of the
step's time on 2 cores (bench/train_step.py). The glibc tunables below keep freed
memory for reuse (one arena, no mmap, no trimming) and back the heap with
transparent huge pages. The cost: the process's resident memory does not shrink
back after its peak.

glibc reads GLIBC_TUNABLES only when a program starts, so the setting takes a
re-exec of the process: `restart_with_tunables()` at the top of a command.
"""
import os
import platform
import sys

TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=68719476736")


def restart_with_tunables() -> None:
    """Re-executes this process, same command line, with GLIBC_TUNABLES=TUNABLES.

    Returns without doing anything when GLIBC_TUNABLES is already set (even to ''),
    which is also the way to keep your own allocator settings, off glibc Linux, and
    inside IPython (`%run -m infusing_jax.main` in a notebook: a re-exec would
    replace the kernel).
    """
    if ("GLIBC_TUNABLES" in os.environ or platform.libc_ver()[0] != "glibc" or
            "IPython" in sys.modules):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=TUNABLES))
