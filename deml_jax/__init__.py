"""deml_jax: Hybrid-Attention based Decoupled Metric Learning in JAX/Flax."""

__version__ = "0.1.0"
