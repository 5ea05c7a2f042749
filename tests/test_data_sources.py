"""Sources (tfds, folder, uned, captions, images) and the paper's splits (carve_val, holdout)."""
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from infusing_jax.data import splits as splits_lib
from infusing_jax.data.sources import Roles, load_source
from tests.helpers.assertions import one_line_error

BROKEN = b"\xff\xd8 not really a jpeg"


def _examples(ds: tf.data.Dataset) -> list:
    return list(ds.as_numpy_iterator())


def _ids(split, shard_index=0, num_shards=1) -> list:
    return [ex["id"] for ex in _examples(split.dataset(shard_index, num_shards))]


def _write_image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)



# ---------------------------------------------------------------------------- TFDS, mocked


def test_tfds_cars196():
    with tfds.testing.mock_data(num_examples=5):
        source = load_source("tfds:cars196")
        split = source.split("train")
        examples = _examples(split.dataset(0, 1))
    assert source.name == "cars196"
    assert source.splits == ("train", "test")
    assert source.roles == Roles(query="test", index="test")
    assert (split.num_examples, split.num_classes, split.num_coarse_classes) == (5, 196, 0)
    assert not split.has_captions
    assert len(examples) == 5
    for ex in examples:
        assert set(ex) == {"image", "label", "coarse_label", "id"}
        assert ex["image"].startswith(b"\x89PNG")  # the encoded file, not pixels
        assert 0 <= ex["label"] < 196 and ex["coarse_label"] == -1
        assert ex["id"].startswith(b"cars196-train.tfrecord")


@pytest.mark.parametrize("name,classes", [("imagenette", 10), ("places365_small", 365)])
def test_tfds_small_generic_sets(name, classes):
    with tfds.testing.mock_data(num_examples=4):
        source = load_source(f"tfds:{name}")
        examples = _examples(source.split("test").dataset(0, 1))
    assert source.splits == ("train", "test") and source.split("train").num_classes == classes
    assert len(examples) == 4 and all(0 <= ex["label"] < classes for ex in examples)
    assert all(ex["id"].startswith(f"{name}-validation".encode()) for ex in examples)


def test_tfds_sop_coarse_label():
    with tfds.testing.mock_data(num_examples=6):
        split = load_source("tfds:stanford_online_products").split("test")
        examples = _examples(split.dataset(0, 1))
    assert (split.num_classes, split.num_coarse_classes) == (22634, 12)
    assert all(0 <= ex["coarse_label"] < 12 and 0 <= ex["label"] < 22634 for ex in examples)


def test_tfds_coco_captions():
    captions = [["a dog", "a brown dog"], ["a cat"], ["two birds", "birds", "sky"]]

    # The mock's random generator cannot make Sequence(Text) captions: give it examples.
    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        return tf.data.Dataset.from_tensor_slices({
            "tfds_id": [f"coco-{split}__{i}" for i in range(3)],
            "image": [b"jpeg%d" % i for i in range(3)],
            "captions": {"text": tf.ragged.constant(captions)},
        })

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        source = load_source("tfds:coco_captions:2014")
        split = source.split("test")
        examples = _examples(split.dataset(0, 1))
    assert source.splits == ("train", "val", "test", "restval")
    assert split.has_captions and split.num_examples == 3 and split.num_classes == 0
    assert [ex["label"] for ex in examples] == [-1, -1, -1]
    assert [[c.decode() for c in ex["captions"]] for ex in examples] == captions
    assert examples[0]["id"] == b"coco-test__0"


