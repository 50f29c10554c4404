"""Test-wide JAX settings: silent dtype promotion or broadcasting fails loudly."""

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
