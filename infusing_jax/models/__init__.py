"""Flax SigLIP / CLIP towers with big_vision parameter trees."""
from infusing_jax.models.config import build, init_params, model_config, validate
