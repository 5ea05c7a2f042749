"""Parity with open_clip (PyTorch, float32, CPU) on tiny random models.

`open_clip_torch` needs torchvision, which is not installed here, so the
references are small torch modules written for this test that rebuild the
module tree and forward pass of open_clip (v3.x) and timm:

* CLIP (OpenAI layout): open_clip `model.CLIP` with `transformer.VisionTransformer`
  (`conv1` without bias, `class_embedding`, `positional_embedding` over cls +
  patches, `ln_pre`, `ResidualAttentionBlock`s with `nn.MultiheadAttention`
  (`attn.in_proj_weight`, `attn.out_proj`), `mlp.c_fc` / `mlp.c_proj`,
  `ln_post` then token 0, `@ proj`) and the text tower inlined into CLIP
  (`token_embedding`, causal mask, `ln_final`, argmax (EOT) pooling,
  `@ text_projection`); QuickGELU and LayerNorm eps 1e-5.
* SigLIP: open_clip `model.CustomTextCLIP` with `timm_model.TimmModel`
  (`visual.trunk` is timm's `VisionTransformer(class_token=False,
  global_pool='map', num_classes=0)`: `patch_embed.proj` with bias, `pos_embed`,
  `blocks.{i}` with `norm1`, fused `attn.qkv`, `attn.proj`, `norm2`,
  `mlp.fc1` / `mlp.fc2`, final `norm`, `attn_pool` = `AttentionPoolLatent`)
  and `text` = `transformer.TextTransformer(no_causal_mask=True,
  pool_type='last', proj_bias=True)`; exact-erf GELU, LayerNorm eps 1e-6,
  scalar `logit_scale` and `logit_bias`.

Names follow the real modules, so `load_state_dict(strict=True)` proves that
an exported file has exactly open_clip's keys and shapes.
"""
import collections
import functools

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import torch as safetensors_torch
from torch import nn

from infusing_jax import checkpoints
from infusing_jax import models
from infusing_jax.checkpoints import tree
from infusing_jax.models import config as model_config

from tests.helpers.tiny import (TEXT_LEN, VOCAB, random_images, random_params, random_tokens,
                                tiny_config)

TOL = 1e-5


