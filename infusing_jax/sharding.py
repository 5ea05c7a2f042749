"""Where arrays live: one 1-D 'data' mesh over every device of every process.

Batches are split over 'data' (data parallelism): each process passes its own
share of the global batch (`global_batch`). With FSDP, every parameter-sized
array (parameters, optimiser moments, EMA, the frozen reference) is also split
over 'data', along its largest axis that the device count divides; the compiler
all-gathers it for the forward pass and reduce-scatters its gradient (ZeRO-3).
Without FSDP they are replicated.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of every process), axis 'data'."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (example) axis over 'data'."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's numpy/tf batch -> global arrays sharded on their leading axis.

    Each process passes its own share (global batch / process count); string
    fields (ids) stay on the host and are returned as numpy arrays. With one process
    the share is the whole batch, placed in one `device_put` (half the host time).
    """
    host = {k: np.asarray(v) for k, v in batch.items()}
    numeric = {k: v for k, v in host.items() if v.dtype.kind not in "SUO"}
    if jax.process_count() == 1:
        placed = jax.device_put(numeric, batch_sharding(mesh))
    else:
        placed = {k: jax.make_array_from_process_local_data(batch_sharding(mesh), v)
                  for k, v in numeric.items()}
    return {k: placed.get(k, v) for k, v in host.items()}


def fsdp_spec(shape, num_devices: int) -> PartitionSpec:
    """Split the largest axis that `num_devices` divides; replicate if none does."""
    axes = [i for i in np.argsort(shape)[::-1] if shape[i] % num_devices == 0 and shape[i] > 1]
    if num_devices == 1 or not axes:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[axes[0]] = DATA_AXIS
    return PartitionSpec(*spec)


def state_shardings(abstract_state, mesh: Mesh, fsdp: bool):
    """A tree of NamedShardings like `abstract_state` (a tree of ShapeDtypeStructs)."""
    def one(x):
        shape = getattr(x, "shape", ())
        spec = fsdp_spec(shape, mesh.size) if fsdp and len(shape) else PartitionSpec()
        return NamedSharding(mesh, spec)
    return jax.tree.map(one, abstract_state)
