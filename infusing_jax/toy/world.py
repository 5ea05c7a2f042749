"""The toy world: a procedural, seeded stand-in for a VLM's world and a fine-grained domain.

Every image is one object on a background, 32 x 32 px, with pixel noise.

generic (the VLM's world): the object's shape, colour, texture, size and height
  are drawn at random and its caption names them all, e.g. "a large red striped
  circle at the top on a dark background". Class (for image retrieval and
  zero-shot) = colour + shape, e.g. "red circle".
target (the fine-grained domain): silver badges (large discs, a colour no
  caption uses) on the generic backgrounds, each marked with a glyph: a 3 x 3
  grid of dots, symmetric left-right (so horizontal flips keep it), on a plate
  that is one 8 px patch of the image grid. The class is the glyph, which no
  caption names; background, height, position and size vary inside a class.
  Classes are disjoint across train / val / test. (Glyphs on the generic objects
  themselves, with colour, shape and texture as nuisances, left the full method
  unable to learn them without losing text alignment on a model this small.)

Everything is invariant to horizontal flips (the fine-tuning augmentation):
shapes are symmetric, heights are named but left / right is not.

    make(root, seed=0, ...) writes, under root:
      generic/{train,test}/<colour>_<shape>/<n>.png
      captions_train.json, captions_test.json  [{"image": path, "captions": [...]}]
      target/{train,val,test}/glyph<code>/<n>.png
      classes.txt            generic class names, one per line ("red circle")
      spm.model              a sentencepiece tokenizer trained on the captions
"""
import hashlib
import json
import os
from typing import Optional

import numpy as np
from PIL import Image

from infusing_jax import errors

SIZE = 32
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {"red": (215, 40, 40), "green": (40, 185, 60), "blue": (45, 75, 225),
           "yellow": (235, 210, 40), "purple": (140, 50, 200), "orange": (245, 135, 30),
           "pink": (245, 130, 190), "cyan": (40, 205, 215)}
BADGE = ("silver", "circle")  # (colour, shape) of every target object
_RGB = {**COLOURS, "silver": (195, 195, 200)}
BACKGROUNDS = {"dark": (25, 25, 30), "light": (225, 225, 215), "grey": (120, 120, 120)}
TEXTURES = ("plain", "striped", "outlined")
SIZES = {"small": (5.0, 7.0), "large": (9.5, 12.0)}
HEIGHTS = {"top": 9.0, "middle": 16.0, "bottom": 23.0}
WHERE = {"top": "at the top", "middle": "in the middle", "bottom": "at the bottom"}
NOISE = 6.0
GLYPH_CELL = 8  # the glyph's plate: one ViT/8 patch
# A glyph: bits (left column, centre column) x 3 rows; the right column mirrors the left.
GLYPH_CODES = tuple(range(1, 64))


