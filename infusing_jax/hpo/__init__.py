"""Hyperparameter search on Optuna: the sweep command's parts (infusing_jax/sweep.py)."""
