"""One process of the multi-process input test (run by test_data_multiprocess.py).

    python -m tests.helpers.data_worker PROCESS_ID NUM_PROCESSES PORT STEPS   (from the repo root)

With NUM_PROCESSES=1 it simulates both shares of a 2-process run in one process.
Prints one JSON line: per step, the global sums of images and labels computed on
the device mesh, and the ids this process fed.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from infusing_jax import sharding
from infusing_jax.data import pipeline
from tests.helpers.fake_data import preprocess, two_domains

SHARES = 2  # the run being reproduced has two processes


def main(process_id, num_processes, port, steps):
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    mesh = sharding.make_mesh()
    reduce = jax.jit(lambda b: (jnp.sum(b["image"]), jnp.sum(b["label"])))
    shares = [process_id] if num_processes > 1 else list(range(SHARES))
    iters = [iter(pipeline.train_dataset(two_domains(), preprocess, global_batch_size=8, seed=5,
                                         process_index=s, process_count=SHARES,
                                         shuffle_buffer=32)) for s in shares]
    out = []
    for _ in range(steps):
        parts = [{k: v.numpy() for k, v in next(it).items()} for it in iters]
        local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        batch = sharding.global_batch(local, mesh)
        image_sum, label_sum = reduce({k: batch[k] for k in ("image", "label")})
        out.append(dict(image_sum=float(image_sum), label_sum=int(label_sum),
                        ids=sorted(x.decode() for x in local["id"]),
                        devices=len(mesh.devices.reshape(-1)),
                        shape=list(batch["image"].shape)))
    print(json.dumps(out))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:5]))
