"""The training objective: every domain's loss terms on its own examples.

For a batch with examples of domains d (masks m_d, fractions p_d = mean(m_d)):

    loss = sum_d p_d * L_d,    L_d = sum_i w_i l_i            ('weighted_sum')
                               L_d = sum_i w_i l_i / sum_i w_i ('weighted_average')

over the terms l_i of domain d's config (`config.domains.<d>.losses`). With one
domain per batch (the authors' way) p_d is 1 for the batch's domain and the
other domains' terms are skipped (lax.cond), the online teacher included.
Parameter terms (anchoring, EWC) do not depend on the batch: they are computed
once per step, outside the conds, and weighted like the rest of their domain's
terms (p_d w_i, over sum_i w_i for 'weighted_average'). The recipes list
anchoring in every domain with the same weight, so it counts once per step.

Heads (the trainable per-domain parameters): {'classifier' (E, C) shared by the
domain's classifier losses, 'log_scale' {kind: ()} for each classifier loss with
a trainable scale (each starts at its own `scale`), 'proxies' (C, E) for
proxy-anchor}. Every data term sees the whole batch and its domain's mask, and
equals the same term on the domain's examples alone.
"""
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infusing_jax.training import config as config_lib
from infusing_jax.losses import classification
from infusing_jax.losses import metric
from infusing_jax.losses import retention
from infusing_jax.models import lora


def init_heads(domains, names: Sequence[str], num_classes: dict, dim: int, rng) -> dict:
    """{domain: {'classifier' (dim, C), 'log_scale' {kind: ()}, 'proxies' (C, dim)}} where
    its losses need them; domains: config.domains."""
    heads = {}
    for name, key in zip(names, jax.random.split(rng, len(names))):
        losses = domains[name].losses
        head = {}
        kinds = [k for k in losses.keys() if k in config_lib.CLASSIFIERS]
        if kinds:
            head["classifier"] = classification.init_head(key, dim, num_classes[name])
            trainable = {k: jnp.log(jnp.float32(losses[k].scale)) for k in kinds
                         if losses[k].trainable_scale}
            if trainable:
                head["log_scale"] = trainable
        if "proxy_anchor" in losses:
            head["proxies"] = jax.random.normal(jax.random.fold_in(key, 1),
                                                (num_classes[name], dim)) / np.sqrt(dim)
        if head:
            heads[name] = head
    return heads


def _classifier_logits(kind, settings, head, f, labels):
    trainable = head.get("log_scale", {})
    scale = jnp.exp(trainable[kind]) if kind in trainable else settings.scale
    w = head["classifier"]
    if kind == "normface":
        return classification.normface_logits(f, w, scale)
    if kind == "cosface":
        return classification.cosface_logits(f, w, labels, scale, settings.margin)
    return classification.arcface_logits(f, w, labels, scale, settings.margin,
                                         settings.fallback)


def _masked_mean(values, mask):
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def domain_terms(losses, head: dict, f, batch: dict, mask, reference, embed: Callable,
                 texts=None) -> dict:
    """{kind: scalar} for one domain's data losses on the examples where `mask` (B,) holds.

    f (B, E): student embeddings; batch['label'] (B,); batch['teacher'] (B, E) and
    batch['has_teacher'] (B,) for a precomputed teacher. embed(backbone, images)
    -> (B, E) runs the online teacher (on `reference`, the pretrained weights); texts:
    (K, E) the domain's lipsum bank (frozen_text.py), where it has that loss.
    """
    labels = jnp.where(mask, batch["label"], 0)
    terms, online = {}, None
    for kind in losses.keys():
        s = losses[kind]
        if kind in config_lib.PARAMETER:
            continue
        if kind in config_lib.CLASSIFIERS:
            logits = _classifier_logits(kind, s, head, f, labels)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            terms[kind] = _masked_mean(ce, mask)
        elif kind == "supcon":
            terms[kind] = metric.supcon(f, labels, s.temperature, mask=mask)
        elif kind == "multi_similarity":
            terms[kind] = metric.multi_similarity(f, labels, s.alpha, s.beta, s.base, s.epsilon,
                                                  mask=mask)
        elif kind == "triplet":
            terms[kind] = metric.triplet_batch_hard(f, labels, s.margin, mask=mask)
        elif kind == "proxy_anchor":
            terms[kind] = metric.proxy_anchor(f, labels, head["proxies"], s.alpha, s.delta,
                                              mask=mask)
        elif kind in config_lib.DISTILLATION:
            if s.teacher == "online":
                if online is None:
                    online = jax.lax.stop_gradient(embed(reference, batch["image"]))
                f0, m = online, mask
            else:
                f0, m = batch["teacher"], mask & batch["has_teacher"]
            if kind == "feature_mse":
                terms[kind] = retention.feature_mse(f, f0, m)
            elif kind == "feature_cosine":
                terms[kind] = retention.feature_cosine(f, f0, m)
            elif kind == "relational":
                terms[kind] = retention.relational(f, f0, m)
            elif kind == "lipsum":
                if texts is None:
                    raise ValueError("lipsum needs its bank of text embeddings (frozen_text.py)")
                terms[kind] = retention.lipsum(f, f0, texts, m)
            else:
                classifier = next(k for k in losses.keys() if k in config_lib.CLASSIFIERS)
                student = _classifier_logits(classifier, losses[classifier], head, f, labels)
                teacher = _classifier_logits(classifier, losses[classifier], head, f0, labels)
                terms[kind] = retention.logit_kl(student, teacher, s.student_temperature,
                                                 s.teacher_temperature, s.scale_by_t2, m)
    return {k: v.astype(jnp.float32) for k, v in terms.items()}


