"""Every shape the suite runs: real LM heads, sweeps, and how each suite scales them
(``benchmarks/README.md``, "Shapes"): on a CPU the quick suite keeps the real ``V`` and
scales ``D`` down, and says so in the case's ``note``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Case:
    """One problem: ``x [n, d]``, ``w [d, v]`` (``[v, d]`` passed transposed if ``tied``).

    ``group``: ``models``, ``vocab_sweep``, ``token_sweep`` or a mode's own name;
    ``modes``: ``fwd`` and/or ``fwd_bwd``; ``dtype``: None for the run's dtype.
    """

    name: str
    group: str
    n: int
    d: int
    v: int
    softcap: float | None = None
    modes: tuple[str, ...] = ("fwd", "fwd_bwd")
    note: str = ""
    dtype: str | None = None
    tied: bool = False

    def flops(self, mode: str) -> int:
        """Useful matmul FLOPs: ``2 N D V`` forward, ``6 N D V`` forward+backward
        (implementations that recompute the logits do more and get the same credit)."""
        return (2 if mode == "fwd" else 6) * self.n * self.d * self.v


# The published LM heads (hidden size, vocabulary; Gemma-2's final_logit_softcapping).
MODEL_SHAPES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("tiny", "models", 0, 64, 1000),  # a small synthetic head for tests
        Case("gpt2", "models", 0, 768, 50257),
        Case("llama3-8b", "models", 0, 4096, 128256),
        Case("gemma2-2b", "models", 0, 2304, 256000, 30.0),
        Case("qwen2.5-7b", "models", 0, 3584, 152064),
    )
}
DEFAULT_MODELS: tuple[str, ...] = ("gpt2", "llama3-8b", "gemma2-2b", "qwen2.5-7b")
SERIES: tuple[str, ...] = ("vocab_sweep", "token_sweep")
SUITES: tuple[str, ...] = ("quick", "full")


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """How a suite scales to a backend (see the table in ``benchmarks/README.md``)."""

    tokens: int
    max_dv: int | None  # above it D is scaled down (None: real heads)
    reps: int  # timed rounds (after one warm-up call)
    max_seconds: float  # no new round once a program has spent this much
    matmul: tuple[int, int, int]  # (M, K, N) of the peak measurement
    vocab_sweep: tuple[int, int, tuple[int, ...]]  # (n, d, vocabularies)
    token_sweep: tuple[int, int, tuple[int, ...]]  # (d, v, token counts)
    standard_losses: tuple[int, int]  # (n, v) logits of the standard-loss table


# Keyed by (suite, accelerator?). CPU numbers keep `python -m benchmarks` to minutes on
# 2 cores (a D*V cap of 2e7: GPT-2 at D=384, Llama-3 / Qwen at 128, Gemma-2 at 64).
CONFIGS: dict[tuple[str, bool], SuiteConfig] = {
    ("quick", False): SuiteConfig(
        128, 20_000_000, 3, 0.5, (1024, 2048, 2048), (256, 64, (4096, 16384, 65536)),
        (64, 8192, (256, 1024, 4096)), (256, 16384),
    ),
    ("full", False): SuiteConfig(
        1024, None, 3, 5.0, (2048, 2048, 2048), (1024, 1024, (16384, 65536, 262144)),
        (1024, 65536, (256, 1024, 4096)), (1024, 65536),
    ),
    ("quick", True): SuiteConfig(
        2048, None, 5, 1.0, (8192, 8192, 8192), (2048, 4096, (32768, 65536, 131072, 262144)),
        (4096, 128256, (1024, 2048, 4096, 8192)), (4096, 128256),
    ),
    ("full", True): SuiteConfig(
        8192, None, 10, 1.0, (8192, 8192, 8192), (4096, 4096, (32768, 65536, 131072, 262144)),
        (4096, 128256, (1024, 4096, 16384)), (8192, 128256),
    ),
}  # fmt: skip


# The error budget of `python -m benchmarks gpu-check`, per case dtype.
GPU_CASES: dict[str, Case] = {
    "llama3-8b": Case("llama3-8b", "gpu-check", 8192, 4096, 128256, dtype="bfloat16"),
    "gemma2-2b": Case("gemma2-2b", "gpu-check", 8192, 2304, 256000, 30.0, dtype="bfloat16"),
    "llama3-8b-f32": Case("llama3-8b-f32", "gpu-check", 2048, 4096, 128256, dtype="float32"),
    "gpt2-f32": Case("gpt2-f32", "gpu-check", 8192, 768, 50257, dtype="float32"),
    "tiny": Case("tiny", "gpu-check", 200, 64, 1000, 30.0, dtype="bfloat16"),  # for tests
}


def suite_config(suite: str, platform: str) -> SuiteConfig:
    """The scaling of ``suite`` on ``platform`` (``jax.default_backend()``)."""
    return CONFIGS[(suite, platform != "cpu")]


def model_case(name: str, tokens: int, max_dv: int | None = None) -> Case:
    """The case of a model head, ``D`` scaled down when ``D * V > max_dv``."""
    s = MODEL_SHAPES[name]
    d = s.d
    if max_dv is not None and s.d * s.v > max_dv:
        d = max(64, (max_dv // s.v) // 64 * 64)  # a multiple of 64, like real heads
    note = "" if d == s.d else f"D scaled {s.d}->{d} (real D*V too slow for this suite)"
    return dataclasses.replace(s, n=tokens, d=d, note=note)


def build_cases(
    names: Sequence[str] | None, suite: str, platform: str, tokens: int | None = None
) -> list[Case]:
    """The cases of ``names`` (heads and/or series; default: all), in order."""
    cfg = suite_config(suite, platform)
    out: list[Case] = []
    for name in names or (*DEFAULT_MODELS, *SERIES):
        if name == "vocab_sweep":
            n, d, vs = cfg.vocab_sweep
            out += [Case(f"{name}/V={v}", name, tokens or n, d, v, modes=("fwd_bwd",)) for v in vs]
        elif name == "token_sweep":
            d, v, ns = cfg.token_sweep
            out += [Case(f"{name}/N={n}", name, n, d, v, modes=("fwd_bwd",)) for n in ns]
        elif name in MODEL_SHAPES:
            out.append(model_case(name, tokens or cfg.tokens, cfg.max_dv))
        else:
            raise ValueError(f"unknown shape {name!r}; choose from {[*MODEL_SHAPES, *SERIES]}")
    return out
