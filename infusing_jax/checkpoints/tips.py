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

SCENIC_ROOT = "encoder/"
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
    f32 = lambda a: np.asarray(a, np.float32)
    width = t["cls_token"].shape[-1]
    heads = PYTORCH_HEADS.get(width, max(1, width // 64))
    d = width // heads
    pos = f32(t["pos_embed"])
    grid = int(round(np.sqrt(pos.shape[1] - 1)))
    if pos.ndim != 3 or grid * grid + 1 != pos.shape[1]:
        raise errors.UserError(f"pos_embed has shape {pos.shape}; TIPS's is (1, 1 + G*G, "
                               "width) for a G x G grid")
    flat = {
        "img/embedding/kernel": f32(t["patch_embed.proj.weight"]).transpose(2, 3, 1, 0),
        "img/embedding/bias": f32(t["patch_embed.proj.bias"]),
        "img/cls": np.concatenate([f32(t["cls_token"]) + pos[:, :1],
                                   f32(t["register_tokens"])], axis=1),
        "img/pos_embedding": pos[:, 1:].reshape(1, grid, grid, width),
        "img/Transformer/encoder_norm/scale": f32(t["norm.weight"]),
        "img/Transformer/encoder_norm/bias": f32(t["norm.bias"]),
    }
    depth = len({k.split(".")[1] for k in t if k.startswith("blocks.")})
    for i in range(depth):
        b, o = f"blocks.{i}.", f"img/Transformer/encoderblock_{i}/"
        attn = o + "MultiHeadDotProductAttention_0/"
        for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            flat[f"{o}{ln}/scale"] = f32(t[f"{b}{norm}.weight"])
            flat[f"{o}{ln}/bias"] = f32(t[f"{b}{norm}.bias"])
        qkv_w, qkv_b = f32(t[b + "attn.qkv.weight"]), f32(t[b + "attn.qkv.bias"])
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * width, (j + 1) * width)
            flat[f"{attn}{name}/kernel"] = qkv_w[rows].T.reshape(width, heads, d)
            flat[f"{attn}{name}/bias"] = qkv_b[rows].reshape(heads, d)
        g1 = f32(t.get(b + "ls1.gamma", np.ones(width, np.float32)))
        g2 = f32(t.get(b + "ls2.gamma", np.ones(width, np.float32)))
        flat[f"{attn}out/kernel"] = (f32(t[b + "attn.proj.weight"]).T * g1).reshape(
            heads, d, width)
        flat[f"{attn}out/bias"] = f32(t[b + "attn.proj.bias"]) * g1
        mlp = o + "MlpBlock_0/"
        if b + "mlp.w12.weight" in t:
            w12, b12 = f32(t[b + "mlp.w12.weight"]), f32(t[b + "mlp.w12.bias"])
            hidden = w12.shape[0] // 2
            for n, rows in enumerate((slice(0, hidden), slice(hidden, None))):
                flat[f"{mlp}Dense_{n}/kernel"] = w12[rows].T
                flat[f"{mlp}Dense_{n}/bias"] = b12[rows]
            out, last = "mlp.w3", "Dense_2"
        else:
            flat[f"{mlp}Dense_0/kernel"] = f32(t[b + "mlp.fc1.weight"]).T
            flat[f"{mlp}Dense_0/bias"] = f32(t[b + "mlp.fc1.bias"])
            out, last = "mlp.fc2", "Dense_1"
        flat[f"{mlp}{last}/kernel"] = f32(t[f"{b}{out}.weight"]).T * g2
        flat[f"{mlp}{last}/bias"] = f32(t[f"{b}{out}.bias"]) * g2
    hints = _hints(flat, act=None if _swiglu(flat, _BLOCKS[0]) else "gelu")
    hints["img"]["num_heads"] = heads
    return flat, hints


def to_pytorch(flat: dict) -> dict:
    """Canonical flat image-tower params -> TIPS's PyTorch state dict (LayerScale gammas of
    1, a zero position for the first cls token, a zero mask_token)."""
    cls, grid = flat["img/cls"], flat["img/pos_embedding"]
    width = cls.shape[-1]
    zeros = np.zeros((1, 1, width), grid.dtype)
    t = {
        "cls_token": cls[:, :1], "register_tokens": cls[:, 1:],
        "pos_embed": np.concatenate([zeros, grid.reshape(1, -1, width)], axis=1),
        "mask_token": np.zeros((1, width), grid.dtype),
        "patch_embed.proj.weight": flat["img/embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": flat["img/embedding/bias"],
        "norm.weight": flat["img/Transformer/encoder_norm/scale"],
        "norm.bias": flat["img/Transformer/encoder_norm/bias"],
    }
    depth = len({k.split("/")[2] for k in flat if k.startswith("img/Transformer/encoderblock_")})
    for i in range(depth):
        b, o = f"blocks.{i}.", f"img/Transformer/encoderblock_{i}/"
        attn, mlp = o + "MultiHeadDotProductAttention_0/", o + "MlpBlock_0/"
        for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            t[f"{b}{norm}.weight"] = flat[f"{o}{ln}/scale"]
            t[f"{b}{norm}.bias"] = flat[f"{o}{ln}/bias"]
        t[b + "attn.qkv.weight"] = np.concatenate(
            [flat[f"{attn}{n}/kernel"].reshape(width, width).T
             for n in ("query", "key", "value")])
        t[b + "attn.qkv.bias"] = np.concatenate(
            [flat[f"{attn}{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
        t[b + "attn.proj.weight"] = flat[f"{attn}out/kernel"].reshape(width, width).T
        t[b + "attn.proj.bias"] = flat[f"{attn}out/bias"]
        if f"{mlp}Dense_2/kernel" in flat:
            t[b + "mlp.w12.weight"] = np.concatenate(
                [flat[f"{mlp}Dense_{n}/kernel"].T for n in (0, 1)])
            t[b + "mlp.w12.bias"] = np.concatenate([flat[f"{mlp}Dense_{n}/bias"] for n in (0, 1)])
            t[b + "mlp.w3.weight"] = flat[f"{mlp}Dense_2/kernel"].T
            t[b + "mlp.w3.bias"] = flat[f"{mlp}Dense_2/bias"]
        else:
            t[b + "mlp.fc1.weight"] = flat[f"{mlp}Dense_0/kernel"].T
            t[b + "mlp.fc1.bias"] = flat[f"{mlp}Dense_0/bias"]
            t[b + "mlp.fc2.weight"] = flat[f"{mlp}Dense_1/kernel"].T
            t[b + "mlp.fc2.bias"] = flat[f"{mlp}Dense_1/bias"]
        t[b + "ls1.gamma"] = np.ones(width, grid.dtype)
        t[b + "ls2.gamma"] = np.ones(width, grid.dtype)
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


def text_from_pytorch(t: dict, where: str) -> dict:
    """TIPS's PyTorch TextEncoder state dict -> canonical 'txt/...' and 'temperature'."""
    try:
        return _text_from_pytorch(t)
    except KeyError as e:
        raise errors.UserError(f"{where}: parameter {e.args[0]!r} is missing; not a complete "
                               "TIPS PyTorch text encoder") from None


def _text_from_pytorch(t):
    f32 = lambda a: np.asarray(a, np.float32)
    width = t["token_embedding.weight"].shape[1]
    heads = PYTORCH_HEADS.get(width, max(1, width // 64))
    d = width // heads
    flat = {"txt/Embed_0/embedding": f32(t["token_embedding.weight"]),
            "txt/Encoder_0/encoder_norm/scale": f32(t["ln_final.weight"]),
            "txt/Encoder_0/encoder_norm/bias": f32(t["ln_final.bias"])}
    temperature = t.get("temperature_contrastive", t.get("temperature"))
    if temperature is not None:
        flat["temperature"] = f32(temperature).reshape(())
    depth = len({k.split(".")[2] for k in t if k.startswith("transformer.resblocks.")})
    for i in range(depth):
        b, o = f"transformer.resblocks.{i}.", f"txt/Encoder_0/encoderblock_{i}/"
        attn = o + "MultiHeadDotProductAttention_0/"
        for norm, ln in (("ln_1", "LayerNorm_0"), ("ln_2", "LayerNorm_1")):
            flat[f"{o}{ln}/scale"] = f32(t[f"{b}{norm}.weight"])
            flat[f"{o}{ln}/bias"] = f32(t[f"{b}{norm}.bias"])
        w, bias = f32(t[b + "attn.in_proj_weight"]), f32(t[b + "attn.in_proj_bias"])
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * width, (j + 1) * width)
            flat[f"{attn}{name}/kernel"] = w[rows].T.reshape(width, heads, d)
            flat[f"{attn}{name}/bias"] = bias[rows].reshape(heads, d)
        flat[f"{attn}out/kernel"] = f32(t[b + "attn.out_proj.weight"]).T.reshape(heads, d, width)
        flat[f"{attn}out/bias"] = f32(t[b + "attn.out_proj.bias"])
        for n, fc in enumerate(("c_fc", "c_proj")):
            flat[f"{o}MlpBlock_0/Dense_{n}/kernel"] = f32(t[f"{b}mlp.{fc}.weight"]).T
            flat[f"{o}MlpBlock_0/Dense_{n}/bias"] = f32(t[f"{b}mlp.{fc}.bias"])
    return flat


def text_to_pytorch(flat: dict) -> dict:
    width = flat["txt/Embed_0/embedding"].shape[1]
    t = {"token_embedding.weight": flat["txt/Embed_0/embedding"],
         "ln_final.weight": flat["txt/Encoder_0/encoder_norm/scale"],
         "ln_final.bias": flat["txt/Encoder_0/encoder_norm/bias"]}
    if "temperature" in flat:
        t["temperature_contrastive"] = flat["temperature"]
    depth = len({k.split("/")[2] for k in flat if k.startswith("txt/Encoder_0/encoderblock_")})
    for i in range(depth):
        b, o = f"transformer.resblocks.{i}.", f"txt/Encoder_0/encoderblock_{i}/"
        attn = o + "MultiHeadDotProductAttention_0/"
        for norm, ln in (("ln_1", "LayerNorm_0"), ("ln_2", "LayerNorm_1")):
            t[f"{b}{norm}.weight"] = flat[f"{o}{ln}/scale"]
            t[f"{b}{norm}.bias"] = flat[f"{o}{ln}/bias"]
        t[b + "attn.in_proj_weight"] = np.concatenate(
            [flat[f"{attn}{n}/kernel"].reshape(width, width).T
             for n in ("query", "key", "value")])
        t[b + "attn.in_proj_bias"] = np.concatenate(
            [flat[f"{attn}{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
        t[b + "attn.out_proj.weight"] = flat[f"{attn}out/kernel"].reshape(width, width).T
        t[b + "attn.out_proj.bias"] = flat[f"{attn}out/bias"]
        for n, fc in enumerate(("c_fc", "c_proj")):
            t[f"{b}mlp.{fc}.weight"] = flat[f"{o}MlpBlock_0/Dense_{n}/kernel"].T
            t[f"{b}mlp.{fc}.bias"] = flat[f"{o}MlpBlock_0/Dense_{n}/bias"]
    return {k: np.ascontiguousarray(v) for k, v in t.items()}
