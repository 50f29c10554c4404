"""Post-training objectives against the float64 oracles of ``tests/oracles.py``.

Values and gradients (x, w, bias) of each fused objective against finite
differences of its paper's formula, with masked tokens, an all-masked row, NaN where
nothing may be read, the argument errors, one fused call on ``w`` read from the
jaxpr, and the compiled temporaries at Llama-3-8B's head.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusedloss
from tests import oracles

B, T, D, V = 4, 7, 6, 37  # unaligned on purpose
TOL = {"value": dict(rtol=2e-5, atol=2e-6), "grad": dict(rtol=2e-4, atol=2e-5)}


def _mask(lengths, t, rng):
    """Rows with the given numbers of included tokens, scattered (not a prefix)."""
    m = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        m[i, rng.choice(t, size=n, replace=False)] = True
    return m


def _head(rng, b, t):
    x = rng.normal(size=(b, t, D)).astype(np.float32)
    w = (rng.normal(size=(D, V)) / 2).astype(np.float32)
    bias = (0.3 * rng.normal(size=(V,))).astype(np.float32)
    tokens = rng.integers(0, V, size=(b, t)).astype(np.int32)
    return x, w, bias, tokens


def _values_and_grads(fns, args):
    """``value_and_grad`` (w.r.t. x, w, bias) of every objective in ONE compile (one
    program holding all cases compiles several times faster than one per case)."""

    def all_cases(args):
        return [jax.value_and_grad(f, (0, 1, 2))(*a) for f, a in zip(fns, args, strict=True)]

    return jax.jit(all_cases)([tuple(map(jnp.asarray, a)) for a in args])


def _check_against(name, oracle, value, grads, x, w, bias):
    """``value``, ``grads`` of the fused objective against the float64 ``oracle(x, w,
    bias)`` and its finite differences."""
    args = (x.astype(np.float64), w.astype(np.float64), bias.astype(np.float64))
    np.testing.assert_allclose(float(value), oracle(*args), **TOL["value"], err_msg=name)
    for i, g in enumerate(grads):
        want = oracles.finite_difference(oracle, args, i)
        assert np.all(np.isfinite(np.asarray(g))), name
        np.testing.assert_allclose(np.asarray(g), want, **TOL["grad"], err_msg=f"{name} grad {i}")


# ---------------------------------------------------------------------------------
# Policy gradient

PG_CASES = {
    # name: (options, data) -- data: old (off-policy), ref (None | "given" | "head"),
    # isw (sampler weights), adv ("seq" | "token"), sft, temperature
    "grpo_k3_entropy": (
        dict(loss_type="grpo", beta=0.05, kl_estimator="k3", entropy_coef=0.01),
        dict(old=True, ref="given", adv="seq", temperature=0.8),
    ),
    "dapo_clip_higher_is_weights_k1_clamp": (
        dict(loss_type="dapo", epsilon_high=0.28, beta=0.1, kl_estimator="k1", kl_clamp=0.05),
        dict(old=True, ref="head_same_w", isw=True, adv="seq"),
    ),
    "dr_grpo_on_policy_k2": (
        dict(loss_type="dr_grpo", beta=0.2, kl_estimator="mse_kl"),
        dict(ref="given", adv="seq"),
    ),
    "bnpo_sft": (
        dict(loss_type="bnpo", sft_coef=0.3, loss_agg_mode="seq-mean-token-sum"),
        dict(old=True, adv="seq", sft=True),
    ),
    "gspo_sequence": (
        dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=0.05),
        dict(old=True, adv="seq"),
    ),
    "gspo_token": (
        dict(
            loss_type="grpo",
            importance_sampling_level="sequence_token",
            epsilon_low=0.05,
            epsilon_high=0.1,
        ),
        dict(old=True, adv="token"),
    ),
    "ppo_dual_clip_token_sum_norm": (
        dict(
            loss_type="ppo",
            clip_ratio_c=1.3,
            loss_agg_mode="token-sum-norm",
            loss_scale_factor=64.0,
        ),
        dict(old=True, adv="token", temperature=1.3),
    ),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.1), dict(old=True, adv="token")),
    "sapo": (dict(loss_type="sapo"), dict(old=True, adv="token")),
}

_PG_ORACLE_NAMES = {
    "loss_type": "loss_type", "importance_sampling_level": "level", "loss_agg_mode": "agg",
    "loss_scale_factor": "factor", "epsilon_low": "eps_low", "epsilon_high": "eps_high",
    "clip_ratio_c": "clip_c", "beta": "beta", "kl_estimator": "kl", "kl_clamp": "kl_clamp",
    "entropy_coef": "entropy_coef", "sft_coef": "sft_coef",
}  # fmt: skip
_TUNIX_KL = {"kl": "k1", "mse_kl": "k2", "low_var_kl": "k3"}


def _pg_data(seed, data):
    rng = np.random.default_rng(seed)
    x, w, bias, tokens = _head(rng, B, T)
    mask = _mask([7, 3, 0, 5], T, rng)  # one all-masked row
    temp = data.get("temperature", 1.0)
    lp_true, _ = oracles.pt_head_log_probs(x, w, bias, tokens, temp)
    d = dict(x=x, w=w, bias=bias, tokens=tokens, mask=mask, temperature=temp)
    adv = rng.normal(size=(B,) if data["adv"] == "seq" else (B, T))
    d["adv"] = adv.astype(np.float32)
    nan_out = lambda a: np.where(mask, a, np.nan).astype(np.float32)  # never read
    if data.get("old"):
        d["old"] = nan_out(lp_true + 0.3 * rng.normal(size=(B, T)))
    if data.get("isw"):
        d["isw"] = nan_out(rng.uniform(0.2, 1.0, size=(B, T)))
    if data.get("sft"):
        d["sft"] = _mask([2, 0, 4, 0], T, rng)
    if data.get("ref") == "given":
        d["ref"] = nan_out(lp_true + 0.2 * rng.normal(size=(B, T)))
    elif data.get("ref", "").startswith("head"):
        # "head_same_w": the reference head is the trained w itself (e.g. the policy at
        # the start of training): the frozen call must give it no gradient.
        d["ref_x"] = (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
        d["ref_w"] = (w + 0.1 * rng.normal(size=w.shape)).astype(np.float32)
        if data["ref"] == "head_same_w":
            d["ref_w"] = None
        ref_w = w if d["ref_w"] is None else d["ref_w"]
        d["ref"] = oracles.pt_head_log_probs(d["ref_x"], ref_w, None, tokens, temp)[0]
    return d


def _pg_case(name):
    """(fused objective of (x, w, bias), float64 oracle, data) of a policy-gradient case."""
    options, data = PG_CASES[name]
    d = _pg_data(sum(map(ord, name)), data)
    kw = dict(options)
    if "old" in d:
        kw["old_log_probs"] = d["old"]
    if "isw" in d:
        kw["sampler_is_weights"] = d["isw"]
    if "sft" in d:
        kw["sft_where"] = d["sft"]
    if "ref_x" in d:
        kw.update(ref_x=d["ref_x"], ref_w=d["ref_w"])
    elif "ref" in d:
        kw["ref_log_probs"] = d["ref"]

    def f(x, w, bias):
        ref_w = {"ref_w": w} if kw.get("ref_w", 0) is None else {}
        return fusedloss.linear_policy_gradient_loss(
            x, w, d["tokens"], d["adv"], bias=bias, where=d["mask"],
            temperature=d["temperature"], **{**kw, **ref_w},
        )  # fmt: skip

    oracle_kw = {_PG_ORACLE_NAMES[k]: v for k, v in options.items()}
    oracle_kw["kl"] = _TUNIX_KL.get(oracle_kw.get("kl"), oracle_kw.get("kl", "k3"))
    frozen, _ = oracles.pt_head_log_probs(d["x"], d["w"], d["bias"], d["tokens"], d["temperature"])

    def oracle(x, w, bias):
        lp, ent = oracles.pt_head_log_probs(x, w, bias, d["tokens"], d["temperature"])
        return oracles.pt_policy_gradient(
            lp, frozen, d["adv"].astype(np.float64), d["mask"], old=d.get("old"),
            ref=d.get("ref"), ent=ent, isw=d.get("isw"), sft_mask=d.get("sft"), **oracle_kw,
        )  # fmt: skip

    return f, oracle, d


def test_policy_gradient_matches_oracle():
    """Every case's value and gradients (x, w, bias); excluded tokens (NaN inputs
    there) get exactly zero gradient."""
    cases = {name: _pg_case(name) for name in PG_CASES}
    args = [(d["x"], d["w"], d["bias"]) for _, _, d in cases.values()]
    outs = _values_and_grads([f for f, _, _ in cases.values()], args)
    for (name, (_, oracle, d)), (value, grads) in zip(cases.items(), outs, strict=True):
        _check_against(name, oracle, value, grads, d["x"], d["w"], d["bias"])
        keep = d["mask"] | d.get("sft", np.zeros_like(d["mask"]))
        gx = np.asarray(grads[0])
        assert not np.any(gx[~keep]), name
        assert np.any(gx[keep]), name


def test_policy_gradient_aux_matches_oracle():
    """Clip fractions, ratio statistics, approximate KL, entropy and KL against the
    oracle's readings of the same quantities (token means over included tokens)."""
    d = _pg_data(7, dict(old=True, ref="given", adv="token"))
    lp, ent = oracles.pt_head_log_probs(d["x"], d["w"], d["bias"], d["tokens"])
    m = d["mask"]
    _, aux = jax.jit(
        lambda x, w, b: fusedloss.linear_policy_gradient_loss(
            x, w, d["tokens"], d["adv"], bias=b, where=m, old_log_probs=d["old"],
            ref_log_probs=d["ref"], loss_type="dapo", epsilon_low=0.1, epsilon_high=0.15,
            clip_ratio_c=1.2, beta=0.1, return_aux=True,
        )
    )(d["x"], d["w"], d["bias"])  # fmt: skip
    r = np.exp(lp - np.where(m, d["old"], 0.0))[m]
    a = d["adv"][m]
    want = dict(
        ratio_mean=r.mean(), ratio_min=r.min(), ratio_max=r.max(),
        clip_fraction_low=np.mean((r < 0.9) & (a < 0)),
        clip_fraction_high=np.mean((r > 1.15) & (a > 0)),
        approx_kl=np.mean(np.where(m, d["old"], 0.0)[m] - lp[m]),
        entropy=ent[m].mean(),
        kl=np.mean([oracles.pt_kl(p, q, "k3") for p, q in zip(lp[m], d["ref"][m], strict=True)]),
        num_tokens=m.sum(),
    )  # fmt: skip
    pg_max = np.maximum(-a * r, -a * np.clip(r, 0.9, 1.15))
    want["dual_clip_fraction"] = np.mean((a < 0) & (pg_max > -1.2 * a))
    for k, v in want.items():
        np.testing.assert_allclose(float(getattr(aux, k)), v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert 0 < want["clip_fraction_low"] + want["clip_fraction_high"] < 1
    assert want["dual_clip_fraction"] > 0


# ---------------------------------------------------------------------------------
# Preference

P, TP = 3, 5
PREF_CASES = {
    "sigmoid_smoothed_ref_head": dict(loss_type="sigmoid", beta=0.3, label_smoothing=0.1),
    "rpo": dict(loss_type="rpo", beta=0.2, nll_coef=0.5),
    "hinge": dict(loss_type="hinge", beta=0.4),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "robust": dict(loss_type="robust", beta=0.3, label_smoothing=0.2),
    "exo_pair": dict(loss_type="exo_pair", beta=0.3),
    "nca_pair": dict(loss_type="nca_pair", beta=0.3),
    "bco_pair": dict(loss_type="bco_pair", beta=0.3),
    "sppo_hard": dict(loss_type="sppo_hard", beta=0.5),
    "apo_zero": dict(loss_type="apo_zero", beta=0.3),
    "apo_down": dict(loss_type="apo_down", beta=0.3),
    "simpo": dict(loss_type="simpo", beta=2.0, gamma=0.7, label_smoothing=0.05),
    "cpo": dict(loss_type="cpo", beta=0.1),
    "orpo": dict(loss_type="orpo", beta=0.25),
}


def _pref_data(seed):
    rng = np.random.default_rng(seed)
    x, w, bias, tokens = _head(rng, 2 * P, TP)
    # chosen rows, then rejected; the last pair's rejected row is empty (not counted)
    mask = _mask([5, 3, 4, 2, 5, 0], TP, rng)
    ref = rng.uniform(-14, -4, size=(2 * P,)).astype(np.float32)
    return dict(x=x, w=w, bias=bias, tokens=tokens, mask=mask, ref=ref)


def _pref_case(name):
    options = PREF_CASES[name]
    d = _pref_data(sum(map(ord, name)))
    ref_free = options["loss_type"] in ("simpo", "cpo", "orpo")
    kw = dict(options)
    if name.endswith("ref_head"):
        rng = np.random.default_rng(1)
        ref_x = (d["x"] + 0.1 * rng.normal(size=d["x"].shape)).astype(np.float32)
        ref_w = (d["w"] + 0.1 * rng.normal(size=d["w"].shape)).astype(np.float32)
        kw.update(ref_x=ref_x, ref_w=ref_w)
        lp_ref, _ = oracles.pt_head_log_probs(ref_x, ref_w, None, d["tokens"])
        ref = np.where(d["mask"], lp_ref, 0.0).sum(-1)
    elif not ref_free:
        kw["ref_log_probs"] = d["ref"]
        ref = d["ref"].astype(np.float64)
    else:
        ref = None

    def f(x, w, bias):
        return fusedloss.linear_preference_loss(x, w, d["tokens"], bias=bias, where=d["mask"], **kw)

    frozen, _ = oracles.pt_head_log_probs(d["x"], d["w"], d["bias"], d["tokens"])
    oracle_kw = dict(
        beta=options["beta"], eps=options.get("label_smoothing", 0.0),
        gamma=options.get("gamma", 0.5), nll_coef=options.get("nll_coef"),
    )  # fmt: skip

    def oracle(x, w, bias):
        lp, _ = oracles.pt_head_log_probs(x, w, bias, d["tokens"])
        return oracles.pt_preference(lp, frozen, d["mask"], ref, options["loss_type"], **oracle_kw)

    return f, oracle, d


def _kto_case(variant):
    rng = np.random.default_rng(len(variant))
    x, w, bias, tokens = _head(rng, 6, TP)
    mask = _mask([5, 2, 0, 4, 3, 5], TP, rng)
    desirable = np.array([True, False, True, False, True, False])
    ref = rng.uniform(-14, -4, size=(6,)).astype(np.float32)
    frozen, _ = oracles.pt_head_log_probs(x, w, bias, tokens)
    kw = dict(beta=0.4, desirable_weight=1.3, undesirable_weight=0.7)
    if variant.startswith("kl_rows"):
        kl_rows = np.array([False, False, False, False, True, True])
        extra, oracle_extra = dict(kl_rows=kl_rows), dict(kl_rows=kl_rows)
        # a positive mean log-ratio (the baseline), or a negative one (baseline 0)
        s = np.where(mask, frozen, 0.0).sum(-1)
        sign = -1.0 if variant.endswith("negative") else 1.0
        ref[4:] = s[4:] - sign * rng.uniform(1.0, 3.0, size=2)
    else:
        # a negative estimate: the baseline is its positive part, 0
        extra, oracle_extra = dict(kl_baseline=np.float32(-1.5)), dict(kl_baseline=-1.5)

    def f(x, w, bias):
        return fusedloss.linear_kto_loss(
            x, w, tokens, desirable, bias=bias, where=mask, ref_log_probs=ref, **kw, **extra
        )

    def oracle(x, w, bias):
        lp, _ = oracles.pt_head_log_probs(x, w, bias, tokens)
        return oracles.pt_kto(lp, frozen, mask, desirable, ref.astype(np.float64),
                              beta=0.4, w_d=1.3, w_u=0.7, **oracle_extra)  # fmt: skip

    return f, oracle, dict(x=x, w=w, bias=bias)


def test_preference_and_kto_match_oracle():
    cases = {name: _pref_case(name) for name in PREF_CASES}
    kto = ("kl_rows", "kl_rows_negative", "kl_baseline")
    cases.update({f"kto_{v}": _kto_case(v) for v in kto})
    args = [(d["x"], d["w"], d["bias"]) for _, _, d in cases.values()]
    outs = _values_and_grads([f for f, _, _ in cases.values()], args)
    for (name, (_, oracle, d)), (value, grads) in zip(cases.items(), outs, strict=True):
        _check_against(name, oracle, value, grads, d["x"], d["w"], d["bias"])


def test_preference_aux_matches_oracle():
    d = _pref_data(3)
    lp, _ = oracles.pt_head_log_probs(d["x"], d["w"], d["bias"], d["tokens"])
    s = np.where(d["mask"], lp, 0.0).sum(-1)
    beta = 0.3
    _, aux = jax.jit(
        lambda x, w, b: fusedloss.linear_preference_loss(
            x, w, d["tokens"], bias=b, where=d["mask"], ref_log_probs=d["ref"], beta=beta,
            return_aux=True,
        )
    )(d["x"], d["w"], d["bias"])  # fmt: skip
    chosen = beta * (s[:P] - d["ref"][:P])
    rejected = beta * (s[P:] - d["ref"][P:])
    counted = np.array([True, True, False])
    np.testing.assert_allclose(aux.chosen_rewards, np.where(counted, chosen, 0), rtol=1e-5)
    np.testing.assert_allclose(aux.rejected_rewards, np.where(counted, rejected, 0), rtol=1e-5)
    margin = (chosen - rejected)[counted]
    np.testing.assert_allclose(aux.reward_margin, margin.mean(), rtol=1e-5)
    np.testing.assert_allclose(aux.reward_accuracy, np.mean(margin > 0))
    nll = -np.concatenate([lp[i][d["mask"][i]] for i in range(2)]).mean()
    np.testing.assert_allclose(aux.nll, nll, rtol=1e-5)
    assert int(aux.num_pairs) == 2


# ---------------------------------------------------------------------------------
# Empty completions, all-masked rows


def test_all_masked_and_empty_give_zero_and_zero_gradients():
    rng = np.random.default_rng(5)
    lp = jnp.asarray(np.where(rng.random((4, 6)) < 0.5, np.nan, -1.0), jnp.float32)
    none = jnp.zeros((4, 6), bool)
    adv = jnp.ones((4,))
    ref = jnp.full((4,), jnp.nan)
    cases = {
        "grpo": lambda lp: fusedloss.policy_gradient_loss(
            lp, adv, where=none, old_log_probs=lp, ref_log_probs=lp, beta=0.1),
        "gspo": lambda lp: fusedloss.policy_gradient_loss(
            lp, adv, where=none, importance_sampling_level="sequence"),
        "dr_grpo_sft": lambda lp: fusedloss.policy_gradient_loss(
            lp, adv, where=none, loss_type="dr_grpo", sft_where=none, sft_coef=1.0),
        "dpo": lambda lp: fusedloss.preference_loss(lp, where=none, ref_log_probs=ref),
        "orpo": lambda lp: fusedloss.preference_loss(lp, where=none, loss_type="orpo"),
        "simpo": lambda lp: fusedloss.preference_loss(lp, where=none, loss_type="simpo"),
        "kto": lambda lp: fusedloss.kto_loss(
            lp, jnp.array([True, False, True, False]), where=none, ref_log_probs=ref,
            kl_rows=jnp.array([False, False, True, True])),
    }  # fmt: skip
    outs = jax.jit(lambda lp: {k: jax.value_and_grad(f)(lp) for k, f in cases.items()})(lp)
    for name, (value, grad) in outs.items():
        assert float(value) == 0.0, name
        assert not np.any(np.asarray(grad)), name
    # A fused call with empty completions (T = 0) and an all-masked batch.
    x, w, _, tokens = _head(rng, 2, 0)
    f = lambda x, w: fusedloss.linear_preference_loss(x, w, tokens, loss_type="simpo")
    value, (gx, gw) = jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)
    assert float(value) == 0.0 and gx.shape == x.shape and not np.any(np.asarray(gw))
    x, w, _, tokens = _head(rng, 2, 3)
    x[0, 1] = np.nan  # an excluded token's hidden state is not read
    aux_f = functools.partial(
        fusedloss.linear_policy_gradient_loss, where=jnp.zeros((2, 3), bool), return_aux=True
    )
    (value, aux), (gx, gw) = jax.jit(
        jax.value_and_grad(lambda x, w: aux_f(x, w, tokens, jnp.ones((2,))), (0, 1), has_aux=True)
    )(x, w)
    assert float(value) == 0.0 and int(aux.num_tokens) == 0 and float(aux.ratio_max) == 0.0
    assert not np.any(np.asarray(gx)) and not np.any(np.asarray(gw))