# ----------------------------------------------------------------------------
# open_clip CLIP (OpenAI layout): src/open_clip/transformer.py, model.py


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """open_clip ResidualAttentionBlock: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, width, heads, mlp_dim, act, eps):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(collections.OrderedDict([
            ("c_fc", nn.Linear(width, mlp_dim)),
            ("gelu", act()),
            ("c_proj", nn.Linear(mlp_dim, width)),
        ]))

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, depth, heads, mlp_dim, act, eps):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_dim, act, eps) for _ in range(depth)])

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class OpenClipVisionTransformer(nn.Module):
    """open_clip VisionTransformer, pool_type 'tok', final_ln_after_pool False."""

    def __init__(self, image_size, patch, width, depth, heads, mlp_dim, out_dim, act, eps):
        super().__init__()
        grid = image_size // patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=eps)
        self.transformer = Transformer(width, depth, heads, mlp_dim, act, eps)
        self.ln_post = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    def forward(self, images):
        x = self.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(x)
        return x[:, 0] @ self.proj


class OpenClipCLIP(nn.Module):
    """open_clip CLIP: visual tower + the text tower's modules inlined at the top level."""

    def __init__(self, image_size, patch, v_width, v_depth, v_heads, v_mlp,
                 vocab, seq_len, t_width, t_depth, t_heads, t_mlp, embed_dim):
        super().__init__()
        act, eps = QuickGELU, 1e-5
        self.visual = OpenClipVisionTransformer(image_size, patch, v_width, v_depth, v_heads,
                                                v_mlp, embed_dim, act, eps)
        self.transformer = Transformer(t_width, t_depth, t_heads, t_mlp, act, eps)
        self.token_embedding = nn.Embedding(vocab, t_width)
        self.positional_embedding = nn.Parameter(torch.zeros(seq_len, t_width))
        self.ln_final = nn.LayerNorm(t_width, eps=eps)
        self.text_projection = nn.Parameter(torch.zeros(t_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        mask = torch.full((seq_len, seq_len), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.logit_bias = None

    def encode_image(self, images, normalize=False):
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text, normalize=False):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]  # EOT: the largest token id
        x = x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x


# ----------------------------------------------------------------------------
# open_clip SigLIP: timm trunk (timm/models/vision_transformer.py,
# timm/layers/attention_pool.py, timm/layers/mlp.py) + open_clip TextTransformer


class Mlp(nn.Module):
    """timm Mlp: fc1 -> act -> fc2."""

    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()  # exact erf
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmAttention(nn.Module):
    """timm Attention: fused qkv laid out (3, heads, head_dim) on the output axis."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TimmBlock(nn.Module):
    def __init__(self, width, heads, mlp_dim, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = TimmAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, width):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=True)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)  # NCHW -> NLC


class AttentionPoolLatent(nn.Module):
    """timm AttentionPoolLatent, latent_len 1, pool 'token': x + mlp(norm(proj(attn)))."""

    def __init__(self, width, heads, mlp_dim, eps):
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.zeros(1, 1, width))
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim)

    def forward(self, x):
        b, n, c = x.shape
        hd = c // self.heads
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, 1, self.heads, hd).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = self.proj(x.transpose(1, 2).reshape(b, 1, c))
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


class TimmSiglipViT(nn.Module):
    """timm VisionTransformer(class_token=False, global_pool='map', num_classes=0)."""

    def __init__(self, image_size, patch, width, depth, heads, mlp_dim, eps=1e-6):
        super().__init__()
        grid = image_size // patch
        self.patch_embed = PatchEmbed(patch, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, width))
        self.blocks = nn.Sequential(*[TimmBlock(width, heads, mlp_dim, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=eps)
        self.attn_pool = AttentionPoolLatent(width, heads, mlp_dim, eps)
        self.head = nn.Identity()

    def forward(self, images):
        x = self.patch_embed(images) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(self.attn_pool(x))


class TimmModel(nn.Module):
    """open_clip TimmModel with timm_proj 'none': the trunk, and an empty head."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Sequential()

    def forward(self, images):
        return self.head(self.trunk(images))


class OpenClipTextTransformer(nn.Module):
    """open_clip TextTransformer, bidirectional, 'last' pooling, Linear projection with bias."""

    def __init__(self, vocab, seq_len, width, depth, heads, mlp_dim, out_dim, eps=1e-6):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.zeros(seq_len, width))
        self.transformer = Transformer(width, depth, heads, mlp_dim, nn.GELU, eps)
        self.ln_final = nn.LayerNorm(width, eps=eps)
        self.text_projection = nn.Linear(width, out_dim)
        self.attn_mask = None

    def forward(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        return self.text_projection(x[:, -1])


class OpenClipSiglip(nn.Module):
    """open_clip CustomTextCLIP with a timm SigLIP trunk."""

    def __init__(self, image_size, patch, v_width, v_depth, v_heads, v_mlp,
                 vocab, seq_len, t_width, t_depth, t_heads, t_mlp):
        super().__init__()
        self.visual = TimmModel(TimmSiglipViT(image_size, patch, v_width, v_depth, v_heads, v_mlp))
        self.text = OpenClipTextTransformer(vocab, seq_len, t_width, t_depth, t_heads, t_mlp,
                                            v_width)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def encode_image(self, images, normalize=False):
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text, normalize=False):
        x = self.text(text)
        return F.normalize(x, dim=-1) if normalize else x


def _reference(family, image_size, patch, v, t, embed_dim=None):
    """v, t: (width, depth, heads, mlp_dim) of the image and text towers."""
    if family == "clip":
        return OpenClipCLIP(image_size, patch, *v, VOCAB, TEXT_LEN, *t, embed_dim).eval()
    return OpenClipSiglip(image_size, patch, *v, VOCAB, TEXT_LEN, *t).eval()


