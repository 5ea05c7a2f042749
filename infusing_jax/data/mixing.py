"""How the training domains share the steps: the mixes and their sampling probabilities.

  round_robin   domain i % D at step i (the authors' way)
  balanced      each domain with probability 1 / D
  dataset_size  each domain in proportion to its number of train examples
  weights       each domain in proportion to its `weight`

With one domain per batch the mix chooses each batch's domain, else each
example's (pipeline.choices). No TensorFlow here: the run config checks its
`data.mix` against MIXES.
"""
from typing import Sequence

import numpy as np

from infusing_jax import errors

MIXES = ("round_robin", "balanced", "dataset_size", "weights")


def weights(domains: Sequence, mix: str) -> np.ndarray:
    """Sampling probabilities (D,) of the domains (each with `name`, `weight` and
    `split.num_examples`) under a mix; round_robin alternates, its are uniform."""
    if mix in ("balanced", "round_robin"):
        w = np.ones(len(domains))
    elif mix == "dataset_size":
        unknown = [d.name for d in domains if d.split.num_examples is None]
        if unknown:
            raise errors.UserError(f"config.data.mix: 'dataset_size' weighs domains by their "
                                   f"sizes, and the sizes of {unknown} are unknown (filtered "
                                   "TFDS splits); use mix 'weights' with domain weights")
        w = np.array([d.split.num_examples for d in domains], np.float64)
    elif mix == "weights":
        w = np.array([d.weight for d in domains], np.float64)
    else:
        raise errors.UserError(f"config.data.mix: unknown mix {mix!r}; use one of {MIXES}")
    if np.any(w < 0) or w.sum() <= 0:
        raise errors.UserError(f"config.data.mix: {mix!r} with domain weights {w.tolist()}; "
                               "give weights >= 0, not all 0")
    return w / w.sum()
