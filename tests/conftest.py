"""Strict JAX for every test: float64 available, no silent rank promotion."""

import jax

# float64 for the 1e-12 checks; every float32 test asks for float32 explicitly.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