def _reference_for(cfg):
    tower = lambda c: (c.width, c.depth, c.num_heads, c.mlp_dim)
    return _reference(cfg.family, cfg.image_size, cfg.image.patch_size, tower(cfg.image),
                      tower(cfg.text), cfg.image.out_dim)


def _torch_outputs(model, images, tokens):
    """open_clip's encode_image / encode_text (normalize=False) and get_logits' image logits."""
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        img = model.encode_image(pixels)
        txt = model.encode_text(ids)
        logits = model.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
        if model.logit_bias is not None:
            logits = logits + model.logit_bias
    return img.numpy(), txt.numpy(), logits.numpy()


def _assert_match(ours, theirs, relative=False):
    """max |diff| <= TOL (times max(1, max |theirs|) when `relative`)."""
    for name, a, b in zip(("image embedding", "text embedding", "logits"), ours, theirs):
        a = np.asarray(a)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        diff = float(np.max(np.abs(a - b)))
        tol = TOL * max(1.0, float(np.abs(b).max())) if relative else TOL
        assert diff <= tol, f"{name}: max |diff| {diff:.3g} > {tol:.3g}"
        assert np.abs(b).max() > 0.1, f"{name} trivially small"


def _flax_config(family):
    cfg = tiny_config(family)
    if family == "siglip":  # open_clip's SigLIP towers run timm / torch's exact GELU
        cfg.image.act = "gelu"
        cfg.text.act = "gelu"
    return cfg


def _ours(params, cfg, images, tokens):
    """Our model's image / text embeddings (before L2 normalisation) and image x text logits."""
    _, _, out = jax.jit(models.build(cfg).apply)({"params": params}, images, tokens)
    return out["img"]["embedding"], out["txt"]["embedding"], out["logits"]


def _read_file(path):
    if path.endswith(".safetensors"):
        return safetensors_torch.load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------
# Tests


@functools.lru_cache(maxsize=None)
def _flax_model(family):
    """(cfg, params, images, tokens, our outputs), shared by the .safetensors / .bin cases."""
    cfg = _flax_config(family)
    params = random_params(cfg)
    images, tokens = random_images(3), random_tokens(4, family)
    return cfg, params, images, tokens, _ours(params, cfg, images, tokens)


# open_clip records no CLIP activation; these reference CLIPs run QuickGELU.
_ACT = {"clip": "quick_gelu", "siglip": None}


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_export_loads_into_open_clip_and_matches(family, suffix, tmp_path):
    cfg, params, images, tokens, ours = _flax_model(family)
    path = str(tmp_path / f"open_clip{suffix}")
    checkpoints.save(params, cfg, path, "open_clip")

    model = _reference_for(cfg)
    state = _read_file(path)
    assert all(v.dtype == torch.float32 for v in state.values())
    model.load_state_dict(state, strict=True)  # no missing or unexpected keys, same shapes

    _assert_match(ours, _torch_outputs(model, images, tokens))

    # And the file reads back to the very same parameters.
    again, cfg2 = checkpoints.load(path, act=_ACT[family])
    assert cfg2.family == family
    (img, txt), (img2, txt2) = (model_config.resolved_towers(c) for c in (cfg, cfg2))
    assert (img2["act"], img2["ln_eps"], txt2["act"], txt2["ln_eps"]) == (
        img["act"], img["ln_eps"], txt["act"], txt["ln_eps"])
    ours_flat, again_flat = tree.flatten(params), tree.flatten(again)
    assert ours_flat.keys() == again_flat.keys()
    for k in ours_flat:
        np.testing.assert_array_equal(ours_flat[k], again_flat[k], err_msg=k)


def _randomize_torch(model, seed=0, std=0.2):
    """Every parameter random: LayerNorm weights ~ 1 + N(0, std^2), all else ~ N(0, std^2)."""
    gen = torch.Generator().manual_seed(seed)
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            module, _, leaf = name.rpartition(".")
            p.copy_(1.0 + noise if module in norms and leaf == "weight" else noise)


