"""Fake splits of in-memory JPEGs and a small train view, for the input pipeline tests."""
import io

import numpy as np
import tensorflow as tf
from PIL import Image

from infusing_jax.data import pipeline
from infusing_jax.data import schema
from infusing_jax.data import tf_views

SIZE = 8  # the side of the views' output images


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (value, 255 - value, (7 * value) % 256)).save(buf, "JPEG")
    return buf.getvalue()


def fake_split(name, num, num_classes, broken=()):
    """A SplitData over in-memory JPEGs; indices in `broken` hold garbage bytes."""
    images = [b"not an image" if i in broken else _jpeg(i * 5 % 256) for i in range(num)]
    labels = np.arange(num) % num_classes

    def dataset(shard_index, num_shards):
        ds = tf.data.Dataset.from_tensor_slices(dict(
            image=images, label=labels.astype(np.int64),
            coarse_label=np.full(num, schema.NO_LABEL, np.int64),
            id=[f"{name}/{i}" for i in range(num)]))
        return ds.shard(num_shards, shard_index)

    return schema.SplitData(name=name, num_examples=num, num_classes=num_classes,
                            num_coarse_classes=0, dataset=dataset)


def augment(image, seed, crop=SIZE):
    """Resize to SIZE + 2, random crop of crop x crop, random flip."""
    image = tf.image.resize(tf.cast(image, tf.float32), (SIZE + 2, SIZE + 2))
    image = tf.image.stateless_random_crop(image, (crop, crop, 3), seed=seed)
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


preprocess = tf_views.View(
    augment=augment,
    decode=lambda image_bytes: tf.io.decode_image(image_bytes, channels=3,
                                                  expand_animations=False))


def two_domains(broken=()):
    """target (30 images, 5 classes, weight 3; `broken` indices undecodable) and
    generic (50 images, 10 classes, weight 1)."""
    return [pipeline.Domain("target", fake_split("target", 30, 5, broken), weight=3.0),
            pipeline.Domain("generic", fake_split("generic", 50, 10), weight=1.0)]
