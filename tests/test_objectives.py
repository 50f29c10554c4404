"""fusedloss.objectives: fused objectives give the same optax updates as materialized logits.

The oracle everywhere is the plain path a user would write without this library:
``logits = hidden @ w`` and ``optax.losses.softmax_cross_entropy_with_integer_labels``
(``optax.losses.softmax_cross_entropy`` with ``optax.smooth_labels`` for label
smoothing), reduced by hand. Tolerances are float32: rtol 1e-5 on one evaluation;
optimizer trajectories are compared step by step (see the comments there).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

from fusedloss import objectives

V, D = 50, 8  # unaligned vocabulary and width
B, T = 4, 9


def init_params(key, *, tied=False, bias=False):
    k = jax.random.split(key, 4)
    params = {
        "embed": 0.5 * jax.random.normal(k[0], (V, D)),
        "w1": jax.random.normal(k[1], (D, D)) / np.sqrt(D),
        "b1": 0.1 * jax.random.normal(k[2], (D,)),
    }
    if not tied:
        params["head"] = 0.5 * jax.random.normal(k[3], (D, V))
    if bias:
        params["head_b"] = 0.1 * jax.random.normal(k[3], (V,))
    return params


def hidden_fn(params, tokens):
    """A tiny causal model: embedding, a residual tanh layer, and a causal mean mix."""
    h = params["embed"][tokens]
    h = h + jnp.tanh(h @ params["w1"] + params["b1"].reshape(1, 1, D))
    t = tokens.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), h.dtype)) / jnp.arange(1, t + 1, dtype=h.dtype)[:, None]
    return h + jnp.einsum("st,btd->bsd", causal, h)


def head_fn(params):
    return params["head"] if "head" in params else params["embed"].T


def head_bias_fn(params):
    return params["head_b"]


def make_batch(key, *, batch=B, seq=T, lengths=None, weights=False):
    k1, k2 = jax.random.split(key)
    tokens = jax.random.randint(k1, (batch, seq), 0, V)
    if lengths is None:
        lengths = jax.random.randint(k2, (batch,), 2, seq + 1)
    mask = jnp.arange(seq)[None, :] < jnp.asarray(lengths)[:, None]
    out = {"tokens": tokens, "mask": mask}
    if weights:
        out["weights"] = jax.random.uniform(k2, (batch, seq), minval=0.5, maxval=2.0)
    return out


def materialized_objective(
    *, label_smoothing=0.0, z_loss=0.0, ignore_index=None, reduction="mean", use_bias=False
):
    """The plain optax path: materialized logits, optax CE, masked mean by hand."""

    def loss_fn(params, batch):
        tokens = batch["tokens"]
        h = hidden_fn(params, tokens)[:, :-1]
        logits = h @ head_fn(params)
        if use_bias:
            logits = logits + head_bias_fn(params).reshape(1, 1, V)
        labels = tokens[:, 1:]
        if label_smoothing:
            targets = optax.smooth_labels(jax.nn.one_hot(labels, V), label_smoothing)
            per = optax.losses.softmax_cross_entropy(logits, targets)
        else:
            per = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
        lse = jax.nn.logsumexp(logits, axis=-1)
        per = per + z_loss * lse**2
        w = batch["mask"][:, 1:].astype(jnp.float32)
        if "weights" in batch:
            w = w * batch["weights"][:, 1:]
        if ignore_index is not None:
            w = jnp.where(labels == ignore_index, 0.0, w)
        total = jnp.sum(jnp.where(w != 0, per * w, 0.0))
        loss = total if reduction == "sum" else total / jnp.sum(w)
        nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
        stats = {
            "nll": jnp.sum(jnp.where(w != 0, nll * w, 0.0)) / jnp.sum(w),
            "accuracy": jnp.sum(jnp.where(jnp.argmax(logits, -1) == labels, w, 0.0)) / jnp.sum(w),
            "lse": jnp.sum(w * lse) / jnp.sum(w),
            "lse_sq": jnp.sum(w * lse**2) / jnp.sum(w),
            "num_tokens": jnp.sum(w != 0),
            "weight_sum": jnp.sum(w),
        }
        return loss, stats

    return loss_fn


def fused_objective(implementation="xla", *, use_bias=False, **kw):
    return objectives.causal_lm_objective(
        hidden_fn,
        head=head_fn,
        head_bias=head_bias_fn if use_bias else None,
        implementation=implementation,
        **kw,
    )


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def assert_grads_close(a, b, rtol=1e-5):
    """Per leaf, rtol plus an absolute floor of rtol/10 of the leaf's largest entry:
    float32 sums of O(1) terms that cancel to ~0 keep an O(1e-7 * scale) error."""

    def check(x, y):
        atol = 0.1 * rtol * float(np.max(np.abs(y)))
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)

    jax.tree.map(check, a, b)


# ---- one evaluation: value, gradient and aux against the materialized oracle ----------


CASES = {
    "plain-xla": dict(),
    "everything-xla": dict(
        label_smoothing=0.1,
        z_loss=1e-3,
        use_bias=True,
        ignore_index=7,
        reduction="sum",
        weights=True,
    ),
    "tied_smooth-reference": dict(label_smoothing=0.2, tied=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_value_grad_and_aux_match_materialized(case):
    implementation = case.split("-")[1]
    kw = dict(CASES[case])
    tied = kw.pop("tied", False)
    weights = kw.pop("weights", False)
    params = init_params(jax.random.key(0), tied=tied, bias=kw.get("use_bias", False))
    batch = make_batch(jax.random.key(1), weights=weights)
    if kw.get("ignore_index") is not None:
        batch["tokens"] = batch["tokens"].at[:, 3].set(kw["ignore_index"])

    fused = jax.jit(jax.value_and_grad(fused_objective(implementation, **kw), has_aux=True))
    oracle = jax.jit(jax.value_and_grad(materialized_objective(**kw), has_aux=True))
    (loss, aux), grads = fused(params, batch)
    (ref_loss, stats), ref_grads = oracle(params, batch)

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_grads_close(grads, ref_grads)
    assert aux.reduction == kw.get("reduction", "mean")
    assert aux.implementation == implementation
    assert int(aux.num_tokens) == int(stats["num_tokens"])
    np.testing.assert_allclose(aux.weight_sum, stats["weight_sum"], rtol=1e-6)
    np.testing.assert_allclose(aux.loss * (aux.weight_sum if kw.get("reduction") else 1), loss)
    np.testing.assert_allclose(aux.nll, stats["nll"], rtol=1e-5)
    np.testing.assert_allclose(aux.perplexity, np.exp(stats["nll"]), rtol=1e-5)
    np.testing.assert_allclose(aux.accuracy, stats["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(aux.lse_mean, stats["lse"], rtol=1e-5)
    np.testing.assert_allclose(aux.lse_sq_mean, stats["lse_sq"], rtol=1e-5)
    assert set(aux.metrics()) >= {"loss", "perplexity", "accuracy", "lse", "num_tokens"}


def test_integer_mask_softcap_and_uint8_tokens():
    params = init_params(jax.random.key(0))
    batch = make_batch(jax.random.key(2))
    loss_fn = jax.jit(fused_objective(logit_softcap=3.0, label_smoothing=0.1))
    loss, aux = loss_fn(params, batch)
    # HF-style 0/1 int mask and uint8 ids (compared with int32 ids internally).
    small = {"tokens": batch["tokens"].astype(jnp.uint8), "mask": batch["mask"].astype(jnp.int32)}
    np.testing.assert_allclose(loss_fn(params, small)[0], loss, rtol=1e-6)

    # Oracle for the softcap: materialized logits through c * tanh(z / c).
    h = hidden_fn(params, batch["tokens"])[:, :-1]
    logits = 3.0 * jnp.tanh(h @ params["head"] / 3.0)
    labels = batch["tokens"][:, 1:]
    m = batch["mask"][:, 1:]
    nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    ref_nll = jnp.sum(jnp.where(m, nll, 0.0)) / jnp.sum(m, dtype=jnp.float32)
    np.testing.assert_allclose(aux.nll, ref_nll, rtol=1e-5)


def test_fully_masked_batch_gives_zero_loss_and_gradient():
    params = init_params(jax.random.key(0))
    batch = make_batch(jax.random.key(1))
    batch["mask"] = jnp.zeros_like(batch["mask"]).at[:, 0].set(True)  # no target included
    (loss, aux), grads = jax.jit(jax.value_and_grad(fused_objective(), has_aux=True))(params, batch)
    assert float(loss) == 0.0 and int(aux.num_tokens) == 0
    assert float(aux.perplexity) == 1.0 and float(aux.accuracy) == 0.0
    for g in jax.tree.leaves(grads):
        np.testing.assert_array_equal(g, 0.0)


def test_extra_arguments_reach_apply_fn():
    params = init_params(jax.random.key(0))
    batch = make_batch(jax.random.key(1))

    def scaled_hidden(params, tokens, scale, *, shift):
        return hidden_fn(params, tokens) * scale + shift

    loss_fn = objectives.causal_lm_objective(scaled_hidden, head=head_fn)
    got, _ = loss_fn(params, batch, 2.0, shift=0.0)
    ref, _ = objectives.causal_lm_objective(lambda p, t: 2.0 * hidden_fn(p, t), head=head_fn)(
        params, batch
    )
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
    params = init_params(jax.random.key(0))
    batch = make_batch(jax.random.key(1))
    loss_fn = fused_objective()
    with pytest.raises(ValueError, match=r"'tokens' entry"):
        loss_fn(params, {"ids": batch["tokens"]})
    with pytest.raises(ValueError, match=r"T >= 2, got \(4, 1\)"):
        loss_fn(params, {"tokens": batch["tokens"][:, :1]})
    with pytest.raises(ValueError, match=r"batch\['mask'\]` must have shape \(4, 9\)"):
        loss_fn(params, {**batch, "mask": batch["mask"][:, 1:]})
    with pytest.raises(TypeError, match=r"batch\['mask'\]` must be a boolean"):
        loss_fn(params, {**batch, "mask": batch["mask"].astype(jnp.float32)})
    with pytest.raises(TypeError, match=r"batch\['tokens'\]` must have an integer dtype"):
        loss_fn(params, {"tokens": batch["tokens"].astype(jnp.float32)})
    bad_model = objectives.causal_lm_objective(lambda p, t: hidden_fn(p, t)[:, 1:], head=head_fn)
    with pytest.raises(
        ValueError, match=r"must return hidden states .* = \(4, 9\) .*got \(4, 8, 8\)"
    ):
        bad_model(params, batch)
    with pytest.raises(ValueError, match=r"`reduction` must be one of \('sum', 'mean'\)"):
        objectives.causal_lm_objective(hidden_fn, head=head_fn, reduction="none")
    with pytest.raises(TypeError, match=r"`head` must be a callable"):
        objectives.causal_lm_objective(hidden_fn, head=params["head"])
    with pytest.raises(ValueError, match=r"`z_loss` must be in \[0.0, inf\)"):
        objectives.causal_lm_objective(hidden_fn, head=head_fn, z_loss=-1.0)(params, batch)


# ---- optimizers: fused (xla) vs materialized, step for step --------------------------


def strong(tree):
    """Drops weak types: optax's init states hold weakly typed scalars that the states
    returned by ``update`` do not, which would make every jitted step compile twice."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.result_type(x)), tree)


