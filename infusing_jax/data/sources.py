"""Sources: where a dataset's examples come from, as schema dicts (see schema.py).

    source = load_source("tfds:stanford_online_products", data_dir="/data/tfds")
    source.splits                  # ('train', 'test')
    source.roles                   # Roles(query='test', index='test')
    split = source.split("train")  # SplitData
    ds = split.dataset(jax.process_index(), jax.process_count())

Specs:
  tfds:NAME[:CONFIG]      a TFDS dataset from _TFDS (data_dir: the TFDS data folder)
  folder:DIR              DIR/<class>/**/<image>, or DIR/{train,val,test}/<class>/**/<image>
  uned:DIR                UnED split files DIR/{train,val,test,index}.json
                          (data_dir: the image root, default DIR)
  captions:FILE.json[:SPLIT]  an image-text set (data_dir: the image root, default
                          FILE's folder); the source has one split, SPLIT (default 'test')
  images:DIR_OR_LIST      unlabelled images, one split 'train': DIR read recursively, or
                          a text file of image paths, one per line (relative ones against
                          data_dir, default the file's folder; paths that are not files
                          are counted, named and left out); e.g. a generic domain

No source decodes images: `image` is the encoded file, broken files included.
File sources read through tf.io.gfile: DIR and FILE may be local or gs:// paths.
"""
import collections
import concurrent.futures
import dataclasses
import json
import os
import posixpath
from typing import Mapping, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from infusing_jax import errors
from infusing_jax.data.schema import NO_LABEL, SplitData
from infusing_jax.data.pil_views import IMAGE_EXTENSIONS

_SPLIT_ORDER = ("train", "val", "test", "index")


