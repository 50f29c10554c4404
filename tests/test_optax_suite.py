"""optax's own loss tests, run unchanged against fusedloss's drop-ins.

The test modules shipped in the installed optax wheel (``optax/losses/*_test.py``) are
read from disk and executed here with one change: their ``from optax.losses import
_classification`` (and ``_regression``, ``_smoothing``, ``_fenchel_young``) receives a
stand-in module whose attributes are fusedloss's functions wherever fusedloss has a
function of that name, and optax's own for the names fusedloss lacks (``ctc_loss``,
``make_fenchel_young_loss``, ...). Nothing of optax is patched globally and no test
body is copied here.

Two things are adjusted around the tests, never inside them:

- optax's tests rely on JAX's default promotion rules (e.g. an ``int32`` array times a
  Python float), so this module restores ``jax_numpy_dtype_promotion="standard"`` and
  ``jax_numpy_rank_promotion="allow"`` for its tests (the rest of the suite runs with
  ``"strict"``/``"raise"``, see ``conftest.py``).
- Their random masks come from the global NumPy generator. Every test is seeded, and
  each test class with a mask test runs a second time with every random boolean mask
  forced to all-False, so the fully masked (empty) case is always exercised.
"""

from __future__ import annotations

import builtins
import importlib.util
import pathlib
import types
import unittest
from unittest import mock

import jax
import numpy as np
import optax.losses
import pytest

import fusedloss

_OPTAX_LOSSES = pathlib.Path(optax.losses.__file__).parent
# The optax module each test module imports, and the test modules that exercise it.
_MODULES_UNDER_TEST = ("_classification", "_regression", "_smoothing", "_fenchel_young")
_TEST_MODULES = (
    "_classification_test",
    "_regression_test",
    "_smoothing_test",
    "_fenchel_young_test",
)

# optax tests excluded here, each with the reason; keyed by "<module>.<Class>.<method>".
# None at present: every test of the four modules passes against fusedloss.
EXCLUDED: dict[str, str] = {}


def _stand_in(name: str) -> types.ModuleType:
    """optax's ``optax.losses.<name>`` with fusedloss's functions substituted."""
    original = getattr(optax.losses, name)
    module = types.ModuleType(f"fusedloss_stand_in.{name}")
    for attr, value in vars(original).items():
        ours = getattr(fusedloss, attr, None) if not attr.startswith("__") else None
        module.__dict__[attr] = ours if callable(ours) else value
    return module


_STAND_INS = {name: _stand_in(name) for name in _MODULES_UNDER_TEST}


def _import_with_stand_ins(name, globals=None, locals=None, fromlist=(), level=0):
    """``__import__`` that answers ``from optax.losses import _x`` with the stand-in."""
    if name == "optax.losses" and level == 0 and fromlist:
        wanted = [n for n in fromlist if n in _STAND_INS]
        if wanted:
            package = types.SimpleNamespace(**vars(optax.losses))
            for n in wanted:
                setattr(package, n, _STAND_INS[n])
            return package
    return builtins.__import__(name, globals, locals, fromlist, level)


def _load(test_module: str) -> types.ModuleType:
    path = _OPTAX_LOSSES / f"{test_module}.py"
    spec = importlib.util.spec_from_loader(f"optax_suite.{test_module}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    module.__dict__["__builtins__"] = {**vars(builtins), "__import__": _import_with_stand_ins}
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module


def _test_classes(module: types.ModuleType) -> list[type[unittest.TestCase]]:
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, unittest.TestCase)
        and obj.__module__ == module.__name__
    ]


class _AllMasksEmpty:
    """Mixin: every random boolean mask drawn by the test is all-False."""

    def setUp(self):
        super().setUp()
        draw = np.random.randint

        def randint(*args, **kwargs):
            out = draw(*args, **kwargs)
            return np.zeros_like(out) if kwargs.get("dtype") is bool else out

        patcher = mock.patch.object(np.random, "randint", randint)
        patcher.start()
        self.addCleanup(patcher.stop)


def _exclude(cls: type, key_prefix: str) -> None:
    for key, reason in EXCLUDED.items():
        mod_cls, _, method = key.rpartition(".")
        if mod_cls == key_prefix and hasattr(cls, method):
            setattr(cls, method, unittest.skip(reason)(getattr(cls, method)))


for _test_module in _TEST_MODULES:
    for _cls in _test_classes(_load(_test_module)):
        _exclude(_cls, f"{_test_module}.{_cls.__name__}")
        globals()[f"{_test_module}_{_cls.__name__}"] = _cls
        if any(m.startswith("test_mask") for m in dir(_cls)):
            # Only the mask tests run again; the others would repeat unchanged.
            _others = {m: None for m in dir(_cls) if m.startswith("test") and "mask" not in m}
            _empty = type(f"{_cls.__name__}AllMasksEmpty", (_AllMasksEmpty, _cls), _others)
            globals()[f"{_test_module}_{_cls.__name__}_all_masks_empty"] = _empty
            del _empty, _others
del _test_module, _cls


@pytest.fixture(autouse=True)
def _optax_conventions():
    """optax's tests assume JAX's default promotion rules and a seeded NumPy generator."""
    np.random.seed(0)  # noqa: NPY002 - optax's tests draw from the global generator
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def test_stand_ins_hold_fusedloss_functions_where_fusedloss_has_them():
    substituted = {
        name: sorted(
            attr
            for attr, value in vars(module).items()
            if callable(value) and getattr(fusedloss, attr, None) is value
        )
        for name, module in _STAND_INS.items()
    }
    assert substituted == {
        "_classification": [
            "generalized_kl_divergence",
            "hinge_loss",
            "kl_divergence",
            "kl_divergence_with_log_targets",
            "multiclass_hinge_loss",
            "multiclass_perceptron_loss",
            "multiclass_sparsemax_loss",
            "perceptron_loss",
            "poly_loss_cross_entropy",
            "safe_softmax_cross_entropy",
            "sigmoid_binary_cross_entropy",
            "sigmoid_focal_loss",
            "softmax_cross_entropy",
            "softmax_cross_entropy_with_integer_labels",
            "sparsemax_loss",
        ],
        "_regression": [
            "cosine_distance",
            "cosine_similarity",
            "huber_loss",
            "l2_loss",
            "log_cosh",
            "squared_error",
        ],
        "_smoothing": ["smooth_labels"],
        "_fenchel_young": [],
    }
    # Names fusedloss lacks keep optax's function.
    assert _STAND_INS["_classification"].ctc_loss is optax.losses._classification.ctc_loss


def test_all_masks_empty_mixin_empties_boolean_draws_only():
    legacy = np.random  # the global generator optax's tests draw from
    legacy.seed(1)
    integers = legacy.randint(10, size=20)
    case = type("Case", (_AllMasksEmpty, unittest.TestCase), {"runTest": lambda self: None})()
    case.setUp()
    try:
        legacy.seed(1)
        np.testing.assert_array_equal(legacy.randint(10, size=20), integers)
        assert not legacy.randint(2, size=50, dtype=bool).any()
    finally:
        case.doCleanups()
    assert legacy.randint(2, size=50, dtype=bool).any()
