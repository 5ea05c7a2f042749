"""Zero-shot text side: class names and prompt templates.

Class names by granularity, 'fine' (the `label` field) and 'coarse' (the
`coarse_label` field), from the installed TFDS builders' metadata, offline:

  cars196, food101, oxford_flowers102, oxford_iiit_pet (+ coarse: Cat, Dog),
  stanford_online_products (coarse only: its 12 super-classes);
  imagenet2012 and its variants: TFDS labels them by WordNet id (n01440764);
  the names are the first lemma of tensorflow_datasets' bundled ImageNet label
  list (datasets/siscore/labels.py), the full lemma list where two classes
  share a first lemma ('maillot').

Underscores become spaces ('apple_pie' -> 'apple pie'). Datasets whose TFDS
labels are bare numbers (caltech_birds2011, SOP's class_id) have no names:
give a file (`read_class_names`), one name per line, line i = class i.

Templates are ours: a few per dataset, '{}' standing for the class name.
"""
import re

from infusing_jax import errors
from infusing_jax.data import sources

GENERIC = ("a photo of a {}.", "an image showing a {}.", "a {} in the picture.",
           "a snapshot of the {}.", "a sketch of a {}.")
TEMPLATES = {
    "imagenet2012": GENERIC,
    "cars196": ("a photo of a {}, a type of car.", "a {} parked outside.", "the {} on the road.",
                "a {} for sale."),
    "food101": ("a photo of {}, a type of food.", "a plate of {}.", "{} served on a table.",
                "a close-up of homemade {}."),
    "oxford_flowers102": ("a photo of a {}, a type of flower.", "a {} in bloom.",
                          "a close-up of a {} flower.", "{} flowers in a garden."),
    "oxford_iiit_pet": ("a photo of a {}, a type of pet.", "a {} resting at home.",
                        "a portrait of a {}.", "a {} looking at the camera."),
    "stanford_online_products": ("a photo of a {}, a product for sale.",
                                 "a {} on a white background.", "a {} in an online shop."),
}
GRANULARITIES = {"fine": "label", "coarse": "coarse_label"}  # name -> schema field
_WNID = re.compile(r"n\d{8}")


def templates(dataset: str) -> tuple:
    """The templates of a TFDS dataset name ('imagenet_v2' -> ImageNet's); GENERIC otherwise."""
    if dataset.startswith("imagenet"):
        return TEMPLATES["imagenet2012"]
    return TEMPLATES.get(dataset, GENERIC)


def check_templates(templates_) -> tuple:
    """The templates, each with exactly one '{}'; raises ValueError naming a bad one."""
    templates_ = tuple(templates_)
    if not templates_:
        raise errors.UserError("prompt templates: none given; give at least one like 'a photo of a {}.'")
    for t in templates_:
        if t.count("{}") != 1:
            raise errors.UserError(f"prompt template {t!r}: needs exactly one '{{}}' for the class name")
    return templates_


def clean(name: str) -> str:
    """A TFDS class name as words: underscores -> spaces, whitespace collapsed."""
    return " ".join(name.replace("_", " ").split())


def read_class_names(path) -> list:
    """A text file, one class name per line (line i = class i) -> list of names."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise errors.UserError(f"class names file {path}: cannot read ({e})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if empty or not lines:
        raise errors.UserError(f"class names file {path}: empty line {empty[:1] or 1}; want one name "
                         "per line, line i = class i")
    return [line.strip() for line in lines]


def imagenet_names(wnids) -> list:
    """WordNet ids in TFDS's ImageNet order -> readable names (see the module doc)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.siscore import labels as bundled
    order = tfds.builder("imagenet2012").info.features["label"].names
    lemmas = bundled.IMAGENET_LABELS_LIST
    if list(wnids) != list(order) or len(lemmas) != len(order):
        raise errors.UserError("imagenet class names: these WordNet ids are not TFDS's ImageNet order; "
                         "give a class names file")
    first = [s.split(", ")[0] for s in lemmas]
    return [f if first.count(f) == 1 else full for f, full in zip(first, lemmas)]


def tfds_class_names(name: str, data_dir=None) -> dict:
    """{'fine': [C names], 'coarse': [C' names]} from TFDS metadata, the granularities
    that have names; raises ValueError if none has. No data is read or downloaded."""
    # pylint: disable=protected-access  # the sources' own TFDS field map and builder
    if name not in sources._TFDS:
        raise errors.UserError(f"tfds:{name}: unsupported TFDS dataset; give a class names file")
    spec = sources._TFDS[name]
    features = sources._tfds_builder(name, data_dir).info.features
    out = {}
    for granularity, key in (("fine", spec.label), ("coarse", spec.coarse)):
        names = list(features[key].names) if key else []
        if names and all(_WNID.fullmatch(n) for n in names):
            out[granularity] = imagenet_names(names)
        elif names and not all(n.isdigit() for n in names):
            out[granularity] = [clean(n) for n in names]
    if not out:
        raise errors.UserError(f"tfds:{name}: TFDS has no class names for it (only numbers); give a "
                         "class names file")
    return out


def source_class_names(spec: str, data_dir=None) -> dict:
    """{'fine': names[, 'coarse': names]} of a data spec's classes, label i = name i: TFDS
    metadata (`tfds_class_names`), or a folder: source's class folders as words; one
    UserError for a source that names no classes (uned:, captions:, images:)."""
    kind, _, rest = spec.partition(":")
    if kind == "tfds":
        return tfds_class_names(rest.split(":")[0], data_dir)
    names = sources.load_source(spec, data_dir).class_names
    if not names:
        raise errors.UserError(f"{spec} has no class names of its own; give a file with one "
                               "name per line (line i = class i)")
    return {"fine": [clean(n) for n in names]}