@dataclasses.dataclass(frozen=True)
class Roles:
    """The splits that retrieval evaluation uses as queries and as the index (may be the same)."""
    query: str
    index: str


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset: its splits by name and its retrieval roles."""
    name: str
    roles: Roles
    split_data: Mapping[str, SplitData]
    class_names: Optional[tuple] = None  # label i's name, where the source names its classes

    @property
    def splits(self) -> tuple:
        return tuple(self.split_data)

    def split(self, name: str) -> SplitData:
        if name not in self.split_data:
            raise errors.UserError(f"{self.name}: no split {name!r}; it has {', '.join(self.splits)}")
        return self.split_data[name]


def load_source(spec: str, data_dir: Optional[str] = None) -> Source:
    """'tfds:NAME[:CONFIG]' | 'folder:DIR' | 'uned:DIR' | 'captions:FILE.json[:SPLIT]' |
    'images:DIR_OR_LIST' -> Source."""
    kind, _, rest = spec.partition(":")
    loaders = {"tfds": _tfds_source, "folder": _folder_source, "uned": _uned_source,
               "captions": _captions_source, "images": _images_source}
    if kind not in loaders or not rest:
        raise errors.UserError(f"unknown source spec {spec!r}; use tfds:NAME[:CONFIG], folder:DIR, "
                         "uned:DIR, captions:FILE.json[:SPLIT] or images:DIR_OR_LIST")
    return loaders[kind](rest, data_dir)


def _roles(splits) -> Roles:
    """query = 'test' (else the first split); index = 'index' if there is one, else = query."""
    query = "test" if "test" in splits else splits[0]
    return Roles(query=query, index="index" if "index" in splits else query)


def _ordered(names) -> list:
    """Split names, train/val/test/index first, the rest sorted."""
    return sorted(names, key=lambda s: (_SPLIT_ORDER.index(s) if s in _SPLIT_ORDER else 99, s))


# ---------------------------------------------------------------------------- TFDS


@dataclasses.dataclass(frozen=True)
class _TfdsSet:
    """How a TFDS dataset maps onto the schema; field names as in the installed builders."""
    label: Optional[str]                 # ClassLabel feature; None: no labels (caption sets)
    splits: Mapping[str, str]            # our split name -> TFDS split name
    coarse: Optional[str] = None         # ClassLabel feature of a coarser class
    captions: bool = False               # has the feature captions: Sequence({'text': ...})


_TRAIN_TEST = {"train": "train", "test": "test"}
_TEST = {"test": "test"}
_TFDS = {
    "cars196": _TfdsSet("label", _TRAIN_TEST),
    "stanford_online_products": _TfdsSet("class_id", _TRAIN_TEST, coarse="super_class_id"),
    "food101": _TfdsSet("label", {"train": "train", "test": "validation"}),
    # TFDS 'test' is iNat's public test set, whose labels are -1.
    "i_naturalist2021": _TfdsSet("label", {"train": "train", "mini": "mini", "test": "val"},
                                 coarse="supercategory"),
    "caltech_birds2011": _TfdsSet("label", _TRAIN_TEST),
    "oxford_flowers102": _TfdsSet("label", {"train": "train", "val": "validation", "test": "test"}),
    "oxford_iiit_pet": _TfdsSet("label", _TRAIN_TEST, coarse="species"),
    # TFDS 'test' is the unlabelled ImageNet test set.
    "imagenet2012": _TfdsSet("label", {"train": "train", "test": "validation"}),
    "imagenet_v2": _TfdsSet("label", _TEST),
    "imagenet_sketch": _TfdsSet("label", _TEST),
    "imagenet_r": _TfdsSet("label", _TEST),
    "imagenet_a": _TfdsSet("label", _TEST),
    # Small generic domains: TFDS 'test' of places365_small is unlabelled.
    "imagenette": _TfdsSet("label", {"train": "train", "test": "validation"}),
    "places365_small": _TfdsSet("label", {"train": "train", "test": "validation"}),
    "coco_captions": _TfdsSet(None, {"train": "train", "val": "val", "test": "test",
                                     "restval": "restval"}, captions=True),
}


def _tfds_source(rest: str, data_dir: Optional[str]) -> Source:
    name, _, config = rest.partition(":")
    if name not in _TFDS:
        raise errors.UserError(f"tfds:{rest}: unsupported TFDS dataset; supported: {', '.join(_TFDS)}")
    info = _TFDS[name]
    builder = _tfds_builder(f"{name}/{config}" if config else name, data_dir)
    split_data = {ours: _tfds_split(builder, info, ours, theirs, rest)
                  for ours, theirs in info.splits.items()}
    return Source(name=name, roles=_roles(tuple(split_data)), split_data=split_data)


def _tfds_builder(name: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
    """The builder from the installed code, or from the prepared files' own metadata.

    i_naturalist2021's code cannot build its DatasetInfo offline: its label-names file is
    not shipped in the tensorflow_datasets wheel (FileNotFoundError).
    """
    try:
        return tfds.builder(name, data_dir=data_dir)
    except FileNotFoundError:
        try:
            return tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            where = data_dir or "the default TFDS data_dir"
            raise errors.UserError(f"tfds:{name}: no prepared data in {where}; prepare it "
                             f"(tfds build {name}) and pass data_dir=that folder") from None


def _tfds_split(builder, info: _TfdsSet, ours: str, theirs: str, spec: str) -> SplitData:
    """One TFDS split as SplitData; id = tfds_id ('<file>__<index>': stable for given files)."""
    wanted = {"image": True}
    for key in (info.label, info.coarse):
        if key:
            wanted[key] = True
    if info.captions:
        wanted["captions"] = {"text": True}
    # Only the fields we use are parsed: skips segmentation masks (pets, birds), COCO objects, ...
    decoders = tfds.decode.PartialDecoding(wanted, decoders={"image": tfds.decode.SkipDecoding()})

    def read(read_config):
        try:
            return builder.as_dataset(split=theirs, decoders=decoders, read_config=read_config,
                                      shuffle_files=False)
        except AssertionError:  # how TFDS says the data is not prepared
            raise errors.UserError(f"tfds:{spec}: no prepared data in {builder.data_dir}; prepare it "
                             f"(tfds build {builder.name}) or pass data_dir=the TFDS data "
                             "folder that holds it") from None

    # TFDS knows its split's files only once prepared (not under tfds.testing.mock_data).
    num_files = builder.info.splits[theirs].num_shards if theirs in builder.info.splits else 0

    def dataset(shard_index: int, num_shards: int) -> tf.data.Dataset:
        if num_shards > 1 and num_files >= num_shards:
            # Whole files per process: each process reads only its own files.
            context = tf.distribute.InputContext(num_input_pipelines=num_shards,
                                                 input_pipeline_id=shard_index)
            ds = read(tfds.ReadConfig(add_tfds_id=True, input_context=context))
        else:
            # Fewer files than processes (TFDS refuses input_context): every process reads
            # the split and keeps every num_shards-th example.
            ds = read(tfds.ReadConfig(add_tfds_id=True)).shard(num_shards, shard_index)
        return ds.map(to_schema, num_parallel_calls=tf.data.AUTOTUNE)

    def to_schema(ex):
        out = {
            "image": ex["image"],
            "label": ex[info.label] if info.label else tf.constant(NO_LABEL, tf.int64),
            "coarse_label": ex[info.coarse] if info.coarse else tf.constant(NO_LABEL, tf.int64),
            "id": ex["tfds_id"],
        }
        if info.captions:
            out["captions"] = ex["captions"]["text"]
        return out

    features = builder.info.features
    return SplitData(
        name=ours,
        num_examples=int(read(tfds.ReadConfig(add_tfds_id=True)).cardinality()),
        num_classes=features[info.label].num_classes if info.label else 0,
        num_coarse_classes=features[info.coarse].num_classes if info.coarse else 0,
        dataset=dataset,
        has_captions=info.captions,
    )


# ---------------------------------------------------------------------------- files


def _file_split(name: str, root: str, records: list, num_classes: int,
                captions: bool = False) -> SplitData:
    """records: [(relative path, label[, captions list])] -> SplitData with ids, sorted by path.

    id = the relative path; image = the bytes of root/path (read after sharding); `unread`
    leaves the path there, for the training pipeline to read a chunk at a time.
    """
    records = sorted(records, key=lambda r: r[0])
    ids = np.array([r[0] for r in records], dtype=object)
    labels = np.array([r[1] for r in records], dtype=np.int64)
    paths = [posixpath.join(root, r[0]) for r in records]

    def unread(shard_index: int, num_shards: int) -> tf.data.Dataset:
        columns = {"image": paths, "label": labels,
                   "coarse_label": np.full(len(records), NO_LABEL, np.int64), "id": list(ids)}
        if captions:
            columns["captions"] = tf.RaggedTensor.from_row_lengths(
                [c for r in records for c in r[2]], [len(r[2]) for r in records])
        return tf.data.Dataset.from_tensor_slices(columns).shard(num_shards, shard_index)

    def dataset(shard_index: int, num_shards: int) -> tf.data.Dataset:
        return unread(shard_index, num_shards).map(
            lambda ex: dict(ex, image=tf.io.read_file(ex["image"])),
            num_parallel_calls=tf.data.AUTOTUNE)

    return SplitData(name=name, num_examples=len(records), num_classes=num_classes,
                     num_coarse_classes=0, dataset=dataset, has_captions=captions,
                     labels=labels, ids=ids, unread=unread, read=tf.io.read_file)


def _is_subdir(folder: str, name: str) -> bool:
    """Whether listdir(folder)'s entry `name` is a folder: gs:// listings end folders with
    '/', so only other filesystems' entries are stat-ed (on gs:// a stat is a request)."""
    return name.endswith("/") or tf.io.gfile.isdir(posixpath.join(folder, name))