def test_tfds_imagenet_holdout_80_20():
    with tfds.testing.mock_data(num_examples=400):
        source = load_source("tfds:imagenet2012")
        train = source.split("train")
        kept, held = splits_lib.holdout(train, fraction=0.2, seed=42)
        kept_ids, held_ids = _ids(kept), _ids(held)
        again = _ids(splits_lib.holdout(train, fraction=0.2, seed=42)[1])
        other_seed = _ids(splits_lib.holdout(train, fraction=0.2, seed=7)[1])
        sharded = [_ids(held, i, 3) for i in range(3)]
        all_ids = _ids(train)
    assert source.splits == ("train", "test")
    assert not set(kept_ids) & set(held_ids)
    assert sorted(kept_ids + held_ids) == sorted(all_ids) and len(all_ids) == 400
    assert 0.14 < len(held_ids) / 400 < 0.26
    assert again == held_ids and other_seed != held_ids
    assert sorted(sum(sharded, [])) == sorted(held_ids)
    assert kept.num_examples is None  # TFDS: counting needs a full read
    assert (kept.name, held.name) == ("train", "train-heldout")


def test_tfds_carve_val_without_known_labels():
    with tfds.testing.mock_data(num_examples=60):
        split = load_source("tfds:oxford_iiit_pet").split("train")
        train, val = splits_lib.carve_val(split, 0.3, seed=0)
        train_labels = {ex["label"] for ex in _examples(train.dataset(0, 1))}
        val_labels = {ex["label"] for ex in _examples(val.dataset(0, 1))}
        coarse = {ex["coarse_label"] for ex in _examples(split.dataset(0, 1))}
    assert split.num_coarse_classes == 2 and coarse <= {0, 1}
    assert val_labels and train_labels and not train_labels & val_labels
    assert train.num_examples is None and val.num_classes == 37


# ---------------------------------------------------------------------------- TFDS, prepared files


@pytest.fixture(scope="module")
def prepared_cars(tmp_path_factory):
    """A real prepared cars196 (TFDS data dir): train in 4 files of 3 examples, test in 1."""
    data_dir = tmp_path_factory.mktemp("tfds")
    features = tfds.builder("cars196", data_dir=str(data_dir)).info.features
    version_dir = data_dir / "cars196" / "2.1.0"
    version_dir.mkdir(parents=True)
    for split, num_files in [("train", 4), ("test", 1)]:
        for f in range(num_files):
            name = f"cars196-{split}.tfrecord-{f:05d}-of-{num_files:05d}"
            with tf.io.TFRecordWriter(str(version_dir / name)) as writer:
                for i in range(3):
                    writer.write(features.serialize_example({
                        "image": np.full((4, 4, 3), i, np.uint8), "label": 10 * f + i,
                        "bbox": tfds.features.BBox(0.0, 0.0, 1.0, 1.0), "id": f"{f}-{i}"}))
    tfds.folder_dataset.write_metadata(data_dir=str(version_dir), features=features)
    return str(data_dir)


@pytest.mark.parametrize("num_shards", [3, 5])
def test_tfds_prepared_shards(prepared_cars, num_shards):
    """3 shards <= 4 files: whole files per shard (input_context); 5 > 4: Dataset.shard."""
    train = load_source("tfds:cars196", data_dir=prepared_cars).split("train")
    all_ids = _ids(train)
    shards = [_ids(train, i, num_shards) for i in range(num_shards)]
    assert train.num_examples == 12 == len(set(all_ids))
    assert sorted(sum(shards, [])) == sorted(all_ids)
    files = [{i.split(b"__")[0] for i in shard} for shard in shards]
    if num_shards == 3:
        assert sum(len(f) for f in files) == 4  # no file is split between shards
    else:
        assert all(len(shard) in (2, 3) for shard in shards)


