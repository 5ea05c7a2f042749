"""WiSE-FT (Wortsman et al., 2022): the weight-space ensemble of the pretrained and the
fine-tuned image tower, theta(a) = (1 - a) * theta0 + a * theta1, a in [0, 1]."""
import jax
import numpy as np


def interpolate(pretrained, finetuned, alpha: float):
    """Trees of the same structure -> (1 - alpha) * pretrained + alpha * finetuned, leafwise,
    computed in float32 and returned in each fine-tuned leaf's dtype."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"wise_ft: alpha {alpha} must be in [0, 1]")
    if jax.tree.structure(pretrained) != jax.tree.structure(finetuned):
        raise ValueError("wise_ft: the pretrained and fine-tuned trees differ in structure")

    def mix(p, f):
        p32, f32 = np.asarray(p, np.float32), np.asarray(f, np.float32)
        if p32.shape != f32.shape:
            raise ValueError(f"wise_ft: shapes {p32.shape} and {f32.shape} differ")
        return ((1.0 - alpha) * p32 + alpha * f32).astype(np.asarray(f).dtype)
    return jax.tree.map(mix, pretrained, finetuned)


def parse_alphas(text: str) -> list:
    """'0,0.25,0.5' -> [0.0, 0.25, 0.5], each in [0, 1]."""
    alphas = [float(a) for a in text.split(",") if a.strip()]
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise ValueError(f"--wise_ft: {bad} not in [0, 1]")
    return alphas
