"""Checkpoint import and export: big_vision `.npz`, Hugging Face directories, open_clip,
TIPS's `_vision` + `_text` pairs (Scenic's and their PyTorch layouts); export of the
image tower to ONNX.

    params, cfg = checkpoints.load("webli_en_b16_224_63724782.npz")
    checkpoints.save(params, cfg, "out_dir", "hf")
    checkpoints.save(params, cfg, "gs://bucket/model.onnx")

`load` infers the format from the path and the model config from the tensors;
nothing in a file is ever executed (no unpickling of objects).
"""
import os
import tempfile

import ml_collections
import numpy as np
from absl import logging

from infusing_jax import errors
from infusing_jax import paths
from infusing_jax.checkpoints import big_vision
from infusing_jax.checkpoints import hf
from infusing_jax.checkpoints import infer
from infusing_jax.checkpoints import mapping
from infusing_jax.checkpoints import onnx_graph
from infusing_jax.checkpoints import open_clip
from infusing_jax.checkpoints import state_dict
from infusing_jax.checkpoints import tips
from infusing_jax.checkpoints import tree
from infusing_jax.models import config as model_config_lib
from infusing_jax.models import transformer

# What `load` reads and `save` writes. A TIPS .npz is told from a big_vision one by its
# keys; tips_scenic / tips_pytorch are written only when asked for (--to).
FORMATS = ("big_vision", "hf", "open_clip", "tips_scenic", "tips_pytorch")
EXPORT_FORMATS = FORMATS + ("onnx",)  # what `save` writes


