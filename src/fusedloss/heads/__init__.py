"""Fused vocabulary heads: ``x @ w`` streamed in chunks, never ``[tokens, vocab]``.

The engine (:mod:`._engine`): per-token row statistics computed by a backend's core
(:mod:`.reference`, :mod:`.xla`, :mod:`.pallas_gpu`, :mod:`.pallas_tpu`; the fixed
table in :mod:`._registry`, chosen for the compilation target by :mod:`._targets`),
tokens prepared once (:mod:`._tokens`), heads as differentiable functions of the
statistics (:mod:`.cross_entropy`), and the sharded wrapper (:mod:`.sharded`).
"""
