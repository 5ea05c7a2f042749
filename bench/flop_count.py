"""FLOPs of one train step: the analytic matmul count, and XLA's own count."""


def analytic_flops(image_cfg, image_size: int, batch_size: int, num_classes: int) -> dict:
    """-> {'forward', 'train'}: matmul FLOPs (2 per multiply-add) of the image tower and
    a NormFace classifier over a batch.

    Per image, N = (S / p)^2 patches, width D, MLP width M, L blocks, C classes:
      patch embedding      N * (p * p * 3) * D
      per block            q/k/v/out projections 4 * N * D^2, attention scores and
                           values 2 * N^2 * D, MLP 2 * N * D * M
      MAP head             query and output projections 2 * D^2, key/value
                           2 * N * D^2, attention 2 * N * D, MLP 2 * D * M
      classifier           D * C
    Training = 3x forward (backward: input and weight gradients, 2x forward), less
    the patch embedding's input gradient (the images are not differentiated).
    """
    n = (image_size // image_cfg.patch_size) ** 2
    d, m = image_cfg.width, image_cfg.mlp_dim
    patch_macs = n * image_cfg.patch_size ** 2 * 3 * d
    block_macs = 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    head_macs = 2 * d * d + 2 * n * d * d + 2 * n * d + 2 * d * m
    macs = patch_macs + image_cfg.depth * block_macs + head_macs + d * num_classes
    forward = 2 * macs * batch_size
    return dict(forward=forward, train=3 * forward - 2 * patch_macs * batch_size)


def xla_flops(compiled) -> float:
    """XLA's FLOP count of a compiled executable (cost_analysis()['flops']: matmuls and
    elementwise work), NaN where the backend gives none."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))