def run_optimizer(opt, loss_fn, params, batches, *, pass_value=False):
    grad_fn = jax.value_and_grad(lambda p, b: loss_fn(p, b)[0])

    @jax.jit
    def step(params, state, batch):
        loss, grads = grad_fn(params, batch)
        extra = {"value": loss} if pass_value else {}
        # optax's Adam bias correction mixes an int32 count with float32, which strict
        # promotion (tests/conftest.py) rejects: an optax matter, not ours.
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state, loss

    state = strong(opt.init(params))
    trajectory = []
    for batch in batches:
        params, state, loss = step(params, state, batch)
        trajectory.append((params, state, loss))
    return trajectory


def test_adamw_with_clipping_equal_updates():
    params = init_params(jax.random.key(0), tied=True)
    batches = [make_batch(jax.random.key(10 + i)) for i in range(5)]
    opt = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(3e-2, weight_decay=0.1))
    fused = run_optimizer(opt, fused_objective(z_loss=1e-3), params, batches)
    ref = run_optimizer(opt, materialized_objective(z_loss=1e-3), params, batches)
    for i, ((p, _, loss), (p_ref, _, loss_ref)) in enumerate(zip(fused, ref, strict=True)):
        # One float32 evaluation agrees to ~1e-7 relative; Adam divides by sqrt(v), so a
        # gradient entry of tiny magnitude still moves its parameter by ~lr, and the
        # 1e-7 relative gradient difference reaches parameters as ~lr * 1e-6 after
        # a few steps: rtol 1e-5 with atol 1e-6 (parameters are O(0.1..1)).
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-5, err_msg=f"step {i}")
        assert_trees_close(p, p_ref, rtol=1e-5, atol=1e-6)
    # The parameters did move (the comparison is not vacuous).
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params, p)
    assert max(jax.tree.leaves(moved)) > 0.05


