"""From per-process tf.data batches to global jax.Arrays sharded over a device mesh."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices (of every process), axis 'data'."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's numpy/tf batch -> global arrays sharded on their leading axis.

    Each process passes its own share (global batch / process count); string
    fields (ids) stay on the host and are returned as numpy arrays.
    """
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "SUO":
            out[key] = value
        else:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