# ---------------------------------------------------------------------------------
# Bad arguments


def test_bad_arguments_name_the_argument():
    lp = jnp.zeros((3, 4))
    adv = jnp.zeros((3,))
    pg = fusedloss.policy_gradient_loss
    cases = [
        (ValueError, "`log_probs` must hold chosen and rejected.*got batch 3",
         lambda: fusedloss.preference_loss(lp, ref_log_probs=jnp.zeros(3))),
        (ValueError, "`tokens` must hold chosen and rejected.*got batch 3",
         lambda: fusedloss.linear_preference_loss(
             jnp.zeros((3, 4, 2)), jnp.zeros((2, 5)), jnp.zeros((3, 4), jnp.int32))),
        (ValueError, r"`epsilon_low` must be in \(0.0, inf\), got 0.0",
         lambda: pg(lp, adv, epsilon_low=0.0)),
        (ValueError, r"`epsilon_high` must be in \(0.0, inf\), got -0.1",
         lambda: pg(lp, adv, epsilon_high=-0.1)),
        (ValueError, r"`clip_ratio_c` must be in \(1.0, inf\), got 0.5",
         lambda: pg(lp, adv, clip_ratio_c=0.5)),
        (ValueError, "`loss_type` must be one of .*got 'reinforce'",
         lambda: pg(lp, adv, loss_type="reinforce")),
        (ValueError, "`loss_agg_mode` must be one of .*got 'mean'",
         lambda: pg(lp, adv, loss_agg_mode="mean")),
        (ValueError, "`loss_scale_factor` is required",
         lambda: pg(lp, adv, loss_agg_mode="token-sum-norm")),
        (ValueError, "`kl_estimator` must be one of .*got 'k4'",
         lambda: pg(lp, adv, kl_estimator="k4")),
        (ValueError, "`kl_estimator='full'`.*cannot share the one fused pass",
         lambda: pg(lp, adv, kl_estimator="full")),
        (ValueError, "`importance_sampling_level` must be one of",
         lambda: pg(lp, adv, importance_sampling_level="seq")),
        (ValueError, r"`advantages` must have shape \(3,\) \(per sequence\) or \(3, 4\)",
         lambda: pg(lp, jnp.zeros((4,)))),
        (ValueError, "`ref_log_probs` is required when `beta` > 0",
         lambda: pg(lp, adv, beta=0.1)),
        (ValueError, "`entropy` is required", lambda: pg(lp, adv, entropy_coef=0.1)),
        (ValueError, r"`old_log_probs` must have shape \(3, 4\)",
         lambda: pg(lp, adv, old_log_probs=jnp.zeros((3, 5)))),
        (TypeError, "`where` must be a boolean array", lambda: pg(lp, adv, where=lp)),
        (ValueError, "`loss_type` must be one of .*got 'dpo'",
         lambda: fusedloss.preference_loss(jnp.zeros((2, 3)), loss_type="dpo")),
        (ValueError, "`ref_log_probs`.*is required by loss_type='sigmoid'",
         lambda: fusedloss.preference_loss(jnp.zeros((2, 3)))),
        (ValueError, r"`ref_log_probs` must have shape \(2,\)",
         lambda: fusedloss.preference_loss(jnp.zeros((2, 3)), ref_log_probs=jnp.zeros(3))),
        (ValueError, "loss_type='simpo' uses no reference",
         lambda: fusedloss.preference_loss(jnp.zeros((2, 3)), loss_type="simpo",
                                           ref_log_probs=jnp.zeros(2))),
        (ValueError, r"`label_smoothing` must be in \[0, 0.5\)",
         lambda: fusedloss.preference_loss(jnp.zeros((2, 3)), ref_log_probs=jnp.zeros(2),
                                           label_smoothing=0.5)),
        (ValueError, r"`beta` must be in \(0.0, inf\)",
         lambda: fusedloss.preference_loss(jnp.zeros((2, 3)), ref_log_probs=jnp.zeros(2),
                                           beta=0.0)),
        (ValueError, "either `ref_log_probs` or a reference head",
         lambda: fusedloss.linear_preference_loss(
             jnp.zeros((2, 3, 2)), jnp.zeros((2, 5)), jnp.zeros((2, 3), jnp.int32),
             ref_log_probs=jnp.zeros(2), ref_x=jnp.zeros((2, 3, 2)), ref_w=jnp.zeros((2, 5)))),
        (ValueError, r"`desirable` must have shape \(2,\)",
         lambda: fusedloss.kto_loss(jnp.zeros((2, 3)), jnp.zeros(3, bool),
                                    ref_log_probs=jnp.zeros(2))),
        (ValueError, "either `kl_baseline` or `kl_rows`",
         lambda: fusedloss.kto_loss(jnp.zeros((2, 3)), jnp.zeros(2, bool),
                                    ref_log_probs=jnp.zeros(2), kl_baseline=jnp.float32(1),
                                    kl_rows=jnp.zeros(2, bool))),
        (ValueError, r"`x` must have shape \[batch, completion_length, D\]",
         lambda: fusedloss.linear_policy_gradient_loss(
             jnp.zeros((6, 2)), jnp.zeros((2, 5)), jnp.zeros((2, 3), jnp.int32), adv[:2])),
    ]  # fmt: skip
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()