class ArgumentError(errors.UserError):
    """An argument of `load` that the file cannot take (`argument`: 'act' or 'image_size'):
    callers name it as their own flag or config field."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


def format_of(path: str) -> str:
    """The format a path names: .npz[:sub] -> big_vision, a state-dict file -> open_clip,
    .onnx -> onnx, anything else -> a Hugging Face directory."""
    if path.endswith(".onnx"):
        return "onnx"
    if big_vision.is_npz(path):
        return "big_vision"
    if path.endswith(state_dict.SUFFIXES):
        return "open_clip"
    return "hf"


def detect_format(path: str) -> str:
    """The format of an existing checkpoint at `path`."""
    fmt = format_of(path)
    if fmt == "onnx":
        raise errors.UserError(f"{path}: an ONNX file is an export for serving, not a "
                               "checkpoint to load; give the checkpoint or run it came from")
    if fmt != "hf" or hf.is_hf_dir(path):
        return fmt
    if not os.path.exists(path):
        raise errors.UserError(f"{path}: no such checkpoint file or directory")
    raise errors.UserError(f"{path}: unknown checkpoint format; expected a big_vision .npz, a "
                     "Hugging Face directory with config.json, or an open_clip "
                     ".safetensors / .bin state dict")


def _read_flat(path: str, fmt: str):
    """-> (canonical flat params, hints for config inference)."""
    if fmt == "big_vision":
        arrays = big_vision.read_arrays(path)
        kind = tips.layout(arrays)
        if kind in ("scenic", "pytorch"):
            return _read_tips(arrays, kind, path)
        if kind == "text":
            raise errors.UserError(f"{path}: a TIPS text tower; give the _vision.npz beside "
                                   "it (its _text.npz is loaded with it)")
        return big_vision.canonical(arrays, path), {}
    if fmt == "hf":
        theirs, hints = hf.read(path)
        heads = {t: hints[t]["num_heads"] for t in ("img", "txt") if t in hints}
        return mapping.import_(hf.TABLES[hints["family"]], theirs, heads, path), hints
    theirs = state_dict.read(path, open_clip.unwrap)
    if tips.layout(theirs) == "pytorch":  # TIPS's PyTorch state dict, saved by torch
        return _read_tips(theirs, "pytorch", path)
    if tips.layout(theirs) == "text":
        raise errors.UserError(f"{path}: a TIPS text tower; give the _vision file beside it "
                               "(its _text file is loaded with it)")
    if any(k.startswith("visual.trunk.embeds.") for k in theirs):  # timm's NaFlexVit
        raise errors.UserError(f"{path}: an open_clip NaFlex image tower (SigLIP 2's variable "
                               "resolution), which is not supported; use a fixed-resolution "
                               "SigLIP 2 checkpoint (e.g. open_clip's ViT-B-16-SigLIP2)")
    family = open_clip.family_of(theirs)
    if family is None:
        raise errors.UserError(f"{path}: not an open_clip SigLIP or CLIP state dict (no "
                         "'visual.trunk.*' or 'visual.conv1.weight' keys)")
    heads = open_clip.num_heads(theirs, family)
    flat = mapping.import_(open_clip.TABLES[family], theirs, heads, path)
    return flat, open_clip.hints(theirs, family)


def _read_tips(arrays: dict, kind: str, path: str):
    """A TIPS _vision file, with the _text file beside it where there is one."""
    read = tips.from_scenic if kind == "scenic" else tips.from_pytorch
    flat, hints = read(arrays, path)
    text_path = tips.text_file(path)
    if text_path is None or not paths.exists(text_path):
        return flat, hints
    text = (big_vision.read_arrays(text_path) if text_path.endswith(".npz") else
            state_dict.read(text_path, open_clip.unwrap))
    text_kind = tips.text_layout(text)
    if text_kind == "scenic":
        flat.update(tips.text_from_scenic(text, text_path))
    elif text_kind == "pytorch":
        flat.update(tips.text_from_pytorch(text, text_path))
        hints["txt"] = dict(ln_eps=tips.PYTORCH_TEXT_LN_EPS)
    else:
        raise errors.UserError(f"{text_path}: not a TIPS text tower (beside {path}); move it "
                               "away, or load the image tower alone as FILE_vision.npz:img")
    return flat, hints


def check_shapes(flat: dict, cfg, where: str):
    """One-line errors for missing keys, unexpected keys and shape mismatches."""
    expected = infer.expected_shapes(cfg)
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise errors.UserError(f"{where}: {len(missing)} missing parameters, e.g. {missing[:5]}")
    unexpected = sorted(set(flat) - set(expected))
    if unexpected:
        raise errors.UserError(f"{where}: {len(unexpected)} unexpected parameters, e.g. {unexpected[:5]}")
    for key, shape in expected.items():
        if tuple(flat[key].shape) != shape:
            raise errors.UserError(f"{where}: parameter {key} has shape {tuple(flat[key].shape)}, "
                             f"the model expects {shape}")


def load(path: str, image_size: int = None, act: str = None, scan: bool = False,
         param_dtype: str = "float32"):
    """A checkpoint in any supported format -> (params nested dict, model config).

    image_size: run at another resolution (the learned position embedding is
    resampled as big_vision does when the patch grid changes).
    act: the towers' activation ('gelu_tanh' | 'gelu' | 'quick_gelu') of CLIP files that
    record none: required for open_clip's, big_vision's default to quick_gelu; refused
    where it is not the activation the checkpoint fixes (SigLIP, a Hugging Face config).
    scan: return big_vision's scan layout.
    """
    if act is not None and act not in transformer.ACTIVATIONS:
        raise ArgumentError("act", f"{act!r}: use one of {sorted(transformer.ACTIVATIONS)}")
    fmt = detect_format(path)
    flat, hints = _read_flat(path, fmt)
    cfg = infer.infer_config(flat, hints, where=path)
    if fmt == "open_clip" and cfg.family == "clip" and not act:
        raise ArgumentError("act", f"{path}: open_clip stores no activation; pass "
                            "act='quick_gelu' (OpenAI weights, '-quickgelu' models) or "
                            "act='gelu' (LAION, DataComp, DFN weights), --act on the "
                            "command line")
    fixed = cfg.family in ("siglip", "tips") or hints.get("img", {}).get("act")  # or HF's
    own = model_config_lib.resolved_towers(cfg)[0]["act"]
    if act and fixed and act != own:
        raise ArgumentError("act", f"{path} is a {fmt} {cfg.family} checkpoint, whose "
                            f"activation is {own!r}; leave act unset (it names the activation "
                            "of CLIP files that record none: open_clip's, big_vision's)")
    if act and not fixed:
        hints = dict(hints, img=dict(hints.get("img", {}), act=act),
                     txt=dict(hints.get("txt", {}), act=act))
        cfg = infer.infer_config(flat, hints, where=path)
    if image_size is not None:
        if image_size < cfg.image.patch_size:
            raise ArgumentError("image_size", f"{image_size} is smaller than the patch size "
                                f"{cfg.image.patch_size} of {path}")
        if cfg.family == "tips" and image_size % cfg.image.patch_size:
            raise ArgumentError("image_size", f"{image_size} is not a multiple of the patch "
                                f"size {cfg.image.patch_size} of {path}: TIPS's Scenic code "
                                "pads such images, their PyTorch code refuses them")
        flat, cfg = infer.resample_image_posemb(flat, cfg, image_size)
    check_shapes(flat, cfg, path)
    cfg.scan, cfg.param_dtype = scan, param_dtype
    dtype = transformer.dtype_of(param_dtype)
    flat = {k: np.asarray(v, dtype) for k, v in flat.items()}
    if scan:
        flat = tree.roll_scan(flat)
    return tree.unflatten(flat), cfg


def to_flat(params) -> dict:
    """Model params (nested, scan or not) -> canonical flat numpy params."""
    return tree.unroll_scan(tree.flatten(params))


def _float32(flat):
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def _check_open_clip_heads(theirs, cfg, path):
    """open_clip files carry no head count: refuse models whose count would not come back."""
    implied = open_clip.num_heads(theirs, cfg.family)
    for tower, name in (("img", "image"), ("txt", "text")):
        if tower in implied and implied[tower] != cfg[name].num_heads:
            raise errors.UserError(
                f"export to {path}: open_clip stores no head count, and this model's "
                f"{name} tower ({cfg[name].num_heads} heads of width {cfg[name].width}) "
                f"would load back with {implied[tower]}; use the hf or big_vision format")


def save(params, cfg: ml_collections.ConfigDict, path: str, fmt: str = None) -> None:
    """Write `params` of a model with config `cfg` as `fmt` (default: `format_of(path)`).

    big_vision: a .npz file; hf: a save_pretrained directory; open_clip: a
    .safetensors file (or .bin / .pt / .pth, written with torch.save); tips_scenic,
    tips_pytorch: TIPS's layouts, the text tower to the _text file beside a _vision
    one (checkpoints/tips.py); onnx: the image tower's graph (onnx_graph). A remote
    path (gs://...) is written locally first, then copied there.
    """
    fmt = fmt or format_of(path)
    if fmt not in EXPORT_FORMATS:
        raise errors.UserError(f"unknown format {fmt!r}; use one of {EXPORT_FORMATS}")
    flat = to_flat(params)
    if fmt == "onnx":  # the image tower only
        flat = {k: v for k, v in flat.items() if k.startswith("img/")}
        cfg = ml_collections.ConfigDict(dict(cfg.to_dict(), text=None))
    tips_only = fmt.startswith("tips_")
    if (tips_only and cfg.family != "tips") or (fmt in ("hf", "open_clip")
                                                 and cfg.family == "tips"):
        raise errors.UserError(f"export to {path}: a {cfg.family} model cannot be written as "
                               f"{fmt}; TIPS towers go to tips_scenic or tips_pytorch (or "
                               "big_vision, onnx), the others to big_vision, hf or open_clip")
    check_shapes(flat, cfg, f"saving {path}")
    if not paths.is_remote(path):
        _write(flat, cfg, path, fmt)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(path.rstrip("/")))
        _write(flat, cfg, local, fmt)
        _upload(tmp, os.path.dirname(path.rstrip("/")))


def _write(flat: dict, cfg, path: str, fmt: str) -> None:
    if fmt == "big_vision":
        _check_records_its_settings(cfg, path)
        big_vision.write(path, flat, scan=bool(cfg.get("scan")))
    elif fmt == "hf":
        theirs = mapping.export(hf.TABLES[cfg.family], _float32(flat), f"export to {path}")
        hf.write(path, theirs, hf.hf_config(cfg, model_config_lib.resolved_towers(cfg)),
                 hf.preprocessor_config(cfg))
    elif fmt == "open_clip":
        theirs = mapping.export(open_clip.TABLES[cfg.family], _float32(flat),
                                f"export to {path}")
        _check_open_clip_heads(theirs, cfg, path)
        state_dict.write(path, theirs)
    elif fmt.startswith("tips_"):
        _write_tips(flat, cfg, path, fmt)
    else:
        onnx_graph.write(onnx_graph.image_tower(_float32(flat), cfg), path)


def _runs_tips_pytorch_settings(cfg) -> bool:
    """Whether a TIPS model runs the exact GELU or text LayerNorm eps 1e-5 of TIPS's
    PyTorch code (one loaded from their PyTorch files), not the family's (Scenic's)."""
    if cfg.family != "tips":
        return False
    image, text = model_config_lib.resolved_towers(cfg)
    family = model_config_lib.FAMILIES["tips"]
    return image["act"] not in (family["image"]["act"], transformer.SWIGLU) or (
        text is not None and text["ln_eps"] != family["text"]["ln_eps"])


def _check_records_its_settings(cfg, path):
    """A big_vision .npz records no activation or LayerNorm eps: refuse a TIPS model that
    runs other ones than the family's."""
    if _runs_tips_pytorch_settings(cfg):
        raise errors.UserError(f"export to {path}: this TIPS model runs the exact GELU and "
                               "text LayerNorm eps 1e-5 of TIPS's PyTorch code, which a "
                               "big_vision .npz does not record; export with "
                               "--to=tips_pytorch (or .onnx)")


