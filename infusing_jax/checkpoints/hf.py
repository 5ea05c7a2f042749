"""Hugging Face `save_pretrained` directories: SiglipModel, SiglipVisionModel,
CLIPModel, CLIPVisionModelWithProjection (config.json + model.safetensors).

Written without transformers: config.json and preprocessor_config.json are
plain JSON, the weights are safetensors.
"""
import json
import os

import numpy as np
from safetensors import numpy as safetensors_np

from infusing_jax import errors
from infusing_jax import tokenizers
from infusing_jax.data import pil_views
from infusing_jax.checkpoints import mapping
from infusing_jax.checkpoints import state_dict
from infusing_jax.checkpoints.mapping import dense as _dense
from infusing_jax.checkpoints.mapping import layer_norm as _ln
from infusing_jax.checkpoints.mapping import rule

_BLOCK = dict(ln1="layer_norm1", ln2="layer_norm2", q="self_attn.q_proj",
              k="self_attn.k_proj", v="self_attn.v_proj", out="self_attn.out_proj",
              fc1="mlp.fc1", fc2="mlp.fc2")


def _map_head(ours, theirs):
    a = f"{ours}/MultiHeadDotProductAttention_0"
    return [
        rule(f"{ours}/probe", f"{theirs}.probe"),
        rule([f"{a}/{p}/kernel" for p in ("query", "key", "value")],
             f"{theirs}.attention.in_proj_weight", "heads_in"),
        rule([f"{a}/{p}/bias" for p in ("query", "key", "value")],
             f"{theirs}.attention.in_proj_bias", "heads_bias"),
        rule(f"{a}/out/kernel", f"{theirs}.attention.out_proj.weight", "heads_out"),
        rule(f"{a}/out/bias", f"{theirs}.attention.out_proj.bias"),
        *_ln(f"{ours}/LayerNorm_0", f"{theirs}.layernorm"),
        *_dense(f"{ours}/MlpBlock_0/Dense_0", f"{theirs}.mlp.fc1"),
        *_dense(f"{ours}/MlpBlock_0/Dense_1", f"{theirs}.mlp.fc2"),
    ]


def _text_rules():
    return [
        rule("txt/Embed_0/embedding", "text_model.embeddings.token_embedding.weight"),
        rule("txt/pos_embedding", "text_model.embeddings.position_embedding.weight", "pos"),
        *mapping.block_rules("txt/Encoder_0/encoderblock_{i}/",
                             "text_model.encoder.layers.{i}.", _BLOCK),
        *_ln("txt/Encoder_0/encoder_norm", "text_model.final_layer_norm"),
    ]


SIGLIP = [
    rule("img/embedding/kernel", "vision_model.embeddings.patch_embedding.weight", "conv"),
    rule("img/embedding/bias", "vision_model.embeddings.patch_embedding.bias"),
    rule("img/pos_embedding", "vision_model.embeddings.position_embedding.weight", "pos"),
    *mapping.block_rules("img/Transformer/encoderblock_{i}/",
                         "vision_model.encoder.layers.{i}.", _BLOCK),
    *_ln("img/Transformer/encoder_norm", "vision_model.post_layernorm"),
    *_map_head("img/MAPHead_0", "vision_model.head"),
    *_text_rules(),
    *_dense("txt/head", "text_model.head"),
    rule("t", "logit_scale"),
    rule("b", "logit_bias"),
]

CLIP = [
    rule("img/cls", "vision_model.embeddings.class_embedding", "cls"),
    rule("img/embedding/kernel", "vision_model.embeddings.patch_embedding.weight", "conv"),
    rule("img/pos_embedding", "vision_model.embeddings.position_embedding.weight", "pos"),
    *_ln("img/pre_norm", "vision_model.pre_layrnorm"),
    *mapping.block_rules("img/Transformer/encoderblock_{i}/",
                         "vision_model.encoder.layers.{i}.", _BLOCK),
    *_ln("img/Transformer/encoder_norm", "vision_model.post_layernorm"),
    *_dense("img/head", "visual_projection", bias=False),
    *_text_rules(),
    *_dense("txt/head", "text_projection", bias=False),
    rule("t", "logit_scale", "scalar"),
]

TABLES = {"siglip": SIGLIP, "clip": CLIP}

_ACT_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
_ACT_FROM_HF = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
                "quick_gelu": "quick_gelu"}
WEIGHTS = "model.safetensors"


def is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


# transformers' defaults for what a config.json may leave out (it writes only
# non-default values in some versions): heads per tower, vision image size.
_DEFAULT_HEADS = {("siglip", "img"): 12, ("siglip", "txt"): 12, ("clip", "img"): 12,
                  ("clip", "txt"): 8}
_DEFAULT_IMAGE_SIZE = 224
# Buffers some transformers versions saved beside the parameters; not weights.
_BUFFERS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")


