"""The command lines (convert, embed) end to end, and image decoding."""
import os
import subprocess
import sys

import numpy as np
import sentencepiece
from PIL import Image, ImageDraw

from infusing_jax import checkpoints
from infusing_jax import models
from infusing_jax.data import pil_views

from tests.helpers.tiny import random_params, tiny_config


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


def _draw_images(folder, n: int, seed: int = 0) -> list:
    """n images of a coloured shape in several modes (RGB JPEG, grayscale, RGBA and 16-bit
    PNG) and one broken file; -> their captions."""
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
               "yellow": (230, 210, 40)}
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    captions = []
    for i in range(n):
        shape, colour = ("circle", "square")[i % 2], list(colours)[(i // 2) % len(colours)]
        size = int(rng.integers(48, 96))
        image = Image.new("RGB", (size + 16, size), tuple(int(v) for v in rng.integers(200, 255, 3)))
        r = size // 4
        box = (size // 2 - r, size // 2 - r, size // 2 + r, size // 2 + r)
        (ImageDraw.Draw(image).ellipse if shape == "circle" else
         ImageDraw.Draw(image).rectangle)(box, fill=colours[colour])
        name = os.path.join(folder, f"{i:03d}_{colour}_{shape}")
        if i % 4 == 1:
            image.convert("L").save(name + ".png")
        elif i % 4 == 2:
            image.convert("RGBA").save(name + ".png")
        elif i % 4 == 3:
            Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257).save(name + ".png")
        else:
            image.save(name + ".jpg", quality=90)
        captions.append(f"a photo of a {colour} {shape}")
    with open(os.path.join(folder, "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return sorted(set(captions))


def _train_spm(folder, captions):
    """folder/spm.model: a 32-piece sentencepiece model (EOS 1, no pad) of the captions."""
    (folder / "corpus.txt").write_text("\n".join(captions * 4) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "spm"), vocab_size=32,
        hard_vocab_limit=False, model_type="unigram", pad_id=-1, unk_id=2, bos_id=-1, eos_id=1,
        minloglevel=2)


def test_every_format_embeds_a_folder_alike_end_to_end(tmp_path):
    """A random tiny SigLIP in big_vision's format, converted to HF and open_clip by
    `convert`; `embed` of a folder (every colour mode, one broken file) and of captions
    gives the same embeddings from each."""
    captions = _draw_images(tmp_path / "images", 12)
    (tmp_path / "texts.txt").write_text("\n".join(captions) + "\n")
    _train_spm(tmp_path, captions)
    cfg = models.model_config("siglip", "mu/8", 64, "mu", vocab_size=64, seq_len=16)
    copies = {"big_vision": tmp_path / "m.npz", "hf": tmp_path / "m_hf",
              "open_clip": tmp_path / "m.safetensors"}
    checkpoints.save(random_params(cfg), cfg, str(copies["big_vision"]), "big_vision")
    for fmt in ("hf", "open_clip"):
        result = _run("infusing_jax.convert", str(copies["big_vision"]), str(copies[fmt]),
                      f"--to={fmt}")
        assert result.returncode == 0, result.stderr[-3000:]
    out = {}
    for fmt, path in copies.items():
        result = _run("infusing_jax.embed", f"--checkpoint={path}", f"--images={tmp_path}/images",
                      f"--texts={tmp_path}/texts.txt", f"--tokenizer={tmp_path}/spm.model",
                      f"--output={tmp_path}/{fmt}.npz")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "skipped 1 of 13 images" in result.stderr  # counts go to stderr
        out[fmt] = dict(np.load(tmp_path / f"{fmt}.npz"))
    ref = out["big_vision"]
    assert len(ref["image_paths"]) == 12 and ref["skipped_paths"].tolist() == ["broken.jpg"]
    assert len(ref["texts"]) == len(captions)
    np.testing.assert_allclose(np.linalg.norm(ref["image_embeddings"], axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ref["text_embeddings"], axis=1), 1, atol=1e-5)
    for fmt, tol in (("hf", 1e-6), ("open_clip", 1e-2)):  # open_clip's SigLIP: exact GELU
        diff = max(np.abs(out[fmt][k] - ref[k]).max()
                   for k in ("image_embeddings", "text_embeddings"))
        assert diff <= tol, (fmt, diff)
    assert np.abs(out["open_clip"]["image_embeddings"] - ref["image_embeddings"]).max() > 0


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
    assert np.asarray(pil_views.to_rgb(gray16)).min() == 255
    half16 = Image.fromarray(np.full((4, 4), 32896, np.uint16))  # 128 * 257
    assert np.all(np.asarray(pil_views.to_rgb(half16)) == 128)
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.all(np.asarray(pil_views.to_rgb(transparent)) == 255)  # onto white
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red
    assert tuple(np.asarray(pil_views.to_rgb(cmyk))[0, 0]) == (255, 0, 0)
    for mode in ("L", "P", "LA", "1", "I", "F"):
        img = pil_views.to_rgb(Image.new(mode, (3, 5)))
        assert img.mode == "RGB" and img.size == (3, 5)


def test_eval_view_shapes_and_ranges():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), np.uint8))
    siglip = pil_views.eval_view(image, 32, "siglip")
    clip = pil_views.eval_view(image, 32, "clip")
    assert siglip.shape == clip.shape == (32, 32, 3)
    assert siglip.min() >= -1 and siglip.max() <= 1
    white = pil_views.eval_view(Image.new("RGB", (40, 30), (255, 255, 255)), 16, "clip")
    np.testing.assert_allclose(white[0, 0], (1 - np.array(pil_views.CLIP_MEAN))
                               / np.array(pil_views.CLIP_STD), rtol=1e-5)
    assert os.path.splitext("x.JPG")[1].lower() in pil_views.IMAGE_EXTENSIONS


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


