"""WiSE-FT (Wortsman et al., 2022): the weight-space ensemble of the pretrained and the
fine-tuned image tower, theta(a) = (1 - a) * theta0 + a * theta1, a in [0, 1]."""
import jax
import numpy as np

from infusing_jax import errors


def interpolate(pretrained, finetuned, alpha: float):
    """Trees of the same structure -> (1 - alpha) * pretrained + alpha * finetuned, leafwise,
    computed in float32 and returned in each fine-tuned leaf's dtype."""
    if not 0.0 <= alpha <= 1.0:
        raise errors.UserError(f"wise_ft: alpha {alpha} must be in [0, 1]")
    if jax.tree.structure(pretrained) != jax.tree.structure(finetuned):
        raise errors.UserError("wise_ft: the pretrained and fine-tuned trees differ in structure")

    def mix(p, f):
        p32, f32 = np.asarray(p, np.float32), np.asarray(f, np.float32)
        if p32.shape != f32.shape:
            raise errors.UserError(f"wise_ft: shapes {p32.shape} and {f32.shape} differ")
        return ((1.0 - alpha) * p32 + alpha * f32).astype(np.asarray(f).dtype)
    return jax.tree.map(mix, pretrained, finetuned)


def parse_alphas(text: str, flag: str = "--wise_ft") -> list:
    """'0,0.25,0.5' -> [0.0, 0.25, 0.5], each in [0, 1]; errors name `flag`."""
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise errors.UserError(f"{flag}={text}: give comma-separated numbers in [0, 1], "
                               "e.g. 0.25,0.5,0.75") from None
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise errors.UserError(f"{flag}: {bad} not in [0, 1]")
    return alphas
