"""PyTorch state-dict files: .safetensors, or torch.save files read with weights_only=True.

Nothing is unpickled beyond tensors and plain containers: a file that needs
other objects is refused.
"""
import os
import pickle

import numpy as np
from safetensors import SafetensorError
from safetensors import numpy as safetensors_np

from infusing_jax import errors

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
SUFFIXES = (".safetensors",) + TORCH_SUFFIXES


def _torch():
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise ImportError("reading or writing torch files needs torch: pip install "
                          "'infusing_jax[torch]', or use .safetensors") from None
    return torch


def read(path: str, unwrap=lambda state: state) -> dict:
    """A state-dict file -> {key: np.ndarray} (bfloat16 as float32).

    `unwrap` maps the loaded dict to the parameter dict (e.g. a training
    checkpoint's 'state_dict'); any entry left that is not a tensor is an error.
    """
    if not os.path.exists(path):
        raise errors.UserError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    torch = _torch()
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise errors.UserError(f"{path}: not a readable PyTorch file ({e.strerror})") from None
    if head != b"PK" and head[:1] != b"\x80":  # torch.save's zip, or a legacy pickle
        raise errors.UserError(f"{path}: not a readable PyTorch file (neither a zip archive "
                               "nor a pickle)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as e:  # a corrupt or truncated archive
        raise errors.UserError(f"{path}: not a readable PyTorch file "
                               f"({str(e).splitlines()[0][:200]})") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise errors.UserError(f"{path}: refused, it needs arbitrary Python objects unpickled "
                         f"(weights_only load failed: {first}); use a .safetensors file") from None
    if not isinstance(state, dict):
        raise errors.UserError(f"{path}: expected a state dict, found {type(state).__name__}")
    state = unwrap(state)
    others = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if others:
        raise errors.UserError(f"{path}: {len(others)} entries are not tensors, e.g. {others[:5]}")
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def read_safetensors(path: str) -> dict:
    """{key: np.ndarray} of a .safetensors file; one UserError where it is not one."""
    try:
        return safetensors_np.load_file(path)
    except (OSError, SafetensorError) as e:
        raise errors.UserError(f"{path}: not a readable .safetensors file "
                               f"({getattr(e, 'strerror', None) or e})") from None


def write(path: str, tensors: dict):
    """{key: np.ndarray} -> .safetensors, or a torch.save file for .bin / .pt / .pth."""
    if not path.endswith(SUFFIXES):
        raise errors.UserError(f"{path}: a state-dict file must end in one of {', '.join(SUFFIXES)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    if path.endswith(".safetensors"):
        safetensors_np.save_file(tensors, path)
    else:
        torch = _torch()
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path)
