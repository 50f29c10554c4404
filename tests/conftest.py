"""Test-wide JAX settings.

Silent dtype promotion or broadcasting fails loudly. The session sees 8 host CPU
devices (set before JAX initializes its backend; every pytest-xdist worker imports
this file first), so the multi-device tests build their meshes in-process and every
other test runs on a multi-device host, as on a real accelerator node.
"""

import jax

NUM_CPU_DEVICES = 8

jax.config.update("jax_num_cpu_devices", NUM_CPU_DEVICES)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
