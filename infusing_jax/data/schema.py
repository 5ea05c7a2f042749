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

import tensorflow as tf

NO_LABEL = -1


@dataclasses.dataclass(frozen=True)
class SplitData:
    """One split of one source.

    `dataset(shard_index, num_shards)` -> tf.data.Dataset of schema dicts
    (without 'domain'), the examples of that shard only, in a fixed order.
    `num_examples` counts the whole split; `num_classes` the label range
    (labels are 0..num_classes-1), 0 where there are none.
    """
    name: str
    num_examples: int
    num_classes: int
    num_coarse_classes: int
    dataset: Callable[[int, int], tf.data.Dataset]
    has_captions: bool = False
    labels: Optional[object] = None  # np.ndarray (num_examples,) when known without a pass