def test_reduce_on_plateau_equal_updates_and_scale():
    params = init_params(jax.random.key(0))
    batch = make_batch(jax.random.key(3))
    # rtol=0.5: only a halving of the loss counts as progress, so the plateau logic
    # reduces the scale on a fixed schedule instead of deciding on a 1e-7 margin.
    opt = optax.chain(
        optax.adam(3e-2),
        optax.contrib.reduce_on_plateau(factor=0.5, patience=1, rtol=0.5, cooldown=0),
    )
    fused = run_optimizer(opt, fused_objective(), params, [batch] * 6, pass_value=True)
    ref = run_optimizer(opt, materialized_objective(), params, [batch] * 6, pass_value=True)
    for (p, s, loss), (p_ref, s_ref, loss_ref) in zip(fused, ref, strict=True):
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
        assert_trees_close(p, p_ref)
        np.testing.assert_array_equal(s[1].scale, s_ref[1].scale)
    assert float(fused[-1][1][1].scale) < 0.5  # the plateau logic did fire


def test_lbfgs_with_value_and_grad_from_state_equal_updates():
    params = init_params(jax.random.key(0), bias=True)
    batch = make_batch(jax.random.key(4), batch=8)
    opt = optax.lbfgs(memory_size=5)

    def run(loss_fn):
        def value_fn(p):  # L-BFGS evaluates it again inside its zoom line search
            return loss_fn(p, batch)[0]

        value_and_grad = optax.value_and_grad_from_state(value_fn)

        @jax.jit
        def step(params, state):
            value, grad = value_and_grad(params, state=state)
            # optax's line search mixes weakly-typed scalars with float32 in ways strict
            # promotion rejects (an optax matter, not ours).
            with jax.numpy_dtype_promotion("standard"):
                updates, state = opt.update(
                    grad, state, params, value=value, grad=grad, value_fn=value_fn
                )
            return optax.apply_updates(params, updates), state, value

        state = strong(opt.init(params))
        out = []
        for _ in range(6):
            params_i, state, value = step(out[-1][0] if out else params, state)
            out.append((params_i, value))
        return out

    fused = run(fused_objective(use_bias=True))
    ref = run(materialized_objective(use_bias=True))
    for i, ((p, v), (p_ref, v_ref)) in enumerate(zip(fused, ref, strict=True)):
        # L-BFGS builds its curvature estimate from gradient differences, which
        # magnifies the ~1e-7 evaluation error as the iterates converge: rtol 1e-5
        # for the first steps, 1e-4 after.
        rtol = 1e-5 if i < 3 else 1e-4
        np.testing.assert_allclose(v, v_ref, rtol=rtol, err_msg=f"step {i}")
        assert_trees_close(p, p_ref, rtol=rtol, atol=10 * rtol)
    assert float(fused[-1][1]) < 0.8 * float(fused[0][1])  # it optimized


