"""Named benchmark shapes: real-model LM heads, sweeps, and how suites scale them.

Every shape the suite runs is defined here, in one place. A *model shape* is an LM
head ``[D, V]`` taken from a published model; a *case* is one concrete problem
``x [N, D] @ w [D, V]`` that the suite times, derived from a model shape (or a sweep
point) and scaled to the backend:

* ``quick`` on CPU (the default of ``python -m benchmarks`` on a laptop): N = 128,
  and for the heads whose ``D * V`` is far above GPT-2's, ``D`` is scaled down (the
  vocabulary ``V`` is kept, since it is what makes logits large). Scaled cases say so
  in their ``note``, which the tables print.
* ``full`` on GPU/TPU: the real heads at ``N = 8192`` tokens (one H100: < 10 min).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

Suite = Literal["quick", "full"]
SUITES: tuple[Suite, ...] = ("quick", "full")
Group = Literal["models", "vocab_sweep", "token_sweep"]


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """An LM head: ``logits = x @ w`` with ``w`` of shape ``[d, v]``.

    Attributes:
      name: short name used on the command line (``--shapes``).
      d: hidden size.
      v: vocabulary size.
      softcap: the model's final-logit softcap (Gemma-2 uses 30), else None.
      source: where the numbers come from.
    """

    name: str
    d: int
    v: int
    softcap: float | None = None
    source: str = ""


MODEL_SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("tiny", 64, 1000, source="small synthetic head for tests"),
        ModelShape("gpt2", 768, 50257, source="GPT-2 small (n_embd, vocab_size)"),
        ModelShape("llama3-8b", 4096, 128256, source="Llama-3-8B (hidden_size, vocab_size)"),
        ModelShape(
            "gemma2-2b",
            2304,
            256000,
            softcap=30.0,
            source="Gemma-2-2B (hidden_size, vocab_size, final_logit_softcapping=30)",
        ),
        ModelShape("qwen2.5-7b", 3584, 152064, source="Qwen-2.5-7B (hidden_size, vocab_size)"),
    )
}
# The real-model heads a suite runs by default ("tiny" is for tests and smoke runs).
DEFAULT_MODELS: tuple[str, ...] = ("gpt2", "llama3-8b", "gemma2-2b", "qwen2.5-7b")
SERIES: tuple[str, ...] = ("vocab_sweep", "token_sweep")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark problem: ``x [n, d]``, ``w [d, v]``, ``labels [n]``, mean CE.

    Attributes:
      name: unique name within a run (e.g. ``"gpt2"``, ``"vocab_sweep/V=65536"``).
      group: ``"models"``, ``"vocab_sweep"`` or ``"token_sweep"``.
      model: the model shape it derives from (the sweeps name their base shape).
      n: tokens.
      d: hidden size as run (may be scaled down; see ``note``).
      v: vocabulary size.
      softcap: logit softcap, or None.
      modes: which measurements to take: ``"fwd"`` and/or ``"fwd_bwd"``.
      note: human-readable scaling note ("" when the real head is run).
    """

    name: str
    group: Group
    model: str
    n: int
    d: int
    v: int
    softcap: float | None = None
    modes: tuple[str, ...] = ("fwd", "fwd_bwd")
    note: str = ""

    @property
    def flops_fwd(self) -> int:
        """Matmul FLOPs of the forward pass, ``2 N D V``."""
        return 2 * self.n * self.d * self.v

    @property
    def flops_fwd_bwd(self) -> int:
        """Model FLOPs of forward + backward, ``6 N D V`` (three matmuls).

        Implementations that recompute the logits in the backward do ``8 N D V`` of
        work; they are still credited with ``6 N D V``, the useful work.
        """
        return 6 * self.n * self.d * self.v


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """How a suite scales to a backend.

    Attributes:
      tokens: tokens ``N`` of the model-head cases.
      max_dv: cap on ``D * V`` for model heads; above it ``D`` is scaled down
        (None: real heads).
      reps: timed repetitions per measurement (after one warm-up call).
      max_seconds: stop repeating a measurement once this much time was spent
        (at least one timed call is always made).
      matmul: ``(M, K, N)`` of the matmul that measures the peak.
      vocab_sweep: ``(n, d, vocabularies)`` of the vocabulary sweep.
      token_sweep: ``(d, v, token counts)`` of the token sweep.
      standard_losses: ``(n, v)`` of the ``[N, V]`` logits of the standard-loss table.
    """

    tokens: int
    max_dv: int | None
    reps: int
    max_seconds: float
    matmul: tuple[int, int, int]
    vocab_sweep: tuple[int, int, tuple[int, ...]]
    token_sweep: tuple[int, int, tuple[int, ...]]
    standard_losses: tuple[int, int]


