"""Shared input validation.

Every check runs at trace time on shapes and dtypes (static information), so errors
are raised before anything is compiled, with a message that names the argument, what
was received and what was expected. Value checks (e.g. labels in range) run only when
the array is concrete, i.e. in an eager call; under ``jit`` the loss functions make
the affected example NaN instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "sum", "mean")


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def dtype_of(x: Any) -> np.dtype:
    return jnp.result_type(x)


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds values (not a tracer), so value checks can run."""
    return not isinstance(x, jax.core.Tracer)


def check_floating(name: str, x: Any) -> None:
    dtype = dtype_of(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a floating dtype, got {dtype}.")


def check_integer(name: str, x: Any) -> None:
    dtype = dtype_of(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"`{name}` must have an integer dtype, got {dtype}.")


def check_bool(name: str, x: Any) -> None:
    dtype = dtype_of(x)
    if dtype != jnp.bool_:
        raise TypeError(f"`{name}` must be a boolean array (True = include), got {dtype}.")


def check_ndim_at_least(name: str, x: Any, ndim: int) -> None:
    if np.ndim(x) < ndim:
        raise ValueError(
            f"`{name}` must have at least {ndim} dimension(s), got shape {shape_of(x)}."
        )


def check_shape(name: str, x: Any, expected: Sequence[int], what: str = "") -> None:
    """Exact shape match; ``what`` explains where the expected shape comes from."""
    got = shape_of(x)
    expected = tuple(expected)
    if got != expected:
        hint = f" ({what})" if what else ""
        raise ValueError(f"`{name}` must have shape {expected}{hint}, got {got}.")


def check_same_shape(name_a: str, a: Any, name_b: str, b: Any) -> None:
    if shape_of(a) != shape_of(b):
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got "
            f"{shape_of(a)} and {shape_of(b)}."
        )


def check_mask(name: str, mask: Any, allowed_shapes: Sequence[Sequence[int]]) -> None:
    """A boolean mask whose shape is exactly one of ``allowed_shapes`` (no broadcasting)."""
    check_bool(name, mask)
    allowed = [tuple(s) for s in allowed_shapes]
    if shape_of(mask) not in allowed:
        options = " or ".join(str(s) for s in dict.fromkeys(allowed))
        raise ValueError(f"`{name}` must have shape {options}, got {shape_of(mask)}.")


def check_reduction(reduction: Any) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")


def check_axis(name: str, axis: Any, ndim: int) -> tuple[int, ...]:
    """Normalizes an int or tuple of ints to sorted non-negative axes."""
    axes = (axis,) if isinstance(axis, int | np.integer) else axis
    if not isinstance(axes, tuple) or not all(isinstance(a, int | np.integer) for a in axes):
        raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}.")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"`{name}`={axis!r} is out of range for an array of rank {ndim}.")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}`={axis!r} names the same axis twice.")
    return tuple(sorted(out))


def check_axis_in_order(name: str, axis: Any, ndim: int) -> tuple[int, ...]:
    """Like :func:`check_axis`, but keeps the axes in the order given.

    For class axes that are flattened in that order (a label is a C-order index).
    """
    check_axis(name, axis, ndim)
    axes = (axis,) if isinstance(axis, int | np.integer) else axis
    return tuple(int(a) % ndim for a in axes)


def check_scalar_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    high_inclusive: bool = False,
    low_inclusive: bool = True,
) -> None:
    """Range check on a Python/NumPy scalar hyperparameter (skipped for tracers)."""
    if not is_concrete(value):
        return
    if np.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {shape_of(value)}.")
    v = float(value)
    lo_ok = low is None or (v >= low if low_inclusive else v > low)
    hi_ok = high is None or (v <= high if high_inclusive else v < high)
    if not (lo_ok and hi_ok) or np.isnan(v):
        lb = "-inf" if low is None else f"{low}"
        hb = "inf" if high is None else f"{high}"
        left, right = ("[" if low_inclusive else "("), ("]" if high_inclusive else ")")
        interval = f"{left}{lb}, {hb}{right}"
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")


def check_labels_in_range(
    name: str,
    labels: Any,
    num_classes: int,
    *,
    ignore_index: int | None = None,
    mask: Any = None,
) -> None:
    """Eager-only check that integer labels lie in ``[0, num_classes)``.

    Labels equal to ``ignore_index`` or excluded by ``mask`` (False) are not checked.
    Under tracing this is a no-op: the caller makes such examples NaN instead.
    """
    if not (is_concrete(labels) and (mask is None or is_concrete(mask))):
        return
    lab = np.asarray(labels)
    bad = (lab < 0) | (lab >= num_classes)
    if ignore_index is not None:
        bad &= lab != ignore_index
    if mask is not None:
        bad &= np.asarray(mask, dtype=bool)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        extra = "" if ignore_index is None else f" or equal to ignore_index={ignore_index}"
        raise ValueError(
            f"`{name}` must lie in [0, {num_classes}){extra}; got {int(lab[first])} "
            f"at index {first} ({int(bad.sum())} out-of-range label(s) in total)."
        )
