"""Checkpoint import and export: big_vision `.npz`, Hugging Face directories, open_clip.

    params, cfg = checkpoints.load("webli_en_b16_224_63724782.npz")
    checkpoints.save(params, cfg, "out_dir", "hf")

`load` infers the format from the path and the model config from the tensors;
nothing in a file is ever executed (no unpickling of objects).
"""
import os
import pickle

import ml_collections
import numpy as np
from safetensors import numpy as safetensors_np

from infusing_jax.checkpoints import big_vision
from infusing_jax.checkpoints import hf
from infusing_jax.checkpoints import infer
from infusing_jax.checkpoints import mapping
from infusing_jax.checkpoints import open_clip
from infusing_jax.checkpoints import tree
from infusing_jax.models import config as model_config_lib
from infusing_jax.models import transformer

FORMATS = ("big_vision", "hf", "open_clip")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def detect_format(path: str) -> str:
    """'big_vision' | 'hf' | 'open_clip', from the path (and, for open_clip, its keys)."""
    if big_vision.is_npz(path):
        return "big_vision"
    if hf.is_hf_dir(path):
        return "hf"
    if path.endswith((".safetensors",) + _TORCH_SUFFIXES):
        return "open_clip"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    raise ValueError(f"{path}: unknown checkpoint format; expected a big_vision .npz, a "
                     "Hugging Face directory with config.json, or an open_clip "
                     ".safetensors / .bin state dict")


def read_torch_state(path: str) -> dict:
    """A .safetensors or torch state-dict file -> {key: np.ndarray}, never unpickling objects."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        return safetensors_np.load_file(path)
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise ImportError(f"{path}: reading torch files needs torch: pip install "
                          "'infusing_jax[torch]', or convert the file to .safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refused, it needs arbitrary Python objects unpickled "
                         f"(weights_only load failed: {first}); use a .safetensors file") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    state = open_clip.unwrap(state)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_flat(path: str):
    """-> (canonical flat params, hints for config inference)."""
    fmt = detect_format(path)
    if fmt == "big_vision":
        return big_vision.read(path), {}
    if fmt == "hf":
        theirs, hints = hf.read(path)
        heads = {t: hints[t]["num_heads"] for t in ("img", "txt") if t in hints}
        return mapping.import_(hf.TABLES[hints["family"]], theirs, heads, path), hints
    theirs = read_torch_state(path)
    family = open_clip.family_of(theirs)
    if family is None:
        raise ValueError(f"{path}: not an open_clip SigLIP or CLIP state dict (no "
                         "'visual.trunk.*' or 'visual.conv1.weight' keys)")
    heads = open_clip.num_heads(theirs, family)
    flat = mapping.import_(open_clip.TABLES[family], theirs, heads, path)
    return flat, open_clip.hints(theirs, family)


def check_shapes(flat: dict, cfg, where: str):
    """One-line errors for missing keys, unexpected keys and shape mismatches."""
    expected = infer.expected_shapes(cfg)
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(f"{where}: {len(missing)} missing parameters, e.g. {missing[:5]}")
    unexpected = sorted(set(flat) - set(expected))
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} unexpected parameters, e.g. {unexpected[:5]}")
    for key, shape in expected.items():
        if tuple(flat[key].shape) != shape:
            raise ValueError(f"{where}: parameter {key} has shape {tuple(flat[key].shape)}, "
                             f"the model expects {shape}")


def load(path: str, image_size: int = None, scan: bool = False,
         param_dtype: str = "float32"):
    """A checkpoint in any supported format -> (params nested dict, model config).

    image_size: run at another resolution (the learned position embedding is
    resampled bilinearly). scan: return big_vision's scan layout.
    """
    flat, hints = _read_flat(path)
    cfg = infer.infer_config(flat, hints)
    if image_size:
        flat = infer.resample_image_posemb(flat, cfg, image_size)
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


def save(params, cfg: ml_collections.ConfigDict, path: str, fmt: str):
    """Write `params` of a model with config `cfg` as `fmt` ('big_vision' | 'hf' | 'open_clip').

    big_vision: a .npz file; hf: a save_pretrained directory; open_clip: a
    .safetensors file (or .bin, written with torch.save).
    """
    flat = to_flat(params)
    check_shapes(flat, cfg, f"saving {path}")
    if fmt == "big_vision":
        big_vision.write(path, flat, scan=bool(cfg.get("scan")))
    elif fmt == "hf":
        theirs = mapping.export(hf.TABLES[cfg.family], _float32(flat), f"export to {path}")
        hf.write(path, theirs, hf.hf_config(cfg, model_config_lib.resolved_towers(cfg)),
                 hf.preprocessor_config(cfg))
    elif fmt == "open_clip":
        theirs = mapping.export(open_clip.TABLES[cfg.family], _float32(flat),
                                f"export to {path}")
        implied = open_clip.num_heads(theirs, cfg.family)
        for tower, name in (("img", "image"), ("txt", "text")):
            if tower in implied and implied[tower] != cfg[name].num_heads:
                raise ValueError(
                    f"export to {path}: open_clip stores no head count, and this model's "
                    f"{name} tower ({cfg[name].num_heads} heads of width {cfg[name].width}) "
                    f"would load back with {implied[tower]}; use the hf or big_vision format")
        _write_torch_state(path, theirs)
    else:
        raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")


def _float32(flat):
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def _write_torch_state(path: str, theirs: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        safetensors_np.save_file({k: np.asarray(v, order="C") for k, v in theirs.items()}, path)
    elif path.endswith(_TORCH_SUFFIXES):
        import torch  # pylint: disable=g-import-not-at-top
        torch.save({k: torch.from_numpy(np.asarray(v, order="C")) for k, v in theirs.items()}, path)
    else:
        raise ValueError(f"{path}: an open_clip state dict must end in .safetensors or .bin")