def read(path: str):
    """A save_pretrained directory -> (their state dict, hints for config inference)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise errors.UserError(f"{path}/config.json: not a readable JSON file ({e}); "
                               "re-save the model with save_pretrained") from None
    if not isinstance(cfg, dict):
        raise errors.UserError(f"{path}/config.json: not a model config (a JSON object); "
                               "re-save the model with save_pretrained")
    model_type = cfg.get("model_type", "")
    family = model_type.split("_")[0]
    if family == "siglip2":
        raise errors.UserError(f"{path}/config.json: model_type {model_type!r} is SigLIP 2's "
                               "NaFlex (variable resolution), which is not supported; use a "
                               "fixed-resolution SigLIP 2 (model_type 'siglip', e.g. "
                               "google/siglip2-base-patch16-224)")
    if family not in TABLES:
        raise errors.UserError(f"{path}/config.json: model_type {model_type!r} is not a SigLIP "
                         "or CLIP model")
    weights = os.path.join(path, WEIGHTS)
    if not os.path.exists(weights):
        raise errors.UserError(f"{path}: no {WEIGHTS}; re-save the model with "
                         "save_pretrained(safe_serialization=True)")
    theirs = {k: v for k, v in state_dict.read_safetensors(weights).items()
              if k not in _BUFFERS}
    vision_only = "vision" in model_type
    towers = {"img": cfg.get("vision_config", cfg if vision_only else {}),
              "txt": None if vision_only else cfg.get("text_config", {})}
    hints = dict(family=family,
                 image_size=towers["img"].get("image_size", _DEFAULT_IMAGE_SIZE))
    for tower, c in towers.items():
        if c is None:
            continue
        act = c.get("hidden_act")
        if act is not None and act not in _ACT_FROM_HF:
            raise errors.UserError(f"{path}/config.json: hidden_act {act!r} is not supported; "
                             f"expected one of {sorted(_ACT_FROM_HF)}")
        hints[tower] = dict(num_heads=c.get("num_attention_heads", _DEFAULT_HEADS[family, tower]),
                            act=_ACT_FROM_HF.get(act), ln_eps=c.get("layer_norm_eps"))
    return theirs, hints


def _tower_config(tower, act, ln_eps):
    return dict(hidden_size=tower.width, intermediate_size=tower.mlp_dim,
                num_hidden_layers=tower.depth, num_attention_heads=tower.num_heads,
                hidden_act=_ACT_TO_HF[act], layer_norm_eps=ln_eps)


def hf_config(cfg, tower_arch) -> dict:
    """config.json for a model config. tower_arch: the two resolved tower dicts."""
    img, txt = tower_arch
    vision = dict(_tower_config(cfg.image, img["act"], img["ln_eps"]),
                  image_size=cfg.image_size, patch_size=cfg.image.patch_size, num_channels=3)
    if cfg.family == "clip":
        vision["projection_dim"] = cfg.image.out_dim
    else:
        vision["vision_use_head"] = cfg.image.pool_type == "map"
    if cfg.get("text") is None:
        arch = {"siglip": "SiglipVisionModel", "clip": "CLIPVisionModelWithProjection"}
        return dict(vision, architectures=[arch[cfg.family]],
                    model_type=f"{cfg.family}_vision_model")
    text = dict(_tower_config(cfg.text, txt["act"], txt["ln_eps"]),
                vocab_size=cfg.text.vocab_size, max_position_embeddings=cfg.text.seq_len)
    if cfg.family == "clip":
        text.update(projection_dim=cfg.text.out_dim, eos_token_id=cfg.text.vocab_size - 1,
                    bos_token_id=cfg.text.vocab_size - 2, pad_token_id=0)
        out = dict(architectures=["CLIPModel"], model_type="clip",
                   projection_dim=cfg.text.out_dim, logit_scale_init_value=2.6592)
    else:
        text["projection_size"] = cfg.text.out_dim
        if tokenizers.convention(cfg) == "siglip2":  # Gemma's special ids, as the hub's
            text.update(pad_token_id=0, eos_token_id=1, bos_token_id=2)
        out = dict(architectures=["SiglipModel"], model_type="siglip")
    return dict(out, vision_config=vision, text_config=text)


def preprocessor_config(cfg) -> dict:
    """preprocessor_config.json: the family's eval preprocessing at the model's resolution."""
    s = cfg.image_size
    if cfg.family == "clip":
        return dict(image_processor_type="CLIPImageProcessor", do_resize=True,
                    size={"shortest_edge": s}, do_center_crop=True,
                    crop_size={"height": s, "width": s}, resample=3, do_rescale=True,
                    rescale_factor=1 / 255, do_normalize=True, image_mean=list(pil_views.CLIP_MEAN),
                    image_std=list(pil_views.CLIP_STD), do_convert_rgb=True)
    return dict(image_processor_type="SiglipImageProcessor", do_resize=True,
                size={"height": s, "width": s}, resample=2, do_rescale=True,
                rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                image_std=[0.5] * 3)


def write(path: str, theirs: dict, config: dict, preprocessor: dict):
    os.makedirs(path, exist_ok=True)
    tensors = {k: np.asarray(v, order="C") for k, v in theirs.items()}
    safetensors_np.save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    for name, obj in (("config.json", config), ("preprocessor_config.json", preprocessor)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f, indent=2)