# ---------------------------------------------------------------------------------
# One fused call on w; compiled temporaries at Llama-3-8B's head


def _engine_calls_on(jaxpr, shape):
    """Stats-core calls (the engine's ``custom_jvp``) that read an operand of ``shape``."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_jvp_call" and any(
            getattr(v.aval, "shape", None) == shape for v in eqn.invars
        ):
            count += 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    count += _engine_calls_on(sub.jaxpr, shape)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    count += _engine_calls_on(sub, shape)
    return count


def _objectives(tokens, ref_shape_x, ref_shape_w, cfg):
    """Each fused objective with all its terms on, and a frozen reference head."""
    b = tokens.shape[0]
    s = jax.ShapeDtypeStruct
    ref_x, ref_w = s(ref_shape_x, jnp.float32), s(ref_shape_w, jnp.float32)
    sft = jnp.zeros(tokens.shape, bool).at[0].set(True)
    common = dict(implementation="xla", config=cfg)
    return {
        "policy_gradient": lambda x, w, rx, rw: fusedloss.linear_policy_gradient_loss(
            x, w, tokens, jnp.ones((b,)), ref_x=rx, ref_w=rw, beta=0.04, entropy_coef=0.01,
            sft_where=sft, sft_coef=0.1, old_log_probs=jnp.zeros(tokens.shape), **common),
        "preference": lambda x, w, rx, rw: fusedloss.linear_preference_loss(
            x, w, tokens, ref_x=rx, ref_w=rw, loss_type="rpo", **common),
        "kto": lambda x, w, rx, rw: fusedloss.linear_kto_loss(
            x, w, tokens, jnp.arange(b) % 2 == 0, ref_x=rx, ref_w=rw,
            kl_rows=jnp.arange(b) >= b - 2, **common),
    }, (ref_x, ref_w)  # fmt: skip


def test_each_objective_makes_one_fused_call_on_w():
    """From the jaxpr: exactly one engine call (the statistics core, a ``custom_jvp``)
    reads the trained head ``w``, and one the frozen reference head (another width).
    Its backward is the transpose of that one call; that it holds one ``dw`` is what
    the compiled-temporaries test below measures."""
    s = jax.ShapeDtypeStruct
    tokens = jnp.zeros((4, 8), jnp.int32)
    x, w = s((4, 8, 16), jnp.float32), s((16, 3000), jnp.float32)
    cfg = fusedloss.XlaConfig(strategy="recompute", vocab_chunk=512)
    fns, refs = _objectives(tokens, (4, 8, 24), (24, 3000), cfg)
    for name, f in fns.items():
        fwd = jax.make_jaxpr(f)(x, w, *refs).jaxpr
        assert _engine_calls_on(fwd, (16, 3000)) == 1, name
        assert _engine_calls_on(fwd, (24, 3000)) == 1, name

    def two_calls(x, w, rx, rw):  # what the count must catch: chosen, rejected apart
        lp = [fusedloss.linear_log_probs(x[i : i + 2], w, tokens[i : i + 2], **common)
              for i in (0, 2)]  # fmt: skip
        return fusedloss.preference_loss(jnp.concatenate(lp), ref_log_probs=jnp.zeros(4))

    common = dict(implementation="xla", config=cfg)
    assert _engine_calls_on(jax.make_jaxpr(two_calls)(x, w, *refs).jaxpr, (16, 3000)) == 2


def test_memory_llama3_8b_head_one_pass():
    """value_and_grad w.r.t. (x, w) at N=8192, D=4096, V=128256, f32: each objective's
    temporaries are at most one ``linear_log_probs`` call's (with entropy) + 10%."""
    s = jax.ShapeDtypeStruct
    n_rows, t, d, v = 16, 512, 4096, 128256
    tokens = s((n_rows, t), jnp.int32)
    x, w = s((n_rows, t, d), jnp.float32), s((d, v), jnp.float32)
    ref = s((n_rows,), jnp.float32)

    def temp(f, *args):
        lowered = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*args)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    def one_call(x, w, y):
        lp, ent = fusedloss.linear_log_probs(x, w, y, return_entropy=True)
        return jnp.sum(lp) + 0.01 * jnp.sum(ent)

    def grpo(x, w, y, old):
        return fusedloss.linear_policy_gradient_loss(
            x, w, y, jnp.ones((n_rows,)), old_log_probs=old, entropy_coef=0.01,
            loss_type="dapo", epsilon_high=0.28,
        )  # fmt: skip

    def dpo(x, w, y, ref):
        return fusedloss.linear_preference_loss(x, w, y, ref_log_probs=ref, loss_type="rpo")

    base = temp(one_call, x, w, tokens)
    got = {
        "grpo": temp(grpo, x, w, tokens, s((n_rows, t), jnp.float32)),
        "dpo": temp(dpo, x, w, tokens, ref),
    }
    assert base < 400 * 2**20, base
    for name, b in got.items():
        assert b <= 1.1 * base, (name, b / 2**20, base / 2**20)


