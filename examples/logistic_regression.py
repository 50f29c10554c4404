"""Softmax (multinomial logistic) regression with L-BFGS and the fused loss.

Softmax regression *is* a linear layer followed by softmax cross-entropy, so its
loss is exactly ``fusedloss.linear_cross_entropy(x, w, labels, bias=b)``: the
``[examples, classes]`` logits are never formed, which is what lets the same code
fit many classes on many examples. The data set is made in code (no download):
Gaussian clusters, one per class, in ``--features`` dimensions with overlapping
classes, split into train and test. ``optax.lbfgs`` minimizes the mean training
loss plus an L2 penalty; ``optax.value_and_grad_from_state`` reuses the value and
gradient that L-BFGS's zoom line search already computed.

The script prints the training objective and train/test accuracy per iteration,
then checks the fused loss against the materialized
``fusedloss.softmax_cross_entropy_with_integer_labels(x @ w + b, labels)`` at the
solution.

Usage::

    python examples/logistic_regression.py
    python examples/logistic_regression.py --classes 100 --features 64 --examples 20000
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fusedloss
from fusedloss import regularization
from fusedloss.heads.cross_entropy import linear_cross_entropy


def make_dataset(
    key: jax.Array, num_examples: int, num_features: int, num_classes: int, spread: float
) -> dict[str, jax.Array]:
    """Gaussian clusters: class ``c`` is ``N(mu_c, I)`` with ``|mu_c| ~ spread``."""
    k_mu, k_y, k_x = jax.random.split(key, 3)
    means = spread * jax.random.normal(k_mu, (num_classes, num_features)) / np.sqrt(num_features)
    labels = jax.random.randint(k_y, (num_examples,), 0, num_classes)
    x = means[labels] + jax.random.normal(k_x, (num_examples, num_features))
    return {"x": x, "labels": labels}


def split(data: dict[str, jax.Array], test_fraction: float) -> tuple[dict, dict]:
    n_test = int(len(data["labels"]) * test_fraction)
    return (
        jax.tree.map(lambda a: a[n_test:], data),
        jax.tree.map(lambda a: a[:n_test], data),
    )


def objective(params: dict, data: dict, l2: float) -> jax.Array:
    """Mean softmax cross-entropy of ``x @ w + b`` (fused) plus ``l2 / 2 * |w|^2``."""
    ce = linear_cross_entropy(data["x"], params["w"], data["labels"], bias=params["b"])
    return ce + regularization.l2_regularization(params["w"], scale=l2)


def accuracy(params: dict, data: dict) -> jax.Array:
    _, aux = linear_cross_entropy(
        data["x"], params["w"], data["labels"], bias=params["b"], return_aux=True
    )
    return jnp.mean(aux.correct.astype(jnp.float32))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=6000)
    p.add_argument("--features", type=int, default=20)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--spread", type=float, default=3.0, help="distance scale of class means")
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--tol", type=float, default=1e-4, help="stop when |grad| falls below")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fits the model; returns the per-iteration objective and the final metrics."""
    args = parse_args(argv)
    log = (lambda *a: None) if args.quiet else print
    data = make_dataset(
        jax.random.key(args.seed), args.examples, args.features, args.classes, args.spread
    )
    train, test = split(data, test_fraction=0.25)
    params = {"w": jnp.zeros((args.features, args.classes)), "b": jnp.zeros(args.classes)}

    def value_fn(p):
        return objective(p, train, args.l2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(value_fn)

    @jax.jit
    def step(params, state):
        value, grad = value_and_grad(params, state=state)
        # optax's line search mixes weakly typed scalars and float32, which JAX's
        # "strict" promotion mode (used by our tests) rejects; a no-op by default.
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(
                grad, state, params, value=value, grad=grad, value_fn=value_fn
            )
        return optax.apply_updates(params, updates), state, value, optax.tree.norm(grad)

    metrics = jax.jit(lambda p: (accuracy(p, train), accuracy(p, test)))
    # optax's init state holds weakly typed scalars that the updated state does not;
    # strong types keep the jitted step to one compilation.
    state = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.result_type(x)), opt.init(params))
    log(
        f"{len(train['labels'])} train / {len(test['labels'])} test examples, "
        f"{args.features} features, {args.classes} classes; chance accuracy "
        f"{1 / args.classes:.3f}"
    )
    log(f"{'iter':>4} {'objective':>10} {'|grad|':>9} {'train acc':>9} {'test acc':>9}")
    history = []
    for i in range(args.iters):
        train_acc, test_acc = metrics(params)
        # `value` and `grad_norm` belong to the parameters the step started from.
        new_params, state, value, grad_norm = step(params, state)
        history.append(float(value))
        log(
            f"{i:>4} {float(value):>10.5f} {float(grad_norm):>9.2e} "
            f"{float(train_acc):>9.3f} {float(test_acc):>9.3f}"
        )
        if float(grad_norm) < args.tol:
            break
        params = new_params

    final = float(value_fn(params))
    # The same loss with the logits materialized: equal up to float32 rounding.
    logits = train["x"] @ params["w"] + params["b"].reshape(1, -1)
    materialized = float(
        fusedloss.softmax_cross_entropy_with_integer_labels(logits, train["labels"]).mean()
        + regularization.l2_regularization(params["w"], scale=args.l2)
    )
    train_acc, test_acc = (float(a) for a in metrics(params))
    log(
        f"final objective {final:.6f} (materialized logits: {materialized:.6f}, "
        f"difference {abs(final - materialized):.2g}); train accuracy {train_acc:.3f}, "
        f"test accuracy {test_acc:.3f}"
    )
    return {
        "history": history,
        "objective": final,
        "materialized_objective": materialized,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "params": params,
    }


if __name__ == "__main__":
    main()
