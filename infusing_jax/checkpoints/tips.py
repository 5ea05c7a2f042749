"""TIPS (google-deepmind/tips), v1 and v2, in their two `.npz` layouts: the image tower in
`X_vision.npz`, the text tower and its temperature in `X_text.npz` beside it.

Scenic (`tips_oss_*_vision.npz`, `tips_v2_*_vision.npz`): flax's flat '/'-joined
tree of `VisionEncoder`, our canonical tree under other names:

  encoder/ToTokenSequence_0/{embedding/{kernel,bias}, posembed_input (1, G, G, W),
  cls (1, 2, W)}, encoder/transformer/encoderblock_i/{LayerNorm_0, LayerNorm_1,
  MultiHeadDotProductAttention_0/..., MlpBlock_0/Dense_{0,1} | FFNSwiGluFused_0/
  Dense_{0,1,2}}, encoder/encoder_norm.

PyTorch (the files `pytorch/image_encoder.py` loads with block_chunks=0): a
DINOv2-style state dict, as their `.npz` of arrays or as a `.pth` / `.bin` /
`.safetensors` state-dict file. cls_token (1, 1, W) plus register_tokens
(1, 1, W) are our two cls tokens; pos_embed (1, 1 + G*G, W) also covers the first
one, whose entry is folded into it (Scenic's cls tokens have no position);
blocks.i.attn.qkv is q, k, v fused; LayerScale ls1 / ls2 gammas are folded into
the attention's and the MLP's output layers; mlp.w12 (SwiGLU) is Dense_0 and
Dense_1 stacked; mask_token (masked training only) is dropped. The PyTorch code
runs the exact GELU (Scenic: tanh), so such a file loads with act 'gelu'.
Writing gives gammas of 1 and a zero first position: a file of that form (a
conversion of a Scenic file) round-trips bit-exactly.
"""
import numpy as np

from infusing_jax import errors
from infusing_jax.checkpoints import mapping

_TOKENS = "encoder/ToTokenSequence_0/"
_SCENIC_NAMES = {  # ours -> Scenic's, outside the blocks
    "img/embedding/kernel": _TOKENS + "embedding/kernel",
    "img/embedding/bias": _TOKENS + "embedding/bias",
    "img/pos_embedding": _TOKENS + "posembed_input",
    "img/cls": _TOKENS + "cls",
    "img/Transformer/encoder_norm/scale": "encoder/encoder_norm/scale",
    "img/Transformer/encoder_norm/bias": "encoder/encoder_norm/bias",
}
_BLOCKS = ("img/Transformer/", "encoder/transformer/")
# TIPS's PyTorch files store no head count: by width (S, B, L, So400m, g).
PYTORCH_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16, 1536: 24}


def layout(keys) -> str:
    """'scenic', 'pytorch', 'text' (a text tower's file) or '' for the keys of an .npz."""
    keys = set(keys)
    if _TOKENS + "embedding/kernel" in keys:
        return "scenic"
    if {"patch_embed.proj.weight", "cls_token", "pos_embed"} <= keys:
        return "pytorch"
    if text_layout(keys):
        return "text"
    return ""


def _swiglu(flat, prefix) -> bool:
    return any(k.startswith(prefix) and "/FFNSwiGluFused_0/" in k for k in flat) or any(
        k.startswith(prefix) and "/MlpBlock_0/Dense_2/" in k for k in flat)


def from_scenic(theirs: dict, where: str):
    """Scenic's flat vision params -> (canonical flat, hints)."""
    flat = {}
    for key, value in theirs.items():
        ours = next((o for o, t in _SCENIC_NAMES.items() if t == key), None)
        if ours is None and key.startswith(_BLOCKS[1]):
            ours = _BLOCKS[0] + key[len(_BLOCKS[1]):].replace("FFNSwiGluFused_0", "MlpBlock_0")
        if ours is None:
            raise errors.UserError(f"{where}: parameter {key!r} is not part of a TIPS vision "
                                   "encoder (a _text.npz file holds the text tower)")
        flat[ours] = value
    for ours, theirs_key in _SCENIC_NAMES.items():
        if ours not in flat and not ours.endswith("/bias"):
            raise errors.UserError(f"{where}: parameter {theirs_key!r} is missing; not a "
                                   "complete TIPS vision encoder")
    return flat, _hints(flat, act=None)


def to_scenic(flat: dict) -> dict:
    """Canonical flat image-tower params -> Scenic's flat keys."""
    swiglu = _swiglu(flat, _BLOCKS[0])
    out = {}
    for key, value in flat.items():
        if key in _SCENIC_NAMES:
            out[_SCENIC_NAMES[key]] = value
        elif key.startswith(_BLOCKS[0]):
            theirs = _BLOCKS[1] + key[len(_BLOCKS[0]):]
            out[theirs.replace("MlpBlock_0", "FFNSwiGluFused_0") if swiglu else theirs] = value
        else:
            raise errors.UserError(f"TIPS export: parameter {key!r} has no place in a TIPS "
                                   "vision encoder")
    return out


