"""big_vision `.npz` checkpoints: a flat dict of '/'-joined parameter paths.

Accepts an optional `params/` root, a `file.npz:img` sub-tree suffix, bfloat16
arrays stored as 2-byte numpy void, and both the scan and unrolled layouts.
Never unpickles (allow_pickle=False).
"""
import os

import ml_dtypes
import numpy as np

from infusing_jax import errors
from infusing_jax import paths
from infusing_jax.checkpoints import tree

_TWO_TOWER_ROOTS = ("img", "txt", "t", "b", "temperature")


def split_path(path: str):
    """'dir/file.npz:img' -> ('dir/file.npz', 'img'); no suffix -> (path, '')."""
    head, sep, sub = path.rpartition(":")
    if sep and head.endswith(".npz"):
        return head, sub.strip("/")
    return path, ""


def is_npz(path: str) -> bool:
    return split_path(path)[0].endswith(".npz")


def _decode(key, value, file):
    if value.dtype.kind == "V" and value.dtype.itemsize == 2:
        return value.view(ml_dtypes.bfloat16)
    if value.dtype.kind not in "fiub":
        raise errors.UserError(f"{file}: array {key!r} has dtype {value.dtype}; expected numbers")
    return value


def read_arrays(path: str) -> dict:
    """'file.npz[:sub/tree]' -> the file's arrays by key, bfloat16 decoded (local or
    remote, e.g. gs://big_vision/...)."""
    file, _ = split_path(path)
    if not paths.exists(file):
        raise errors.UserError(f"{file}: no such checkpoint file")
    return {k: _decode(k, v, file) for k, v in paths.read_npz(file).items()}


def read(path: str) -> dict:
    """'file.npz[:sub/tree]' -> canonical flat params ('img/...', 'txt/...', 't', 'b')."""
    return canonical(read_arrays(path), path)


def canonical(flat: dict, path: str) -> dict:
    """A big_vision file's arrays -> canonical flat params.

    A file with a `params/` sub-tree (e.g. a training state with `opt/` beside
    it) is read from that sub-tree; 'file.npz:sub' reads the sub-tree `sub`.
    """
    file, sub = split_path(path)
    if any(k.startswith("params/") for k in flat):
        flat = {k[len("params/"):]: v for k, v in flat.items() if k.startswith("params/")}
    if sub:
        prefix = sub + "/"
        flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        if not flat:
            raise errors.UserError(f"{path}: no parameters under {sub!r} in {file}")
    scanned = {k.replace("/encoderblock/", "/") for k in flat if "/encoderblock/" in k}
    if scanned and any("/encoderblock_" in k for k in flat):
        raise errors.UserError(f"{file}: holds both the scan ('encoderblock/') and unrolled "
                         "('encoderblock_N/') layouts; keep one")
    flat = tree.unroll_scan(flat)
    if not any(k.split("/")[0] in _TWO_TOWER_ROOTS for k in flat):
        flat = {f"img/{k}": v for k, v in flat.items()}  # a lone image tower
    if "img/embedding/kernel" not in flat:
        raise errors.UserError(f"{path}: no image tower (img/embedding/kernel); name a sub-tree "
                         "with file.npz:SUB if the model is nested")
    if flat["img/embedding/kernel"].ndim == 2:
        raise errors.UserError(f"{path}: a NaFlex image tower (a Dense patch embedding over "
                               "flattened patches, SigLIP 2's variable resolution), which is "
                               "not supported; use a fixed-resolution SigLIP 2 checkpoint "
                               "(e.g. siglip2_b16_224.npz)")
    return flat


def write(path: str, flat: dict, scan: bool = False):
    """Canonical flat params -> `.npz` (the scan layout if `scan`)."""
    if not path.endswith(".npz"):
        raise errors.UserError(f"{path}: a big_vision checkpoint file must end in .npz")
    if scan:
        flat = tree.roll_scan(flat)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})
