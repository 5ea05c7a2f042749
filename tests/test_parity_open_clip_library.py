"""Parity with the real open_clip and timm libraries, where they are installed.

open_clip needs torchvision, which this project's CPU machines cannot install
beside torch 2.13, so these tests skip there; they run wherever open_clip and
timm import (e.g. the GPU images, with open_clip's wheel carried along).
tests/test_parity_open_clip.py checks the same formats against reference
modules everywhere.
"""
import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
torch = pytest.importorskip("torch")

import jax  # noqa: E402

from infusing_jax import checkpoints  # noqa: E402
from infusing_jax import models  # noqa: E402

from tests.helpers.tiny import random_images, random_tokens  # noqa: E402

TOL = 1e-5


def _clip(quick_gelu=True):
    return open_clip.CLIP(
        embed_dim=48, quick_gelu=quick_gelu,
        vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=2, head_width=64,
                        mlp_ratio=2.0),
        text_cfg=dict(context_length=8, vocab_size=100, width=128, heads=2, layers=2))


def _siglip():
    """open_clip's SigLIP: timm's real B/16 SigLIP trunk (224 px) and a small text tower."""
    return open_clip.CustomTextCLIP(
        embed_dim=768, init_logit_bias=-10.0,
        vision_cfg=dict(timm_model_name="vit_base_patch16_siglip_224", timm_pool="map",
                        timm_proj="none", image_size=224),
        text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=2,
                      no_causal_mask=True, proj_bias=True, pool_type="last",
                      norm_kwargs={"eps": 1e-6}))


def _randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan = p.shape[-1] if p.ndim > 1 else 32
            noise = torch.randn(p.shape, generator=gen) * (1.1 / fan ** 0.5)
            is_norm_weight = name.endswith("weight") and p.ndim == 1 and (
                "norm" in name or "ln" in name)
            p.copy_(1.0 + noise if is_norm_weight else noise)


# (family, open_clip's activation, what the user names: OpenAI weights run
# quick_gelu, LAION / DataComp / DFN ones exact GELU; SigLIP's is inferred).
CASES = [("clip", "quick_gelu"), ("clip", "gelu"), ("siglip", None)]


def _model(family, act):
    return _clip(quick_gelu=act == "quick_gelu") if family == "clip" else _siglip()


@pytest.mark.parametrize("family,act", CASES)
def test_real_open_clip_both_directions(family, act, tmp_path):
    torch.manual_seed(0)
    model = _model(family, act).eval()
    _randomize(model)
    path = str(tmp_path / "open_clip_model.safetensors")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)

    params, cfg = checkpoints.load(path, act=act)
    images, tokens = random_images(2, size=cfg.image_size), random_tokens(3, family)
    with torch.no_grad():
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
        ids = torch.from_numpy(tokens.astype(np.int64))
        ref_img = model.encode_image(pixels).numpy()
        ref_txt = model.encode_text(ids).numpy()
    _, _, out = jax.jit(lambda p: models.build(cfg).apply({"params": p}, images, tokens))(params)
    assert np.abs(np.asarray(out["img"]["embedding"]) - ref_img).max() <= TOL
    assert np.abs(np.asarray(out["txt"]["embedding"]) - ref_txt).max() <= TOL

    # Our export loads back into the real open_clip model with no key left over.
    checkpoints.save(params, cfg, str(tmp_path / "again.safetensors"), "open_clip")
    from safetensors.torch import load_file
    fresh = _model(family, act)
    fresh.load_state_dict(load_file(str(tmp_path / "again.safetensors")), strict=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0, msg=k)