def test_tfds_inat_from_prepared_files(tmp_path):
    """i_naturalist2021's code cannot build offline: the source reads the prepared metadata."""
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=10000),
        "supercategory": tfds.features.ClassLabel(num_classes=11)})
    version_dir = tmp_path / "i_naturalist2021" / "2.0.1"
    version_dir.mkdir(parents=True)
    for split in ("train", "mini", "val"):
        name = f"i_naturalist2021-{split}.tfrecord-00000-of-00001"
        with tf.io.TFRecordWriter(str(version_dir / name)) as writer:
            for i in range(2):
                writer.write(features.serialize_example({
                    "image": np.zeros((4, 4, 3), np.uint8), "label": 9000 + i, "supercategory": i}))
    tfds.folder_dataset.write_metadata(data_dir=str(version_dir), features=features)
    source = load_source("tfds:i_naturalist2021", data_dir=str(tmp_path))
    test = source.split("test")  # TFDS 'val'
    examples = _examples(test.dataset(0, 1))
    assert source.splits == ("train", "mini", "test")
    assert (test.num_examples, test.num_classes, test.num_coarse_classes) == (2, 10000, 11)
    assert [(ex["label"], ex["coarse_label"]) for ex in examples] == [(9000, 0), (9001, 1)]
    assert examples[0]["id"].startswith(b"i_naturalist2021-val.tfrecord")
    one_line_error(lambda: load_source("tfds:i_naturalist2021", data_dir=str(tmp_path / "no")),
                    "tfds:i_naturalist2021", str(tmp_path / "no"))


def test_tfds_missing_data(prepared_cars):
    one_line_error(lambda: load_source("tfds:food101", data_dir=prepared_cars),
                    "tfds:food101", prepared_cars, "tfds build food101")


def test_tfds_unknown_dataset():
    message = one_line_error(lambda: load_source("tfds:mnist"), "tfds:mnist")
    assert "cars196" in message and "coco_captions" in message


# ---------------------------------------------------------------------------- folder


def test_folder_single_split(tmp_path):
    _write_image(tmp_path / "b_cls" / "x.png")
    _write_image(tmp_path / "a_cls" / "deep" / "y.JPG", seed=1)
    (tmp_path / "a_cls" / "broken.jpg").write_bytes(BROKEN)
    (tmp_path / "a_cls" / "notes.txt").write_text("not an image")
    source = load_source(f"folder:{tmp_path}")
    split = source.split("train")
    examples = {ex["id"].decode(): ex for ex in _examples(split.dataset(0, 1))}
    assert source.splits == ("train",) and source.roles == Roles("train", "train")
    assert sorted(examples) == ["a_cls/broken.jpg", "a_cls/deep/y.JPG", "b_cls/x.png"]
    assert {k: int(ex["label"]) for k, ex in examples.items()} == {
        "a_cls/broken.jpg": 0, "a_cls/deep/y.JPG": 0, "b_cls/x.png": 1}
    assert examples["a_cls/broken.jpg"]["image"] == BROKEN  # passed through, not decoded
    assert examples["b_cls/x.png"]["image"] == (tmp_path / "b_cls" / "x.png").read_bytes()
    assert split.num_examples == 3 and split.num_classes == 2
    assert list(split.labels) == [0, 0, 1] and list(split.ids) == sorted(examples)


def test_folder_split_subfolders(tmp_path):
    for split, classes in [("train", ["cat", "dog"]), ("test", ["cat", "eel"])]:
        for c in classes:
            _write_image(tmp_path / split / c / "0.png")
    source = load_source(f"folder:{tmp_path}")
    assert source.splits == ("train", "test") and source.roles == Roles("test", "test")
    test = {ex["id"]: ex["label"] for ex in _examples(source.split("test").dataset(0, 1))}
    assert test == {b"test/cat/0.png": 0, b"test/eel/0.png": 2}  # one class -> one label
    assert source.split("train").num_classes == 3


# ---------------------------------------------------------------------------- images


