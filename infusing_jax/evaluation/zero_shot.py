r"""Zero-shot classification through the frozen text tower.

Class c's embedding from its T prompts (template t with the class name), the
CLIP convention: normalise each prompt embedding, average, renormalise,

    w_c = m_c / |m_c|,   m_c = (1/T) sum_t u_ct / |u_ct|.

An image x is classified by its cosines <x / |x|, w_c>; its rank is the number of
classes before its true class when sorted by score, descending, ties to the lower
class index (text_retrieval.first_positive_ranks). top-K accuracy = mean [rank < K]
(top-5 is 1 with 5 classes or fewer). Each granularity the dataset has names for
('fine': `label`, 'coarse': `coarse_label`) is scored with its own classes.
"""
import numpy as np

from infusing_jax.evaluation import embedding
from infusing_jax.evaluation import prompts as prompts_lib
from infusing_jax.evaluation import text_retrieval

KS = (1, 5)


def classifier(prompt_embeddings) -> np.ndarray:
    """(C, T, E) prompt embeddings -> (C, E) class embeddings w_c (module doc)."""
    u = np.asarray(prompt_embeddings, np.float64)
    if u.ndim != 3:
        raise ValueError(f"zero-shot: prompt embeddings {u.shape}; want (classes, templates, E)")
    u = u / np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
    m = u.mean(axis=1)
    return (m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def class_embeddings(embed_texts, class_names, templates) -> np.ndarray:
    """C names x T templates through embed_texts (texts -> (C*T, E)) -> (C, E) class embeddings."""
    templates = prompts_lib.check_templates(templates)
    names = list(class_names)
    if not names:
        raise ValueError("zero-shot: no class names")
    texts = [t.replace("{}", name) for name in names for t in templates]
    prompt_embeddings = np.asarray(embed_texts(texts))
    return classifier(prompt_embeddings.reshape(len(names), len(templates), -1))


def accuracy(image_embeddings, labels, classes, ks=KS, block_size: int = None) -> dict:
    """image_embeddings (N, E), labels (N,) in [0, C), classes (C, E) class embeddings ->
    {'top{K}' for K in ks: fractions in [0, 1], 'num_images': N}."""
    images, labels, classes = (np.asarray(a) for a in (image_embeddings, labels, classes))
    if images.ndim != 2 or classes.ndim != 2 or images.shape[1] != classes.shape[1]:
        raise ValueError(f"zero-shot: image embeddings {images.shape} and class embeddings "
                         f"{classes.shape} must be (N, E) and (C, E)")
    if labels.shape != (len(images),) or not len(images):
        raise ValueError(f"zero-shot: labels {labels.shape} for {len(images)} images; want one "
                         "label per image and at least one image")
    bad = (labels < 0) | (labels >= len(classes))
    if bad.any():
        raise ValueError(f"zero-shot: {bad.sum()} labels outside [0, {len(classes)}) (e.g. "
                         f"{labels[bad][0]}); the class names do not cover the dataset's labels")
    ranks = text_retrieval.first_positive_ranks(images, classes, labels, np.arange(len(classes)),
                                                block_size)
    out = {f"top{k}": float(np.mean(ranks < k)) for k in ks}
    out["num_images"] = len(images)
    return out


def evaluate_split(encode_images, embed_texts, split, preprocess_fn, class_names: dict,
                   templates, batch_size: int = 256, ks=KS) -> dict:
    """Zero-shot top-K accuracy of a labelled split, at each granularity named.

    encode_images: (B, S, S, 3) -> (B, E) (embedding.embed_split); embed_texts:
    texts -> (M, E), the frozen text tower (text_retrieval.text_embedder);
    class_names: {'fine': [C names], 'coarse': [C' names]}, either or both
    (prompts.tfds_class_names, prompts.read_class_names).
    Returns {granularity: {'top1', 'top5', 'num_images'}}; undecodable images skipped.
    """
    unknown = set(class_names) - set(prompts_lib.GRANULARITIES)
    if unknown or not class_names:
        raise ValueError(f"zero-shot class_names: keys {sorted(class_names)}; use 'fine' and/or "
                         "'coarse'")
    sizes = {"fine": split.num_classes, "coarse": split.num_coarse_classes}
    for granularity, names in class_names.items():
        if sizes[granularity] and len(names) != sizes[granularity]:
            raise ValueError(f"zero-shot class_names[{granularity!r}]: {len(names)} names, split "
                             f"{split.name} has {sizes[granularity]} classes; give one per class")
    fields = tuple(prompts_lib.GRANULARITIES[g] for g in class_names)
    embedded = embedding.embed_split(encode_images, split, preprocess_fn, batch_size=batch_size,
                                     columns=fields)
    images, columns = embedded.embeddings, embedded.columns
    out = {}
    for granularity, names in class_names.items():
        classes = class_embeddings(embed_texts, names, templates)
        labels = columns[prompts_lib.GRANULARITIES[granularity]]
        out[granularity] = accuracy(images, labels, classes, ks)
    return out