# Deliberately unlike tiny_config: another resolution, depths and (CLIP) an
# embedding width that differs from the tower widths, so that transposed
# projections or a wrong grid cannot pass. The head counts are what open_clip's
# head-count inference gives: 64-wide heads for CLIP, big_vision's variants for
# SigLIP (width 32 -> 2 heads, 64 -> 1 head). `std` keeps activations O(1).
REVERSE = {
    "clip": dict(image_size=48, patch=8, v=(128, 3, 2, 256), t=(64, 1, 1, 256), embed_dim=24,
                 std=0.1),
    "siglip": dict(image_size=48, patch=8, v=(32, 3, 2, 128), t=(64, 1, 1, 256), std=0.2),
}


def test_open_clip_training_checkpoint_loads_and_matches(family, tmp_path):
    spec = REVERSE[family]
    torch.manual_seed(0)
    model = _reference(family, spec["image_size"], spec["patch"], spec["v"], spec["t"],
                       spec.get("embed_dim"))
    _randomize_torch(model, seed=1, std=spec["std"])
    path = str(tmp_path / "epoch_1.bin")
    torch.save({"epoch": 1, "name": "tiny",
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)

    params, cfg = checkpoints.load(path, act=_ACT[family])
    v_width, v_depth, v_heads, v_mlp = spec["v"]
    t_width, t_depth, t_heads, t_mlp = spec["t"]
    assert cfg.family == family
    assert cfg.image_size == spec["image_size"] and cfg.image.patch_size == spec["patch"]
    assert (cfg.image.width, cfg.image.depth, cfg.image.num_heads, cfg.image.mlp_dim) == spec["v"]
    assert (cfg.text.width, cfg.text.depth, cfg.text.num_heads, cfg.text.mlp_dim) == spec["t"]
    assert cfg.text.vocab_size == VOCAB and cfg.text.seq_len == TEXT_LEN
    act = "gelu" if family == "siglip" else "quick_gelu"
    assert cfg.image.act == act and cfg.text.act == act
    if family == "clip":
        assert cfg.image.pool_type == "tok" and cfg.image.out_dim == spec["embed_dim"]
        assert cfg.text.out_dim == spec["embed_dim"]
    else:
        assert cfg.image.pool_type == "map" and cfg.image.out_dim is None
        assert cfg.text.out_dim == v_width

    images = random_images(3, size=spec["image_size"], seed=2)
    tokens = random_tokens(4, family, seed=2)
    _assert_match(_ours(params, cfg, images, tokens), _torch_outputs(model, images, tokens))

    # Export again: the same tensors as the original state dict.
    out = str(tmp_path / "again.safetensors")
    checkpoints.save(params, cfg, out, "open_clip")
    again = safetensors_torch.load_file(out)
    orig = model.state_dict()
    assert again.keys() == orig.keys()
    for k in orig:
        torch.testing.assert_close(again[k], orig[k], rtol=0, atol=0, msg=k)


def test_open_clip_bigg_text_heads(tmp_path):
    family = "clip"
    """open_clip ViT-bigG-14 text tower (model_configs/ViT-bigG-14.json): width 1280, 20 heads.

    Depth 1, a narrow MLP and tiny vocab keep it cheap; only the head count matters.
    """
    text = (1280, 1, 20, 64)
    model = _reference("clip", 32, 8, (64, 1, 1, 64), text, 24)
    _randomize_torch(model, seed=3)
    path = str(tmp_path / "bigg_text.bin")
    torch.save(model.state_dict(), path)
    params, cfg = checkpoints.load(path, act=_ACT[family])
    assert (cfg.text.width, cfg.text.depth, cfg.text.num_heads, cfg.text.mlp_dim) == text
    images, tokens = random_images(2, seed=3), random_tokens(2, "clip", seed=3)
    # Text embeddings reach ~20 at this width: float32 sums over 1280 terms, so relative.
    _assert_match(_ours(params, cfg, images, tokens), _torch_outputs(model, images, tokens),
                  relative=True)
