"""One process of a multi-process training run (run by test_train_distributed.py).

    python tests/train_worker.py PROCESS_ID NUM_PROCESSES PORT ROOT WORKDIR [--config.F=V ...]
"""
import sys

import jax

from infusing_jax import cli
from infusing_jax import main

if __name__ == "__main__":
    process_id, num_processes, port, root, workdir = sys.argv[1:6]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sys.argv = [sys.argv[0], f"--config=tests/world_config.py:{root}", f"--workdir={workdir}",
                "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={num_processes}", f"--process_id={process_id}"] + sys.argv[6:]
    cli.run(main.main)