# ---- gradient accumulation with global-token normalization ----------------------------


def micro_batches(key, m, lengths):
    """`m` micro-batches of 2 sequences with very different numbers of real tokens."""
    batch = make_batch(key, batch=2 * m, lengths=lengths)
    return batch, jax.tree.map(lambda x: x.reshape(m, 2, *x.shape[1:]), batch)


def test_accumulate_gradients_equals_one_big_batch():
    params = init_params(jax.random.key(0))
    full, micro = micro_batches(jax.random.key(5), 3, [9, 9, 2, 3, 9, 5])
    oracle = materialized_objective(z_loss=1e-3)
    (ref_loss, ref_aux), ref_grads = jax.jit(jax.value_and_grad(oracle, has_aux=True))(params, full)
    accumulate = jax.jit(objectives.accumulate_gradients, static_argnums=0)
    for reduction in ["sum", "mean"]:
        loss_fn = fused_objective(reduction=reduction, z_loss=1e-3)
        (loss, aux), grads = accumulate(loss_fn, params, micro)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=reduction)
        assert_grads_close(grads, ref_grads)
        assert int(aux.num_tokens) == int(ref_aux["num_tokens"]) == 31
        assert aux.reduction == "mean"
        np.testing.assert_allclose(aux.perplexity, np.exp(ref_aux["nll"]), rtol=1e-5)

    # Averaging per-micro-batch means (what optax.MultiSteps does by default) is a
    # different, token-count-biased gradient: the comparison above can tell them apart.
    per_micro = jax.jit(jax.vmap(jax.grad(lambda p, b: oracle(p, b)[0]), (None, 0)))
    naive = jax.tree.map(lambda g: g.mean(0), per_micro(params, micro))
    assert not np.allclose(naive["head"], ref_grads["head"], rtol=1e-3)


