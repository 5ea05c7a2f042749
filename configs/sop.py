"""The paper's recipe (infusing_jax/recipes.py) with this target domain:
Stanford Online Products (UnED splits).

  python -m infusing_jax.main --workdir=DIR \
      --config=configs/sop.py:method=full,family=siglip,data=/data,checkpoints=/ckpt

method: full (the paper's method) | naive (the baseline); family: siglip (B/16 224,
big_vision) | clip (B/16, a Hugging Face directory). recipes.py lists the files
expected under data= and checkpoints=; tests=target+imagenet+flickr30k+coco+zero_shot
(the default) or a subset picks the test sets; any field can be overridden with
--config.F=V.
"""
from infusing_jax.training import recipes


def get_config(arg=None):
    return recipes.config_file("sop", arg)
