"""SigLIP pretraining of the toy world's VLM (infusing_jax/toy/pretrain.py).

  python -m infusing_jax.toy.world --root=WORLD          # the images and captions
  python -m infusing_jax.toy.pretrain --config=configs/toy_pretrain.py:world=WORLD \
      --workdir=WORLD/vlm                                # -> WORLD/vlm/pretrained.npz

steps= sets the length (the quickstart's default; the CI test uses fewer).
"""
from infusing_jax.toy import pretrain
from infusing_jax.training import recipes


def get_config(arg=None):
    a = recipes.parse_arg(arg, world="toy_world", steps="1000")
    c = pretrain.default_config()
    c.pretrain.captions = f"captions:{a['world']}/captions_train.json:train"
    c.pretrain.tokenizer = f"{a['world']}/spm.model"
    c.train.num_steps = int(a["steps"])
    return c
