"""The PyTorch reference: the plain config's train step in transformers + torch.

transformers' SiglipVisionModel from a SiglipVisionConfig of our tower's sizes
(random init, its default attention: SDPA), eager, train mode; the same NormFace
loss, cross_entropy(16 * l2norm(pooler_output) @ l2norm_columns(W)), W (D, C)
bias-free; torch.optim.AdamW with config.optim's two learning rates (backbone
1e-5, head 1e-3), weight decay 1e-6 and betas (0.9, 0.999). Unlike ours, it does
not compute the gradient / parameter / update norms the trainer logs.
"""
import time

import numpy as np


def runner(host_batch: dict, num_classes: int, threads: int, image_cfg, image_size: int):
    """-> (run() -> seconds of one step on host_batch's image (B, S, S, 3) and label (B,),
    synchronised by loss.item(); {'attn_implementation', 'threads', 'version'})."""
    import torch
    from transformers import SiglipVisionConfig
    from transformers import SiglipVisionModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    img = image_cfg
    config = SiglipVisionConfig(hidden_size=img.width, intermediate_size=img.mlp_dim,
                                num_hidden_layers=img.depth, num_attention_heads=img.num_heads,
                                num_channels=3, image_size=image_size,
                                patch_size=img.patch_size, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6, attention_dropout=0.0)
    model = SiglipVisionModel(config).train()
    bound = (3.0 / img.width) ** 0.5  # lecun_uniform, as objective.init_heads
    w = torch.nn.Parameter(torch.empty(img.width, num_classes).uniform_(-bound, bound))
    opt = torch.optim.AdamW([dict(params=list(model.parameters()), lr=1e-5),
                             dict(params=[w], lr=1e-3)],
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-6)
    images = torch.from_numpy(np.ascontiguousarray(host_batch["image"].transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(host_batch["label"].astype(np.int64))
    normalize = torch.nn.functional.normalize

    def run() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        features = normalize(model(pixel_values=images).pooler_output, dim=-1)
        logits = 16.0 * features @ normalize(w, dim=0)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        loss.item()
        return time.perf_counter() - start
    info = dict(attn_implementation=getattr(model.config, "_attn_implementation", None),
                threads=torch.get_num_threads(), version=torch.__version__)
    return run, info
