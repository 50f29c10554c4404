"""Flax output layers as fused heads: ``head_weights(layer) -> (w, bias)``.

A Flax language model ends in an output layer that turns ``[..., D]`` hidden states
into ``[..., V]`` logits: an ``nnx.Linear`` / ``nn.Dense`` (kernel ``[D, V]``, with
or without bias) or, with tied embeddings, the input embedding's ``attend``
(``logits = h @ embedding.T``, embedding ``[V, D]``), or, in the Gemma / Llama /
Qwen implementations that post-training libraries ship (e.g. Tunix's), an
``Embedder`` whose ``decode`` attends to its ``input_embedding`` (``[V, D]``) and an
``Einsum`` head ``jnp.einsum("BTD,DV->BTV", h, w)``. To train with a fused head,
call the model up to its hidden states and hand the output layer's parameters to the
head instead of calling the layer::

    w, bias = head_weights(model.lm_head)  # nnx: the layer itself
    w, bias = head_weights(params["params"]["lm_head"])  # linen: its params subtree
    loss = fusedloss.linear_cross_entropy(h, w, labels, bias=bias)

The pair is what every fused head takes (``w`` positionally, ``bias=`` by keyword),
so the same two lines serve any of them. A tied embedding comes back as
``Transposed(embedding)``: the ``[V, D]`` table read as it is stored, with no copy,
and its gradient in its own layout. The parameters are returned as the layer's
values, not copies, so gradients flow to them under ``nnx.value_and_grad`` (w.r.t.
the model) and ``jax.value_and_grad`` (w.r.t. a linen params tree).

Flax is an optional dependency: this module imports it only when given an nnx
layer, and ``import fusedloss`` does not import this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from fusedloss.heads.transposed import Transposed

__all__ = ["head_weights"]


def _cast(a: jax.Array, dtype: Any) -> jax.Array:
    return a if dtype is None or a.dtype == dtype else a.astype(dtype)


def head_weights(layer: Any, *, dtype: Any = None) -> tuple[jax.Array | Transposed, Any]:
    """The ``(w, bias)`` of a Flax output layer, for the fused heads.

    Args:
      layer: one of
        - an ``nnx.Linear`` (kernel ``[D, V]``, bias ``[V]`` or ``use_bias=False``);
        - an ``nnx.Embed`` used as tied output layer through ``attend``
          (embedding ``[V, D]``);
        - an ``Embedder``-style module (Gemma's) with an ``input_embedding``
          parameter ``[V, D]`` that its ``decode`` attends to (tied); Gemma-2's
          final logit softcap is the model config's ``final_logit_softcap``: pass it
          to the head as ``logit_softcap``;
        - an ``Einsum``-style module with an ``einsum_str`` that contracts the last
          axis of the hidden states with a 2-D parameter ``w``: ``"...D,DV->...V"``
          (``w`` is ``[D, V]``) or ``"...D,VD->...V"`` (``w`` is ``[V, D]``);
        - a linen params subtree: ``{"kernel": [D, V]}`` with an optional
          ``"bias": [V]`` (an ``nn.Dense``) or ``{"embedding": [V, D]}`` (an
          ``nn.Embed`` used through ``attend``), e.g. ``params["params"]["lm_head"]``;
          ``{"input_embedding": [V, D]}`` (an ``Embedder``'s params).
      dtype: if given, the parameters are cast to it (the fused heads need ``w`` in
        ``x``'s dtype, e.g. ``dtype=jnp.bfloat16`` for bf16 activations and float32
        parameters). Default: the layer's ``dtype`` attribute for nnx layers (the
        dtype the layer itself computes in, when it is set), else as stored.

    Returns:
      ``(w, bias)``: ``w`` is the ``[D, V]`` kernel, or ``Transposed(embedding)`` for
      an embedding (no copy of the ``[V, D]`` table); ``bias`` is the ``[V]`` bias or
      ``None``. Pass them as ``head(x, w, labels, bias=bias, ...)``.

    Raises:
      TypeError: for a layer or params subtree that is none of the above.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> import fusedloss
      >>> from fusedloss.flax_heads import head_weights
      >>> embed = nnx.Embed(1000, 16, rngs=nnx.Rngs(0))  # tied: [V, D]
      >>> h = jax.random.normal(jax.random.key(1), (8, 16))  # [N, D] hidden states
      >>> labels = jnp.arange(8)
      >>> w, bias = head_weights(embed)
      >>> type(w).__name__, w.shape, bias
      ('Transposed', (16, 1000), None)
      >>> loss = fusedloss.linear_cross_entropy(h, w, labels, bias=bias)
      >>> ref = optax.losses.softmax_cross_entropy_with_integer_labels(
      ...     embed.attend(h), labels).mean()
      >>> bool(jnp.allclose(loss, ref, rtol=1e-5))
      True
    """
    if isinstance(layer, Mapping):
        return _from_linen_params(layer, dtype)
    # Only nnx layers reach this point, so flax is installed.
    from flax import nnx

    if isinstance(layer, nnx.Linear):
        dtype = layer.dtype if dtype is None else dtype
        bias = None if layer.bias is None else _cast(layer.bias[...], dtype)
        return _cast(layer.kernel[...], dtype), bias
    if isinstance(layer, nnx.Embed):
        dtype = layer.dtype if dtype is None else dtype
        return Transposed(_cast(layer.embedding[...], dtype)), None
    if isinstance(layer, nnx.Module) and isinstance(
        getattr(layer, "input_embedding", None), nnx.Variable
    ):
        return Transposed(_cast(layer.input_embedding[...], dtype)), None
    if isinstance(layer, nnx.Module) and isinstance(getattr(layer, "w", None), nnx.Variable):
        w = layer.w[...]
        vd = _einsum_layout(getattr(layer, "einsum_str", None), w.ndim)
        return (Transposed(_cast(w, dtype)) if vd else _cast(w, dtype)), None
    raise TypeError(
        "`layer` must be an nnx.Linear, an nnx.Embed, an Embedder-style module (an "
        "`input_embedding` parameter), an Einsum-style module (`w` and `einsum_str`), or a "
        "linen params subtree ({'kernel', optionally 'bias'}, {'embedding'} or "
        f"{{'input_embedding'}}), got {type(layer).__name__}."
    )


def _einsum_layout(spec: Any, w_ndim: int) -> bool:
    """Whether an Einsum head's ``w`` is stored ``[V, D]`` (else ``[D, V]``); raises for
    an ``einsum_str`` that is not a linear head on the hidden states' last axis."""
    parts = spec.replace(" ", "").replace("->", ",").split(",") if isinstance(spec, str) else []
    if len(parts) == 3 and w_ndim == 2 and len(parts[1]) == 2:
        h, (a, b), out = parts
        if h and out == h[:-1] + b and h[-1] == a and a != b:
            return False  # "...D,DV->...V"
        if h and out == h[:-1] + a and h[-1] == b and a != b:
            return True  # "...D,VD->...V"
    raise TypeError(
        "an Einsum-style head must have a 2-D `w` and an `einsum_str` like 'BTD,DV->BTV' "
        f"(w [D, V]) or 'BTD,VD->BTV' (w [V, D]), got {spec!r} with w of rank {w_ndim}."
    )


def _from_linen_params(params: Mapping, dtype: Any) -> tuple[jax.Array | Transposed, Any]:
    keys = set(params)
    if keys in ({"kernel"}, {"kernel", "bias"}):
        bias = params.get("bias")
        return _cast(params["kernel"], dtype), None if bias is None else _cast(bias, dtype)
    if keys in ({"embedding"}, {"input_embedding"}):
        return Transposed(_cast(params[keys.pop()], dtype)), None
    raise TypeError(
        "a linen params subtree must have the keys {'kernel'} or {'kernel', 'bias'} (an "
        "nn.Dense), {'embedding'} (an nn.Embed used through `attend`) or "
        "{'input_embedding'} (an Embedder), got "
        f"{sorted(keys)}; pass the output layer's subtree, e.g. params['params']['lm_head']."
    )