COMMANDS = {"main": "--distributed", "evaluate": "--checkpoint", "embed": "--checkpoint",
            "retrieval": "--queries", "compare": "--names", "convert": "--image_size",
            "toy.world": "--target_per_class", "toy.pretrain": "--workdir", "search": "--query",
            "report": "--queries"}


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


def test_search_an_embedded_folder_by_photo_and_by_text(tmp_path):
    """embed a folder, then search: a photo of the folder finds itself first (cosine 1);
    a text finds the images whose embeddings score highest with it; bad input: one line."""
    captions = _draw_images(tmp_path / "images", 8)
    _train_spm(tmp_path, captions)
    cfg = models.model_config("siglip", "mu/8", 64, "mu", vocab_size=64, seq_len=16)
    checkpoints.save(random_params(cfg), cfg, str(tmp_path / "m.npz"))
    index = str(tmp_path / "index.npz")
    result = _run("infusing_jax.embed", f"--checkpoint={tmp_path}/m.npz",
                  f"--images={tmp_path}/images", f"--output={index}",
                  f"--texts={tmp_path}/corpus.txt", f"--tokenizer={tmp_path}/spm.model")
    assert result.returncode == 0, result.stderr[-3000:]
    stored = dict(np.load(index))
    query = stored["image_paths"][3]
    result = _run("infusing_jax.search", f"--index={index}",
                  f"--query={tmp_path}/images/{query}", "--k=3")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == ["1", "2", "3"] and lines[0][2] == query
    assert abs(float(lines[0][1]) - 1) < 1e-4
    assert float(lines[0][1]) >= float(lines[1][1]) >= float(lines[2][1])
    # A text: the images whose embeddings score highest with the text's, as embed made it.
    text = captions[0]
    result = _run("infusing_jax.search", f"--index={index}", f"--text={text}", "--k=20")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert len(lines) == 8  # k is capped at the index's size
    row = list(stored["texts"]).index(text)
    scores = stored["image_embeddings"] @ stored["text_embeddings"][row]
    want = [stored["image_paths"][i] for i in np.argsort(-scores)]
    assert [line[2] for line in lines] == want
    np.testing.assert_allclose([float(line[1]) for line in lines], np.sort(scores)[::-1],
                               atol=1e-4)
    for args, words in [((f"--index={index}",), "--query, --text: give one of them"),
                        ((f"--index={tmp_path}/none.npz", "--text=x"), "none.npz: no such file"),
                        ((f"--index={index}", f"--query={tmp_path}/corpus.txt"),
                         "not a readable image"),
                        ((f"--index={index}", "--text=x", "--k=0"), "--k=0: must be >= 1")]:
        result = _run("infusing_jax.search", *args)
        assert result.returncode == 1 and words in result.stderr.strip().splitlines()[-1], \
            (args, result.stderr[-500:])
        assert "Traceback" not in result.stderr