def class_name(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def _texture(a: dict) -> str:
    """The texture word and a space ('' for plain)."""
    return "" if a["texture"] == "plain" else a["texture"] + " "


def caption(a: dict) -> str:
    return (f"a {a['size']} {a['colour']} {_texture(a)}{a['shape']} {WHERE[a['height']]} "
            f"on a {a['background']} background")


def partial_captions(a: dict, rng) -> list:
    """The full caption and two shorter ones that name fewer attributes."""
    texture = _texture(a)
    short = [f"a {a['colour']} {a['shape']}",
             f"a {a['size']} {a['colour']} {texture}{a['shape']}",
             f"a {a['colour']} {a['shape']} {WHERE[a['height']]}",
             f"a {a['colour']} {a['shape']} on a {a['background']} background",
             f"a {texture}{a['shape']} on a {a['background']} background"]
    return [caption(a)] + list(rng.choice(short, 2, replace=False))


def generic_classes() -> list:
    """(colour, shape) pairs in the order of their folder names (= class ids)."""
    return sorted(((c, s) for c in COLOURS for s in SHAPES), key=lambda cs: "_".join(cs))


def random_attributes(rng, sizes=("small", "large"), colour_shape=None) -> dict:
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    colour, shape = colour_shape or (pick(list(COLOURS)), pick(SHAPES))
    return dict(shape=shape, colour=colour, texture=pick(TEXTURES), size=pick(list(sizes)),
                height=pick(list(HEIGHTS)), background=pick(list(BACKGROUNDS)))


def _shape_mask(shape: str, dx, dy, r):
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (ax <= 0.82 * r) & (ay <= 0.82 * r)
    if shape == "triangle":  # apex up
        return (dy <= 0.8 * r) & (dy >= -r + 2.0 * ax)
    if shape == "diamond":
        return ax + ay <= 1.1 * r
    if shape == "cross":
        return ((ax <= 0.33 * r) & (ay <= r)) | ((ay <= 0.33 * r) & (ax <= r))
    if shape == "ring":
        d2 = dx ** 2 + dy ** 2
        return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def glyph_bits(code: int) -> np.ndarray:
    """6-bit code -> (3, 3) bool, columns (left, centre, left mirrored)."""
    bits = [(code >> i) & 1 for i in range(6)]
    left, centre = np.array(bits[:3], bool), np.array(bits[3:], bool)
    return np.stack([left, centre, left], axis=1)


def render(a: dict, rng, glyph: Optional[int] = None) -> np.ndarray:
    """Attributes (and a glyph code) -> uint8 (SIZE, SIZE, 3).

    A glyph fills one 8 x 8 cell of the image grid (a ViT/8 patch) at the object's
    centre: a plain plate of the object's colour with 2 x 2 px dots at a 3 px pitch.
    """
    lo, hi = SIZES[a["size"]]
    r = rng.uniform(lo, hi)
    if glyph is None:
        cy = HEIGHTS[a["height"]] + rng.uniform(-1.0, 1.0)
        cx = rng.uniform(r * 0.8, SIZE - r * 0.8)
    else:
        cy, cx = (float(GLYPH_CELL * rng.integers(1, 3) + GLYPH_CELL / 2) for _ in range(2))
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    image = np.empty((SIZE, SIZE, 3), np.float32)
    image[:] = BACKGROUNDS[a["background"]]
    colour = np.array(_RGB[a["colour"]], np.float32)
    shade = np.ones((SIZE, SIZE), np.float32)
    if a["texture"] == "striped":
        shade = np.where((y.astype(int) // 2) % 2 == 0, 1.0, 0.55)
    mask = _shape_mask(a["shape"], dx, dy, r)
    if a["texture"] == "outlined":  # a dark rim: the mask minus its shrunk copy
        inner = _shape_mask(a["shape"], dx * r / (r - 2.0), dy * r / (r - 2.0), r)
        shade = np.where(inner, 1.0, 0.35)
    image[mask] = colour * shade[mask, None]
    if glyph is not None:
        top, left = int(cy) - GLYPH_CELL // 2, int(cx) - GLYPH_CELL // 2
        image[top:top + GLYPH_CELL, left:left + GLYPH_CELL] = colour
        ink = 0.0 if colour.mean() > 110 else 255.0
        for (i, j) in zip(*np.nonzero(glyph_bits(glyph))):
            image[top + 3 * i:top + 3 * i + 2, left + 3 * j:left + 3 * j + 2] = ink
    image += rng.normal(0.0, NOISE, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _write(root: str, rel: str, pixels):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def glyph_splits(seed: int, train: int, val: int, test: int) -> dict:
    """Class-disjoint glyph codes per split, in a seeded order."""
    if train + val + test > len(GLYPH_CODES):
        raise ValueError(f"toy world: {train + val + test} glyph classes asked, "
                         f"{len(GLYPH_CODES)} exist")
    order = np.random.default_rng(seed).permutation(GLYPH_CODES)
    return {"train": order[:train], "val": order[train:train + val],
            "test": order[train + val:train + val + test]}


def _generic(root: str, split: str, n: int, rng) -> list:
    """n images, the classes in turn (every class present once n >= 48)."""
    records, classes = [], generic_classes()
    for i in range(n):
        a = random_attributes(rng, colour_shape=classes[i % len(classes)])
        rel = f"generic/{split}/{a['colour']}_{a['shape']}/{i:05d}.png"
        _write(root, rel, render(a, rng))
        captions = partial_captions(a, rng) if split == "train" else [caption(a)]
        records.append({"image": rel, "captions": captions})
    return records


def _target(root: str, codes: dict, per_class: dict, rng) -> None:
    for split, split_codes in codes.items():
        for code in split_codes:
            for i in range(per_class[split]):
                a = random_attributes(rng, sizes=("large",), colour_shape=BADGE)
                a["texture"] = "plain"
                _write(root, f"target/{split}/glyph{code:02d}/{i:03d}.png",
                       render(a, rng, glyph=int(code)))


def train_tokenizer(texts, prefix: str, vocab_size: int = 64) -> str:
    """A sentencepiece model on `texts` -> PREFIX.model (EOS 1, pad 0, as SigLIP's)."""
    import sentencepiece
    corpus = prefix + ".corpus.txt"
    with open(corpus, "w") as f:
        f.write("\n".join(texts) + "\n")
    with open(os.devnull, "w") as log:
        sentencepiece.SentencePieceTrainer.train(
            input=corpus, model_prefix=prefix, vocab_size=vocab_size, pad_id=0, eos_id=1,
            unk_id=2, bos_id=-1, minloglevel=2, logstream=log, hard_vocab_limit=False,
            model_type="word")
    os.remove(corpus)
    return prefix + ".model"


def make(root: str, seed: int = 0, generic_train: int = 20000, generic_test: int = 1000,
         target_classes=(40, 8, 15), target_per_class=(40, 10, 20)) -> dict:
    """Writes the world under `root` (see the module docstring); -> its description
    {'settings': these arguments, 'size', 'digest'}, also written to root/world.json.
    The same arguments give the same files."""
    settings = dict(seed=seed, generic_train=generic_train, generic_test=generic_test,
                    target_classes=list(target_classes),
                    target_per_class=list(target_per_class))
    rng = np.random.default_rng(seed)
    train = _generic(root, "train", generic_train, rng)
    test = _generic(root, "test", generic_test, rng)
    for name, records in (("captions_train.json", train), ("captions_test.json", test)):
        with open(os.path.join(root, name), "w") as f:
            json.dump(records, f)
    codes = glyph_splits(seed, *target_classes)
    _target(root, codes, dict(zip(("train", "val", "test"), target_per_class)), rng)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(class_name(c, s) for c, s in generic_classes()) + "\n")
    texts = [c for r in train for c in r["captions"]]
    train_tokenizer(texts, os.path.join(root, "spm"))
    info = dict(settings=settings, size=SIZE, digest=_digest(train + test))
    with open(os.path.join(root, "world.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def _digest(records) -> str:
    return hashlib.sha256(json.dumps(records).encode()).hexdigest()[:16]


def main(argv):
    del argv
    from absl import flags
    from infusing_jax import cli
    f = flags.FLAGS
    done = os.path.join(f.root, "world.json")
    try:
        wanted = dict(seed=f.seed, generic_train=f.generic_train, generic_test=f.generic_test,
                      target_classes=[int(x) for x in f.target_classes],
                      target_per_class=[int(x) for x in f.target_per_class])
    except ValueError:
        raise errors.UserError(f"--target_classes={','.join(f.target_classes)}, "
                               f"--target_per_class={','.join(f.target_per_class)}: give "
                               "integers, e.g. 40,8,15") from None
    for name in ("generic_train", "generic_test"):
        if f[name].value < 1:
            raise errors.UserError(f"--{name}={f[name].value}: must be >= 1")
    for name in ("target_classes", "target_per_class"):
        if len(wanted[name]) != 3 or min(wanted[name]) < 1:
            raise errors.UserError(f"--{name}={','.join(f[name].value)}: give three "
                                   "numbers >= 1 (train,val,test)")
    cli.check_folder("--root", f.root)
    if os.path.exists(done):
        with open(done) as file:
            have = json.load(file)["settings"]
        if have != wanted:
            raise errors.UserError(f"--root={f.root}: holds a toy world made with {have}, not "
                                   f"{wanted}; use another --root or delete it")
        print(f"{f.root}: the toy world is there already ({done})")
        return
    info = make(f.root, **wanted)
    print(f"{f.root}: toy world written: {json.dumps(info)}")


if __name__ == "__main__":
    from absl import flags
    from infusing_jax import cli
    flags.DEFINE_string("root", None, "Where to write the world.")
    flags.DEFINE_integer("seed", 0, "The world's seed.")
    flags.DEFINE_integer("generic_train", 20000, "Generic image-caption pairs to pretrain on.")
    flags.DEFINE_integer("generic_test", 1000, "Generic test images (one caption each).")
    flags.DEFINE_list("target_classes", ["40", "8", "15"], "Glyph classes: train,val,test.")
    flags.DEFINE_list("target_per_class", ["40", "10", "20"], "Images per class: train,val,test.")
    flags.mark_flag_as_required("root")
    cli.run(main)
