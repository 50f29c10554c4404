"""Mutation check: plants one-line bugs in a copy of src/ and runs the tests meant to catch each.

Usage (from the repository root):

    python tools/mutants.py            # every mutant
    python tools/mutants.py NAME ...   # a subset (names from --list)
    python tools/mutants.py --list
    python tools/mutants.py --check    # every mutant still applies (seconds, no tests)

Each mutant is (name, file under src/fusedloss/, exact original text, replacement,
pytest selection). The original text must occur exactly once in its file and the
replacement must change it, so the check fails loudly when the code moves; ``--check``
verifies only that (``make test`` runs it), ``make mutants`` runs the whole check.
A mutant is *caught* when its tests fail. Prints a caught/survived table; the exit
status is non-zero if any survives (or a mutant no longer applies).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/fusedloss/
    original: str
    replacement: str
    tests: tuple[str, ...]  # files under tests/
    select: str = ""  # pytest -k expression

    def command(self, python: str) -> list[str]:
        cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        cmd += [str(ROOT / "tests" / t) for t in self.tests]
        return cmd + (["-k", self.select] if self.select else [])


G = ("test_guards.py",)

MUTANTS = [
    # grad_in_forward (heads/xla.py)
    Mutant(
        "gif-cast-ignores-cotangent",
        "heads/xla.py",
        "new = (g * _w_slice(buf, start, chunk, axis)).astype(out_dtype)",
        "new = _w_slice(buf, start, chunk, axis).astype(out_dtype)",
        G,
        "cotangent",
    ),
    Mutant(
        "gif-forward-drops-bad-label-nan",
        "heads/xla.py",
        "    loss = _ce_math.nan_if_bad_label(loss, labels, w.shape[va], valid)\n",
        "",
        G,
        "out_of_range",
    ),
    Mutant(
        "gif-aux-argmin",
        "heads/xla.py",
        "arg_c = upd(arg_c, jnp.argmax(s, axis=1).astype(jnp.int32))",
        "arg_c = upd(arg_c, jnp.argmin(s, axis=1).astype(jnp.int32))",
        G,
        "accuracy_under",
    ),
    # recompute core (heads/xla.py)
    Mutant(
        "recompute-argmax-tie-takes-last",
        "heads/xla.py",
        "take = bm > best",
        "take = bm >= best",
        G,
        "argmax_ties",
    ),
    Mutant(
        "recompute-overlap-columns-unmasked",
        "heads/xla.py",
        "s = jnp.where(col_new[None, :], s, -jnp.inf)",
        "s = s",
        G,
        "400",
    ),
    Mutant(
        "chunk-clamp-off-by-one",
        "heads/xla.py",
        "return jnp.minimum(nominal, total - chunk), nominal",
        "return jnp.minimum(nominal, total - chunk - 1), nominal",
        G,
        "400 or accuracy",
    ),
    Mutant(
        "K-ids-scatter-into-column-0",
        "heads/xla.py",
        "local = jnp.where((lab >= vstart) & (lab < vstart + vc), lab - vstart, vc)",
        "local = jnp.where((lab >= vstart) & (lab < vstart + vc), lab - vstart, 0)",
        ("test_distillation.py",),
        "values_and_gradients and xla",
    ),
    # shared math (_ce_math.py)
    Mutant(
        "lse-combine-wrong-sign",
        "_ce_math.py",
        "return m, l1 * jnp.exp(m1 - m_safe) + l2 * jnp.exp(m2 - m_safe)",
        "return m, l1 * jnp.exp(m1 - m_safe) + l2 * jnp.exp(m_safe - m2)",
        G,
        "400",
    ),
    Mutant(
        "backward-temperature-not-applied",
        "_ce_math.py",
        "return g * softcap_grad(capped * temperature, cap) / temperature",
        "return g * softcap_grad(capped * temperature, cap)",
        ("test_log_probs.py",),
        "values_and_gradients",
    ),
    Mutant(
        "expected-logit-term-dropped",
        "_ce_math.py",
        "g = g + g_expected * p * (1.0 + capped - expected)",
        "g = g + g_expected * p",
        ("test_log_probs.py",),
        "values_and_gradients",
    ),
    Mutant(
        "smoothing-grad-not-divided-by-V",
        "_ce_math.py",
        "-scale * (label_smoothing / num_classes),",
        "-scale * label_smoothing,",
        ("test_linear_cross_entropy.py",),
        "matches_float64_oracle",
    ),
    Mutant(
        "z-loss-grad-factor-dropped",
        "_ce_math.py",
        "scale * (1.0 + 2.0 * z_loss * lse),",
        "scale * (1.0 + z_loss * lse),",
        ("test_linear_cross_entropy.py",),
        "matches_float64_oracle",
    ),
    # fused softmax CE
    Mutant(
        "softmax-ce-backward-counts-V",
        "_softmax_ce.py",
        "lse, 1.0, num_classes=count,",
        "lse, 1.0, num_classes=num_classes,",
        G,
        "softmax_ce_element_mask",
    ),
    Mutant(
        "softmax-ce-reverse-mode-saves-logit-gradient",
        "_softmax_ce.py",
        "policy=jax.checkpoint_policies.save_only_these_names(_ROW_STAT),",
        "policy=jax.checkpoint_policies.everything_saveable,",
        ("test_softmax_ce.py",),
        "reverse_mode_keeps",
    ),
    # Pallas GPU kernels
    Mutant(
        "gpu-forward-no-column-mask-past-split",
        "heads/pallas_gpu.py",
        "check_cols = st.v % st.bv != 0 or nv % tiles_per_split != 0",
        "check_cols = st.v % st.bv != 0",
        G,
        "tiling_edges",
    ),
    Mutant(
        "gpu-swizzle-wrong-group-start",
        "heads/pallas_gpu.py",
        "first = (pid // per_group) * group",
        "first = pid // per_group",
        G,
        "tiling_edges",
    ),
    Mutant(
        "gpu-clamped-chunk-overwrites-predecessor",
        "heads/pallas_gpu.py",
        "keep = (start + lax.iota(jnp.int32, k)) >= fresh",
        "keep = (start + lax.iota(jnp.int32, k)) >= start",
        ("test_pallas.py",),
        "layouts or llama3",
    ),
    Mutant(
        "gpu-logits-rounded-to-input-dtype",
        "heads/pallas_gpu.py",
        "    return _ce_math.head_logits(z, st.hp.softcap, st.hp.temperature)",
        "    return _ce_math.head_logits(\n"
        "        z.astype(st.in_dtype).astype(st.acc), st.hp.softcap, st.hp.temperature\n"
        "    )",
        ("test_pallas.py",),
        "low_precision",
    ),
    # Pallas TPU kernels
    Mutant(
        "tpu-label-logit-kept-from-last-tile-only",
        "heads/pallas_tpu.py",
        "y_sc[...] += jnp.sum(jnp.where(is_label, s, 0.0), axis=1, keepdims=True)",
        "y_sc[...] = jnp.sum(jnp.where(is_label, s, 0.0), axis=1, keepdims=True)",
        ("test_pallas.py",),
        "many_tiles",
    ),
    Mutant(
        "tpu-dw-accumulator-reset-at-token-tile-1",
        "heads/pallas_tpu.py",
        "    @pl.when(i == 0)\n",
        "    @pl.when(i == 1)\n",
        ("test_pallas.py",),
        "many_tiles",
    ),
    Mutant(
        "tpu-dx-edge-block-padding-unmasked",
        "heads/pallas_tpu.py",
        "w = jnp.where(cols_ok.T if st.w_vd else cols_ok, w, jnp.zeros((), w.dtype))",
        "w = w",
        ("test_pallas.py",),
        "layouts",
    ),
    # sharded path
    Mutant(
        "sharded-lse-without-max-shift",
        "heads/sharded.py",
        "lse = _ce_math.lse_finalize(m, psum_over(jnp.exp(local.lse - m_safe), model))",
        "lse = _ce_math.lse_finalize(0 * m, psum_over(jnp.exp(local.lse), model))",
        G,
        "400 and sharded",
    ),
    Mutant(
        "sharded-argmax-tie-takes-largest-id",
        "heads/sharded.py",
        "    argmax = _pmin(cand, model)\n",
        "    argmax = _pmax(cand, model)\n",
        G,
        "argmax_ties and sharded",
    ),
    Mutant(
        "sharded-label-logit-not-summed",
        "heads/sharded.py",
        "label_logit = psum_over(local.label_logit, model)",
        "label_logit = local.label_logit",
        G,
        "400 and sharded",
    ),
    # new heads
    Mutant(
        "log-probs-entropy-sign",
        "heads/log_probs.py",
        "entropy = jnp.where(valid, stats.lse - stats.expected_logit, 0.0)",
        "entropy = jnp.where(valid, stats.expected_logit - stats.lse, 0.0)",
        ("test_log_probs.py",),
        "values_and_gradients",
    ),
    Mutant(
        "distill-rest-bin-dropped",
        "heads/distillation.py",
        "    return inside + rest\n",
        "    return inside\n",
        ("test_distillation.py",),
        "values_and_gradients",
    ),
    Mutant(
        "teacher-distill-reverse-kl-grad-drops-mean",
        "heads/_distill.py",
        "        return _weighted(q, lq - lp - sc.k[:, None])\n",
        "        return _weighted(q, lq - lp)\n",
        ("test_distillation_head.py",),
        "recompute-reverse_kl",
    ),
    Mutant(
        "teacher-distill-jsd-mixture-weights-swapped",
        "heads/_distill.py",
        "    lb, lb1 = math.log(dh.beta), math.log1p(-dh.beta)\n",
        "    lb, lb1 = math.log1p(-dh.beta), math.log(dh.beta)\n",
        ("test_distillation_head.py",),
        "recompute-jsd",
    ),
    Mutant(
        "teacher-distill-padding-columns-counted",
        "heads/_distill.py",
        "    return new if dh.vocab_size is None else new & (cols + offset < dh.vocab_size)\n",
        "    return new\n",
        ("test_sharded_distillation.py",),
        "sharded_equals",
    ),
    Mutant(
        "teacher-distill-shard-cotangent-not-summed",
        "heads/_distill.py",
        "    g_div, g_ce = (psum_over(c, axes) for c in cts)\n",
        "    g_div, g_ce = cts\n",
        ("test_sharded_distillation.py",),
        "sharded_equals",
    ),
    # distillation heads: strategies x divergences, bf16 budget, default plan, exclusions
    Mutant(
        "teacher-distill-gif-hard-ce-takes-teacher-lse",
        "heads/_distill.py",
        "    l1 = ls if t == 1.0 else jax.nn.logsumexp(z, axis=-1)\n",
        "    l1 = lt if t == 1.0 else jax.nn.logsumexp(z, axis=-1)\n",
        ("test_distillation_head.py",),
        "every_divergence_weight",
    ),
    Mutant(
        "teacher-distill-gif-dw-accumulator-in-input-dtype",
        "heads/_distill.py",
        "        jnp.zeros(w.shape, dt),  # dw accumulator (stored orientation)\n",
        "        jnp.zeros(w.shape, w.dtype),  # dw accumulator (stored orientation)\n",
        ("test_distillation_head.py",),
        "bf16_gradients_within",
    ),
    Mutant(
        "teacher-distill-gif-half-block-only-when-set",
        "heads/_distill.py",
        'if plan.strategy == "grad_in_forward" and config.block_bytes is None:',
        'if plan.strategy == "grad_in_forward" and config.block_bytes is not None:',
        ("test_distillation_head.py",),
        "default_plan",
    ),
    Mutant(
        "teacher-distill-gif-teacher-rows-unmasked",
        "heads/_distill.py",
        "            _rows(sl(teacher.x), take),\n",
        "            sl(teacher.x),\n",
        ("test_excluded_tokens.py",),
        "teacher_head",
    ),
    Mutant(
        "teacher-distill-aux-hard-loss-only-when-weighted",
        "heads/distillation.py",
        "        dh = dh._replace(hard=True)\n",
        "        pass\n",
        ("test_distillation_head.py",),
        "every_divergence_weight",
    ),
    Mutant(
        "topk-distill-excluded-teacher-log-probs-kept",
        "heads/distillation.py",
        "    teacher_log_probs = jnp.where(tokens.valid[:, None], teacher_log_probs, 0.0)\n",
        "",
        ("test_excluded_tokens.py",),
        "topk",
    ),
    # The kernels' temperature and entropy, the TPU's transposed read
    Mutant(
        "kernel-expected-logit-not-rescaled",
        "_ce_math.py",
        "    return ex * old_scale + tile * jnp.exp(shift - m_safe)",
        "    return ex + tile * jnp.exp(shift - m_safe)",
        ("test_log_probs.py",),
        "values_and_gradients and pallas and temperature and 1",
    ),
    Mutant(
        "gpu-kernel-backward-without-temperature",
        "heads/pallas_gpu.py",
        "        temperature=st.hp.temperature,\n",
        "",
        ("test_log_probs.py",),
        "values_and_gradients and pallas_gpu and temperature",
    ),
    Mutant(
        "tpu-unaligned-kernel-not-flipped",
        "heads/pallas_tpu.py",
        "    flip = not problem.w_vd and problem.v % 128 != 0 and problem.d % 128 == 0",
        "    flip = False",
        ("test_linear_cross_entropy.py",),
        "unaligned_kernel",
    ),
    # Cross-entropy options and aux
    Mutant(
        "class-weights-smoothing-unweighted-normalizer",
        "heads/_ce_head.py",
        "            ce = ce + (a / v) * (jnp.sum(cw) * lse - weighted_sum)",
        "            ce = ce + (a / v) * (v * lse - weighted_sum)",
        ("test_cross_entropy_options.py",),
        "cw_smooth",
    ),
    Mutant(
        "token-scaling-not-detached",
        "heads/_ce_head.py",
        "        p_y = jax.lax.stop_gradient(jnp.exp(jnp.where(valid, lab - lse, 0.0)))",
        "        p_y = jnp.exp(jnp.where(valid, lab - lse, 0.0))",
        ("test_cross_entropy_options.py",),
        "dft",
    ),
    Mutant(
        "aux-predicted-not-masked",
        "heads/_engine.py",
        "        jnp.where(valid, argmax, -1).astype(jnp.int32),",
        "        argmax.astype(jnp.int32),",
        ("test_linear_cross_entropy.py",),
        "aux_outputs",
    ),
    # Distillation conventions
    Mutant(
        "distill-hard-label-where-shares-the-mean",
        "heads/distillation.py",
        "        terms = Terms(tokens.coef, hard.coef, hard.valid, div_scale)",
        "        terms = Terms(tokens.coef, tokens.coef, hard.valid, div_scale)",
        ("test_distillation_head.py",),
        "separate_exclusions_and",
    ),
    Mutant(
        "topk-truncated-teacher-not-renormalized",
        "heads/distillation.py",
        "    lt = jax.nn.log_softmax(teacher_log_probs, axis=-1)",
        "    lt = teacher_log_probs",
        ("test_distillation.py",),
        "truncated",
    ),
]


def problems(root: Path = ROOT, mutants: list[Mutant] | None = None) -> list[str]:
    """Why each mutant would not apply to the tree at ``root`` (empty when all do).

    A mutant applies when its original text occurs exactly once in its file, the
    replacement differs from it, and its test files exist.
    """
    out = []
    names = set()
    for m in MUTANTS if mutants is None else mutants:
        if m.name in names:
            out.append(f"{m.name}: the name is used twice")
        names.add(m.name)
        path = root / "src" / "fusedloss" / m.file
        if not path.is_file():
            out.append(f"{m.name}: {m.file} does not exist")
            continue
        n = path.read_text().count(m.original)
        if n != 1:
            out.append(f"{m.name}: original text occurs {n} times in {m.file}, expected once")
        if m.replacement == m.original:
            out.append(f"{m.name}: the replacement does not change {m.file}")
        out += [
            f"{m.name}: no test file tests/{t}"
            for t in m.tests
            if not (root / "tests" / t).is_file()
        ]
        if not m.tests:
            out.append(f"{m.name}: no test file selected")
    return out


def plant(src: Path, m: Mutant) -> None:
    path = src / "fusedloss" / m.file
    text = path.read_text()
    count = text.count(m.original)
    if count != 1:
        raise LookupError(f"{m.name}: original text occurs {count} times in {m.file}")
    path.write_text(text.replace(m.original, m.replacement))


def main(argv: list[str]) -> int:
    if "--list" in argv:
        for m in MUTANTS:
            print(m.name)
        return 0
    if "--check" in argv:
        stale = problems()
        print("\n".join(stale) or f"mutants: all {len(MUTANTS)} apply", file=sys.stderr)
        return 2 if stale else 0
    chosen = [m for m in MUTANTS if not argv or m.name in argv]
    unknown = set(argv) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutants: {sorted(unknown)}", file=sys.stderr)
        return 2
    # Every original text must still be present once before anything runs.
    stale = problems()
    if stale:
        print("\n".join(stale), file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        for m in chosen:
            src = Path(tmp) / m.name / "src"
            shutil.copytree(ROOT / "src", src)
            plant(src, m)
            env = dict(os.environ, PYTHONPATH=str(src))
            start = time.monotonic()
            r = subprocess.run(
                m.command(sys.executable), cwd=ROOT, env=env, capture_output=True, text=True
            )
            # pytest exit 1: tests failed (caught); 5: nothing selected; else an error.
            status = {0: "SURVIVED", 1: "caught"}.get(r.returncode, f"error({r.returncode})")
            rows.append((m.name, status, time.monotonic() - start))
            print(f"{m.name:46s} {status:10s} {rows[-1][2]:6.1f}s", flush=True)
            shutil.rmtree(src.parent)
    print()
    print(f"{'mutant':46s} {'result':10s}")
    for name, status, _ in rows:
        print(f"{name:46s} {status:10s}")
    bad = [r for r in rows if r[1] != "caught"]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
