"""The examples run (in a few small steps) and produce the numbers they promise.

Each example is imported from ``examples/`` and its ``main()`` called with small
arguments; the README's "Use in a training loop" section is run as a doctest.
"""

import importlib.util
import itertools
import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_lm():
    module = load_example("train_lm")
    try:
        module.stdlib_files(max_bytes=1)
    except RuntimeError as e:  # some distributions ship the standard library as .pyc only
        pytest.skip(f"no standard-library sources to train on: {e}")
    return module


def test_tokenizer_is_lossless_and_deterministic(train_lm):
    texts = [f.read_bytes() for f in train_lm.stdlib_files(max_bytes=200_000)]
    tok = train_lm.Tokenizer(texts[1:], vocab_size=600)
    assert tok.vocab_size == 600
    assert train_lm.Tokenizer(texts[1:], vocab_size=600).pieces == tok.pieces
    sample = texts[0] + "\n    ünïcode = 'ok'\t\r\n".encode()
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert max(ids) < 600 and len(ids) < len(sample)  # pieces do compress


def test_train_lm_fused_and_materialized_agree(train_lm, tmp_path):
    # Vocabulary large against the batch, so the logits dominate the step's memory.
    out = train_lm.main(
        [
            "--steps", "6", "--batch-size", "8", "--seq-len", "64", "--d-model", "32",
            "--layers", "1", "--heads", "2", "--vocab-size", "4096", "--lr", "1e-2",
            "--warmup", "2", "--eval-every", "3", "--eval-batches", "2",
            "--max-mbytes", "0.6", "--chunk-mib", "0.5", "--out", str(tmp_path), "--quiet",
        ]
    )  # fmt: skip
    fused, mat = out["fused"], out["materialized"]
    agreement = out["agreement"]
    # The loss functions agree to float32 rounding at the same parameters ...
    assert agreement["same_params_rel"] < 2e-6
    assert agreement["grad_rel"] < 1e-5
    # ... and over a few steps so do the two independent runs, validation included.
    assert agreement["runs_rel"] < 1e-5
    assert agreement["runs_agree_steps"] == 6
    np.testing.assert_allclose(fused["final"]["loss"], mat["final"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(fused["final"]["perplexity"], mat["final"]["perplexity"], rtol=1e-4)
    # It learns: from ~log(V) at initialization to clearly less.
    assert fused["train_loss"][0] == pytest.approx(np.log(4096), rel=0.02)
    assert fused["evals"][-1][1]["loss"] < fused["train_loss"][0] - 0.5
    # 504 x 4096 float32 logits are 7.9 MiB: the materialized step holds them, the fused
    # one only 0.5 MiB blocks.
    assert mat["temp_bytes"] > 504 * 4096 * 4
    assert fused["temp_bytes"] < 0.5 * mat["temp_bytes"]
    text = out["results_md"].read_text()
    assert f"{fused['temp_bytes']:,}" in text and "final validation perplexity" in text
    if out["png"] is not None:
        assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flax_nnx_lm_fused_and_materialized_agree(train_lm, tmp_path):
    example = load_example("flax_nnx_lm")
    out = example.main(
        [
            "--steps", "6", "--batch-size", "8", "--seq-len", "64", "--d-model", "32",
            "--layers", "1", "--heads", "2", "--vocab-size", "4096", "--lr", "1e-2",
            "--warmup", "2", "--eval-every", "3", "--eval-batches", "2",
            "--max-mbytes", "0.6", "--chunk-mib", "0.5", "--out", str(tmp_path), "--quiet",
        ]
    )  # fmt: skip
    fused, mat = out["fused"], out["materialized"]
    # Same initialization and batches: the runs agree to float32 rounding ...
    assert out["max_train_diff"] < 1e-5 * fused["train_loss"][-1]
    np.testing.assert_allclose(fused["final"]["loss"], mat["final"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(fused["final"]["accuracy"], mat["final"]["accuracy"], rtol=1e-5)
    # ... and they learn, from ~log(V) at initialization.
    assert fused["train_loss"][0] == pytest.approx(np.log(4096), rel=0.02)
    assert fused["evals"][-1][1]["loss"] < fused["train_loss"][0] - 0.5
    # 504 x 4096 float32 logits (7.9 MiB) are held by the materialized step only.
    assert mat["temp_bytes"] > 504 * 4096 * 4
    assert fused["temp_bytes"] < 0.5 * mat["temp_bytes"]
    text = out["results_md"].read_text()
    assert f"{fused['temp_bytes']:,}" in text and "final validation loss" in text
    if out["png"] is not None:
        assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_logistic_regression_lbfgs():
    example = load_example("logistic_regression")
    out = example.main(["--iters", "12", "--examples", "1200", "--quiet"])
    history = out["history"]
    assert history[0] == pytest.approx(np.log(10), rel=1e-6)  # zero init: uniform
    assert history[-1] < 0.5 * history[0]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(history))  # monotone
    assert out["test_accuracy"] > 0.8  # chance is 0.1
    np.testing.assert_allclose(out["objective"], out["materialized_objective"], rtol=1e-5)


def test_distill_lm_fused_and_materialized_agree(train_lm, tmp_path):
    example = load_example("distill_lm")
    out = example.main(
        [
            "--teacher-steps", "20", "--steps", "6", "--batch-size", "4", "--seq-len", "32",
            "--d-model", "32", "--layers", "1", "--heads", "2", "--student-d-model", "16",
            "--student-heads", "2", "--vocab-size", "2048", "--lr", "1e-2", "--warmup", "2",
            "--eval-every", "6", "--eval-batches", "1", "--variants", "fused,materialized",
            "--no-checks", "--max-mbytes", "0.3", "--chunk-mib", "0.05", "--out", str(tmp_path),
            "--quiet",
        ]
    )  # fmt: skip
    fused, mat = out["fused"], out["materialized"]
    assert "top-k" not in out and "labels only" not in out
    agreement = out["agreement"]
    # The independent fused and materialized runs agree to float32 rounding, step by
    # step (training loss) and on the validation cross-entropy.
    assert agreement["runs_rel"] < 1e-5 and agreement["runs_agree_steps"] == 6
    np.testing.assert_allclose(fused["final"]["loss"], mat["final"]["loss"], rtol=1e-5)
    # The distillation loss (a KL divergence, >= 0) falls.
    assert min(fused["train_loss"]) >= 0
    assert fused["train_loss"][-1] < 0.8 * fused["train_loss"][0]
    # 124 x 2048 float32 logits (1 MiB per head): the materialized step holds both
    # heads' logits, the fused one 0.05 MiB blocks.
    assert mat["temp_bytes"] > 2 * 124 * 2048 * 4
    assert fused["temp_bytes"] < 0.6 * mat["temp_bytes"]
    text = out["results_md"].read_text()
    assert f"{fused['temp_bytes']:,}" in text and "KL(teacher" in text
    if out["png"] is not None:
        assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grpo_lm_fused_and_materialized_agree(tmp_path):
    example = load_example("grpo_lm")
    out = example.main(["--quick", "--no-checks", "--out", str(tmp_path), "--quiet"])
    fused, mat = out["fused"], out["materialized"]
    # The independent runs agree to float32 rounding: same samples, same rewards, same
    # losses (the check at the same parameters is skipped: one compile less).
    assert out["agreement"]["runs_agree_steps"] == len(fused["reward"]) == 3
    np.testing.assert_allclose(fused["loss"], mat["loss"], rtol=1e-4, atol=1e-7)
    # The rewards are the script's own: in [0, 1], and the sampled batches hold digits.
    assert all(0.0 <= r <= 1.0 for r in fused["reward"]) and max(fused["reward"]) > 0
    # Off-policy updates: the second update of each batch sees a ratio away from 1.
    assert max(fused["ratio_max"]) > 1.0
    # 96 x 512 float32 logits (192 KiB): the materialized step holds them (and their
    # softmax), the fused one 0.05 MiB blocks.
    assert mat["temp_bytes"] > 96 * 512 * 4
    assert fused["temp_bytes"] < 0.5 * mat["temp_bytes"]
    text = out["results_md"].read_text()
    assert f"{fused['temp_bytes']:,}" in text and "compiled temporaries" in text
    if out["png"] is not None:
        assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