def _subdirs(folder: str) -> list:
    """Names of folder's sub-folders, sorted."""
    return sorted(n.rstrip("/") for n in tf.io.gfile.listdir(folder) if _is_subdir(folder, n))


def _images_under(root: str, sub: str) -> list:
    """Paths relative to root of the image files under root/sub, recursively, by extension
    (any case). Entries named like images are taken as files without a stat."""
    out, todo = [], [sub]
    while todo:
        rel = todo.pop()
        folder = posixpath.join(root, rel)
        for name in tf.io.gfile.listdir(folder):
            if posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                out.append(posixpath.join(rel, name))
            elif _is_subdir(folder, name):
                todo.append(posixpath.join(rel, name.rstrip("/")))
    return out


def _folder_source(rest: str, data_dir: Optional[str]) -> Source:
    """DIR/<class>/... (one split, 'train') or DIR/{train,val,test}/<class>/...; classes sorted
    by name over all splits -> labels 0..C-1 (the same class, the same label in every split)."""
    root = rest.rstrip("/")
    if not tf.io.gfile.isdir(root):
        raise errors.UserError(f"folder:{rest}: no such directory")
    split_dirs = {s: s for s in ("train", "val", "test")
                  if tf.io.gfile.isdir(posixpath.join(root, s))} or {"train": ""}
    class_dirs = {s: _subdirs(posixpath.join(root, d)) for s, d in split_dirs.items()}
    classes = sorted({c for names in class_dirs.values() for c in names})
    label_of = {c: i for i, c in enumerate(classes)}
    split_data = {}
    for s, names in class_dirs.items():
        records = [(p, label_of[c]) for c in names
                   for p in _images_under(root, posixpath.join(split_dirs[s], c))]
        if not records:
            raise errors.UserError(f"folder:{rest}: no images in class sub-folders of "
                             f"{posixpath.join(root, split_dirs[s])} "
                             f"(extensions {' '.join(IMAGE_EXTENSIONS)})")
        split_data[s] = _file_split(s, root, records, num_classes=len(classes))
    return Source(name=posixpath.basename(root), roles=_roles(tuple(split_data)),
                  split_data=split_data, class_names=tuple(classes))