def test_multisteps_with_global_count_equals_one_big_batch_step():
    params = init_params(jax.random.key(0))
    full, micro = micro_batches(jax.random.key(6), 2, [9, 2, 4, 9])
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    # The global token count is known from the masks before any forward pass, so each
    # micro-batch's summed loss can be divided by it and MultiSteps can *sum* them.
    global_count = jnp.sum(full["mask"][:, 1:]).astype(jnp.float32)
    sum_fn = fused_objective(reduction="sum")
    opt = optax.MultiSteps(inner, every_k_schedule=2, use_grad_mean=False)

    @jax.jit
    def micro_step(params, state, batch):
        grads = jax.grad(lambda p: sum_fn(p, batch)[0] / global_count)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam, see run_optimizer
            updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = strong(opt.init(params))
    p = params
    for i in range(2):
        p, state = micro_step(p, state, jax.tree.map(lambda x, i=i: x[i], micro))

    ref = run_optimizer(inner, materialized_objective(), params, [full])[0][0]
    assert_trees_close(p, ref)
    assert not np.allclose(p["head"], params["head"])


def test_accumulate_gradients_rejects_bad_inputs():
    params = init_params(jax.random.key(0))
    with pytest.raises(ValueError, match="same leading micro-batch axis"):
        objectives.accumulate_gradients(
            fused_objective(), params, {"tokens": jnp.zeros((2, 2, 5), int), "mask": jnp.ones(3)}
        )

    def plain(params, batch):
        return jnp.sum(params["w1"]) * 0.0, {"count": jnp.ones(())}

    with pytest.raises(TypeError, match="aux that has a `weight_sum`"):
        objectives.accumulate_gradients(plain, params, {"x": jnp.zeros((2, 3))})


# ---- classification objective ---------------------------------------------------------


def test_classification_objective_matches_optax():
    kx, kw, kl, km = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(kx, (12, 5))
    labels = jax.random.randint(kl, (12,), 0, 7)
    mask = jax.random.bernoulli(km, 0.7, (12,)).at[0].set(True)
    weights = jax.random.uniform(km, (12,), minval=0.5, maxval=2.0)
    params = {"w": jax.random.normal(kw, (5, 7)), "b": jnp.zeros(7)}
    batch = {"inputs": x, "labels": labels, "mask": mask, "weights": weights}
    w = jnp.where(mask, weights, 0.0)

    def logits_fn(params, x):
        return x @ params["w"] + params["b"][None, :]

    def oracle(params):
        logits = logits_fn(params, x)
        per = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(per * w) / jnp.sum(w), logits

    loss_fn = objectives.classification_objective(logits_fn)
    (value, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)
    (ref, logits), ref_grads = jax.jit(jax.value_and_grad(oracle, has_aux=True))(params)
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    assert_grads_close(grads, ref_grads)
    correct = np.argmax(np.asarray(logits), -1) == np.asarray(labels)
    w_np = np.asarray(w)
    np.testing.assert_allclose(aux.accuracy, np.sum(w_np * correct) / np.sum(w_np), rtol=1e-6)
    assert int(aux.num_examples) == int(mask.sum())

    # Another loss, summed; an excluded example's loss is never read (NaN-safe).
    hinge = objectives.classification_objective(
        logits_fn, loss=optax.losses.multiclass_hinge_loss, reduction="sum"
    )
    x_nan = jnp.where(mask[:, None], x, jnp.nan)
    summed, sum_aux = hinge(params, {**batch, "inputs": x_nan})
    per = optax.losses.multiclass_hinge_loss(logits, labels)
    np.testing.assert_allclose(summed, jnp.sum(per * w), rtol=1e-5)
    np.testing.assert_allclose(sum_aux.loss, jnp.sum(per * w) / jnp.sum(w), rtol=1e-5)
    assert sum_aux.reduction == "sum"
    with pytest.raises(
        ValueError, match=r"`apply_fn` must return logits \[\.\.\., F\] with \[\.\.\.\] = "
    ):
        objectives.classification_objective(lambda p, x: x)(params, {**batch, "inputs": x[0]})