def test_images_folder_is_read_recursively_without_labels(tmp_path):
    _write_image(tmp_path / "b.png")
    _write_image(tmp_path / "deep" / "er" / "a.JPG", seed=1)
    (tmp_path / "deep" / "broken.jpg").write_bytes(BROKEN)
    (tmp_path / "notes.txt").write_text("not an image")
    source = load_source(f"images:{tmp_path}")
    split = source.split("train")
    examples = {ex["id"].decode(): ex for ex in _examples(split.dataset(0, 1))}
    assert source.splits == ("train",) and split.num_classes == 0
    assert sorted(examples) == ["b.png", "deep/broken.jpg", "deep/er/a.JPG"]
    assert {int(ex["label"]) for ex in examples.values()} == {-1}
    assert examples["deep/broken.jpg"]["image"] == BROKEN  # skipped when decoded, counted
    assert examples["b.png"]["image"] == (tmp_path / "b.png").read_bytes()
    assert split.num_examples == 3 and list(split.ids) == sorted(examples)


def test_images_list_resolves_relative_paths_and_leaves_out_missing_ones(tmp_path, caplog):
    _write_image(tmp_path / "photos" / "x.png")
    _write_image(tmp_path / "elsewhere" / "y.png", seed=1)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "generic.txt").write_text(
        f"# my generic images\n../photos/x.png\n\n{tmp_path}/elsewhere/y.png\n"
        f"../photos/gone.png\n../photos\n./../photos/x.png\nfile://{tmp_path}/nowhere.png\n")
    with caplog.at_level("WARNING"):
        source = load_source(f"images:{tmp_path}/lists/generic.txt")
    examples = {ex["id"].decode(): ex["image"]
                for ex in _examples(source.split("train").dataset(0, 1))}
    assert sorted(examples) == [f"{tmp_path}/elsewhere/y.png", f"{tmp_path}/photos/x.png"]
    assert examples[f"{tmp_path}/elsewhere/y.png"] == (tmp_path / "elsewhere/y.png").read_bytes()
    assert source.name == "generic" and source.split("train").num_examples == 2
    assert "3 of the 6 listed paths are not files (missing, or folders)" in caplog.text
    assert "gone.png" in caplog.text and "nowhere.png" in caplog.text
    assert f"1 of the 6 listed paths are listed more than once (kept once): {tmp_path}/photos/" \
        "x.png" in caplog.text
    # data_dir is the root of relative paths
    (tmp_path / "rel.txt").write_text("x.png\n")
    source = load_source(f"images:{tmp_path}/rel.txt", data_dir=f"{tmp_path}/photos")
    assert _ids(source.split("train")) == [f"{tmp_path}/photos/x.png".encode()]


def test_images_on_a_remote_filesystem_and_its_errors(tmp_path):
    _write_image(tmp_path / "g" / "a" / "0.png")
    _write_image(tmp_path / "g" / "1.png", seed=1)
    url = "ram://images_test"
    _mirror(tmp_path, url)
    (tmp_path / "list.txt").write_text(f"{url}/g/1.png\n")
    local, remote = load_source(f"images:{tmp_path}/g"), load_source(f"images:{url}/g")
    assert _contents(local) == _contents(remote) and len(_contents(local)["train"]) == 2
    listed = load_source(f"images:{tmp_path}/list.txt")  # a remote path is not stat-ed
    assert [ex[2] for ex in _contents(listed)["train"]] == [(tmp_path / "g/1.png").read_bytes()]
    one_line_error(lambda: load_source(f"images:{tmp_path}/missing"), "missing",
                   "no such folder or file")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load_source(f"images:{tmp_path}/empty"), "no images under")
    (tmp_path / "none.txt").write_text("# nothing\n")
    one_line_error(lambda: load_source(f"images:{tmp_path}/none.txt"), "no images listed")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    one_line_error(lambda: load_source(f"images:{tmp_path}/binary.txt"), "not a text file")


def test_folder_errors(tmp_path):
    one_line_error(lambda: load_source(f"folder:{tmp_path}/missing"), "missing")
    (tmp_path / "empty_class").mkdir()
    one_line_error(lambda: load_source(f"folder:{tmp_path}"), str(tmp_path), "no images")


# ---------------------------------------------------------------------------- UnED