def _images_source(rest: str, data_dir: Optional[str]) -> Source:
    """Unlabelled images (label -1, no classes), one split 'train', sorted by path: the
    image files under DIR, recursively (id: the path below DIR), or the files listed in
    a text file, one per line, blank lines and lines starting with '#' ignored (id: the
    path, relative ones joined to data_dir, default the list's folder). Listed paths
    that are not files (missing, or folders) and repeated paths are counted, named in a
    warning and left out; the listed files are stat-ed in parallel (on gs:// a stat is
    a request)."""
    spec = f"images:{rest}"
    if tf.io.gfile.isdir(rest):
        root = rest.rstrip("/")
        records = [(p, NO_LABEL) for p in _images_under(root, "")]
        where = f"under {root} (extensions {' '.join(IMAGE_EXTENSIONS)})"
    elif tf.io.gfile.exists(rest):
        base = data_dir or posixpath.dirname(rest)
        try:
            with tf.io.gfile.GFile(rest) as f:
                lines = [line.strip() for line in f.read().splitlines()]
        except UnicodeDecodeError:
            raise errors.UserError(f"{spec}: not a text file; give a folder of images or a "
                                   "text file of image paths, one per line") from None
        listed = [p if "://" in p else posixpath.normpath(posixpath.join(base, p))
                  for p in lines if p and not p.startswith("#")]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            is_file = dict(zip(listed, pool.map(_is_file, listed)))
        unique = sorted(set(listed))
        _warn_left_out(spec, len(listed), [p for p in unique if not is_file[p]],
                       "are not files (missing, or folders)")
        _warn_left_out(spec, len(listed), sorted(p for p, n in collections.Counter(
            listed).items() if n > 1), "are listed more than once (kept once)")
        root, records = "", [(p, NO_LABEL) for p in unique if is_file[p]]
        where = f"listed in {rest} that are files"
    else:
        raise errors.UserError(f"{spec}: no such folder or file; give a folder of images "
                               "(read recursively) or a text file of image paths")
    if not records:
        raise errors.UserError(f"{spec}: no images {where}")
    name = posixpath.splitext(posixpath.basename(rest.rstrip("/")))[0]
    return Source(name=name, roles=_roles(("train",)),
                  split_data={"train": _file_split("train", root, records, num_classes=0)})


def _is_file(path: str) -> bool:
    """Whether `path` (local or remote) is a file: one stat."""
    if "://" not in path:
        return os.path.isfile(path)
    try:
        return not tf.io.gfile.stat(path).is_directory
    except tf.errors.NotFoundError:
        return False


def _warn_left_out(spec: str, listed: int, paths: list, why: str) -> None:
    if paths:
        logging.warning("%s: %d of the %d listed paths %s: %s%s", spec, len(paths), listed,
                        why, ", ".join(paths[:5]), " ..." if len(paths) > 5 else "")


