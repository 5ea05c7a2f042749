"""Training losses: pure JAX functions, one kind of loss per module."""
