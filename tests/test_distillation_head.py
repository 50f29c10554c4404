"""``linear_distillation_loss`` against float64 oracles sharing nothing with the
library: one written here (both heads' logits materialized in ``jnp`` under x64, the
divergences from their definitions, differentiated by JAX) and the NumPy one of
``tests/oracles.py`` (closed-form gradients). Values, aux outputs, gradients for
arbitrary per-token cotangents; every strategy x divergence x hard-label weight x
temperature; layouts, biases and softcaps crossed between the heads; clamped chunks;
no gradient to the constants, in both modes; vmap; checks at any position, bad
labels, empty batches, the bf16 error budget, the default plan and the memory
contract at real heads."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import fusedloss
from fusedloss import Transposed, XlaConfig, linear_distillation_loss

# 21 tokens (18 after a shift) in chunks of 8 and V = 53 in chunks of 16: several
# chunks each way, the last one clamped.
SMALL = dict(token_chunk=8, vocab_chunk=16)
IMPLS = {
    "reference": ("reference", None),
    "materialized": ("xla", XlaConfig(strategy="materialized")),
    "grad_in_forward": ("xla", XlaConfig(strategy="grad_in_forward", **SMALL)),
    "recompute": ("xla", XlaConfig(strategy="recompute", **SMALL)),
}
LEAD, D, DT, V = (3, 7), 12, 10, 53


def oracle(x, w, xt, wt, *, divergence="forward_kl", beta=0.5, temperature=1.0, bias=None,
           teacher_bias=None, cap=None, teacher_cap=None, labels=None, a=0.0,
           ignore_index=None, where=None, weights=None, shift=0, reduction="mean"):  # fmt: skip
    """float64, from the definitions (KL sums over the vocabulary, M the mixture)."""
    if shift:
        x, xt = x[..., :-shift, :], xt[..., :-shift, :]
        cut = lambda a: None if a is None else a[..., shift:]
        labels, where, weights = cut(labels), cut(where), cut(weights)
    z, u = x @ w, xt @ wt
    row = lambda b: b.reshape((1,) * (z.ndim - 1) + (-1,))
    z = z if bias is None else z + row(bias)
    u = u if teacher_bias is None else u + row(teacher_bias)
    z = z if cap is None else cap * jnp.tanh(z / cap)
    u = u if teacher_cap is None else teacher_cap * jnp.tanh(u / teacher_cap)
    logq = jax.nn.log_softmax(z / temperature, axis=-1)
    logp = jax.nn.log_softmax(u / temperature, axis=-1)
    p, q = jnp.exp(logp), jnp.exp(logq)
    if divergence == "forward_kl":
        div = jnp.sum(p * (logp - logq), -1)
    elif divergence == "reverse_kl":
        div = jnp.sum(q * (logq - logp), -1)
    else:
        logm = jnp.log(beta * p + (1 - beta) * q)
        div = beta * jnp.sum(p * (logp - logm), -1) + (1 - beta) * jnp.sum(q * (logq - logm), -1)
    per = div
    keep = jnp.ones(div.shape, bool) if where is None else where
    if labels is not None:
        ce = -jnp.take_along_axis(jax.nn.log_softmax(z, -1), labels[..., None] % V, -1)[..., 0]
        per = (1 - a) * div + a * ce
        if ignore_index is not None:
            keep = keep & (labels != ignore_index)
    wts = jnp.where(keep, 1.0 if weights is None else weights, 0.0)
    per = jnp.where(keep, per, 0.0) * wts
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / wts.sum()


def make(seed, lead=LEAD):
    rng = np.random.default_rng(seed)
    f32 = lambda *s, scale=1.0: (rng.normal(size=s) * scale).astype(np.float32)
    arrays = dict(
        x=f32(*lead, D), w=f32(D, V, scale=1.5 / np.sqrt(D)),
        xt=f32(*lead, DT), wt=f32(DT, V, scale=2.0 / np.sqrt(DT)),
        bias=f32(V), teacher_bias=f32(V),
        labels=rng.integers(0, V, size=lead).astype(np.int32),
        where=rng.random(lead) > 0.2,
        weights=rng.uniform(0.5, 2.0, size=lead).astype(np.float32),
    )  # fmt: skip
    arrays["labels"].reshape(-1)[:2] = (0, V - 1)  # both ends of the vocabulary
    arrays["labels"].reshape(-1)[5] = -100  # an ignored token
    return arrays


ALL = dict(beta=0.3, temperature=1.7, cap=6.0, teacher_cap=5.0, bias=True, teacher_bias=True,
           labels=True, a=0.3, ignore_index=-100, where=True, weights=True, shift=1)  # fmt: skip
# The row loss (reference, materialized, grad_in_forward) and the closed forms of
# recompute each meet every divergence; every feature at once in most cases.
CASES = [
    # (implementation, divergence, reduction, features)
    # (Every strategy meets every divergence, hard-label weight and temperature in
    # test_every_divergence_weight_and_temperature_with_aux_match_oracle.)
    ("reference", "jsd", "none", ALL),
    ("materialized", "reverse_kl", "mean", ALL),
    ("grad_in_forward", "forward_kl", "mean", ALL),
    ("grad_in_forward", "jsd", "sum", dict(beta=0.8)),
    ("grad_in_forward", "reverse_kl", "sum", ALL),
    *[("recompute", d, "none", ALL) for d in ("forward_kl", "reverse_kl", "jsd")],
    ("recompute", "forward_kl", "mean", dict(labels=True, a=1.0)),
]


@pytest.mark.parametrize("impl,divergence,reduction,feat", CASES)
def test_values_and_gradients_match_float64_oracle(impl, divergence, reduction, feat):
    arr = make(sum(map(ord, impl + divergence + reduction)) + len(feat))
    name, cfg = IMPLS[impl]
    opt = {k: arr[k] if feat.get(k) else None for k in ("bias", "teacher_bias", "labels", "where")}
    opt["weights"] = arr["weights"] if feat.get("weights") else None
    scal = dict(temperature=feat.get("temperature", 1.0), shift=feat.get("shift", 0))
    beta, ign = feat.get("beta", 0.5), feat.get("ignore_index")
    lab = opt["labels"]
    if lab is not None and ign is None:
        lab = lab % V  # no ignored token: every label in range
    shape = arr["labels"][..., scal["shift"] :].shape
    ct = np.random.default_rng(7).normal(size=shape)  # any per-token cotangent

    def fused(x, w, b):
        out = linear_distillation_loss(
            x, w, arr["xt"], arr["wt"], divergence=divergence, beta=beta, bias=b,
            teacher_bias=opt["teacher_bias"], logit_softcap=feat.get("cap"),
            teacher_logit_softcap=feat.get("teacher_cap"), labels=lab,
            hard_label_weight=feat.get("a", 0.0), ignore_index=ign, where=opt["where"],
            weights=opt["weights"], reduction=reduction, implementation=name, config=cfg, **scal,
        )  # fmt: skip
        return jnp.sum(out * ct.astype(np.float32)) if reduction == "none" else out

    argnums = (0, 1, 2) if opt["bias"] is not None else (0, 1)
    got, grads = jax.jit(jax.value_and_grad(fused, argnums))(arr["x"], arr["w"], opt["bias"])
    with jax.enable_x64(True):
        f64 = lambda a: None if a is None else jnp.asarray(a, jnp.float64)

        def want_fn(x, w, b):
            out = oracle(
                x, w, f64(arr["xt"]), f64(arr["wt"]), divergence=divergence, beta=beta,
                bias=b, teacher_bias=f64(opt["teacher_bias"]), cap=feat.get("cap"),
                teacher_cap=feat.get("teacher_cap"), labels=lab, a=feat.get("a", 0.0),
                ignore_index=ign, where=opt["where"], weights=f64(opt["weights"]),
                reduction=reduction, **scal,
            )  # fmt: skip
            return jnp.sum(out * ct) if reduction == "none" else out

        want, want_g = jax.value_and_grad(want_fn, argnums)(
            f64(arr["x"]), f64(arr["w"]), f64(opt["bias"])
        )
        # Directional derivatives along a random direction, per argument.
        rng = np.random.default_rng(8)
        for g, wg in zip(grads, want_g, strict=True):
            u = rng.normal(size=np.shape(wg))
            dd = np.sum(np.asarray(g, np.float64) * u)
            np.testing.assert_allclose(dd, np.sum(np.asarray(wg) * u), rtol=1e-3)
    # float32 statistics of O(1) losses: 1e-5 relative (the cancellation in a KL of
    # close distributions is what float32 logits allow; these are not close).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for nm, g, wg in zip(["dx", "dw", "dbias"], grads, want_g, strict=False):
        wg = np.asarray(wg)  # sums over V of float32 terms: atol scaled by the largest
        np.testing.assert_allclose(g, wg, rtol=1e-4, atol=1e-5 * np.abs(wg).max(), err_msg=nm)


def test_tied_embeddings_of_both_heads():
    """``Transposed`` [V, D] embeddings for the student and the teacher, read in place."""
    arr = make(11)
    name, cfg = IMPLS["recompute"]
    x, w, xt, wt = arr["x"], arr["w"], arr["xt"], arr["wt"]
    kw = dict(divergence="jsd", temperature=1.3, implementation=name, config=cfg)
    f = lambda x, e: linear_distillation_loss(x, Transposed(e), xt, Transposed(wt.T), **kw)
    got, (gx, ge) = jax.jit(jax.value_and_grad(f, (0, 1)))(x, w.T)
    want, (wx, ww) = jax.jit(
        jax.value_and_grad(lambda x, w: linear_distillation_loss(x, w, xt, wt, **kw), (0, 1))
    )(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(gx, wx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ge, ww.T, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_grad_in_forward_columns_masked_on_both_heads(divergence):
    """Columns with a -inf bias on both heads (probability 0 on both sides) add
    nothing: the loss and gradients are those of the vocabulary without them, finite
    (the dw of a masked column is 0)."""
    arr = make(14)
    name, cfg = IMPLS["grad_in_forward"]
    cut = np.array([3, 17, 40])
    keep = np.setdiff1d(np.arange(V), cut)
    bias, t_bias = arr["bias"].copy(), arr["teacher_bias"].copy()
    bias[cut], t_bias[cut] = -np.inf, -np.inf
    lab = np.searchsorted(keep, arr["labels"] % V).clip(0, keep.size - 1).astype(np.int32)
    kw = dict(divergence=divergence, temperature=1.5, hard_label_weight=0.3,
              implementation=name, config=cfg)  # fmt: skip

    def f(x, w, b, wt, tb, labels):
        return linear_distillation_loss(
            x, w, arr["xt"], wt, bias=b, teacher_bias=tb, labels=labels, **kw
        )

    vg = jax.jit(jax.value_and_grad(f, (0, 1)))
    got, (gx, gw) = vg(arr["x"], arr["w"], bias, arr["wt"], t_bias, keep[lab])
    want, (wx, ww) = vg(
        arr["x"], arr["w"][:, keep], bias[keep], arr["wt"][:, keep], t_bias[keep], lab
    )
    assert np.isfinite(got) and np.isfinite(gx).all() and np.isfinite(gw).all()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(gx, wx, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gw[:, keep], ww, rtol=1e-4, atol=1e-6)
    assert not np.any(gw[:, cut])


# The whole first vocabulary chunk of SMALL (the running max stays -inf through it)
# and single columns inside chunks, the last one in the clamped chunk.
MASKED = np.r_[0:16, 20, 37, 52]


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize(
    "impl,reduction,temperature,hard",
    [
        ("reference", "mean", 1.5, True),
        ("materialized", "none", 1.0, False),
        ("grad_in_forward", "sum", 1.5, True),
        ("recompute", "none", 1.5, True),
        ("recompute", "mean", 1.0, False),
    ],
)
def test_columns_masked_on_both_heads_are_removed(impl, reduction, temperature, divergence, hard):
    """A -inf bias on the same columns of both heads: the losses, gradients (the masked
    columns' dw and dbias are 0) and forward-mode tangents are those of the vocabulary
    without those columns, finite, in float64."""
    arr = make(19)
    name, cfg = IMPLS[impl]
    keep = np.setdiff1d(np.arange(V), MASKED)
    lab = np.random.default_rng(20).integers(0, keep.size, size=LEAD).astype(np.int32)
    shape = LEAD if reduction == "none" else ()
    ct = np.random.default_rng(21).normal(size=shape)
    kw = dict(divergence=divergence, beta=0.3, temperature=temperature, reduction=reduction,
              hard_label_weight=0.4 if hard else 0.0, implementation=name, config=cfg)  # fmt: skip
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(a, jnp.float64)
        x, w, b, xt, wt, tb = (f64(arr[k]) for k in ("x", "w", "bias", "xt", "wt", "teacher_bias"))
        b, tb = b.at[MASKED].set(-jnp.inf), tb.at[MASKED].set(-jnp.inf)

        def loss(cols, labels):
            def f(x, w, b):
                out = linear_distillation_loss(
                    x, w, xt, wt[:, cols], bias=b, teacher_bias=tb[cols],
                    labels=labels if hard else None, **kw,
                )  # fmt: skip
                return jnp.sum(out * ct)

            return jax.jit(f)

        masked, removed = loss(np.arange(V), keep[lab]), loss(keep, lab)
        got, g = jax.value_and_grad(masked, (0, 1, 2))(x, w, b)
        want, wg = jax.value_and_grad(removed, (0, 1, 2))(x, w[:, keep], b[keep])
        assert np.isfinite(got) and all(np.isfinite(a).all() for a in g)
        np.testing.assert_allclose(got, want, rtol=1e-10)
        for nm, a, wa in zip(["dx", "dw", "dbias"], g, wg, strict=True):
            a = a if nm == "dx" else a[..., keep]
            np.testing.assert_allclose(a, wa, rtol=1e-9, atol=1e-12, err_msg=nm)
        assert not np.any(g[1][:, MASKED]) and not np.any(g[2][MASKED])
        rng = np.random.default_rng(22)
        t = tuple(f64(rng.normal(size=a.shape)) for a in (x, w, b))
        got_t = jax.jvp(masked, (x, w, b), t)[1]
        want_t = jax.jvp(removed, (x, w[:, keep], b[keep]), (t[0], t[1][:, keep], t[2][keep]))[1]
        assert np.isfinite(got_t)
        np.testing.assert_allclose(got_t, want_t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", ["grad_in_forward", "recompute"])
def test_columns_masked_on_one_head_match_the_row_losses(impl):
    """A -inf bias on one head only: the chunked statistics agree with the whole rows,
    0 where the masking head's weight is 0 and +inf where the other head has mass the
    masking one lacks (forward_kl with the student masked, reverse_kl with the
    teacher masked)."""
    arr = make(23)
    name, cfg = IMPLS[impl]
    for side in ("bias", "teacher_bias"):
        biases = dict(bias=arr["bias"].copy(), teacher_bias=arr["teacher_bias"].copy())
        biases[side][MASKED] = -np.inf
        for divergence in ("forward_kl", "reverse_kl", "jsd"):
            kw = dict(divergence=divergence, temperature=1.5, reduction="sum", **biases)
            f = lambda n, c, kw=kw: linear_distillation_loss(
                arr["x"], arr["w"], arr["xt"], arr["wt"], implementation=n, config=c, **kw
            )
            got, want = f(name, cfg), f("reference", None)
            infinite = (side, divergence) in {
                ("bias", "forward_kl"),
                ("teacher_bias", "reverse_kl"),
            }
            assert np.isposinf(want) == infinite, (side, divergence)
            np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{side} {divergence}")


def test_equal_heads_give_zero_and_aux_terms():
    arr = make(13)
    x, w = arr["x"], arr["w"]
    for div in ("forward_kl", "reverse_kl", "jsd"):
        out = linear_distillation_loss(x, w, x, w, divergence=div, reduction="none")
        np.testing.assert_allclose(out, 0.0, atol=2e-6)
    loss, aux = linear_distillation_loss(
        x, w, arr["xt"], arr["wt"], labels=arr["labels"], hard_label_weight=0.25,
        ignore_index=-100, return_aux=True,
    )  # fmt: skip
    np.testing.assert_allclose(loss, 0.75 * aux.divergence + 0.25 * aux.hard_loss, rtol=1e-6)
    assert int(aux.num_tokens) == int(np.sum(arr["labels"] != -100))
    assert aux.implementation.startswith("xla")


def test_bad_labels_and_arguments():
    arr = make(14, lead=(6,))
    x, w, xt, wt = arr["x"], arr["w"], arr["xt"], arr["wt"]
    bad = arr["labels"] % V  # no ignored token here
    bad[3] = V
    with pytest.raises(ValueError, match=rf"`labels` must lie in \[0, {V}\)"):
        linear_distillation_loss(x, w, xt, wt, labels=bad, hard_label_weight=0.5)
    out = jax.jit(
        lambda y: linear_distillation_loss(
            x, w, xt, wt, labels=y, hard_label_weight=0.5, reduction="none"
        )
    )(bad)
    assert np.isnan(out[3]) and np.isfinite(np.delete(np.asarray(out), 3)).all()
    total = jax.jit(
        lambda y: linear_distillation_loss(x, w, xt, wt, labels=y, hard_label_weight=0.5)
    )
    assert np.isnan(total(bad)) and np.isfinite(total(arr["labels"] % V))
    # Labels only mark ignored tokens without the hard term: no range check.
    linear_distillation_loss(x, w, xt, wt, labels=bad, ignore_index=V)
    cases = [
        (dict(beta=1.0, divergence="jsd"), ValueError, r"`beta` must be in \(0.0, 1.0\)"),
        (dict(beta=0.0), ValueError, r"`beta` must be in \(0.0, 1.0\)"),
        (dict(temperature=0.0), ValueError, r"`temperature` must be in \(0.0, inf\)"),
        (dict(divergence="kl"), ValueError, "`divergence` must be one of"),
        (dict(hard_label_weight=0.5), ValueError, "need `labels`"),
        (dict(hard_label_weight=1.5, labels=arr["labels"]), ValueError, "`hard_label_weight`"),
        (dict(teacher_logit_softcap=-1.0), ValueError, "`teacher_logit_softcap`"),
        (dict(implementation="pallas_gpu"), NotImplementedError, "runs on"),
        (dict(config=fusedloss.PallasGpuConfig()), TypeError, "`config` must be"),
    ]
    for kw, err, msg in cases:
        with pytest.raises(err, match=msg):
            linear_distillation_loss(x, w, xt, wt, **kw)
    with pytest.raises(ValueError, match=r"`teacher_w` must have shape \[Dt, V\].*V = 53"):
        linear_distillation_loss(x, w, xt, wt[:, :50])
    with pytest.raises(ValueError, match=r"`teacher_x` must have shape x.shape\[:-1\]"):
        linear_distillation_loss(x, w, xt[:5], wt)
    with pytest.raises(TypeError, match="`teacher_x` and `teacher_w` must have the same dtype"):
        linear_distillation_loss(x, w, xt, wt.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="`teacher_bias` must have shape"):
        linear_distillation_loss(x, w, xt, wt, teacher_bias=arr["teacher_bias"][:3])


@pytest.mark.parametrize("impl", ["reference", "recompute"])
def test_empty_batch(impl):
    name, cfg = IMPLS[impl]
    x, w = jnp.zeros((2, 0, D)), jnp.ones((D, V))
    xt, wt = jnp.zeros((2, 0, DT)), jnp.ones((DT, V))
    for reduction in ("mean", "sum", "none"):
        f = functools.partial(
            lambda x, w, r: linear_distillation_loss(
                x, w, xt, wt, reduction=r, implementation=name, config=cfg
            ),
            r=reduction,
        )
        out = jax.jit(f)(x, w)
        assert out.shape == ((2, 0) if reduction == "none" else ())
        gx, gw = jax.grad(lambda x, w, f=f: jnp.sum(f(x, w)), (0, 1))(x, w)
        assert gx.shape == x.shape and not np.any(np.asarray(gw))


def test_bf16_inputs_give_float32_results():
    arr = make(15)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    x, w, xt, wt = (bf(arr[k]) for k in ("x", "w", "xt", "wt"))
    for strategy in ("grad_in_forward", "recompute"):
        cfg = XlaConfig(strategy=strategy, **SMALL)
        loss, (gx, gw) = jax.jit(
            jax.value_and_grad(
                lambda x, w, c=cfg: linear_distillation_loss(x, w, xt, wt, config=c), (0, 1)
            )
        )(x, w)
        assert loss.dtype == jnp.float32 and gx.dtype == gw.dtype == jnp.bfloat16
        want = linear_distillation_loss(*(jnp.asarray(a, jnp.float32) for a in (x, w, xt, wt)))
        # The same bf16-rounded inputs, float32 arithmetic on both sides.
        np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_memory_llama3_8b_student_70b_sized_teacher():
    """Student D=4096, teacher Dt=8192, V=128256, N=8192, f32: value_and_grad within
    1 GiB of temporaries (the materialized path holds two 4 GiB logits buffers), on
    the default plan and on the recompute strategy (per-token losses)."""
    s = jax.ShapeDtypeStruct
    n, d, dt, v = 8192, 4096, 8192, 128256
    args = (s((n, d), jnp.float32), s((d, v), jnp.float32))
    args += (s((n, dt), jnp.float32), s((dt, v), jnp.float32))

    def temp(**kw):
        f = lambda x, w, xt, wt: jnp.sum(linear_distillation_loss(x, w, xt, wt, **kw))
        c = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*args).compile()
        return c.memory_analysis().temp_size_in_bytes

    for kw in (dict(), dict(divergence="jsd", reduction="none")):
        assert temp(**kw) <= 2**30, (kw, temp(**kw) / 2**20)


@pytest.mark.parametrize("impl,reduction", [("recompute", "none"), ("grad_in_forward", "mean")])
def test_forward_mode_matches_float64_oracle(impl, reduction):
    """``jax.jvp`` against the oracle's directional derivatives, and ``check_grads``
    with its default modes (forward and reverse), in float64."""
    arr = make(16)
    _, cfg = IMPLS[impl]
    lab = arr["labels"] % V
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(a, jnp.float64)
        x, w, b, xt, wt = (f64(arr[k]) for k in ("x", "w", "bias", "xt", "wt"))
        kw = dict(divergence="jsd", beta=0.3, temperature=1.3, labels=lab, reduction=reduction)

        @jax.jit
        def fused(x, w, b):
            return linear_distillation_loss(
                x, w, xt, wt, bias=b, logit_softcap=5.0, hard_label_weight=0.2,
                implementation="xla", config=cfg, **kw,
            )  # fmt: skip

        def want(x, w, b):
            return oracle(x, w, xt, wt, bias=b, cap=5.0, a=0.2, **kw)

        rng = np.random.default_rng(17)
        t = tuple(f64(rng.normal(size=a.shape)) for a in (x, w, b))
        got = jax.jvp(fused, (x, w, b), t)[1]
        np.testing.assert_allclose(got, jax.jvp(want, (x, w, b), t)[1], rtol=1e-9, atol=1e-12)
        check_grads(fused, (x, w, b), order=1)


def test_hessian_matches_float64_oracle():
    """Second order (forward over reverse) w.r.t. the bias, recompute strategy."""
    arr = make(18)
    _, cfg = IMPLS["recompute"]
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(a, jnp.float64)
        x, w, b, xt, wt = (f64(arr[k]) for k in ("x", "w", "bias", "xt", "wt"))
        kw = dict(divergence="jsd", beta=0.3, temperature=1.3)
        fused = lambda b: linear_distillation_loss(x, w, xt, wt, bias=b, config=cfg, **kw)
        got = jax.jit(jax.hessian(fused))(b)
        want = jax.hessian(lambda b: oracle(x, w, xt, wt, bias=b, **kw))(b)
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)


# ---- every strategy x divergence x hard-label weight x temperature, aux included ------

# 13 tokens in blocks of 8 and V = 37 in chunks of 16: clamped last chunks both ways.
N_S, D_S, DT_S, V_S = 13, 16, 12, 37
CHUNKS = dict(token_chunk=8, vocab_chunk=16)
STRATEGIES = {
    # (implementation, config, reduction): every reduction meets the aux outputs.
    # ``reference`` runs the materialized strategy's code (the whole rows at once).
    "materialized": ("xla", XlaConfig(strategy="materialized"), "sum"),
    "grad_in_forward": ("xla", XlaConfig(strategy="grad_in_forward", **CHUNKS), "mean"),
    "recompute": ("xla", XlaConfig(strategy="recompute", **CHUNKS), "none"),
}
COMBOS = [
    (d, a, t) for d in ("forward_kl", "reverse_kl", "jsd") for a in (0.0, 0.35) for t in (1.0, 1.7)
]


def small_inputs(seed, n=N_S, d=D_S, dt=DT_S, v=V_S):
    """Student and teacher heads whose normalizers differ (the teacher's logits are
    scaled up and shifted by a bias), labels with an ignored token, ``where`` and
    weights; the excluded tokens sit at random positions."""
    rng = np.random.default_rng(seed)
    f32 = lambda *s, scale=1.0: (rng.normal(size=s) * scale).astype(np.float32)
    labels = rng.integers(0, v, size=n).astype(np.int32)
    pos = rng.choice(np.arange(1, n - 1), size=2, replace=False)
    labels[pos[0]] = -100
    where = np.ones(n, bool)
    where[pos[1]] = False
    return dict(
        x=f32(n, d), w=f32(d, v, scale=1.0 / np.sqrt(d)), bias=f32(v, scale=0.5),
        xt=f32(n, dt), wt=f32(dt, v, scale=3.0 / np.sqrt(dt)), teacher_bias=f32(v, scale=2.0),
        labels=labels, where=where, weights=rng.uniform(0.5, 2.0, n).astype(np.float32),
    )  # fmt: skip


def assert_close_f32(name, got, want):
    """float32 results of float64-exact formulas: rtol 1e-5 on values, gradients with
    an absolute floor scaled by their largest entry (sums over V of float32 terms)."""
    want = np.asarray(want, np.float64)
    atol = 1e-5 * max(np.abs(want).max(), 1e-3)
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, rtol=1e-4, atol=atol, err_msg=name
    )


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_divergence_weight_and_temperature_with_aux_match_oracle(strategy):
    """Each strategy (one compiled program) meets every divergence with hard-label
    weight 0 and > 0 at temperature 1 and not 1, the teacher's normalizer differing
    from the student's; the aux terms (the cross-entropy included at weight 0),
    counts and weight sums are checked as strictly as the loss and its gradients."""
    from oracles import distill_teacher_head_oracle

    arr = small_inputs(31 + len(strategy))
    impl, cfg, reduction = STRATEGIES[strategy]
    ct = np.random.default_rng(5).normal(size=N_S).astype(np.float32)

    @jax.jit
    def run(x, w, b):
        outs = []
        for div, a, t in COMBOS:

            def f(x, w, b, div=div, a=a, t=t):
                loss, aux = linear_distillation_loss(
                    x, w, arr["xt"], arr["wt"], divergence=div, beta=0.3, temperature=t,
                    bias=b, teacher_bias=arr["teacher_bias"], labels=arr["labels"],
                    hard_label_weight=a, ignore_index=-100, where=arr["where"],
                    weights=arr["weights"], reduction=reduction, return_aux=True,
                    implementation=impl, config=cfg,
                )  # fmt: skip
                return (jnp.sum(loss * ct) if reduction == "none" else loss), (loss, aux)

            (_, (loss, aux)), g = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(x, w, b)
            outs.append((loss, aux, g))
        return outs

    outs = run(arr["x"], arr["w"], arr["bias"])
    for (div, a, t), (loss, aux, grads) in zip(COMBOS, outs, strict=True):
        want = distill_teacher_head_oracle(
            arr["x"], arr["w"], arr["xt"], arr["wt"], divergence=div, beta=0.3, temperature=t,
            bias=arr["bias"], teacher_bias=arr["teacher_bias"], labels=arr["labels"],
            hard_label_weight=a, ignore_index=-100, valid=arr["where"], weights=arr["weights"],
            reduction=reduction, cotangent=ct if reduction == "none" else None,
        )  # fmt: skip
        case = f"{strategy} {div} a={a} T={t}"
        np.testing.assert_allclose(loss, want["loss"], rtol=1e-5, atol=1e-6, err_msg=case)
        np.testing.assert_allclose(aux.divergence, want["divergence"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(aux.hard_loss, want["hard_loss"], rtol=1e-5, atol=1e-6)
        assert int(aux.num_tokens) == want["num_tokens"], case
        np.testing.assert_allclose(aux.weight_sum, want["weight_sum"], rtol=1e-6)
        for nm, g in zip(("dx", "dw", "dbias"), grads, strict=True):
            assert_close_f32(f"{case} {nm}", g, want[nm])
        assert not np.any(np.asarray(grads[0])[~arr["where"] | (arr["labels"] == -100)])
    assert outs[0][1].implementation == f"xla:{cfg.strategy}"


# Each row crosses every two-way choice between the heads: over the four rows, the
# (student, teacher) pair of each kind takes all four values, never in lockstep.
PAIRS = [(False, False), (False, True), (True, False), (True, True)]
LAYOUT_ROWS = [
    dict(transposed=PAIRS[i], bias=PAIRS[(i + 1) % 4], softcap=PAIRS[(i + 2) % 4], div=d)
    for i, d in enumerate(("forward_kl", "reverse_kl", "jsd", "reverse_kl"))
]


@pytest.mark.parametrize("strategy", ["materialized", "grad_in_forward", "recompute"])
def test_layouts_biases_and_softcaps_crossed_between_heads(strategy):
    """``Transposed`` or plain ``w``, a bias or none, a softcap or none: each chosen
    independently for the student and the teacher, against the oracle (values, the
    aux terms, ``dx``, ``dw`` in its stored layout, ``dbias``)."""
    from oracles import distill_teacher_head_oracle

    arr = small_inputs(47)
    impl, cfg, reduction = STRATEGIES[strategy]
    ct = np.random.default_rng(6).normal(size=N_S).astype(np.float32)
    caps = (4.0, 3.0)

    @jax.jit
    def run(x, w, wt_t, b):
        outs = []
        for row in LAYOUT_ROWS:
            (s_t, t_t), (s_b, t_b), (s_c, t_c) = row["transposed"], row["bias"], row["softcap"]

            def f(x, w, b, row=row, s_t=s_t, t_t=t_t, s_b=s_b, t_b=t_b, s_c=s_c, t_c=t_c):
                loss, aux = linear_distillation_loss(
                    x, Transposed(w) if s_t else w, arr["xt"],
                    Transposed(wt_t) if t_t else arr["wt"], divergence=row["div"],
                    temperature=1.3, bias=b if s_b else None,
                    teacher_bias=arr["teacher_bias"] if t_b else None,
                    logit_softcap=caps[0] if s_c else None,
                    teacher_logit_softcap=caps[1] if t_c else None, labels=arr["labels"],
                    hard_label_weight=0.25, ignore_index=-100, where=arr["where"],
                    weights=arr["weights"], reduction=reduction, return_aux=True,
                    implementation=impl, config=cfg,
                )  # fmt: skip
                return (jnp.sum(loss * ct) if reduction == "none" else loss), (loss, aux)

            w_in = w.T if s_t else w
            (_, (loss, aux)), g = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(x, w_in, b)
            outs.append((loss, aux.divergence, aux.hard_loss, g))
        return outs

    outs = run(arr["x"], arr["w"], arr["wt"].T.copy(), arr["bias"])
    for row, (loss, div, hard, (gx, gw, gb)) in zip(LAYOUT_ROWS, outs, strict=True):
        (s_t, _), (s_b, t_b), (s_c, t_c) = row["transposed"], row["bias"], row["softcap"]
        want = distill_teacher_head_oracle(
            arr["x"], arr["w"], arr["xt"], arr["wt"], divergence=row["div"], temperature=1.3,
            bias=arr["bias"] if s_b else None, teacher_bias=arr["teacher_bias"] if t_b else None,
            softcap=caps[0] if s_c else None, teacher_softcap=caps[1] if t_c else None,
            labels=arr["labels"], hard_label_weight=0.25, ignore_index=-100,
            valid=arr["where"], weights=arr["weights"], reduction=reduction,
            cotangent=ct if reduction == "none" else None,
        )  # fmt: skip
        case = f"{strategy} {row}"
        np.testing.assert_allclose(loss, want["loss"], rtol=1e-5, atol=1e-6, err_msg=case)
        np.testing.assert_allclose(div, want["divergence"], rtol=1e-5, atol=1e-6, err_msg=case)
        np.testing.assert_allclose(hard, want["hard_loss"], rtol=1e-5, atol=1e-6, err_msg=case)
        assert_close_f32(f"{case} dx", gx, want["dx"])
        assert_close_f32(f"{case} dw", gw.T if s_t else gw, want["dw"])
        assert_close_f32(f"{case} dbias", gb if s_b else np.zeros(V_S), want["dbias"] if s_b else 0)


@pytest.mark.parametrize("strategy", ["grad_in_forward", "recompute"])
def test_bf16_gradients_within_the_materialized_error_budget(strategy):
    """bf16 heads: ``dx`` and ``dw`` (accumulated over 64 token blocks, where a bf16
    accumulator would lose several units) are no further from the float64 oracle than
    the materialized bf16 computation's."""
    from oracles import assert_within_error_budget, distill_teacher_head_oracle

    n, d, v = 512, 16, 64
    arr = small_inputs(53, n=n, d=d, dt=DT_S, v=v)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    x, w, xt, wt = bf(arr["x"]), bf(arr["w"] * 4), bf(arr["xt"]), bf(arr["wt"])
    kw = dict(divergence="jsd", temperature=1.5, labels=arr["labels"], hard_label_weight=0.3,
              ignore_index=-100, where=arr["where"])  # fmt: skip

    def grads(impl, cfg):
        f = lambda x, w: linear_distillation_loss(
            x, w, xt, wt, implementation=impl, config=cfg, **kw
        )
        gx, gw = jax.jit(jax.grad(f, (0, 1)))(x, w)
        assert gx.dtype == gw.dtype == jnp.bfloat16
        return gx, gw

    cfg = XlaConfig(strategy=strategy, token_chunk=8, vocab_chunk=48)
    f64 = lambda a: np.asarray(a, np.float64)
    want = distill_teacher_head_oracle(
        f64(x), f64(w), f64(xt), f64(wt), divergence="jsd", temperature=1.5,
        labels=arr["labels"], hard_label_weight=0.3, ignore_index=-100, valid=arr["where"],
    )  # fmt: skip
    for nm, got, naive in zip(
        ("dx", "dw"), grads("xla", cfg), grads("reference", None), strict=True
    ):
        assert_within_error_budget(f"{strategy} {nm}", got, naive, want[nm])


def test_default_plan_on_the_host_at_llama3_8b():
    """The planner's choice for a Llama-3-8B student (N=8192, D=4096, V=128256) on the
    host: grad_in_forward for a reduced float32 loss, in token blocks half the
    cross-entropy's (two heads' blocks and softmaxes are alive at once: 64 MiB of
    float32 logits is 130 rows of V, aligned down to 128); recompute for per-token
    losses and for bf16 (a float32 dw accumulator of 2 GiB exceeds the 1 GiB limit)."""
    from fusedloss.heads import _distill
    from fusedloss.heads._engine import Hyper, Problem
    from fusedloss.heads.xla import plan as xla_plan

    s = jax.ShapeDtypeStruct
    n, d, v = 8192, 4096, 128256
    dh = _distill.Distill("forward_kl", 0.5, 1.0, None, None, False, False, False)
    head = lambda dt: _distill.Head(s((n, d), dt), s((d, v), dt), None)
    name, plan = _distill.plan_for(None, None, head(jnp.float32), dh, needs_stats=False)
    assert (name, plan.strategy, plan.tn, plan.vc_acc) == ("xla", "grad_in_forward", 128, 3968)
    ce = xla_plan(None, Problem(n, d, v, jnp.float32, False, False, Hyper()), None)
    assert (ce.strategy, ce.tn) == ("grad_in_forward", 256)
    for dt, stats in ((jnp.float32, True), (jnp.bfloat16, False), (jnp.bfloat16, True)):
        name, plan = _distill.plan_for(None, None, head(dt), dh, needs_stats=stats)
        assert (name, plan.strategy, plan.tn, plan.vc) == ("xla", "recompute", 4096, 2048)
    # The public call reports the same choice (traced only, nothing compiled).
    f = lambda *a: linear_distillation_loss(*a, return_aux=True)[1]
    args = s((n, d), jnp.float32), s((d, v), jnp.float32), s((n, 8192), jnp.float32)
    aux = jax.eval_shape(f, *args, s((8192, v), jnp.float32))
    assert aux.implementation == "xla:grad_in_forward"


def test_eager_label_check_finds_any_position():
    """An out-of-range label at a random inner position of a 2-D batch (not at the
    ends, not beside another) is reported with its index; excluded tokens are not."""
    rng = np.random.default_rng(61)
    arr = make(62)
    x, xt = arr["x"], arr["xt"]
    labels = rng.integers(0, V, size=LEAD).astype(np.int32)
    i, j = int(rng.integers(1, LEAD[0] - 1)), int(rng.integers(1, LEAD[1] - 1))
    labels[i, j] = V + int(rng.integers(0, 5))
    flat = i * LEAD[1] + j  # reported among the flattened tokens
    msg = rf"`labels` must lie in \[0, {V}\); got {labels[i, j]} at index \({flat},\)"
    with pytest.raises(ValueError, match=msg):
        linear_distillation_loss(x, arr["w"], xt, arr["wt"], labels=labels, hard_label_weight=0.5)
    where = np.ones(LEAD, bool)
    where[i, j] = False
    out = linear_distillation_loss(
        x, arr["w"], xt, arr["wt"], labels=labels, hard_label_weight=0.5, where=where
    )
    assert np.isfinite(out)


def test_vmap_over_a_middle_axis_forward_and_reverse():
    """``vmap`` over axis 1 of ``x``, ``teacher_x`` and ``labels`` (a batch of
    sequences stored token-major): per-sequence losses, ``jvp`` and ``grad`` of the
    batched call equal the oracle's, on both chunked strategies."""
    from oracles import distill_teacher_head_oracle

    nb = 3
    arr = small_inputs(71, n=N_S * nb)
    x = arr["x"].reshape(N_S, nb, D_S)
    xt = arr["xt"].reshape(N_S, nb, DT_S)
    labels = arr["labels"].reshape(N_S, nb) % V_S  # NumPy, batched by vmap
    rng = np.random.default_rng(72)
    tx, tw = rng.normal(size=x.shape).astype(np.float32), rng.normal(size=arr["w"].shape)
    tw = tw.astype(np.float32)
    seq_w = rng.uniform(0.5, 1.5, nb).astype(np.float32)
    kw = dict(divergence="reverse_kl", temperature=1.4, labels=None, hard_label_weight=0.4)

    @jax.jit
    def run(x, w):
        outs = []
        for strategy in ("grad_in_forward", "recompute"):
            cfg = XlaConfig(strategy=strategy, **CHUNKS)

            def one(x, xt, lab, w, cfg=cfg):
                return linear_distillation_loss(
                    x, w, xt, arr["wt"], config=cfg, **{**kw, "labels": lab}
                )

            batched = lambda x, w, one=one: jax.vmap(one, (1, 1, 1, None))(x, xt, labels, w)
            loss, tangent = jax.jvp(batched, (x, w), (tx, tw))
            grads = jax.grad(lambda x, w, b=batched: jnp.sum(b(x, w) * seq_w), (0, 1))(x, w)
            outs.append((loss, tangent, grads))
        return outs

    for loss, tangent, (gx, gw) in run(x, arr["w"]):
        want_dw = 0.0
        for b in range(nb):
            want = distill_teacher_head_oracle(
                x[:, b], arr["w"], xt[:, b], arr["wt"], **{**kw, "labels": labels[:, b]}
            )  # fmt: skip
            np.testing.assert_allclose(loss[b], want["loss"], rtol=1e-5)
            t_want = np.sum(want["dx"] * tx[:, b]) + np.sum(want["dw"] * tw)
            np.testing.assert_allclose(tangent[b], t_want, rtol=1e-4, atol=1e-6)
            assert_close_f32("dx", gx[:, b], seq_w[b] * want["dx"])
            want_dw = want_dw + seq_w[b] * want["dw"]
        assert_close_f32("dw", gw, want_dw)


def test_constants_get_zero_gradients_in_both_modes():
    """The teacher's hidden states, kernel and bias and the token weights are
    constants: zero cotangents (reverse) and zero tangents (forward) on every
    strategy, while the loss does depend on them."""
    arr = small_inputs(81)

    @jax.jit
    def run(xt, wt, tb, weights):
        outs = []
        for strategy in ("materialized", "grad_in_forward", "recompute"):
            cfg = XlaConfig(strategy=strategy, **CHUNKS)

            def f(xt, wt, tb, weights, cfg=cfg):
                return linear_distillation_loss(
                    arr["x"], arr["w"], xt, wt, teacher_bias=tb, weights=weights,
                    divergence="jsd", labels=arr["labels"], hard_label_weight=0.3,
                    ignore_index=-100, config=cfg,
                )  # fmt: skip

            args = (xt, wt, tb, weights)
            grads = jax.grad(f, (0, 1, 2, 3))(*args)
            _, tangent = jax.jvp(f, args, tuple(jnp.ones_like(a) for a in args))
            outs.append((f(*args), f(xt * 2, wt, tb, weights), grads, tangent))
        return outs

    for loss, moved, grads, tangent in run(
        arr["xt"], arr["wt"], arr["teacher_bias"], arr["weights"]
    ):
        assert abs(float(moved) - float(loss)) > 1e-3
        assert all(not np.any(np.asarray(g)) for g in grads) and float(tangent) == 0.0


@pytest.mark.parametrize(
    "impl,divergence,reduction",
    [("reference", "jsd", "mean"), ("grad_in_forward", "forward_kl", "mean"),
     ("recompute", "reverse_kl", "none"), ("materialized", "forward_kl", "sum")],
)  # fmt: skip
def test_separate_exclusions_and_temperature_squared(impl, divergence, reduction):
    """``hard_label_where`` gives the hard-label term its own tokens (and ``"mean"``
    its own denominator) and ``temperature_squared`` scales the divergence by T**2:
    the loss is ``(1 - a) T**2 div(where) + a ce(hard_label_where, ignore_index)``."""
    arr = make(11 + len(impl))
    name, cfg = IMPLS[impl]
    rng = np.random.default_rng(3)
    hard_where = rng.random(LEAD) > 0.5
    a, t, shift = 0.4, 1.7, 1
    shape = arr["labels"][..., shift:].shape
    ct = rng.normal(size=shape)

    def fused(x, w, b):
        out = linear_distillation_loss(
            x, w, arr["xt"], arr["wt"], divergence=divergence, bias=b, temperature=t,
            labels=arr["labels"], hard_label_weight=a, ignore_index=-100, where=arr["where"],
            weights=arr["weights"], hard_label_where=hard_where, temperature_squared=True,
            reduction=reduction, shift=shift, implementation=name, config=cfg,
        )  # fmt: skip
        return jnp.sum(out * ct.astype(np.float32)) if reduction == "none" else out

    got, grads = jax.jit(jax.value_and_grad(fused, (0, 1, 2)))(arr["x"], arr["w"], arr["bias"])
    with jax.enable_x64(True):
        f64 = lambda v: jnp.asarray(v, jnp.float64)
        common = dict(divergence=divergence, temperature=t, weights=f64(arr["weights"]),
                      shift=shift, reduction=reduction)  # fmt: skip

        def want_fn(x, w, b):
            div = oracle(x, w, f64(arr["xt"]), f64(arr["wt"]), bias=b, where=arr["where"],
                         **common)  # fmt: skip
            ce = oracle(x, w, f64(arr["xt"]), f64(arr["wt"]), bias=b, labels=arr["labels"],
                        a=1.0, ignore_index=-100, where=hard_where, **common)  # fmt: skip
            out = (1 - a) * t**2 * div + a * ce
            return jnp.sum(out * f64(ct)) if reduction == "none" else out

        want, want_g = jax.value_and_grad(want_fn, (0, 1, 2))(
            f64(arr["x"]), f64(arr["w"]), f64(arr["bias"])
        )
    np.testing.assert_allclose(float(got), float(want), rtol=2e-5)
    for g, h in zip(grads, want_g, strict=True):
        h = np.asarray(h)
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5 * np.abs(h).max())


def test_separate_exclusions_bad_arguments():
    arr = make(2)
    f = functools.partial(linear_distillation_loss, arr["x"], arr["w"], arr["xt"], arr["wt"])
    with pytest.raises(ValueError, match=r"`hard_label_where` needs `labels`"):
        f(hard_label_where=arr["where"])
    with pytest.raises(ValueError, match=r"`hard_label_where` must have shape \(3, 7\)"):
        f(labels=arr["labels"], hard_label_where=arr["where"][:, 1:])
    with pytest.raises(TypeError, match=r"`temperature_squared` must be a bool, got 1"):
        f(temperature_squared=1)