def _write_uned(info_dir, image_root, splits):
    """splits: {name: [(path, class_id), ...]} -> info_dir/<name>.json, images under image_root."""
    info_dir.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        for path, _ in records:
            _write_image(image_root / path)
        (info_dir / f"{name}.json").write_text(
            json.dumps([{"path": p, "class_id": c} for p, c in records]))


def test_uned_inshop_index_role(tmp_path):
    _write_uned(tmp_path / "info_files" / "inshop", tmp_path / "images", {
        "train": [("inshop/img/t1.jpg", 1), ("inshop/img/t0.jpg", 0)],
        "val": [("inshop/img/v0.jpg", 0)],
        "test": [("inshop/img/q0.jpg", 5), ("inshop/img/q1.jpg", [6])],
        "index": [("inshop/img/g0.jpg", 5), ("inshop/img/g1.jpg", 6), ("inshop/img/g2.jpg", 7)],
    })
    source = load_source(f"uned:{tmp_path}/info_files/inshop", data_dir=str(tmp_path / "images"))
    assert source.name == "inshop"
    assert source.splits == ("train", "val", "test", "index")
    assert source.roles == Roles(query="test", index="index")
    train = source.split("train")
    examples = _examples(train.dataset(0, 1))
    assert [ex["id"] for ex in examples] == [b"inshop/img/t0.jpg", b"inshop/img/t1.jpg"]
    assert [ex["label"] for ex in examples] == [0, 1] and train.num_classes == 2
    assert examples[0]["image"] == (tmp_path / "images" / "inshop/img/t0.jpg").read_bytes()
    assert list(source.split("test").labels) == [5, 6]
    assert source.split("index").num_examples == 3


def test_uned_without_index_and_default_root(tmp_path):
    _write_uned(tmp_path, tmp_path, {"train": [("a.jpg", 0)], "test": [("b.jpg", 1)]})
    (tmp_path / "c.jpg").write_bytes(BROKEN)
    (tmp_path / "val.json").write_text(json.dumps([{"path": "c.jpg", "class_id": 3}]))
    source = load_source(f"uned:{tmp_path}")
    assert source.roles == Roles("test", "test")
    assert _examples(source.split("val").dataset(0, 1))[0]["image"] == BROKEN


def test_uned_errors(tmp_path):
    one_line_error(lambda: load_source(f"uned:{tmp_path}"), str(tmp_path), "train.json")
    (tmp_path / "test.json").write_text(json.dumps([{"path": "a.jpg", "class_id": [1, 2]}]))
    one_line_error(lambda: load_source(f"uned:{tmp_path}"), "multi-label")
    (tmp_path / "test.json").write_text("[]")
    one_line_error(lambda: load_source(f"uned:{tmp_path}"), "test.json", "no records")


# ---------------------------------------------------------------------------- captions


def test_captions_list_layout(tmp_path):
    _write_image(tmp_path / "images" / "1.jpg")
    (tmp_path / "images" / "2.jpg").write_bytes(BROKEN)
    (tmp_path / "flickr_test.json").write_text(json.dumps([
        {"image": "images/2.jpg", "captions": ["c", "d", "e"]},
        {"image": "images/1.jpg", "captions": ["a", "b"]},
    ]))
    source = load_source(f"captions:{tmp_path}/flickr_test.json")
    split = source.split("test")
    examples = _examples(split.dataset(0, 1))
    assert source.splits == ("test",) and source.roles == Roles("test", "test")
    assert split.has_captions and split.num_classes == 0
    assert [ex["id"] for ex in examples] == [b"images/1.jpg", b"images/2.jpg"]
    assert [list(ex["captions"]) for ex in examples] == [[b"a", b"b"], [b"c", b"d", b"e"]]
    assert [ex["label"] for ex in examples] == [-1, -1] and examples[1]["image"] == BROKEN


