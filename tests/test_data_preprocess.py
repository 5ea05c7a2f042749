"""infusing_jax.data.tf_views: decoding against the PIL path, views, normalisation, tf.data."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from infusing_jax.data import tf_views
from infusing_jax.data.pil_views import NORMALIZATION, load_rgb

H, W = 45, 61  # odd sizes reach JPEG's partial blocks and chroma subsampling edges
_rng = np.random.default_rng(0)
RGB = _rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
ALPHA = _rng.integers(0, 256, (H, W, 1), dtype=np.uint8)
RGB16 = _rng.integers(0, 65536, (H, W, 3), dtype=np.uint16)
ALPHA16 = _rng.integers(0, 65536, (H, W, 1), dtype=np.uint16)

decode = tf.function(tf_views.decode)  # graph mode, as inside tf.data


def _pil(image, fmt, **kwargs):
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rgb(mode="RGB"):
    return Image.fromarray(RGB).convert(mode)


def _rgba():
    return Image.fromarray(np.concatenate([RGB, ALPHA], -1))


def _palette():
    return _rgb().quantize(64)


def _animated_gif():
    frames = [_rgb(), Image.fromarray(255 - RGB)]
    return _pil(frames[0], "GIF", save_all=True, append_images=frames[1:])


# name -> (encoded file, max |TF - PIL| in uint8 levels). Written by PIL, except the
# 16-bit colour PNGs (PIL cannot write them; tf.io.encode_png does).
CASES = {
    "jpeg": (lambda: _pil(_rgb(), "JPEG", quality=90), 0),
    "jpeg_420": (lambda: _pil(_rgb(), "JPEG", subsampling=2), 0),
    "jpeg_progressive": (lambda: _pil(_rgb(), "JPEG", progressive=True), 0),
    "jpeg_gray": (lambda: _pil(_rgb("L"), "JPEG"), 0),
    "jpeg_cmyk": (lambda: _pil(_rgb("CMYK"), "JPEG"), 0),
    "png": (lambda: _pil(_rgb(), "PNG"), 0),
    "png_gray": (lambda: _pil(_rgb("L"), "PNG"), 0),
    "png_palette": (lambda: _pil(_palette(), "PNG"), 0),
    "png_palette_transparent": (lambda: _pil(_palette(), "PNG", transparency=3), 0),
    "png_rgba": (lambda: _pil(_rgba(), "PNG"), 0),
    "png_gray_alpha": (lambda: _pil(_rgba().convert("LA"), "PNG"), 0),
    "png16_gray": (lambda: _pil(Image.fromarray(RGB16[..., 0]), "PNG"), 0),
    # PIL keeps the high byte of 16-bit colour (x >> 8); we round x * 255 / 65535.
    "png16_rgb": (lambda: tf.io.encode_png(RGB16).numpy(), 1),
    # ... and PIL composites those truncated values, we the 16-bit ones.
    "png16_rgba": (lambda: tf.io.encode_png(np.concatenate([RGB16, ALPHA16], -1)).numpy(), 2),
    "gif_animated": (_animated_gif, 0),
    "bmp": (lambda: _pil(_rgb(), "BMP"), 0),
    "bmp_gray": (lambda: _pil(_rgb("L"), "BMP"), 0),
    "bmp_32bit": (lambda: _pil(_rgba(), "BMP"), 0),  # 4th byte ignored by both
    "webp_lossless": (lambda: _pil(_rgb(), "WEBP", lossless=True), 0),
    "webp_lossy": (lambda: _pil(_rgb(), "WEBP", quality=80), 0),
    "webp_rgba": (lambda: _pil(_rgba(), "WEBP", lossless=True), 0),
    "webp_rgba_lossy": (lambda: _pil(_rgba(), "WEBP", quality=80), 0),
}


@pytest.mark.parametrize("name", CASES)
def test_decode_matches_pil(name, tmp_path):
    make, tolerance = CASES[name]
    data = make()
    path = tmp_path / name
    path.write_bytes(data)
    want = np.asarray(load_rgb(str(path)), np.int32)
    got = decode(tf.constant(data))
    assert got.dtype == tf.uint8 and got.shape == (H, W, 3)
    assert np.abs(got.numpy().astype(np.int32) - want).max() <= tolerance


def test_decode_16bit_is_rounded_not_truncated():
    got = decode(tf.constant(CASES["png16_rgb"][0]())).numpy()
    np.testing.assert_array_equal(got, np.round(RGB16 / 257.0).astype(np.uint8))


def test_gif_transparency_is_black_not_white():
    """Documented difference: TF fills a GIF's transparent pixels with 0, PIL with white."""
    data = _pil(_palette(), "GIF", transparency=3)
    transparent = np.asarray(Image.open(io.BytesIO(data))) == 3
    got = decode(tf.constant(data)).numpy()
    want = np.asarray(load_rgb(io.BytesIO(data)))
    assert transparent.any()
    np.testing.assert_array_equal(got[~transparent], want[~transparent])
    assert (got[transparent] == 0).all() and (want[transparent] == 255).all()


