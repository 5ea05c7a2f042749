"""open_clip state dicts: OpenAI-style CLIP ViTs and SigLIP (`visual.trunk.*`, timm names).

open_clip stores no hyperparameters with the weights, so they follow from the
tensors: head counts from the widths (see `num_heads`), and for SigLIP the
activation from which model the shapes identify (see `hints`). A CLIP's
activation cannot be told from its tensors (OpenAI's weights use quick_gelu,
LAION / DataComp / DFN ones exact GELU): the caller must name it.
"""
from infusing_jax.checkpoints import infer
from infusing_jax.checkpoints import mapping
from infusing_jax.checkpoints.mapping import dense as _dense
from infusing_jax.checkpoints.mapping import layer_norm as _ln
from infusing_jax.checkpoints.mapping import rule

_RESBLOCK = dict(ln1="ln_1", ln2="ln_2", qkv=("attn.in_proj_weight", "attn.in_proj_bias"),
                 out="attn.out_proj", fc1="mlp.c_fc", fc2="mlp.c_proj")
_TIMM_BLOCK = dict(ln1="norm1", ln2="norm2", qkv="attn.qkv", out="attn.proj",
                   fc1="mlp.fc1", fc2="mlp.fc2")


def _text(prefix, proj):
    return [
        rule("txt/Embed_0/embedding", f"{prefix}token_embedding.weight"),
        rule("txt/pos_embedding", f"{prefix}positional_embedding", "pos"),
        *mapping.block_rules("txt/Encoder_0/encoderblock_{i}/",
                             f"{prefix}transformer.resblocks.{{i}}.", _RESBLOCK),
        *_ln("txt/Encoder_0/encoder_norm", f"{prefix}ln_final"),
        *proj,
    ]


_T = "visual.trunk."
_POOL = "img/MAPHead_0/"
_POOL_ATTN = _POOL + "MultiHeadDotProductAttention_0/"

SIGLIP = [
    rule("img/embedding/kernel", _T + "patch_embed.proj.weight", "conv"),
    rule("img/embedding/bias", _T + "patch_embed.proj.bias"),
    rule("img/pos_embedding", _T + "pos_embed"),
    *mapping.block_rules("img/Transformer/encoderblock_{i}/", _T + "blocks.{i}.", _TIMM_BLOCK),
    *_ln("img/Transformer/encoder_norm", _T + "norm"),
    rule(_POOL + "probe", _T + "attn_pool.latent"),
    rule(_POOL_ATTN + "query/kernel", _T + "attn_pool.q.weight", "heads_in"),
    rule(_POOL_ATTN + "query/bias", _T + "attn_pool.q.bias", "heads_bias"),
    rule([_POOL_ATTN + "key/kernel", _POOL_ATTN + "value/kernel"],
         _T + "attn_pool.kv.weight", "heads_in"),
    rule([_POOL_ATTN + "key/bias", _POOL_ATTN + "value/bias"],
         _T + "attn_pool.kv.bias", "heads_bias"),
    rule(_POOL_ATTN + "out/kernel", _T + "attn_pool.proj.weight", "heads_out"),
    rule(_POOL_ATTN + "out/bias", _T + "attn_pool.proj.bias"),
    *_ln(_POOL + "LayerNorm_0", _T + "attn_pool.norm"),
    *_dense(_POOL + "MlpBlock_0/Dense_0", _T + "attn_pool.mlp.fc1"),
    *_dense(_POOL + "MlpBlock_0/Dense_1", _T + "attn_pool.mlp.fc2"),
    *_text("text.", _dense("txt/head", "text.text_projection")),
    rule("t", "logit_scale", "scalar"),
    rule("b", "logit_bias", "scalar"),
]