def test_captions_karpathy_layout(tmp_path):
    _write_image(tmp_path / "val2014" / "x.jpg")
    _write_image(tmp_path / "val2014" / "y.jpg")
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "x.jpg", "split": "test", "imgid": 0,
         "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]},
                       {"raw": "Dog.", "tokens": ["dog"]}]},
        {"filepath": "val2014", "filename": "y.jpg", "split": "restval", "imgid": 1,
         "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"]}]},
    ]}))
    source = load_source(f"captions:{tmp_path}/dataset_coco.json:test")
    examples = _examples(source.split("test").dataset(0, 1))
    assert [ex["id"] for ex in examples] == [b"val2014/x.jpg"]
    assert list(examples[0]["captions"]) == [b"A dog.", b"Dog."]
    one_line_error(lambda: load_source(f"captions:{tmp_path}/dataset_coco.json:val"), "'val'")
    one_line_error(lambda: load_source(f"captions:{tmp_path}/none.json"), "none.json")


# ---------------------------------------------------------------------------- gs:// paths


def _mirror(local, url: str):
    """Copies the tree under `local` to `url` through tf.io.gfile."""
    for path in local.rglob("*"):
        if path.is_file():
            dst = f"{url}/{path.relative_to(local).as_posix()}"
            tf.io.gfile.makedirs(dst.rsplit("/", 1)[0])
            tf.io.gfile.copy(str(path), dst, overwrite=True)


def _contents(source) -> dict:
    return {name: [(ex["id"], ex["label"], ex["image"], list(ex.get("captions", [])))
                   for ex in _examples(source.split(name).dataset(0, 1))]
            for name in source.splits}


def test_file_sources_read_through_gfile(tmp_path):
    """folder:, uned: and captions: on a non-local filesystem (TF's ram:// stands in for
    gs://) load exactly what they load from the same files on disk."""
    for split, classes in [("train", ["cat", "dog"]), ("test", ["cat", "eel"])]:
        for i, c in enumerate(classes):
            _write_image(tmp_path / "folder" / split / c / "deep" / f"{i}.PNG", seed=i)
    (tmp_path / "folder" / "train" / "dog" / "notes.txt").write_text("not an image")
    _write_uned(tmp_path / "info" / "sop", tmp_path / "images", {
        "train": [("sop/t1.jpg", 1), ("sop/t0.jpg", 0)], "test": [("sop/q0.jpg", 2)]})
    _write_image(tmp_path / "val2014" / "x.jpg")
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [
        {"filepath": "val2014", "filename": "x.jpg", "split": "test",
         "sentences": [{"raw": "A dog."}, {"raw": "Dog."}]}]}))
    url = "ram://sources_test"
    _mirror(tmp_path, url)
    for spec, data_dir in (("folder:{}/folder", None), ("uned:{}/info/sop", "{}/images"),
                           ("captions:{}/dataset_coco.json:test", None)):
        local = load_source(spec.format(tmp_path), data_dir and data_dir.format(tmp_path))
        remote = load_source(spec.format(url), data_dir and data_dir.format(url))
        assert (remote.name, remote.splits, remote.roles) == (local.name, local.splits,
                                                              local.roles), spec
        assert _contents(remote) == _contents(local) and _contents(local)["test"], spec
    one_line_error(lambda: load_source(f"uned:{url}/info"), f"{url}/info", "train.json")


