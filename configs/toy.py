"""Fine-tuning the toy world's VLM on its fine-grained domain (the quickstart).

  python -m infusing_jax.main --config=configs/toy.py:method=full,world=WORLD \
      --workdir=runs/full

method: full (NormFace + feature distillation on generic images + anchoring, the
paper's method) | naive (NormFace only). world: the folder toy_world.make wrote,
with the pretrained two-tower at WORLD/vlm/pretrained.npz (configs/toy_pretrain.py).
Tests at the end: the glyph classes never seen in training (in-domain), generic
image retrieval by colour + shape, caption retrieval both ways and zero-shot
colour + shape classification with the frozen text tower.
"""
from infusing_jax.training import recipes


def get_config(arg=None):
    a = recipes.parse_arg(arg, method="full", world="toy_world", steps="400")
    return recipes.toy_config(a["method"], a["world"], int(a["steps"]))
