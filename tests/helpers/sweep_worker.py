"""One process of a multi-process sweep worker (run by tests/test_sweep.py).

    python -m tests.helpers.sweep_worker PROCESS_ID NUM_PROCESSES PORT [SWEEP FLAGS]

Run from the repository root; gloo carries the collectives between CPU processes.
"""
import sys

import jax

from infusing_jax import cli
from infusing_jax import sweep

if __name__ == "__main__":
    process_id, num_processes, port = sys.argv[1:4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sys.argv = [sys.argv[0], "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={num_processes}", f"--process_id={process_id}"] + sys.argv[4:]
    cli.run(sweep.main, sweep.define_flags)