def _write_tips(flat: dict, cfg, path: str, fmt: str) -> None:
    """The image tower to `path`; a text tower, with the temperature, to the _text.npz
    beside it (`path` then ends in _vision.npz)."""
    image = {k: v for k, v in flat.items() if k.startswith("img/")}
    text = {k: v for k, v in flat.items() if not k.startswith("img/")}
    if text and tips.text_file(path) is None:
        raise errors.UserError(f"export to {path}: a TIPS model with its text tower is a "
                               "pair of files; name this one FILE_vision.npz (FILE_text.npz "
                               "is written beside it)")
    stale = tips.text_file(path)
    if not text and stale and paths.exists(stale):
        raise errors.UserError(f"export to {path}: {stale} is beside it and would be loaded "
                               "with it as its text tower; move it away, or choose another "
                               "name")
    if fmt == "tips_pytorch":  # their .npz, or a state-dict file by its suffix
        _check_tips_pytorch_heads(cfg, path)
        write = big_vision.write if path.endswith(".npz") else state_dict.write
        write(path, tips.to_pytorch(image))
        if text:
            write(tips.text_file(path), tips.text_to_pytorch(text))
    else:
        if _runs_tips_pytorch_settings(cfg):  # allowed: Scenic -> PyTorch -> Scenic is exact
            logging.warning("export to %s: this TIPS model runs the exact GELU and text "
                            "LayerNorm eps 1e-5 of TIPS's PyTorch code; their Scenic code "
                            "runs the file with tanh GELU and eps 1e-6 (about 1e-5 apart)",
                            path)
        big_vision.write(path, tips.to_scenic(image))
        if text:
            big_vision.write(tips.text_file(path), tips.text_to_scenic(text))


def _check_tips_pytorch_heads(cfg, path):
    """TIPS's PyTorch files carry no head count: refuse towers whose count would not come
    back."""
    for tower in (cfg.image, cfg.get("text")):
        if tower is None:
            continue
        width, heads = tower.width, tower.num_heads
        implied = tips.PYTORCH_HEADS.get(width, max(1, width // 64))
        if heads != implied:
            raise errors.UserError(f"export to {path}: TIPS's PyTorch layout stores no head "
                                   f"count, and this tower ({heads} heads of width {width}) "
                                   f"would load back with {implied}; use tips_scenic")


def _upload(local_dir: str, remote_dir: str) -> None:
    """Copy every file under local_dir to remote_dir, keeping relative paths."""
    import tensorflow as tf
    for root, _, files in os.walk(local_dir):
        relative = os.path.relpath(root, local_dir)
        target = remote_dir if relative == "." else f"{remote_dir}/{relative}"
        tf.io.gfile.makedirs(target)
        for name in files:
            tf.io.gfile.copy(os.path.join(root, name), f"{target}/{name}", overwrite=True)
