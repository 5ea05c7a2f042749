r"""Convert a SigLIP / CLIP checkpoint, or a run's fine-tuned model, to another format.

    python -m infusing_jax.convert SRC DST
        [--to=big_vision|hf|open_clip|tips_scenic|tips_pytorch|onnx] [--image_size=N]

SRC is a checkpoint, whose format is inferred (`file.npz[:img]`, a save_pretrained
directory, an open_clip .safetensors / .bin), or the workdir of a run of
infusing_jax.main: the image tower the run keeps (best/ or its last checkpoint,
EMA and LoRA as the run's config.json says) with the pretrained text tower, as
`evaluate --export` writes it. Without --to, DST's name decides: .npz ->
big_vision, .safetensors / .bin -> open_clip, .onnx -> the image tower as an
ONNX graph (a dynamic batch axis; outputs 'embedding' and 'features'),
anything else -> an HF directory. TIPS image towers go to big_vision, onnx or
their own two layouts (--to=tips_scenic, --to=tips_pytorch: .npz files).
"""
import os

import ml_collections
from absl import flags

from infusing_jax import checkpoints
from infusing_jax import cli
from infusing_jax import errors
from infusing_jax import evaluate
from infusing_jax import paths
from infusing_jax.models import transformer
from infusing_jax.training import run_checkpoints

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_enum("to", None, checkpoints.EXPORT_FORMATS,
                      "Output format (default: from DST).")
    flags.DEFINE_integer(
        "image_size", None, "Resample the image position embedding to this resolution.")
    flags.DEFINE_enum(
        "act", None, sorted(transformer.ACTIVATIONS),
        "Activation, for sources that do not record it (required for open_clip CLIP files: "
        "quick_gelu for OpenAI weights, gelu for LAION / DataComp / DFN).")


def is_run(path: str) -> bool:
    """A workdir of infusing_jax.main: its config.json beside checkpoints/ or best/."""
    has = lambda name: paths.exists(os.path.join(path, name))
    return has("config.json") and (has("checkpoints") or has("best"))


def export_run(workdir: str, dst: str, fmt: str) -> None:
    """The model a run keeps, with its pretrained text tower, written to dst as fmt."""
    cfg = ml_collections.ConfigDict(run_checkpoints.read_json(
        os.path.join(workdir, "config.json")))
    source = cfg.model.checkpoint
    if not paths.is_remote(source) and not os.path.exists(source.split(":")[0]):
        raise errors.UserError(
            f"SRC={workdir}: the run's pretrained checkpoint {source!r} (model.checkpoint in "
            "its config.json) is not found from here; run convert in the folder the run was "
            "started from, or put the checkpoint back at that path")
    evaluate.evaluate(cfg, workdir, export=dst, run_tests=False, export_format=fmt)


def main(argv):
    if len(argv) != 3:
        raise errors.UserError("SRC DST: usage: python -m infusing_jax.convert SRC DST "
                               "[--to=FORMAT]")
    src, dst = argv[1:]
    if FLAGS.image_size is not None and FLAGS.image_size < 1:
        raise errors.UserError(f"--image_size={FLAGS.image_size}: must be >= 1 (pixels, a "
                               "multiple of the patch size); leave it out to keep SRC's")
    fmt = FLAGS.to or checkpoints.format_of(dst)
    cli.check_output_file("DST", dst, folder=fmt == "hf")
    if is_run(src):
        if FLAGS.image_size or FLAGS.act:
            raise errors.UserError("--image_size and --act apply to checkpoints; a run "
                                   f"({src}) exports at its own config's settings")
        export_run(src, dst, fmt)
        print(f"wrote {dst} ({fmt}): the model the run in {src} keeps")
        return
    try:
        params, cfg = checkpoints.load(src, image_size=FLAGS.image_size, act=FLAGS.act)
    except checkpoints.ArgumentError as e:
        raise errors.UserError(f"--{e.argument}: {e}") from None
    patch = cfg.image.patch_size
    if FLAGS.image_size and FLAGS.image_size % patch:
        raise errors.UserError(f"--image_size={FLAGS.image_size}: not a multiple of {src}'s "
                               f"patch size {patch}; give one (e.g. "
                               f"{round(FLAGS.image_size / patch) * patch}), or leave it out "
                               "to keep SRC's own size")
    checkpoints.save(params, cfg, dst, fmt)
    towers = "image and text towers" if cfg.get("text") and fmt != "onnx" else "image tower"
    print(f"wrote {dst} ({fmt}): {cfg.family} {towers}, width {cfg.image.width}, "
          f"depth {cfg.image.depth}, patch {cfg.image.patch_size}, {cfg.image_size} px")


if __name__ == "__main__":
    cli.run(main, define_flags)
