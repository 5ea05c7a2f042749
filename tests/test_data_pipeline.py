"""The multi-domain tf.data pipeline: determinism, mixing, sharding, skip counts, resumption."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from infusing_jax import errors
from infusing_jax.data import mixing
from infusing_jax.data import pipeline
from infusing_jax.data import sources
from infusing_jax.data import tf_views
from tests.helpers.fake_data import SIZE, augment, fake_split, preprocess, two_domains

def _take(ds, n):
    return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_deterministic_by_seed_and_round_robin_one_domain_per_batch():
    make = lambda seed: pipeline.train_dataset(two_domains(), preprocess, global_batch_size=4,
                                               seed=seed, shuffle_buffer=16)
    a, b = _take(make(0), 6), _take(make(0), 6)
    _assert_same(a, b)
    assert [int(x["domain"][0]) for x in a] == [0, 1, 0, 1, 0, 1]
    assert all(len(set(x["domain"].tolist())) == 1 for x in a)
    assert a[0]["image"].shape == (4, SIZE, SIZE, 3)
    c = _take(make(1), 6)
    assert any(not np.array_equal(x["id"], y["id"]) for x, y in zip(a, c))


def test_weighted_mixes_follow_their_probabilities():
    domains = two_domains()
    np.testing.assert_allclose(mixing.weights(domains, "dataset_size"), [30 / 80, 50 / 80])
    np.testing.assert_allclose(mixing.weights(domains, "weights"), [0.75, 0.25])
    ds = pipeline.train_dataset(domains, preprocess, global_batch_size=2, seed=3, mix="weights",
                                shuffle_buffer=8)
    first = [int(b["domain"][0]) for b in _take(ds, 400)]
    assert 0.68 < first.count(0) / 400 < 0.82
    mixed = pipeline.train_dataset(domains, preprocess, global_batch_size=16, seed=3,
                                   mix="balanced", one_domain_per_batch=False, shuffle_buffer=8)
    domains_in_batches = np.concatenate([b["domain"] for b in _take(mixed, 25)])
    assert 0.4 < domains_in_batches.mean() < 0.6
    assert any(len(set(b["domain"].tolist())) == 2 for b in _take(mixed, 3))


def test_undecodable_images_are_dropped_and_counted():
    broken = {3, 11, 17}
    ds = pipeline.train_dataset(two_domains(broken), preprocess, global_batch_size=4, seed=0,
                                shuffle_buffer=64)
    counter = pipeline.SkipCounter(["target", "generic"])
    seen_ids = []
    for batch in _take(ds, 40):  # 20 target batches of 4: 80 examples, > 2 epochs of 30
        counter.update(batch)
        seen_ids += [i.decode() for i, d in zip(batch["id"], batch["domain"]) if d == 0]
    assert not {f"target/{i}" for i in broken} & set(seen_ids)
    skipped = counter.skipped()
    assert skipped["generic"] == 0
    # Dropped = broken files among the stream positions consumed so far (2 to 3 epochs).
    assert skipped["target"] in (6, 7, 8, 9)
    epochs_done = (len(seen_ids) + skipped["target"]) // 30
    assert skipped["target"] >= 3 * epochs_done


def test_decoded_chunks_keep_order_and_drop_only_the_broken_images():
    """Chunks of 3 records: one with a broken image is decoded again image by image; one
    with only broken images vanishes; the end marker is the last row, indexed by the
    number of records."""
    png = tf.io.encode_png(tf.fill([2, 2, 3], tf.constant(7, tf.uint8))).numpy()
    broken = {1, 3, 4, 5}
    records = tf.data.Dataset.from_tensor_slices(
        {"image": [b"broken" if i in broken else png for i in range(10)],
         "id": [str(i).encode() for i in range(10)]})
    chunks = list(pipeline._decoded_chunks(records, tf_views.decode, 3, (2, 2, 3))
                  .as_numpy_iterator())
    assert all(1 <= len(index) <= 3 for index, *_ in chunks)
    index, is_end, images, ex = (np.concatenate(parts) for parts in zip(
        *[(i, e, im, r["id"]) for i, e, im, r in chunks]))
    np.testing.assert_array_equal(index, [0, 2, 6, 7, 8, 9, 10])
    np.testing.assert_array_equal(is_end, [False] * 6 + [True])
    assert [int(i) for i in ex[:-1]] == [0, 2, 6, 7, 8, 9]
    assert (images[:-1] == 7).all() and (images[-1] == 0).all()


def test_processes_read_disjoint_shards_of_their_share():
    shards = [pipeline.train_dataset(two_domains(), preprocess, global_batch_size=8, seed=0,
                                     process_index=i, process_count=2, shuffle_buffer=64)
              for i in range(2)]
    ids = [set() for _ in shards]
    for i, ds in enumerate(shards):
        for batch in _take(ds, 10):
            assert batch["image"].shape[0] == 4  # the global batch of 8 over 2 processes
            ids[i] |= {x.decode() for x in batch["id"]}
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    with pytest.raises(ValueError, match="data.batch_size: 9 is not divisible by the 2"):
        pipeline.train_dataset(two_domains(), preprocess, global_batch_size=9, seed=0,
                               process_count=2)
    unsized = [pipeline.Domain("t", dataclasses.replace(two_domains()[0].split, num_examples=None))]
    with pytest.raises(ValueError, match=r"the sizes of \['t'\] are unknown"):
        mixing.weights(unsized, "dataset_size")
    with pytest.raises(ValueError, match="data.mix: unknown mix 'zipf'"):
        pipeline.train_dataset(two_domains(), preprocess, global_batch_size=8, seed=0, mix="zipf")


@pytest.mark.parametrize("stream", ["image at a time", "chunks", "in memory"])
def test_resume_gives_the_batches_an_uninterrupted_run_sees(tmp_path, stream):
    """Restored at three points around pass ends, a stream goes on as the uninterrupted
    one, whether it decodes an image at a time, a chunk at a time, or reads from memory.
    With TF's reshuffle_each_iteration, both disk streams went astray after the restores
    at 13 and 21 (of 12 points from 9 to 31): a later pass replayed an earlier pass's
    order."""
    view = preprocess if stream == "image at a time" else IN_MEMORY_VIEW
    domains = lambda: _in_memory(two_domains({5})) if stream == "in memory" else two_domains({5})
    make = lambda: pipeline.train_dataset(domains(), view, global_batch_size=4,
                                          seed=7, mix="balanced", shuffle_buffer=16)
    uninterrupted = _take(make(), 36)
    for cut in (13, 21, 29):
        it = iter(make())
        counter = pipeline.SkipCounter(["target", "generic"])
        for _ in range(cut):
            counter.update(next(it))
        pipeline.save_iterator(it, counter, str(tmp_path / str(cut)))
        del it

        resumed = iter(make())
        counter2 = pipeline.SkipCounter(["target", "generic"])
        pipeline.restore_iterator(resumed, counter2, str(tmp_path / str(cut)))
        assert counter2.skipped() == counter.skipped()
        rest = [{k: v.numpy() for k, v in next(resumed).items()} for _ in range(36 - cut)]
        _assert_same(uninterrupted[cut:], rest)


def test_a_saved_state_of_another_pipeline_is_a_state_mismatch(tmp_path):
    """Another structure with the same batch shapes (e.g. a state saved by an older
    version): StateMismatch, which the trainer reports as another input pipeline."""
    make = lambda per_batch: pipeline.train_dataset(
        two_domains(), preprocess, global_batch_size=4, seed=7, shuffle_buffer=16,
        one_domain_per_batch=per_batch)
    it, counter = iter(make(False)), pipeline.SkipCounter(["target", "generic"])
    counter.update(next(it))
    pipeline.save_iterator(it, counter, str(tmp_path))
    with pytest.raises(pipeline.StateMismatch, match="another input pipeline"):
        pipeline.restore_iterator(iter(make(True)), counter, str(tmp_path))


def _first_batches(ds, n=3):
    """n batches, or the error the stream raised (it must raise, never hang)."""
    try:
        return _take(ds, n)
    except tf.errors.InvalidArgumentError as e:
        return e


def test_a_domain_whose_images_all_fail_stops_with_its_name_not_a_hang():
    domains = [pipeline.Domain("target", fake_split("target", 6, 2, broken=set(range(6)))),
               pipeline.Domain("generic", fake_split("generic", 20, 4))]
    out = _first_batches(pipeline.train_dataset(domains, preprocess, global_batch_size=4, seed=0))
    assert isinstance(out, tf.errors.InvalidArgumentError)
    assert pipeline.stream_failure(out) == (
        "target", "no image of a whole pass over its train split could be decoded")
    assert pipeline.first_decode_error(domains[0].split, tf_views.decode)[0] == "target/0"
    assert pipeline.first_decode_error(domains[1].split, tf_views.decode) is None
    with pytest.raises(errors.UserError, match=r"^config\.domains\.target\.source: none of the 6 "
                       r"train images tried can be decoded; the first, target/0: "):
        pipeline.check_views(domains, preprocess)
    pipeline.check_views(domains[1:], preprocess)


def test_too_many_undecodable_images_in_a_row_stop_the_stream(monkeypatch):
    monkeypatch.setattr(pipeline, "MAX_FAILURES_IN_A_ROW", 4)
    split = fake_split("target", 40, 4, broken={10, 11, 12, 13})
    ok = pipeline.train_dataset([pipeline.Domain("target", fake_split("target", 40, 4,
                                                                      broken={10, 11, 12}))],
                                preprocess, global_batch_size=4, seed=0, shuffle_buffer=1)
    assert len(_take(ok, 20)) == 20  # three in a row: dropped, counted, and on it goes
    out = _first_batches(pipeline.train_dataset([pipeline.Domain("target", split)], preprocess,
                                                global_batch_size=4, seed=0, shuffle_buffer=1), 20)
    assert isinstance(out, tf.errors.InvalidArgumentError)
    assert pipeline.stream_failure(out) == ("target", "4 images in a row could not be decoded")


def test_a_failing_augmentation_stops_the_run_and_is_not_counted_as_undecodable():
    too_big = tf_views.View(augment=lambda image, seed: augment(image, seed, SIZE + 5),
                                  decode=tf_views.decode)
    domains = [pipeline.Domain("target", fake_split("target", 8, 2))]
    out = _first_batches(pipeline.train_dataset(domains, too_big, global_batch_size=4, seed=0))
    assert isinstance(out, tf.errors.InvalidArgumentError)
    assert pipeline.stream_failure(out) is None  # the augmentation's own error
    with pytest.raises(errors.UserError, match=r"^config\.domains\.target: its train "
                       r"augmentation fails on target/0, a 12x10 image: "):
        pipeline.check_views(domains, too_big)


def _in_memory(domains):
    return [dataclasses.replace(d, in_memory=True) for d in domains]


IN_MEMORY_VIEW = dataclasses.replace(preprocess, decoded_shape=(10, 12, 3))  # the fake JPEGs'


@pytest.mark.parametrize("view", [preprocess, IN_MEMORY_VIEW])
def test_an_empty_data_shard_stops_the_stream_with_its_reason(view):
    """One example over two shards: shard 1's stream fails, image by image (a view whose
    images vary in shape) or a chunk of a batch at a time."""
    domains = [pipeline.Domain("target", fake_split("target", 1, 1))]
    out = _first_batches(pipeline.train_dataset(domains, view, global_batch_size=2, seed=0,
                                                num_shards=2))
    assert pipeline.stream_failure(out) == (
        "target", f"{pipeline.EMPTY_SHARD} (fewer examples than data shards)")


@pytest.mark.parametrize("shuffle_buffer,num_shards,mix,per_batch", [
    (64, 1, "round_robin", True), (4, 2, "weights", False), (1, 1, "balanced", True)])
def test_in_memory_streams_equal_decoded_as_read(shuffle_buffer, num_shards, mix, per_batch):
    """Same batches (ids, positions, images) and skip counts over 3+ passes of each domain,
    with undecodable images, several shards and any mix; and the same from disk read a
    chunk at a time (decoded images of one shape) as an image at a time."""
    make = lambda domains, view=IN_MEMORY_VIEW: pipeline.train_dataset(
        domains, view, global_batch_size=4, seed=5, mix=mix,
        one_domain_per_batch=per_batch, shuffle_buffer=shuffle_buffer, num_shards=num_shards)
    on_disk, in_memory = _take(make(two_domains({0, 3, 29})), 70), \
        _take(make(_in_memory(two_domains({0, 3, 29}))), 70)
    _assert_same(on_disk, in_memory)
    _assert_same(on_disk, _take(make(two_domains({0, 3, 29}), preprocess), 70))
    counts = []
    for batches in (on_disk, in_memory):
        counter = pipeline.SkipCounter(["target", "generic"], shards=num_shards)
        for b in batches:
            counter.update(b)
        counts.append(counter.skipped())
    assert counts[0] == counts[1] and counts[0]["target"] >= 6  # 3 broken, >= 2 passes


def test_in_memory_resume_and_its_small_iterator_state(tmp_path):
    """Resumes exactly; the saved state holds the buffered batches (their number varies
    from run to run with tf.data's autotuned prefetch) but not the kept images."""
    domains = [pipeline.Domain("target", fake_split("target", 300, 5, {5}), weight=3.0),
               pipeline.Domain("generic", fake_split("generic", 500, 10), weight=1.0)]
    make = lambda: pipeline.train_dataset(_in_memory(domains), IN_MEMORY_VIEW,
                                          global_batch_size=4, seed=7, mix="balanced",
                                          shuffle_buffer=16)
    uninterrupted = _take(make(), 30)
    it, counter = iter(make()), pipeline.SkipCounter(["target", "generic"])
    for _ in range(17):
        counter.update(next(it))
    pipeline.save_iterator(it, counter, str(tmp_path))
    resumed, counter2 = iter(make()), pipeline.SkipCounter(["target", "generic"])
    pipeline.restore_iterator(resumed, counter2, str(tmp_path))
    assert counter2.skipped() == counter.skipped()
    _assert_same(uninterrupted[17:], [{k: v.numpy() for k, v in next(resumed).items()}
                                      for _ in range(13)])
    images = 800 * 10 * 12 * 3  # the kept images' bytes
    saved = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert saved < images / 4  # about 20-30 kB: 16-image shuffle buffers, a few batches


def test_in_memory_falls_back_to_the_disk_streams_failures(monkeypatch):
    """A shard that the disk stream would fail on is read from disk, and fails the same way."""
    monkeypatch.setattr(pipeline, "MAX_FAILURES_IN_A_ROW", 4)
    for broken, reason in [(set(range(8)), "no image of a whole pass over its train split "
                            "could be decoded"), ({2, 3, 4, 5}, "4 images in a row could not "
                                                  "be decoded")]:
        domains = _in_memory([pipeline.Domain("target", fake_split("target", 8, 2, broken))])
        out = _first_batches(pipeline.train_dataset(domains, IN_MEMORY_VIEW,
                                                    global_batch_size=4, seed=0,
                                                    shuffle_buffer=1), 20)
        assert pipeline.stream_failure(out) == ("target", reason)


def test_memory_plan_takes_the_most_read_domains_that_fit():
    domains = two_domains()  # target: 30 examples, generic: 50
    image_bytes = 1000
    plan, lines = pipeline.memory_plan(domains, reads=[90.0, 100.0], image_bytes=image_bytes,
                                       budget_bytes=80_000)
    assert [d.in_memory for d in plan] == [True, True]  # 3 and 2 passes, 30 + 50 kB
    assert lines == ["target: decoded once and kept in memory (0.0 MB; the run reads it 3.0 "
                     "times)", "generic: decoded once and kept in memory (0.0 MB; the run "
                     "reads it 2.0 times)"]
    plan, _ = pipeline.memory_plan(domains, reads=[90.0, 100.0], image_bytes=image_bytes,
                                   budget_bytes=79_999)
    assert [d.in_memory for d in plan] == [True, False]  # the most read first, then full
    plan, _ = pipeline.memory_plan(domains, reads=[90.0, 100.0], image_bytes=image_bytes,
                                   budget_bytes=50_000, process_count=2)
    assert [d.in_memory for d in plan] == [True, True]  # 15 + 25 kB on each process
    plan, lines = pipeline.memory_plan(domains, reads=[30.0, 400.0], image_bytes=image_bytes,
                                       budget_bytes=10**9)
    assert [d.in_memory for d in plan] == [False, True]
    assert lines[1] == "target: decoded as read (the run reads it 1.00 times)"


def test_in_memory_with_the_real_train_view_on_files(tmp_path):
    """The trainer's own view (decode + squash, crop, flip) on a folder of JPEGs, PNGs of
    several kinds and broken files: the same batches from memory as from disk, and an
    iterator state that saves."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = tmp_path / "data" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (9 + i % 4, 11, 3), np.uint8)
        image = Image.fromarray(pixels)
        if i % 6 == 5:
            (folder / f"{i}.png").write_bytes(b"\x89PNG broken")
        elif i % 4 == 0:
            image.save(folder / f"{i}.jpg")
        else:
            image = [image, image.convert("RGBA"), image.convert("P")][i % 3]
            image.save(folder / f"{i}.png")
    split = sources.load_source(f"folder:{tmp_path / 'data'}").split("train")
    view = tf_views.train_fn("siglip", 8, 12)
    make = lambda in_memory: pipeline.train_dataset(
        [pipeline.Domain("target", split, in_memory=in_memory)], view, global_batch_size=4,
        seed=1, shuffle_buffer=8)
    on_disk, in_memory = _take(make(False), 16), _take(make(True), 16)  # 3 passes of 20
    _assert_same(on_disk, in_memory)
    counter = pipeline.SkipCounter(["target"])
    for b in in_memory:
        counter.update(b)
    assert counter.skipped() == {"target": 12}  # 4 broken files in each of 3 passes
    it = iter(make(True))
    next(it)
    pipeline.save_iterator(it, counter, str(tmp_path))