def test_folder_listing_stats_no_image_and_no_listed_folder(tmp_path, monkeypatch):
    """gs:// listings end folders with '/' and each stat is an HTTP request: given such a
    listing, a folder: source stats only the root, the split candidates and non-images."""
    for split, classes in [("train", ["cat", "dog"]), ("test", ["cat"])]:
        for i, c in enumerate(classes):
            _write_image(tmp_path / split / c / "a" / "b" / f"{i}.jpg", seed=i)
            _write_image(tmp_path / split / c / f"top{i}.png", seed=i)
    (tmp_path / "train" / "dog" / "a" / "notes.txt").write_text("not an image")
    expected = _contents(load_source(f"folder:{tmp_path}"))
    listdir, isdir, stats = tf.io.gfile.listdir, tf.io.gfile.isdir, []
    monkeypatch.setattr(tf.io.gfile, "listdir", lambda d: [
        n + "/" if isdir(f"{d}/{n}") else n for n in listdir(d)])
    monkeypatch.setattr(tf.io.gfile, "isdir", lambda p: stats.append(p) or isdir(p))
    assert _contents(load_source(f"folder:{tmp_path}")) == expected
    assert len(expected["train"]) == 4 and len(expected["test"]) == 2
    root = str(tmp_path)
    assert sorted(stats) == sorted([root, *(f"{root}/{s}" for s in ("train", "val", "test")),
                                    f"{root}/train/dog/a/notes.txt"])


# ---------------------------------------------------------------------------- sharding, splits


@pytest.fixture
def ten_classes(tmp_path):
    """A folder source: 10 classes x 3 images; one file is broken."""
    for c in range(10):
        for i in range(3):
            _write_image(tmp_path / f"class{c}" / f"{i}.png", seed=c * 3 + i)
    (tmp_path / "class4" / "1.png").write_bytes(BROKEN)
    return load_source(f"folder:{tmp_path}").split("train")


def test_file_source_shards(ten_classes):
    all_ids = _ids(ten_classes)
    shards = [_ids(ten_classes, i, 3) for i in range(3)]
    assert len(all_ids) == 30 == len(set(all_ids))
    assert sorted(sum(shards, [])) == sorted(all_ids)
    assert [len(s) for s in shards] == [10, 10, 10]


def test_carve_val(ten_classes):
    train, val = splits_lib.carve_val(ten_classes, 0.2, seed=0)
    train_ex, val_ex = _examples(train.dataset(0, 1)), _examples(val.dataset(0, 1))
    train_labels = {ex["label"] for ex in train_ex}
    val_labels = {ex["label"] for ex in val_ex}
    assert len(val_labels) == 2 and len(train_labels) == 8 and not train_labels & val_labels
    assert (train.num_examples, val.num_examples) == (len(train_ex), len(val_ex)) == (24, 6)
    assert sorted(val.labels) == sorted(ex["label"] for ex in val_ex)
    assert train.num_classes == val.num_classes == 10  # labels are not renumbered
    again = splits_lib.carve_val(ten_classes, 0.2, seed=0)[1]
    assert {ex["label"] for ex in _examples(again.dataset(0, 1))} == val_labels
    other = {frozenset(splits_lib.carve_val(ten_classes, 0.2, seed=s)[1].labels) for s in (1, 2)}
    assert other != {frozenset(val_labels)}
    sharded = [_ids(val, i, 3) for i in range(3)]
    assert sorted(sum(sharded, [])) == sorted(ex["id"] for ex in val_ex)


def test_holdout_exact_count_on_files(ten_classes):
    kept, held = splits_lib.holdout(ten_classes, fraction=0.3, seed=1)
    kept_ids, held_ids = _ids(kept), _ids(held)
    assert (kept.num_examples, held.num_examples) == (len(kept_ids), len(held_ids))
    assert sorted(kept_ids + held_ids) == sorted(_ids(ten_classes))
    assert list(held.ids) == [i.decode() for i in held_ids]
    # holdout then carve_val: counts stay exact.
    train, val = splits_lib.carve_val(kept, 0.2, seed=0)
    assert train.num_examples + val.num_examples == kept.num_examples
    assert val.num_examples == len(_ids(val))


def test_split_errors(ten_classes, tmp_path):
    one_line_error(lambda: splits_lib.holdout(ten_classes, fraction=1.5), "fraction")
    one_line_error(lambda: load_source("nope:x"), "nope:x", "tfds:NAME")
    source = load_source(f"folder:{tmp_path}")  # the folder of ten_classes
    one_line_error(lambda: source.split("test"), "'test'", "train")
