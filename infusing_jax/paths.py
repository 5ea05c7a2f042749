"""Files that may live on a remote filesystem (gs://, ...), read through tf.io.gfile.

TensorFlow is imported only for such paths, so that local checkpoints and
tokenizers load where TensorFlow is not installed (e.g. a GPU image with JAX only).
"""
import os
import zipfile

import numpy as np

from infusing_jax import errors


def is_remote(path: str) -> bool:
    """'gs://bucket/x', 'ram://x' (any scheme://) -> True; local paths -> False."""
    return "://" in os.fspath(path)


def exists(path: str) -> bool:
    if is_remote(path):
        import tensorflow as tf
        return tf.io.gfile.exists(path)
    return os.path.exists(path)


def open_binary(path: str):
    """A seekable binary file object for reading `path`."""
    if is_remote(path):
        import tensorflow as tf
        return tf.io.gfile.GFile(path, "rb")
    return open(path, "rb")


def read_npz(path: str) -> dict:
    """{name: array} of a local or remote .npz archive, never unpickling; one
    errors.UserError naming the file where it is no readable archive of plain arrays
    (another kind of file, a single .npy array, truncated, pickled objects)."""
    try:
        with open_binary(path) as f:
            head = f.read(6)
            if head.startswith(b"\x93NUMPY"):
                raise errors.UserError(f"{path}: holds a single array, not a .npz archive of "
                                       "named arrays")
            if not head.startswith(b"PK"):
                raise errors.UserError(f"{path}: not a readable .npz archive (not a zip file)")
            f.seek(0)
            with np.load(f, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
    except ValueError as e:
        if isinstance(e, errors.UserError):
            raise
        if "allow_pickle" in str(e):
            raise errors.UserError(f"{path}: refused, it holds pickled Python objects, and "
                                   "loading them could run code; save plain arrays instead"
                                   ) from None
        raise errors.UserError(f"{path}: not a readable .npz archive ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise errors.UserError(f"{path}: not a readable .npz archive "
                               f"({getattr(e, 'strerror', None) or e})") from None
