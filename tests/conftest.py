"""Test-wide JAX settings.

Silent dtype promotion or broadcasting fails loudly. The session sees 8 host CPU
devices (set before JAX initializes its backend; every pytest-xdist worker imports
this file first), so the multi-device tests build their meshes in-process and every
other test runs on a multi-device host, as on a real accelerator node.

Hypothesis runs under the profile named by ``HYPOTHESIS_PROFILE``: ``ci`` (the
default, what CI runs: 50 examples a property, within the suite's time budget) or
``thorough`` (local runs: 1000 examples a property). No deadline: an example that
meets a new shape compiles, which takes far longer than the ones that reuse it.
Property tests therefore leave the number of examples to the profile.
"""

import os

import jax

NUM_CPU_DEVICES = 8

jax.config.update("jax_num_cpu_devices", NUM_CPU_DEVICES)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

try:
    import hypothesis
except ImportError:  # the compile-only target environment (tests/targets) has none
    hypothesis = None
if hypothesis is not None:
    hypothesis.settings.register_profile("ci", max_examples=50, deadline=None)
    hypothesis.settings.register_profile("thorough", max_examples=1000, deadline=None)
    hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
