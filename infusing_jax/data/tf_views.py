"""Image preprocessing as TensorFlow ops, for tf.data `map` (graph mode, parallel calls).

decode: any JPEG / PNG / GIF / BMP / WebP -> uint8 RGB, matching
  `infusing_jax.data.pil_views.load_rgb` (PIL): 16-bit PNGs scaled by 255/65535
  and rounded (PIL truncates 16-bit colour: off by <= 1); PNG and WebP alpha
  composited on white; a BMP's 4th byte ignored, as PIL does. Not matched: a
  GIF's transparent pixels come out black (PIL: white); an 8-bit palette BMP
  is read as gray indices (wrong colours) and 1/4-bit BMPs raise (TF's BMP
  decoder; both rare); an animated WebP raises (see `_decode_webp`).
  A broken file raises, so `Dataset.ignore_errors()` after the
  map drops it.
train_view: squash-resize to (resize, resize) and round to uint8 (`squash`, as PIL's
  resize rounds), then random crop (size, size) and random horizontal flip
  (`crop_and_flip`); stateless, so the same seed gives the same view.
eval_view: shorter side to `size`, centre crop (size, size): the paper's eval
  protocol for every family.
Views are float32 in [0, 255]; `normalize` maps them to each family's input range.
train_fn / eval_fn return a `View`: decode, then augment (view + normalise), two
stages the training pipeline runs apart (a broken file is dropped and counted;
an augmentation that fails is a bug or a bad setting, and stops the run). The
train view's decode ends with the squash, so its decoded images all have one
shape (`View.decoded_shape`, 1 byte a value) and the pipeline can keep them in
memory.
Resizing is bilinear with antialiasing (a triangle filter widened when
downscaling, like PIL's BILINEAR).
"""
import dataclasses
from typing import Callable, Optional

import tensorflow as tf

from infusing_jax.data.pil_views import CLIP_MEAN, CLIP_STD

FAMILIES = ("siglip", "clip", "tips")


def _on_white(rgba):
    """uint8 or uint16 (H, W, 4) -> uint8 (H, W, 3): alpha composited on white, rounded."""
    x = tf.cast(rgba, tf.float32) / rgba.dtype.max
    rgb, alpha = x[..., :3], x[..., 3:]
    return tf.cast(tf.round((rgb * alpha + 1.0 - alpha) * 255.0), tf.uint8)


def _decode_png(image_bytes):
    """PNG of any bit depth / colour type -> uint8 (H, W, 3)."""
    return _on_white(tf.io.decode_png(image_bytes, channels=4, dtype=tf.uint16))


def _decode_webp(image_bytes):
    """Still WebP (RGB or RGBA) -> uint8 (H, W, 3); an animated one raises.

    TF 2.21 overruns the heap decoding an animated WebP without alpha (process
    crash or silent corruption), so animations (VP8X chunk, flag 0x02) are refused.
    """
    vp8x = tf.equal(tf.strings.substr(image_bytes, 12, 4), b"VP8X")
    flags = tf.io.decode_raw(tf.strings.substr(image_bytes, 20, 1), tf.uint8)[0]
    animated = tf.logical_and(vp8x, tf.bitwise.bitwise_and(flags, 2) > 0)
    check = tf.debugging.Assert(tf.logical_not(animated), ["animated WebP is not supported"])
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(image_bytes, expand_animations=False)  # (H, W, 3 or 4)
    return tf.cond(tf.shape(image)[-1] == 4, lambda: _on_white(image), lambda: image)


def _decode_any_png(image_bytes):
    """PNG -> uint8 (H, W, 3). An 8-bit gray or RGB one (its IHDR's bit depth and colour
    type, bytes 24 and 25) has no alpha, no palette and no 16-bit values, so it decodes
    straight to RGB (PIL too ignores a tRNS colour key on these); others go through
    _decode_png. A PNG too short to hold an IHDR raises, as broken."""
    depth_and_type = tf.strings.substr(image_bytes, 24, 2)
    plain = tf.logical_or(tf.equal(depth_and_type, b"\x08\x02"),
                          tf.equal(depth_and_type, b"\x08\x00"))
    return tf.cond(plain, lambda: tf.io.decode_png(image_bytes, channels=3),
                   lambda: _decode_png(image_bytes))