def parameter_term(kind: str, settings, backbone, reference, fisher):
    """Anchoring or EWC of `backbone` to `reference` (scalar float32)."""
    include = retention.exclude_prefixes(*settings.exclude)
    if kind == "anchoring":
        value = retention.anchoring(backbone, reference, settings.reduction, include)
    else:
        value = retention.ewc(backbone, reference, fisher, include)
    return value.astype(jnp.float32)


def normaliser(losses, how: str) -> float:
    """1, or the sum of the domain's loss weights for 'weighted_average'."""
    if how == "weighted_average":
        return max(sum(losses[k].weight for k in losses.keys()), 1e-12)
    return 1.0


def aggregate(losses, terms: dict, how: str):
    """sum_i w_i terms_i / normaliser."""
    return sum(losses[k].weight * terms[k] for k in terms) / normaliser(losses, how)


def needs_reference(domains, names: Sequence[str]) -> bool:
    """Whether a loss needs the frozen pretrained backbone in the step: a parameter term
    (its anchor) or an online teacher."""
    return any(k in config_lib.PARAMETER or
               (k in config_lib.DISTILLATION and domains[n].losses[k].teacher == "online")
               for n in names for k in domains[n].losses.keys())


def student_embedding(embed: Callable, params, images):
    """The student's embeddings; with LoRA (params['lora']) the tower runs unmerged on its
    frozen base (no gradient into it)."""
    if "lora" in params:
        return embed(jax.lax.stop_gradient(params["backbone"]), images, params["lora"])
    return embed(params["backbone"], images)


def student_tower(params, lora_scale: float):
    """The student's image tower as plain weights: with LoRA, base + s A B (models/lora.py)."""
    if "lora" in params:
        return lora.merge(jax.lax.stop_gradient(params["backbone"]), params["lora"],
                          lora_scale)
    return params["backbone"]


def make_loss_fn(domains, names: Sequence[str], aggregation: str, embed: Callable,
                 lora_scale: float = 1.0, text_banks: dict = None) -> Callable:
    """-> loss_fn(params, reference, fisher, batch) -> (loss, {'<domain>/<kind>': term,
    '<domain>/present': 0 or 1}).

    domains: config.domains; aggregation: config.loss_aggregation. params: {'backbone',
    'heads'} and, with LoRA, 'lora' (alpha / rank = lora_scale); embed(backbone,
    images (B, S, S, 3)[, adapters]) -> (B, E) L2-normalised; batch['domain'] (B,)
    indexes `names`. Parameter terms see the merged tower. text_banks: {domain: (K, E)}
    for lipsum (frozen_text.lipsum_banks).
    """
    text_banks = text_banks or {}
    def loss_fn(params, reference, fisher, batch):
        f = student_embedding(embed, params, batch["image"]).astype(jnp.float32)
        total, logged, parameter_values = jnp.zeros((), jnp.float32), {}, {}
        tower = None
        for i, name in enumerate(names):
            losses = domains[name].losses
            mask = batch["domain"] == i
            head = params["heads"].get(name, {})

            def compute(losses=losses, head=head, mask=mask):
                terms = domain_terms(losses, head, f, batch, mask, reference, embed,
                                     text_banks.get(name))
                return terms, aggregate(losses, terms, aggregation)

            present = jnp.any(mask)
            shapes = jax.eval_shape(compute)
            terms, value = jax.lax.cond(
                present, compute, lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
            share = jnp.mean(mask)
            total += share * value
            logged.update({f"{name}/{k}": v for k, v in terms.items()})
            for kind in [k for k in losses.keys() if k in config_lib.PARAMETER]:
                s = losses[kind]
                key = (kind, s.get("reduction"), tuple(s.exclude))
                if key not in parameter_values:
                    tower = student_tower(params, lora_scale) if tower is None else tower
                    parameter_values[key] = parameter_term(kind, s, tower, reference, fisher)
                value = parameter_values[key]
                total += share * s.weight / normaliser(losses, aggregation) * value
                logged[f"{name}/{kind}"] = jnp.where(present, value, 0.0)
            logged[f"{name}/present"] = present.astype(jnp.float32)
        return total, logged

    return loss_fn


def data_losses(losses) -> dict:
    """The losses of a domain that depend on its examples (all but the parameter terms)."""
    return {k: losses[k] for k in losses.keys() if k not in config_lib.PARAMETER}


def per_example_loss_fn(losses, head: dict, aggregation: str, embed: Callable,
                        reference=None, texts=None) -> Callable:
    """-> loss(backbone, batch) -> (B,): a domain's data losses (`data_losses`) on each
    example alone, for EWC's empirical Fisher (retention.estimate_fisher).

    Each example is its own batch of one (vmapped), all of it the domain's; an
    online teacher runs on `reference`.
    """
    losses = data_losses(losses)

    def loss(backbone, batch):
        def one(ex):
            ex = jax.tree.map(lambda x: x[None], ex)
            f = embed(backbone, ex["image"]).astype(jnp.float32)
            terms = domain_terms(losses, head, f, ex, jnp.ones((1,), bool), reference, embed,
                                 texts)
            return aggregate(losses, terms, aggregation)
        return jax.vmap(one)(batch)

    return loss
