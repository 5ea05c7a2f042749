"""Decoding any image to RGB, and each family's eval preprocessing (PIL / numpy).

Eval view, as each family's own code does it: SigLIP (big_vision) squash-resizes
to S x S bilinearly and scales pixels to [-1, 1] (TIPS: to [0, 1]); CLIP (OpenAI) resizes the
shorter side to S bicubically, centre crops S x S, and normalises with OpenAI's
mean and std. (The paper's retrieval protocol, shorter side + centre crop for
both, belongs to the data pipeline.)
"""
import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATION = {"siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "clip": (CLIP_MEAN, CLIP_STD),
                 "tips": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}
# big_vision resizes SigLIP inputs bilinearly, TIPS's code too; OpenAI CLIP bicubically.
RESAMPLE = {"siglip": Image.Resampling.BILINEAR, "clip": Image.Resampling.BICUBIC,
            "tips": Image.Resampling.BILINEAR}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: grayscale, palette, CMYK, 16/32-bit; alpha composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        x = np.asarray(image, np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or x.max() > 255 else 255.0
        x = np.clip(x / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(x, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode an image file fully (raises on a broken file) -> RGB PIL image."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def eval_view(image: Image.Image, size: int, family: str) -> np.ndarray:
    """RGB image -> (size, size, 3) float32, the family's eval view (module docstring)."""
    if family in ("siglip", "tips"):
        image = image.resize((size, size), RESAMPLE[family])
    else:
        w, h = image.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((new_w, new_h), RESAMPLE[family])
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    mean, std = NORMALIZATION[family]
    x = np.asarray(image, np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
