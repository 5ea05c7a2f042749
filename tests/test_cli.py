"""The command lines (convert, embed, demo) end to end, and image decoding."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from infusing_jax import checkpoints
from infusing_jax import preprocessing

from conftest import random_params, tiny_config


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


def test_demo_runs_every_format_end_to_end(tmp_path):
    result = _run("infusing_jax.demo", f"--workdir={tmp_path}", "--num_images=12")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images_embedded"] == 12
    assert summary["images_skipped"] == ["broken.jpg"]
    assert summary["texts_embedded"] > 0
    assert summary["max_abs_diff_vs_big_vision"]["hf"] <= 1e-6
    # open_clip's SigLIP runs timm's exact GELU instead of the tanh form.
    assert 0 < summary["max_abs_diff_vs_big_vision"]["open_clip"] < 1e-2
    out = np.load(tmp_path / "embeddings_hf.npz")
    np.testing.assert_allclose(np.linalg.norm(out["image_embeddings"], axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_embeddings"], axis=1), 1, atol=1e-5)
    assert "skipped 1 of 13 images" not in result.stdout  # progress and counts go to stderr


def test_embed_fails_when_nothing_decodes(tmp_path):
    cfg = tiny_config("clip", text=False)
    checkpoints.save(random_params(cfg), cfg, str(tmp_path / "m.safetensors"), "open_clip")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png")
    result = _run("infusing_jax.embed", f"--checkpoint={tmp_path}/m.safetensors", "--act=quick_gelu",
                  f"--images={tmp_path}/imgs", f"--output={tmp_path}/out.npz")
    assert result.returncode != 0
    assert "skipped 1 of 1 images" in result.stderr
    assert "no image in" in result.stderr
    assert list(np.load(tmp_path / "out.npz")["skipped_paths"]) == ["bad.png"]


def test_convert_reports_bad_input_in_one_line(tmp_path):
    (tmp_path / "model.ckpt").write_text("?")
    result = _run("infusing_jax.convert", str(tmp_path / "model.ckpt"), str(tmp_path / "o.npz"))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.ckpt: unknown checkpoint format" in last


def test_convert_between_formats_is_lossless(tmp_path):
    cfg = tiny_config("clip")
    params = random_params(cfg)
    checkpoints.save(params, cfg, str(tmp_path / "a.npz"), "big_vision")
    chain = ["a.npz", "hf_dir", "b.bin", "c.safetensors", "d.npz"]
    for src, dst in zip(chain, chain[1:]):
        result = _run("infusing_jax.convert", str(tmp_path / src), str(tmp_path / dst),
                      "--act=quick_gelu")
        assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "d.npz") as d:
        assert sorted(a.files) == sorted(d.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], d[k])


def test_images_of_every_mode_become_rgb():
    gray16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(preprocessing.to_rgb(gray16)).min() == 255
    half16 = Image.fromarray(np.full((4, 4), 32896, np.uint16))  # 128 * 257
    assert np.all(np.asarray(preprocessing.to_rgb(half16)) == 128)
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.all(np.asarray(preprocessing.to_rgb(transparent)) == 255)  # onto white
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red
    assert tuple(np.asarray(preprocessing.to_rgb(cmyk))[0, 0]) == (255, 0, 0)
    for mode in ("L", "P", "LA", "1", "I", "F"):
        img = preprocessing.to_rgb(Image.new(mode, (3, 5)))
        assert img.mode == "RGB" and img.size == (3, 5)


def test_eval_view_shapes_and_ranges():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), np.uint8))
    siglip = preprocessing.eval_view(image, 32, "siglip")
    clip = preprocessing.eval_view(image, 32, "clip")
    assert siglip.shape == clip.shape == (32, 32, 3)
    assert siglip.min() >= -1 and siglip.max() <= 1
    white = preprocessing.eval_view(Image.new("RGB", (40, 30), (255, 255, 255)), 16, "clip")
    np.testing.assert_allclose(white[0, 0], (1 - np.array(preprocessing.CLIP_MEAN))
                               / np.array(preprocessing.CLIP_STD), rtol=1e-5)
    assert os.path.splitext("x.JPG")[1].lower() in preprocessing.IMAGE_EXTENSIONS


def test_embed_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path):
    import sentencepiece
    cfg = tiny_config("siglip")  # vocabulary of 100
    checkpoints.save(random_params(cfg), cfg, str(tmp_path / "m.npz"))
    (tmp_path / "corpus.txt").write_text("\n".join(f"word{i} other{i * 7}" for i in range(500)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "big"),
        vocab_size=150, minloglevel=2)
    tokenizer = tmp_path / "big.model"
    (tmp_path / "texts.txt").write_text("a b\n")
    (tmp_path / "imgs").mkdir()
    result = _run("infusing_jax.embed", f"--checkpoint={tmp_path}/m.npz",
                  f"--images={tmp_path}/imgs", f"--output={tmp_path}/o.npz",
                  f"--texts={tmp_path}/texts.txt", f"--tokenizer={tokenizer}")
    assert result.returncode != 0
    assert "do not fit the model's vocabulary of 100" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o.npz").exists()


COMMANDS = {"main": "--workdir", "evaluate": "--checkpoint", "embed": "--checkpoint",
            "retrieval": "--queries", "demo": "--num_images", "compare": "--names",
            "convert": "--image_size", "toy_world": "--target_per_class"}


def test_commands_import_side_by_side_and_keep_their_flags():
    """absl flags are one global namespace: the commands define theirs only when run, so a
    notebook can import evaluate beside main and embed (--config, --checkpoint, ...)."""
    modules = ", ".join(f"infusing_jax.{m}" for m in COMMANDS)
    result = subprocess.run([sys.executable, "-c", f"import {modules}"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for name, flag in COMMANDS.items():
        result = _run(f"infusing_jax.{name}", "--helpshort")  # absl exits 1 after help
        assert flag in result.stdout, (name, result.stderr[-2000:])
