"""Files that may live on a remote filesystem (gs://, ...), read through tf.io.gfile.

TensorFlow is imported only for such paths, so that local checkpoints and
tokenizers load where TensorFlow is not installed (e.g. a GPU image with JAX only).
"""
import os


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
