"""infusing_jax: fine-tune SigLIP / CLIP image encoders for fine-grained retrieval without forgetting."""
__version__ = "0.1.0"