def test_check_grads_both_modes_float64():
    """``jax.test_util.check_grads`` in forward and reverse mode on the objectives, the
    fused ones included (float64, away from the clip boundaries and hinge kinks)."""
    from jax.test_util import check_grads

    rng = np.random.default_rng(11)
    b, t, d, v = 4, 5, 6, 29
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(b, t, d)))
        w = jnp.asarray(rng.normal(size=(d, v)) / 2)
        tokens = jnp.asarray(rng.integers(0, v, (b, t)))
        where = jnp.asarray(rng.random((b, t)) < 0.8).at[:, 0].set(True)
        adv = jnp.asarray(rng.normal(size=b))
        ref = jnp.asarray(-rng.uniform(5, 10, b))

        old = fusedloss.linear_log_probs(x, w, tokens) + 0.01  # ratios inside the clip

        def grpo(x, w):
            return fusedloss.linear_policy_gradient_loss(
                x, w, tokens, adv, where=where, old_log_probs=old, beta=0.05,
                ref_log_probs=old - 0.1, entropy_coef=0.01,
            )  # fmt: skip

        def dpo(x, w):
            return fusedloss.linear_preference_loss(
                x, w, tokens, where=where, ref_log_probs=ref, nll_coef=0.5
            )

        def kto(x, w):
            desirable = jnp.asarray([True, False, True, False])
            return fusedloss.linear_kto_loss(
                x, w, tokens, desirable, where=where, ref_log_probs=ref
            )

        for f in (grpo, dpo, kto):
            check_grads(jax.jit(f), (x, w), order=1, modes=("fwd", "rev"))
