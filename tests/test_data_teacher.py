"""Teacher descriptors: extraction over devices, storage by id, lookup in training, checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from infusing_jax import errors
from infusing_jax.data import pipeline
from infusing_jax.data import tf_views
from infusing_jax.data import teacher
from tests.helpers.fake_data import SIZE, fake_split


eval_view = tf_views.View(
    augment=lambda image, seed=None: tf.image.resize(tf.cast(image, tf.float32), (SIZE, SIZE)),
    decode=lambda image_bytes: tf.io.decode_image(image_bytes, channels=3,
                                                  expand_animations=False))


@jax.jit
def encode(images):
    """A stand-in frozen model: (B, S, S, 3) -> (B, 3) mean colour."""
    return jnp.mean(images, axis=(1, 2))


def _reference(split):
    out = {}
    for ex in split.dataset(0, 1).as_numpy_iterator():
        try:
            view = eval_view(ex["image"], None).numpy()
            out[ex["id"].decode()] = np.asarray(encode(view[None]))[0]
        except tf.errors.InvalidArgumentError:
            pass
    return out


def test_extract_save_load_and_lookup_by_id(tmp_path):
    split = fake_split("target", 30, 5, broken={4})
    desc, skipped = teacher.extract(encode, split, eval_view, model="m1", batch_size=8)
    assert skipped == ["target/4"]
    reference = _reference(split)
    assert sorted(desc.ids.tolist()) == sorted(reference)
    for i, e in zip(desc.ids, desc.embeddings):
        np.testing.assert_allclose(e, reference[i], rtol=1e-6)
    # Two processes each extract their shard; load merges the parts.
    for i in range(2):
        part, _ = teacher.extract(encode, split, eval_view, "m1", 8, process_index=i,
                                  process_count=2)
        teacher.save(teacher.part_path(str(tmp_path / "t.npz"), i, 2), part)
    merged = teacher.load(str(tmp_path / "t.npz"))
    assert sorted(merged.ids.tolist()) == sorted(desc.ids.tolist())
    # The undecodable image is recorded: the split's ids check out without it.
    assert merged.skipped.tolist() == ["target/4"]
    ids = [f"target/{i}" for i in range(30)]
    teacher.check(merged, ids, "m1", "target")
    with pytest.raises(ValueError, match=r"lack 1 of the split's ids, e.g. \['target/30'\]"):
        teacher.check(merged, ids + ["target/30"], "m1", "target")

    domains = [pipeline.Domain("target", split, descriptors=merged),
               pipeline.Domain("generic", fake_split("generic", 20, 4))]
    ds = pipeline.train_dataset(domains, eval_view, global_batch_size=4, seed=0, shuffle_buffer=8)
    for batch in ds.take(6).as_numpy_iterator():
        for i, t, has, d in zip(batch["id"], batch["teacher"], batch["has_teacher"],
                                batch["domain"]):
            if d == 0:
                assert has
                np.testing.assert_allclose(t, reference[i.decode()], rtol=1e-6)
            else:
                assert not has and not t.any()


def test_descriptors_from_another_model_or_missing_ids_are_errors(tmp_path):
    split = fake_split("target", 12, 3)
    desc, _ = teacher.extract(encode, split, eval_view, model="m1", batch_size=4)
    ids = [f"target/{i}" for i in range(12)]
    teacher.check(desc, ids, "m1", "cars")
    with pytest.raises(ValueError, match=r"cars: teacher descriptors were made by model m1, "
                                         r"the pretrained model here is m2"):
        teacher.check(desc, ids, "m2", "cars")
    partial = teacher.Descriptors(desc.ids[:-2], desc.embeddings[:-2], desc.model)
    with pytest.raises(ValueError, match=r"cars: teacher descriptors lack 2 of the split's ids"):
        teacher.check(partial, ids, "m1", "cars")
    # In the pipeline an id without a descriptor fails loudly, it is not dropped.
    ds = pipeline.train_dataset([pipeline.Domain("target", split, descriptors=partial)],
                                eval_view, global_batch_size=12, seed=0, shuffle_buffer=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="without a teacher descriptor"):
        list(ds.take(2).as_numpy_iterator())
    with pytest.raises(errors.UserError, match=r"nothing.npz: no teacher descriptors"):
        teacher.load(str(tmp_path / "nothing.npz"))


def test_fingerprint_tells_models_apart():
    from tests.helpers.tiny import random_params, tiny_config
    from infusing_jax import checkpoints
    cfg = tiny_config("siglip", text=False)
    a = checkpoints.to_flat(random_params(cfg, seed=0))
    b = dict(a)
    b["img/pos_embedding"] = b["img/pos_embedding"] + 1e-6
    assert teacher.fingerprint(a, cfg) == teacher.fingerprint(dict(a), cfg)
    assert teacher.fingerprint(a, cfg) != teacher.fingerprint(b, cfg)