# Keyed by (suite, accelerator?). CPU numbers keep `python -m benchmarks` to a few
# minutes on a 2-core machine; accelerator numbers are the real heads at N = 8192.
_SUITE_CONFIGS: dict[tuple[Suite, bool], SuiteConfig] = {
    ("quick", False): SuiteConfig(
        # On CPU the [N, V] softmax passes, not the matmuls, dominate: N sets the cost.
        tokens=128,
        # A D*V cap of 2e7 runs GPT-2 at D=384, Llama-3 / Qwen-2.5 at D=128 and
        # Gemma-2 at D=64; V (the width of the logits) is always the real one.
        max_dv=20_000_000,
        reps=3,
        max_seconds=0.5,
        matmul=(1024, 2048, 2048),
        vocab_sweep=(256, 64, (4096, 16384, 65536)),
        token_sweep=(64, 8192, (256, 1024, 4096)),
        standard_losses=(256, 16384),
    ),
    ("full", False): SuiteConfig(
        tokens=1024,
        max_dv=None,
        reps=3,
        max_seconds=5.0,
        matmul=(2048, 2048, 2048),
        vocab_sweep=(1024, 1024, (16384, 32768, 65536, 131072, 262144)),
        token_sweep=(1024, 65536, (256, 512, 1024, 2048, 4096)),
        standard_losses=(1024, 65536),
    ),
    ("quick", True): SuiteConfig(
        tokens=2048,
        max_dv=None,
        reps=5,
        max_seconds=1.0,
        matmul=(8192, 8192, 8192),
        vocab_sweep=(2048, 4096, (32768, 65536, 131072, 262144)),
        token_sweep=(4096, 128256, (1024, 2048, 4096, 8192)),
        standard_losses=(4096, 128256),
    ),
    ("full", True): SuiteConfig(
        tokens=8192,
        max_dv=None,
        reps=10,
        # ~120 compilations dominate the full suite; 1 s per measurement keeps the
        # whole run under 10 minutes on one H100.
        max_seconds=1.0,
        matmul=(8192, 8192, 8192),
        vocab_sweep=(4096, 4096, (32768, 65536, 131072, 262144)),
        token_sweep=(4096, 128256, (1024, 4096, 16384)),
        standard_losses=(8192, 128256),
    ),
}


def suite_config(suite: Suite, platform: str) -> SuiteConfig:
    """The scaling of ``suite`` on ``platform`` (``jax.default_backend()``)."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}.")
    return _SUITE_CONFIGS[(suite, platform != "cpu")]


def _scaled_d(shape: ModelShape, max_dv: int | None) -> int:
    if max_dv is None or shape.d * shape.v <= max_dv:
        return shape.d
    # Keep D a multiple of 64 (like real heads) and V untouched.
    return max(64, (max_dv // shape.v) // 64 * 64)


def model_case(shape: ModelShape, tokens: int, max_dv: int | None) -> Case:
    """The case of a model head at ``tokens`` tokens, ``D`` capped by ``max_dv``."""
    d = _scaled_d(shape, max_dv)
    note = "" if d == shape.d else f"D scaled {shape.d}->{d} (real D*V too slow for this suite)"
    return Case(
        name=shape.name,
        group="models",
        model=shape.name,
        n=tokens,
        d=d,
        v=shape.v,
        softcap=shape.softcap,
        note=note,
    )


def sweep_cases(series: str, cfg: SuiteConfig, tokens: int | None = None) -> list[Case]:
    """The points of a sweep series (forward+backward only, no softcap)."""
    if series == "vocab_sweep":
        n, d, vocabs = cfg.vocab_sweep
        n = tokens or n
        return [
            Case(f"vocab_sweep/V={v}", "vocab_sweep", "sweep", n, d, v, modes=("fwd_bwd",))
            for v in vocabs
        ]
    if series == "token_sweep":
        d, v, ns = cfg.token_sweep
        return [
            Case(f"token_sweep/N={n}", "token_sweep", "sweep", n, d, v, modes=("fwd_bwd",))
            for n in ns
        ]
    raise ValueError(f"unknown series {series!r}; expected one of {SERIES}.")


def all_shape_names() -> tuple[str, ...]:
    """Every name ``--shapes`` accepts: model heads and sweep series."""
    return (*MODEL_SHAPES, *SERIES)


def build_cases(
    names: Sequence[str] | None, suite: Suite, platform: str, tokens: int | None = None
) -> list[Case]:
    """The cases to run, in order.

    Args:
      names: model-shape and/or series names (None: every real model head and both
        sweeps).
      suite: ``"quick"`` or ``"full"``.
      platform: ``jax.default_backend()``, which sets the scaling.
      tokens: overrides ``N`` of the model heads and of the vocabulary sweep.

    Returns:
      A list of :class:`Case`.
    """
    cfg = suite_config(suite, platform)
    names = list(DEFAULT_MODELS + SERIES) if names is None else list(names)
    unknown = [n for n in names if n not in all_shape_names()]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; choose from {list(all_shape_names())}.")
    cases: list[Case] = []
    for name in names:
        if name in SERIES:
            cases.extend(sweep_cases(name, cfg, tokens))
        else:
            cases.append(model_case(MODEL_SHAPES[name], tokens or cfg.tokens, cfg.max_dv))
    return cases
