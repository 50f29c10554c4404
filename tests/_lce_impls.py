"""The implementation cases every linear_cross_entropy test runs over.

Each case is ``(id, implementation name, config)``. Chunk sizes are tiny so that the
small test shapes exercise several (and partial) chunks. Kernel modules append their
interpret-mode cases here.
"""

from fusedloss.linear_cross_entropy import XlaConfig

IMPL_CASES = [
    ("reference", "reference", None),
    ("xla-recompute", "xla", XlaConfig(strategy="recompute", token_chunk=16, vocab_chunk=48)),
    ("xla-grad_in_forward", "xla", XlaConfig(strategy="grad_in_forward", token_chunk=16)),
]
