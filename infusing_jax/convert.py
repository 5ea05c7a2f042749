r"""Convert a SigLIP / CLIP checkpoint between big_vision, Hugging Face and open_clip formats.

    python -m infusing_jax.convert SRC DST [--to=big_vision|hf|open_clip] [--image_size=N]

The format of SRC is inferred (`file.npz[:img]`, a save_pretrained directory,
an open_clip .safetensors / .bin); without --to, DST's name decides: .npz ->
big_vision, .safetensors / .bin -> open_clip, anything else -> an HF directory.
"""
from absl import flags

from infusing_jax import checkpoints
from infusing_jax import cli
from infusing_jax import errors
from infusing_jax.models import transformer

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_enum("to", None, checkpoints.FORMATS, "Output format (default: from DST).")
    flags.DEFINE_integer(
        "image_size", None, "Resample the image position embedding to this resolution.")
    flags.DEFINE_enum(
        "act", None, sorted(transformer.ACTIVATIONS),
        "Activation, for sources that do not record it (required for open_clip CLIP files: "
        "quick_gelu for OpenAI weights, gelu for LAION / DataComp / DFN).")


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
    towers = "image and text towers" if cfg.get("text") else "image tower"
    print(f"wrote {dst} ({fmt}): {cfg.family} {towers}, width {cfg.image.width}, "
          f"depth {cfg.image.depth}, patch {cfg.image.patch_size}, {cfg.image_size} px")


if __name__ == "__main__":
    cli.run(main, define_flags)