def decode(image_bytes):
    """Encoded image file (scalar tf.string) -> uint8 (H, W, 3); raises on a broken file."""
    magic = tf.strings.substr(image_bytes, 0, 4)
    image = tf.case(  # conds: a Case op would make the pipeline's iterator unsaveable
        [(tf.io.is_jpeg(image_bytes), lambda: tf.io.decode_jpeg(
            image_bytes, channels=3, dct_method="INTEGER_ACCURATE")),  # libjpeg's default, as PIL
         (tf.equal(magic, b"\x89PNG"), lambda: _decode_any_png(image_bytes)),
         (tf.equal(magic, b"RIFF"), lambda: _decode_webp(image_bytes))],
        default=lambda: tf.io.decode_image(image_bytes, channels=3, expand_animations=False))
    return tf.ensure_shape(image, [None, None, 3])


def _resize(image, height, width):
    """(H, W, 3) -> float32 (height, width, 3) in [0, 255], bilinear with antialiasing.

    The antialiasing filter only widens the triangle when an axis shrinks; where none
    does, plain bilinear is that filter, computed exactly, at ~1/5 of the CPU (a 32 px
    image squashed to 37: 0.03 against 0.15 ms). The antialiased kernel's own weights
    are off by up to ~0.004 (of 255) when an image grows by a factor near 1, so after
    rounding to uint8 ~0.1% of such an image's values differ by 1 between the two."""
    size = tf.stack([height, width])
    shrinks = tf.reduce_any(size < tf.shape(image)[:2])
    image = tf.cond(shrinks, lambda: tf.image.resize(image, size, "bilinear", antialias=True),
                    lambda: tf.image.resize(image, size, "bilinear"))
    return tf.clip_by_value(image, 0.0, 255.0)


def squash(image, resize: int):
    """uint8 (H, W, 3) -> uint8 (resize, resize, 3): resized, aspect not kept, rounded. An
    image of that size already is returned as it is (which the resize gives back too)."""
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], resize))
    image = tf.cond(same, lambda: image,
                    lambda: tf.cast(tf.round(_resize(image, resize, resize)), tf.uint8))
    return tf.ensure_shape(image, (resize, resize, 3))


def crop_and_flip(image, size: int, seed):
    """uint8 (R, R, 3) -> float32 (size, size, 3): a random crop, flipped left-right with
    probability 1/2; seed: int (2,), same seed -> same view."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.stateless_random_crop(tf.cast(image, tf.float32), (size, size, 3),
                                           crop_seed)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def train_view(image, size: int, resize: int, seed):
    """(H, W, 3) -> float32 (size, size, 3) in [0, 255]: crop_and_flip(squash(image))."""
    return crop_and_flip(squash(image, resize), size, seed)


def eval_view(image, size: int):
    """(H, W, 3) -> float32 (size, size, 3) in [0, 255]: shorter side to size, centre crop."""
    hw = tf.cast(tf.shape(image)[:2], tf.float64)
    new_hw = tf.maximum(size, tf.cast(tf.round(hw * size / tf.reduce_min(hw)), tf.int32))
    image = _resize(image, new_hw[0], new_hw[1])
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    return tf.ensure_shape(image[top:top + size, left:left + size], (size, size, 3))


def _check(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def normalize(x, family: str):
    """float32 (..., 3) in [0, 255] -> the family's input: siglip [-1, 1]; clip OpenAI
    mean/std; tips [0, 1]."""
    _check(family)
    x = x / 255.0
    if family == "siglip":
        return (x - 0.5) / 0.5
    if family == "tips":
        return x
    return (x - tf.constant(CLIP_MEAN)) / tf.constant(CLIP_STD)


@dataclasses.dataclass(frozen=True)
class View:
    """decode: image bytes -> uint8 (H, W, 3), raises on a broken file; augment:
    (uint8 image, seed int (2,) or None) -> float32 (S, S, 3). Calling it runs both.
    decoded_shape: the one shape decode gives every image, or None where it varies."""
    augment: Callable
    decode: Callable = decode
    decoded_shape: Optional[tuple] = None

    def __call__(self, image_bytes, seed=None):
        return self.augment(self.decode(image_bytes), seed)


def train_fn(family: str, size: int, resize: int = None) -> View:
    """-> View(augment(image, seed int (2,)) -> float32 (size, size, 3)).

    resize defaults to round(size * 256 / 224): 256 for 224, as the authors.
    """
    _check(family)
    resize = resize or round(size * 256 / 224)
    return View(augment=lambda image, seed: normalize(crop_and_flip(image, size, seed), family),
                decode=lambda image_bytes: squash(decode(image_bytes), resize),
                decoded_shape=(resize, resize, 3))


def eval_fn(family: str, size: int) -> View:
    """-> View(augment(image, seed ignored) -> float32 (size, size, 3))."""
    _check(family)
    return View(lambda image, seed=None: normalize(eval_view(image, size), family))
