"""``Transposed``: a ``[D, V]`` head weight that is stored as a ``[V, D]`` array.

Tied embeddings use the ``[V, D]`` input embedding as the output head, whose
``[D, V]`` kernel is ``embedding.T``. Passing ``embedding.T`` itself makes a
transposed copy of ``w`` wherever XLA cannot fuse the transpose into the consumer
(a loop over vocabulary chunks is such a place). Passing
``Transposed(embedding)`` instead tells every fused head and every implementation
to read the ``[V, D]`` array in row chunks as it is stored: no copy of ``w`` is
made, and the gradient w.r.t. ``embedding`` comes out in its own ``[V, D]`` layout.

``Transposed`` is a pytree (its one leaf is the ``[V, D]`` array), so it passes
through ``jax.jit``, ``jax.vmap``, ``jax.grad`` and ``shard_map`` like the array.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Transposed:
    """The ``[D, V]`` head weight ``array.T`` of a ``[V, D]`` ``array``, without a copy.

    Attributes:
      array: the stored ``[V, D]`` array (e.g. a tied input embedding).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fusedloss
      >>> embedding = jax.random.normal(jax.random.key(0), (1000, 16)) / 4  # [V, D]
      >>> x = jax.random.normal(jax.random.key(1), (8, 16))  # [N, D]
      >>> labels = jnp.arange(8)
      >>> head = fusedloss.Transposed(embedding)
      >>> head.shape, head.dtype
      ((16, 1000), dtype('float32'))
      >>> loss = fusedloss.linear_cross_entropy(x, head, labels)
      >>> bool(jnp.allclose(loss, fusedloss.linear_cross_entropy(x, embedding.T, labels)))
      True
      >>> jax.grad(lambda e: fusedloss.linear_cross_entropy(
      ...     x, fusedloss.Transposed(e), labels))(embedding).shape  # [V, D], no transpose
      (1000, 16)
    """

    array: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """``(D, V)``: the shape of the weight this stands for."""
        return tuple(self.array.shape[::-1])

    @property
    def dtype(self):
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def T(self) -> jax.Array:
        """The stored ``[V, D]`` array (no copy)."""
        return self.array
