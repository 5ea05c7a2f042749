"""The one example schema every source yields (a dict of tensors in tf.data).

  image:        tf.string, the encoded image file (decoded later, in the pipeline)
  label:        tf.int64, the class; -1 where the set has none (caption sets)
  coarse_label: tf.int64, a coarser class (SOP super-class, iNat higher taxon,
                Pets species); -1 where the dataset has none
  domain:       tf.int64, the index of the domain in the run's config
  id:           tf.string, a stable example id (the same across runs and machines)
  captions:     tf.string (num_captions,), only in image-text sets
"""
import dataclasses
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

NO_LABEL = -1


@dataclasses.dataclass(frozen=True)
class SplitData:
    """One split of one source.

    `dataset(shard_index, num_shards)` -> tf.data.Dataset of schema dicts
    (without 'domain'), the examples of that shard only, in a fixed order.
    `num_examples` counts the whole split (None where counting needs a full
    read, e.g. a filtered TFDS split); `num_classes` the label range (labels
    are 0..num_classes-1), 0 where there are none. `labels` and `ids`
    (num_examples,) are there when known without a pass (file sources).
    `unread(shard_index, num_shards)`, where a source can read its images later
    (file sources): the same examples as `dataset`, in the same order, but with
    'image' what `read` (tf.string -> tf.string) turns into the encoded file, e.g.
    its path; the training pipeline reads them a chunk at a time.
    """
    name: str
    num_examples: Optional[int]
    num_classes: int
    num_coarse_classes: int
    dataset: Callable[[int, int], tf.data.Dataset]
    has_captions: bool = False
    labels: Optional[np.ndarray] = None
    ids: Optional[np.ndarray] = None
    unread: Optional[Callable[[int, int], tf.data.Dataset]] = None
    read: Optional[Callable] = None
