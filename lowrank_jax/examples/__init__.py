"""Small runnable examples (``python -m lowrank_jax.examples.<name>``)."""