def _uned_source(rest: str, data_dir: Optional[str]) -> Source:
    """UnED split files DIR/<split>.json: [{"path": relative image path, "class_id": int}, ...].

    Images are at <data_dir or DIR>/<path> (the UnED layout keeps them in data/images, beside
    data/info_files/<dataset>). num_classes = max class_id + 1, per split.
    """
    folder = rest.rstrip("/")
    files = ([n for n in tf.io.gfile.listdir(folder) if n.endswith(".json")]
             if tf.io.gfile.isdir(folder) else [])
    if not files:
        raise errors.UserError(f"uned:{rest}: no split files there (train.json, val.json, test.json, "
                         "index.json)")
    root = data_dir or folder
    split_data = {}
    for name in _ordered([f[:-len(".json")] for f in files]):
        path = posixpath.join(folder, f"{name}.json")
        records = _records(path, lambda r: (r["path"], _single_class(r["class_id"], path)),
                           '[{"path": ..., "class_id": ...}, ...]')
        if not records:
            raise errors.UserError(f"uned:{rest}: {name}.json has no records")
        num_classes = max(label for _, label in records) + 1
        split_data[name] = _file_split(name, root, records, num_classes=num_classes)
    return Source(name=posixpath.basename(folder), roles=_roles(tuple(split_data)),
                  split_data=split_data)


def _single_class(class_id, path: str) -> int:
    """UnED class_id: an int, or a list (multi-label records); one class only here."""
    if isinstance(class_id, list):
        if len(class_id) != 1:
            raise errors.UserError(f"{path}: multi-label class_id {class_id} is not supported")
        class_id = class_id[0]
    return int(class_id)


def _captions_source(rest: str, data_dir: Optional[str]) -> Source:
    """An image-text set: a JSON list [{"image": path, "captions": [str, ...]}, ...], or
    Karpathy's dataset_{coco,flickr30k}.json {"images": [{"filepath"?, "filename", "split",
    "sentences": [{"raw": str}, ...]}, ...]} filtered to SPLIT. Images at <data_dir or the
    JSON's folder>/<path>. label = -1."""
    if rest.endswith(".json"):
        file, split = rest, "test"
    else:
        file, _, split = rest.rpartition(":")
    if not file or not tf.io.gfile.exists(file) or tf.io.gfile.isdir(file):
        raise errors.UserError(f"captions:{rest}: no such JSON file {file or rest}")
    want = ('[{"image": ..., "captions": [...]}, ...] or a Karpathy JSON {"images": '
            '[{"filename", "split", "sentences": [{"raw"}, ...]}, ...]}')
    data = _read_json(file, want)
    if isinstance(data, list):
        records = _records(file, lambda r: (r["image"], NO_LABEL, list(r["captions"])), want,
                           data)
    else:
        records = _records(file, lambda r: (posixpath.join(r.get("filepath", ""),
                                                            r["filename"]), NO_LABEL,
                                            [s["raw"] for s in r["sentences"]]), want,
                           [r for r in _field(data, "images", file, want)
                            if _field(r, "split", file, want) == split])
    if not records:
        raise errors.UserError(f"captions:{rest}: no images for split {split!r} in {file}")
    root = data_dir or posixpath.dirname(file)
    split_data = {split: _file_split(split, root, records, num_classes=0, captions=True)}
    return Source(name=posixpath.splitext(posixpath.basename(file))[0], roles=_roles((split,)),
                  split_data=split_data)


def _read_json(path: str, want: str):
    """The JSON in `path`; one UserError where it is not JSON."""
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.UserError(f"{path}: not JSON ({e}); want {want}") from None


def _field(record, key: str, path: str, want: str):
    try:
        return record[key]
    except (KeyError, TypeError, IndexError):
        raise errors.UserError(f"{path}: no {key!r} in {str(record)[:80]}; want {want}") from None


def _records(path: str, parse, want: str, data=None) -> list:
    """parse(record) for each record of the JSON list in `path` (or `data`); one UserError
    naming the first record it fails on."""
    data = _read_json(path, want) if data is None else data
    if not isinstance(data, list):
        raise errors.UserError(f"{path}: not a JSON list; want {want}")
    out = []
    for i, record in enumerate(data):
        try:
            out.append(parse(record))
        except (KeyError, TypeError, IndexError, ValueError) as e:
            if isinstance(e, errors.UserError):
                raise
            raise errors.UserError(f"{path}: record {i} ({str(record)[:80]}) does not fit "
                                   f"({type(e).__name__}: {e}); want {want}") from None
    return out