CLIP = [
    rule("img/embedding/kernel", "visual.conv1.weight", "conv"),
    rule("img/cls", "visual.class_embedding", "cls"),
    rule("img/pos_embedding", "visual.positional_embedding", "pos"),
    *_ln("img/pre_norm", "visual.ln_pre"),
    *mapping.block_rules("img/Transformer/encoderblock_{i}/",
                         "visual.transformer.resblocks.{i}.", _RESBLOCK),
    *_ln("img/Transformer/encoder_norm", "visual.ln_post"),
    rule("img/head/kernel", "visual.proj"),  # used as x @ proj: already (in, out)
    *_text("", [rule("txt/head/kernel", "text_projection")]),
    rule("t", "logit_scale", "scalar"),
]

TABLES = {"siglip": SIGLIP, "clip": CLIP}

# Entries of OpenAI's JIT state dicts that are not parameters.
_NOT_PARAMS = ("input_resolution", "context_length", "vocab_size")


def unwrap(state: dict) -> dict:
    """A training checkpoint {'state_dict': {'module.x': ...}} -> {'x': ...}."""
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in _NOT_PARAMS}


def family_of(theirs: dict):
    """'siglip' | 'clip' | None, from the keys."""
    if any(k.startswith("visual.trunk.") for k in theirs):
        return "siglip"
    if "visual.conv1.weight" in theirs or "token_embedding.weight" in theirs:
        return "clip"
    return None


_SIGLIP_KEYS = {"img": "visual.trunk.patch_embed.proj.weight", "txt": "text.token_embedding.weight"}
_CLIP_KEYS = {"img": "visual.conv1.weight", "txt": "token_embedding.weight"}


# open_clip's CLIP image towers with heads wider than 64: ViT-H/14 (80),
# ViT-g/14 (88), ViT-bigG/14 (104), all 16 heads (model_configs/*.json).
_CLIP_WIDE_HEADS = {1280: 16, 1408: 16, 1664: 16}


def num_heads(theirs: dict, family: str) -> dict:
    """{'img': H, 'txt': H} for the towers present, from their widths.

    SigLIP (timm trunks, big_vision-sized text towers): big_vision's variants.
    CLIP: 64-wide heads, except the image towers in `_CLIP_WIDE_HEADS`.
    """
    keys = _SIGLIP_KEYS if family == "siglip" else _CLIP_KEYS
    heads = {}
    if keys["img"] in theirs:
        width = theirs[keys["img"]].shape[0]
        heads["img"] = (infer.heads_for_width(width) if family == "siglip" else
                        _CLIP_WIDE_HEADS.get(width, max(1, width // 64)))
    if keys["txt"] in theirs:
        width = theirs[keys["txt"]].shape[1]
        heads["txt"] = infer.heads_for_width(width) if family == "siglip" else max(1, width // 64)
    return heads


def _timm_siglip_uses_tanh(theirs: dict) -> bool:
    """timm's SigLIP trunks run exact GELU except So400m/16, L/16 at 512 px, giant-opt, B/32."""
    kernel = theirs[_SIGLIP_KEYS["img"]]
    width, patch = kernel.shape[0], kernel.shape[-1]
    grid = theirs["visual.trunk.pos_embed"].shape[1] ** 0.5
    return ((width == 1152 and patch == 16) or width == 1536 or (width == 768 and patch == 32)
            or (width == 1024 and patch == 16 and grid * patch == 512))


def hints(theirs: dict, family: str) -> dict:
    """What the format implies beyond the tensors: family and each tower's activation.

    SigLIP: torch's exact GELU (open_clip's SigLIP text towers and most timm
    trunks), except the tanh form in SigLIP2 text towers (their 256k Gemma
    vocabulary) and in the timm trunks `_timm_siglip_uses_tanh` lists. CLIP:
    none (the caller names it).
    """
    if family == "clip":
        return dict(family=family)
    out = dict(family=family, img=dict(act="gelu"), txt=dict(act="gelu"))
    if _SIGLIP_KEYS["img"] in theirs and _timm_siglip_uses_tanh(theirs):
        out["img"]["act"] = "gelu_tanh"
    if _SIGLIP_KEYS["txt"] in theirs and theirs[_SIGLIP_KEYS["txt"]].shape[0] == 256_000:
        out["txt"]["act"] = "gelu_tanh"
    return out
