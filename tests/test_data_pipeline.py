"""The multi-domain tf.data pipeline: determinism, mixing, sharding, skip counts, resumption."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from infusing_jax import errors
from infusing_jax.data import mixing
from infusing_jax.data import pipeline
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


def test_resume_gives_the_batches_an_uninterrupted_run_sees(tmp_path):
    make = lambda: pipeline.train_dataset(two_domains({5}), preprocess, global_batch_size=4,
                                          seed=7, mix="balanced", shuffle_buffer=16)
    uninterrupted = _take(make(), 30)

    it = iter(make())
    counter = pipeline.SkipCounter(["target", "generic"])
    for _ in range(17):
        counter.update(next(it))
    pipeline.save_iterator(it, counter, str(tmp_path))
    del it

    resumed = iter(make())
    counter2 = pipeline.SkipCounter(["target", "generic"])
    pipeline.restore_iterator(resumed, counter2, str(tmp_path))
    assert counter2.skipped() == counter.skipped()
    rest = [{k: v.numpy() for k, v in next(resumed).items()} for _ in range(13)]
    _assert_same(uninterrupted[17:], rest)


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
