"""Image-text contrastive losses for pretraining a two-tower."""
import jax
import jax.numpy as jnp


def sigmoid_loss(zimg, ztxt, log_t, b):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023), mean over images.

    zimg (N, E), ztxt (N, E) L2-normalised, row i of each a matching pair;
    logits_ij = exp(log_t) zimg_i . ztxt_j + b, z_ij = +1 if i == j else -1:

        loss = -1/N sum_i sum_j log sigmoid(z_ij logits_ij)
    """
    logits = zimg @ ztxt.T * jnp.exp(log_t) + b
    signs = 2.0 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1.0
    return -jnp.mean(jnp.sum(jax.nn.log_sigmoid(signs * logits), axis=-1))
