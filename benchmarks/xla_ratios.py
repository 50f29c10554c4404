"""Time ratios of the chunked ``xla`` strategies to the materialized path on this device.

``python benchmarks/xla_ratios.py`` times ``jax.value_and_grad`` w.r.t. ``x`` and ``w``
of ``linear_cross_entropy`` at N=2048, D=1024, V=32000 (float32 by default) for the
materialized ``reference``, ``xla`` with ``grad_in_forward`` and ``xla`` with
``recompute``, all in one process (their calls interleaved), and prints the medians
and the ratios. With
``--tied`` every contender gets ``w = embedding.T`` of a ``[V, D]`` embedding (and the
gradient is the embedding's), as a model with tied embeddings calls it.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fusedloss import XlaConfig, linear_cross_entropy


def interleaved_medians(fns: dict, args, reps: int) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin.

    One call of each per round, so that drift in the machine's speed (other load,
    clocks) reaches every contender alike instead of biasing their ratios.
    """
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile and warm up
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--tied", action="store_true", help="pass w as embedding.T")
    a = p.parse_args(argv)
    k = jax.random.split(jax.random.key(0), 3)
    dt = jnp.dtype(a.dtype)
    x = jax.random.normal(k[0], (a.tokens, a.d), dt)
    w = (jax.random.normal(k[1], (a.d, a.vocab)) / np.sqrt(a.d)).astype(dt)
    if a.tied:
        w = jnp.asarray(w.T)  # the [V, D] embedding; the loss sees w.T
    y = jax.random.randint(k[2], (a.tokens,), 0, a.vocab)
    contenders = {
        "materialized": dict(implementation="reference"),
        "grad_in_forward": dict(implementation="xla", config=XlaConfig("grad_in_forward")),
        "recompute": dict(implementation="xla", config=XlaConfig("recompute")),
    }
    fns = {}
    for name, kw in contenders.items():

        def loss(x, w, y, kw=kw):
            return linear_cross_entropy(x, w.T if a.tied else w, y, **kw)

        fns[name] = jax.jit(jax.value_and_grad(loss, (0, 1)))
    times = interleaved_medians(fns, (x, w, y), a.reps)
    base = times["materialized"]
    tied = ", w = embedding.T" if a.tied else ""
    print(f"N={a.tokens} D={a.d} V={a.vocab} {a.dtype}{tied} on {jax.devices()[0].device_kind}")
    for name, t in times.items():
        print(f"{name:>16}: {t * 1e3:9.1f} ms   ratio to materialized {t / base:5.2f}x")
    return {name: t / base for name, t in times.items()}


if __name__ == "__main__":
    main()
