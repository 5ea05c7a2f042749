"""Parity with transformers (PyTorch, float32, CPU) on tiny random models."""
import numpy as np
import pytest
import torch
import transformers
from safetensors import numpy as safetensors_np

from infusing_jax import checkpoints
from infusing_jax import models

from tests.helpers.tiny import random_images, random_params, random_tokens, tiny_config

TOL = 1e-5
HF_CLASSES = {("siglip", True): transformers.SiglipModel,
              ("siglip", False): transformers.SiglipVisionModel,
              ("clip", True): transformers.CLIPModel,
              ("clip", False): transformers.CLIPVisionModelWithProjection}


def _load_hf(path, family, text):
    model, info = HF_CLASSES[family, text].from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def _max_diff(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours) - theirs.detach().numpy())))


def test_two_tower_matches_transformers(family, tmp_path):
    cfg = tiny_config(family)
    params = random_params(cfg)
    checkpoints.save(params, cfg, str(tmp_path / "hf"), "hf")
    hf_model = _load_hf(tmp_path / "hf", family, True)

    images, tokens = random_images(3), random_tokens(4, family)
    zimg, ztxt, out = models.build(cfg).apply({"params": params}, images, tokens)
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        ref = hf_model(input_ids=ids, pixel_values=pixels)
        vision = hf_model.vision_model(pixel_values=pixels)
        text = hf_model.text_model(input_ids=ids)

    # HF CLIP's vision last_hidden_state is before the final LayerNorm; the others after it.
    hidden = "pre_norm" if family == "clip" else "encoded"
    assert _max_diff(out["img"][hidden], vision.last_hidden_state) <= TOL
    assert _max_diff(out["img"]["pooled"], vision.pooler_output) <= TOL
    assert _max_diff(out["txt"]["encoded"], text.last_hidden_state) <= TOL
    # SigLIP's HF text pooler output includes the head; CLIP's stops before the projection.
    pooled_text = "pooled" if family == "clip" else "embedding"
    assert _max_diff(out["txt"][pooled_text], text.pooler_output) <= TOL
    assert _max_diff(zimg, ref.image_embeds) <= TOL
    assert _max_diff(ztxt, ref.text_embeds) <= TOL
    assert _max_diff(out["logits"], ref.logits_per_image) <= TOL * 10  # logits scale ~exp(t)
    assert np.abs(np.asarray(out["logits"])).max() > 0.1  # not trivially zero


def test_image_tower_matches_transformers(family, tmp_path):
    cfg = tiny_config(family, text=False)
    params = random_params(cfg, seed=1)
    checkpoints.save(params, cfg, str(tmp_path / "hf"), "hf")
    hf_model = _load_hf(tmp_path / "hf", family, False)
    images = random_images(2, seed=1)
    _, _, out = models.build(cfg).apply({"params": params}, images)
    with torch.no_grad():
        ref = hf_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    if family == "clip":
        assert _max_diff(out["img"]["pre_norm"], ref.last_hidden_state) <= TOL
        assert _max_diff(out["img"]["embedding"], ref.image_embeds) <= TOL
    else:
        assert _max_diff(out["img"]["encoded"], ref.last_hidden_state) <= TOL
        assert _max_diff(out["img"]["embedding"], ref.pooler_output) <= TOL


def _randomize_torch(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(1.0 + noise if name.endswith("norm.weight") or "layer_norm" in name
                    and name.endswith("weight") else noise)


def _hf_config(family):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    if family == "siglip":
        return transformers.SiglipConfig(
            vision_config=dict(common, image_size=32, patch_size=8),
            text_config=dict(common, vocab_size=100, max_position_embeddings=8))
    return transformers.CLIPConfig(
        vision_config=dict(common, image_size=32, patch_size=8),
        text_config=dict(common, vocab_size=100, max_position_embeddings=8,
                         eos_token_id=99),
        projection_dim=24)


def test_hf_flax_hf_identical(family, tmp_path):
    """A model saved by transformers itself -> Flax -> HF: identical tensors, config inferred."""
    torch.manual_seed(0)
    cls = HF_CLASSES[family, True]
    model = cls(_hf_config(family))
    _randomize_torch(model)
    model.save_pretrained(tmp_path / "orig")
    params, cfg = checkpoints.load(str(tmp_path / "orig"))
    assert cfg.image.num_heads == 4 and cfg.image.depth == 2 and cfg.text.mlp_dim == 64
    checkpoints.save(params, cfg, str(tmp_path / "again"), "hf")
    orig = safetensors_np.load_file(str(tmp_path / "orig" / "model.safetensors"))
    again = safetensors_np.load_file(str(tmp_path / "again" / "model.safetensors"))
    assert orig.keys() == again.keys()
    for k in orig:
        np.testing.assert_array_equal(orig[k], again[k], err_msg=k)
    _load_hf(tmp_path / "again", family, True)
    auto = transformers.AutoModel.from_pretrained(tmp_path / "again")
    assert type(auto) is HF_CLASSES[family, True]
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "again")
    pixels = processor(images=np.zeros((40, 50, 3), np.uint8), return_tensors="np")
    assert pixels["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.slow
def test_full_size_siglip_b16_image_tower(tmp_path):
    """SigLIP B/16 at 224 px: big_vision npz -> Flax -> HF, identical weights and outputs."""
    cfg = models.model_config("siglip", "B/16", 224, text_variant=None)
    params = random_params(cfg, seed=3, std=0.02)  # a trained model's scale, not exploding
    checkpoints.save(params, cfg, str(tmp_path / "b16.npz"), "big_vision")
    loaded, cfg2 = checkpoints.load(str(tmp_path / "b16.npz"))
    assert (cfg2.image.width, cfg2.image.depth, cfg2.image.num_heads, cfg2.image.mlp_dim,
            cfg2.image.patch_size, cfg2.image_size) == (768, 12, 12, 3072, 16, 224)
    flat, flat2 = checkpoints.to_flat(params), checkpoints.to_flat(loaded)
    assert all(np.array_equal(flat[k], flat2[k]) for k in flat) and flat.keys() == flat2.keys()
    checkpoints.save(loaded, cfg2, str(tmp_path / "hf"), "hf")
    hf_model = _load_hf(tmp_path / "hf", "siglip", False)
    images = random_images(2, size=224, seed=3)
    _, _, out = models.build(cfg2).apply({"params": loaded}, images)
    with torch.no_grad():
        ref = hf_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    assert _max_diff(out["img"]["encoded"], ref.last_hidden_state) <= TOL
    assert _max_diff(out["img"]["embedding"], ref.pooler_output) <= TOL
    params_back, _ = checkpoints.load(str(tmp_path / "hf"))
    back = checkpoints.to_flat(params_back)
    assert all(np.array_equal(flat[k], back[k]) for k in flat)
