"""The implementation cases every linear_cross_entropy test runs over.

Each case is ``(id, implementation name, config)``. Chunk sizes are tiny so that the
small test shapes exercise several (and partial) chunks. Kernel modules append their
interpret-mode cases here.
"""

from fusedloss import XlaConfig

IMPL_CASES = [
    ("reference", "reference", None),
    ("xla-recompute", "xla", XlaConfig(strategy="recompute", token_chunk=16, vocab_chunk=48)),
    (
        "xla-grad_in_forward",
        "xla",
        XlaConfig(strategy="grad_in_forward", token_chunk=16, vocab_chunk=40),
    ),
]

# Pallas kernels in interpret mode (they run on any backend). Tiles are tiny and not
# aligned with the test shapes, so partial tiles occur on every axis; the GPU case also
# splits the vocabulary in two and walks the backward in chunks of 32 columns.
from fusedloss.heads.pallas_gpu import PallasGpuConfig  # noqa: E402
from fusedloss.heads.pallas_tpu import PallasTpuConfig  # noqa: E402

IMPL_CASES += [
    (
        "pallas_gpu-interpret",
        "pallas_gpu",
        PallasGpuConfig(
            block_tokens=16,
            block_vocab=32,
            block_d=16,
            vocab_splits=2,
            chunk_bytes=8192,
            interpret=True,
        ),
    ),
    (
        "pallas_tpu-interpret",
        "pallas_tpu",
        PallasTpuConfig(block_tokens=16, block_vocab=32, interpret=True),
    ),
]