def _animated_webp(mode):
    frames = [Image.fromarray(RGB).convert(mode), Image.fromarray(255 - RGB).convert(mode)]
    return _pil(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_animated_webp_raises(mode):
    """TF 2.21 corrupts the heap on animated RGB WebP; decode refuses before decoding."""
    with pytest.raises(tf.errors.InvalidArgumentError, match="animated WebP"):
        decode(tf.constant(_animated_webp(mode)))


def test_ignore_errors_drops_exactly_the_broken_files():
    good = [CASES[k][0]() for k in ("jpeg", "png", "gif_animated", "bmp", "webp_lossy")]
    broken = [good[0][:len(good[0]) // 2], good[1][:-20], good[4][:100],
              b"not an image at all", _animated_webp("RGB")]
    files = [f for pair in zip(good, broken) for f in pair] + [b""]
    ds = tf.data.Dataset.from_tensor_slices(files).map(tf_views.decode, num_parallel_calls=4)
    kept = list(ds.ignore_errors().as_numpy_iterator())
    assert len(kept) == len(good)
    for image, data in zip(kept, good):
        np.testing.assert_array_equal(image, decode(tf.constant(data)).numpy())


def _image(h=375, w=500, seed=1):
    return tf.constant(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("hw, to", [((32, 32), (37, 37)), ((32, 32), (32, 32)),
                                     ((30, 50), (60, 50)), ((50, 70), (48, 48)),
                                     ((64, 20), (32, 40)), ((200, 250), (256, 256))])
def test_resize_is_the_antialiased_resize(hw, to):
    """_resize skips the antialiasing filter where no axis shrinks: the same filter, its
    weights exact (the antialiased ones are off by up to ~0.004 growing near 1x)."""
    image = _image(*hw, seed=3)
    want = tf.clip_by_value(tf.image.resize(image, to, "bilinear", antialias=True), 0.0, 255.0)
    np.testing.assert_allclose(tf_views._resize(image, *to).numpy(), want.numpy(), atol=0.01)
    if hw == to:
        np.testing.assert_array_equal(tf_views._resize(image, *to).numpy(), image.numpy())


def test_train_view_shape_range_and_seeds():
    image = _image()
    views = [tf_views.train_view(image, 224, 256, tf.constant([s, 7])) for s in range(6)]
    for v in views:
        assert v.dtype == tf.float32 and v.shape == (224, 224, 3)
        assert 0.0 <= v.numpy().min() and v.numpy().max() <= 255.0
    again = tf_views.train_view(image, 224, 256, tf.constant([0, 7]))
    np.testing.assert_array_equal(views[0].numpy(), again.numpy())
    for i in range(len(views)):
        for j in range(i):
            assert not np.array_equal(views[i].numpy(), views[j].numpy())


def test_train_view_crops_the_squashed_image():
    image = _image(50, 70)
    squashed = tf_views.squash(image, 48).numpy().astype(np.float32)
    windows = [squashed[t:t + 32, l:l + 32] for t in range(17) for l in range(17)]
    windows += [w[:, ::-1] for w in windows]
    for s in range(5):
        view = tf_views.train_view(image, 32, 48, tf.constant([s, 0], tf.int64)).numpy()
        assert any(np.array_equal(view, w) for w in windows)


def test_train_view_flips():
    image = np.zeros((40, 40, 3), np.uint8)
    image[5:15, 2:10] = 255  # asymmetric: a block at the left
    views = [tf_views.train_view(tf.constant(image), 40, 40, tf.constant([s, 0])).numpy()
             for s in range(16)]
    flipped = [np.array_equal(v, image[:, ::-1]) for v in views]
    unflipped = [np.array_equal(v, image) for v in views]
    assert all(f or u for f, u in zip(flipped, unflipped))
    assert any(flipped) and any(unflipped)


@pytest.mark.parametrize("size", [224, 384])
def test_eval_view_matches_pil(size):
    """TF's antialiased bilinear vs PIL's BILINEAR (8-bit output): within 1 level."""
    image = _image()  # 500 x 375
    got = tf_views.eval_view(image, size)
    assert got.dtype == tf.float32 and got.shape == (size, size, 3)
    pil = Image.fromarray(image.numpy())
    new_w = round(500 * size / 375)
    left = (new_w - size) // 2
    pil = pil.resize((new_w, size), Image.Resampling.BILINEAR).crop((left, 0, left + size, size))
    diff = np.abs(got.numpy() - np.asarray(pil, np.float32))
    assert diff.max() <= 1.0 and diff.mean() < 0.35


def test_eval_view_portrait():
    assert tf_views.eval_view(_image(500, 375), 224).shape == (224, 224, 3)


def test_normalize(family):
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, 4, 3)), tf.float32)
    mean, std = NORMALIZATION[family]
    want = (x.numpy() / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(tf_views.normalize(x, family).numpy(), want, atol=1e-5)
    lo = (0.0 - np.array(mean)) / np.array(std)
    hi = (1.0 - np.array(mean)) / np.array(std)
    if family == "siglip":
        np.testing.assert_allclose([lo, hi], [[-1] * 3, [1] * 3])
    for fn in (tf_views.train_fn(family, 224), tf_views.eval_fn(family, 224)):
        out = fn(tf.constant(CASES["jpeg"][0]()), tf.constant([0, 0])).numpy()
        assert out.dtype == np.float32 and out.shape == (224, 224, 3)
        assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()


def test_unknown_family():
    for call in (lambda: tf_views.normalize(tf.zeros(3), "blip"),
                 lambda: tf_views.train_fn("blip", 224), lambda: tf_views.eval_fn("blip", 224)):
        with pytest.raises(ValueError, match="unknown family"):
            call()


def test_tips_takes_pixels_in_0_1():
    x = tf.constant([[0.0, 127.5, 255.0]])
    np.testing.assert_allclose(tf_views.normalize(x, "tips").numpy(), [[0.0, 0.5, 1.0]])


def test_train_fn_default_resize():
    data, seed = tf.constant(CASES["png"][0]()), tf.constant([3, 4])
    want = tf_views.normalize(
        tf_views.train_view(tf_views.decode(data), 224, 256, seed), "siglip")
    np.testing.assert_array_equal(tf_views.train_fn("siglip", 224)(data, seed).numpy(),
                                  want.numpy())


def test_deterministic_in_parallel_tf_data():
    names = list(CASES)[:12]
    files = [CASES[k][0]() for k in names]
    seeds = [[i, 1] for i in range(len(files))]
    fn = tf_views.train_fn("clip", 32, 40)

    def run():
        ds = tf.data.Dataset.from_tensor_slices((files, seeds)).map(fn, num_parallel_calls=4)
        options = tf.data.Options()
        options.deterministic = True
        return np.stack(list(ds.with_options(options).as_numpy_iterator()))

    first = run()
    assert first.shape == (len(files), 32, 32, 3)
    np.testing.assert_array_equal(first, run())
    for i in (0, 5, 11):
        np.testing.assert_array_equal(first[i], fn(tf.constant(files[i]), tf.constant(seeds[i])))