def _hints(flat, act):
    grid = flat["img/pos_embedding"].shape[1]
    patch = flat["img/embedding/kernel"].shape[0]
    return dict(family="tips", image_size=grid * patch, img=dict(act=act))


def from_pytorch(theirs: dict, where: str):
    """TIPS's PyTorch state dict (numpy arrays) -> (canonical flat, hints)."""
    try:
        return _from_pytorch(theirs)
    except KeyError as e:
        raise errors.UserError(f"{where}: parameter {e.args[0]!r} is missing; not a complete "
                               "TIPS PyTorch image encoder") from None
    except errors.UserError as e:
        raise errors.UserError(f"{where}: {e}") from None


def _from_pytorch(t):
    folded = _folded(t)
    width = folded["cls"].shape[-1]
    heads = PYTORCH_HEADS.get(width, max(1, width // 64))
    swiglu = any(k.endswith(".mlp.w12.weight") for k in folded)
    flat = mapping.import_(_pytorch_table(swiglu), folded, {"img": heads}, "TIPS PyTorch")
    hints = _hints(flat, act=None if swiglu else "gelu")
    hints["img"]["num_heads"] = heads
    return flat, hints


def _pytorch_table(swiglu: bool) -> list:
    """Our image tower <-> their state dict as `_folded` leaves it: 'cls' and 'pos_grid' for
    the cls tokens and the position grid, the blocks as mapping.block_rules (the SwiGLU's
    Dense_0 and Dense_1 stacked in mlp.w12, Dense_2 in mlp.w3)."""
    names = dict(ln1="norm1", ln2="norm2", qkv="attn.qkv", out="attn.proj", fc1="mlp.fc1",
                 fc2="mlp.fc2")
    blocks = mapping.block_rules("img/Transformer/encoderblock_{i}/", "blocks.{i}.", names)
    if swiglu:
        mlp = "img/Transformer/encoderblock_{i}/MlpBlock_0/"
        blocks = [r for r in blocks if "/MlpBlock_0/" not in r.ours[0]] + [
            mapping.rule([f"{mlp}Dense_0/kernel", f"{mlp}Dense_1/kernel"],
                         "blocks.{i}.mlp.w12.weight", "linear"),
            mapping.rule([f"{mlp}Dense_0/bias", f"{mlp}Dense_1/bias"], "blocks.{i}.mlp.w12.bias"),
            *mapping.dense(f"{mlp}Dense_2", "blocks.{i}.mlp.w3")]
    return [mapping.rule("img/embedding/kernel", "patch_embed.proj.weight", "conv"),
            mapping.rule("img/embedding/bias", "patch_embed.proj.bias"),
            mapping.rule("img/cls", "cls"), mapping.rule("img/pos_embedding", "pos_grid"),
            *mapping.layer_norm("img/Transformer/encoder_norm", "norm"), *blocks]


def _folded(t: dict) -> dict:
    """Their image state dict, float32, with what Scenic's tree has no place for folded in:
    each LayerScale gamma into the output layer it scales, pos_embed's first entry into
    cls_token, which with register_tokens becomes 'cls' (1, 2, W); pos_embed's grid as
    'pos_grid' (1, G, G, W); mask_token (masked training only) dropped."""
    t = {k: np.asarray(v, np.float32) for k, v in t.items()}
    pos = t.pop("pos_embed")
    grid = int(round(np.sqrt(pos.shape[1] - 1)))
    if pos.ndim != 3 or grid * grid + 1 != pos.shape[1]:
        raise errors.UserError(f"pos_embed has shape {pos.shape}; TIPS's is (1, 1 + G*G, "
                               "width) for a G x G grid")
    t["cls"] = np.concatenate([t.pop("cls_token") + pos[:, :1], t.pop("register_tokens")], 1)
    t["pos_grid"] = pos[:, 1:].reshape(1, grid, grid, pos.shape[-1])
    t.pop("mask_token", None)
    for key in [k for k in t if k.endswith((".ls1.gamma", ".ls2.gamma"))]:
        gamma, block = t.pop(key), key.rsplit(".", 2)[0]
        out = (f"{block}.attn.proj" if key.endswith(".ls1.gamma") else
               f"{block}.mlp.w3" if f"{block}.mlp.w3.weight" in t else f"{block}.mlp.fc2")
        t[out + ".weight"] = t[out + ".weight"] * gamma[:, None]
        t[out + ".bias"] = t[out + ".bias"] * gamma
    return t


def to_pytorch(flat: dict) -> dict:
    """Canonical flat image-tower params -> TIPS's PyTorch state dict (LayerScale gammas of
    1, a zero position for the first cls token, a zero mask_token)."""
    t = mapping.export(_pytorch_table(_swiglu(flat, _BLOCKS[0])), flat, "TIPS PyTorch export")
    cls, grid = t.pop("cls"), t.pop("pos_grid")
    width = cls.shape[-1]
    t.update(cls_token=cls[:, :1], register_tokens=cls[:, 1:],
             pos_embed=np.concatenate([np.zeros((1, 1, width), grid.dtype),
                                       grid.reshape(1, -1, width)], axis=1),
             mask_token=np.zeros((1, width), grid.dtype))
    for block in {".".join(k.split(".")[:2]) for k in t if k.startswith("blocks.")}:
        for scale in ("ls1", "ls2"):
            t[f"{block}.{scale}.gamma"] = np.ones(width, grid.dtype)
    return {k: np.ascontiguousarray(v) for k, v in t.items()}


# The text tower, in the `*_text.npz` file beside the vision one. Ours: txt/Embed_0,
# txt/Encoder_0/encoderblock_i/..., txt/Encoder_0/encoder_norm, and 'temperature'.
_TEXT_SCENIC = {"txt/Embed_0/embedding": "token_emb/emb_var",
                "txt/Encoder_0/encoder_norm/scale": "text_encoder_norm/scale",
                "txt/Encoder_0/encoder_norm/bias": "text_encoder_norm/bias",
                "temperature": "temperature_contrastive"}
_TEXT_BLOCKS = ("txt/Encoder_0/", "transformer/")
# Their PyTorch text tower runs torch's LayerNorm default, eps 1e-5 (Scenic: 1e-6).
PYTORCH_TEXT_LN_EPS = 1e-5


SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")  # their .npz; any state dict


def text_file(path: str):
    """The `X_text.SUFFIX` beside an `X_vision.SUFFIX` path (None for another name, or with
    the ':img' suffix that asks for the image tower alone)."""
    for suffix in SUFFIXES:
        if path.endswith("_vision" + suffix):
            return path[:-len("_vision" + suffix)] + "_text" + suffix
    return None


def text_layout(keys) -> str:
    keys = set(keys)
    if "token_emb/emb_var" in keys:
        return "scenic"
    if {"token_embedding.weight", "ln_final.weight"} <= keys and \
            "positional_embedding" not in keys:  # open_clip's text towers have one
        return "pytorch"
    return ""


def text_from_scenic(theirs: dict, where: str) -> dict:
    flat = {}
    for key, value in theirs.items():
        ours = next((o for o, t in _TEXT_SCENIC.items() if t == key), None)
        if ours is None and key.startswith(_TEXT_BLOCKS[1]):
            ours = _TEXT_BLOCKS[0] + key[len(_TEXT_BLOCKS[1]):]
        if ours is None:
            raise errors.UserError(f"{where}: parameter {key!r} is not part of a TIPS text "
                                   "encoder")
        flat[ours] = value
    return flat


def text_to_scenic(flat: dict) -> dict:
    out = {}
    for key, value in flat.items():
        if key in _TEXT_SCENIC:
            out[_TEXT_SCENIC[key]] = value
        elif key.startswith(_TEXT_BLOCKS[0]):
            out[_TEXT_BLOCKS[1] + key[len(_TEXT_BLOCKS[0]):]] = value
    return out


_TEXT_PYTORCH = [
    mapping.rule("txt/Embed_0/embedding", "token_embedding.weight"),
    *mapping.layer_norm("txt/Encoder_0/encoder_norm", "ln_final"),
    mapping.rule("temperature", "temperature"),  # their PyTorch demo pops this name
    *mapping.block_rules("txt/Encoder_0/encoderblock_{i}/", "transformer.resblocks.{i}.", dict(
        ln1="ln_1", ln2="ln_2", qkv=("attn.in_proj_weight", "attn.in_proj_bias"),
        out="attn.out_proj", fc1="mlp.c_fc", fc2="mlp.c_proj")),
]


def text_from_pytorch(t: dict, where: str) -> dict:
    """TIPS's PyTorch TextEncoder state dict -> canonical 'txt/...' and 'temperature' (their
    file may name it temperature or temperature_contrastive)."""
    t = {k: np.asarray(v, np.float32) for k, v in t.items()}
    contrastive = t.pop("temperature_contrastive", None)
    if contrastive is not None and "temperature" not in t:
        t["temperature"] = contrastive
    if "token_embedding.weight" not in t:
        raise errors.UserError(f"{where}: parameter 'token_embedding.weight' is missing; not "
                               "a complete TIPS PyTorch text encoder")
    width = t["token_embedding.weight"].shape[1]
    heads = PYTORCH_HEADS.get(width, max(1, width // 64))
    flat = mapping.import_(_TEXT_PYTORCH, t, {"txt": heads}, where)
    if "temperature" in flat:
        flat["temperature"] = flat["temperature"].reshape(())  # a scalar, however stored
    return flat


def text_to_pytorch(flat: dict) -> dict:
    t = mapping.export(_TEXT_PYTORCH, flat, "TIPS PyTorch text export")
    # np.ascontiguousarray would make the scalar temperature 1-D.
    return {k: np.ascontiguousarray(v) if np.ndim(v) else np.asarray(v) for k, v in t.items()}
