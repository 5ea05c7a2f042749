"""SigLIP pretraining of the toy world's VLM (infusing_jax/toy/pretrain.py), before
configs/toy.py fine-tunes it. Usage and the :ARG keys: configs/README.md.
"""
from infusing_jax.toy import pretrain
from infusing_jax.training import recipes


def get_config(arg=None):
    arg = recipes.parse_arg(arg, world="toy_world", steps=1000)
    c = pretrain.default_config()
    c.pretrain.captions = f"captions:{arg.world}/captions_train.json:train"
    c.pretrain.tokenizer = f"{arg.world}/spm.model"
    c.train.num_steps = arg.steps
    return c
