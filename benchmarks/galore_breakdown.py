"""Where does a GaLore step's time go? A hand-written step next to optax.contrib's and ours.

Times, on ``llama_60m`` parameter shapes (rank 128, no refresh in the timed steps), as ratios to
``optax.adamw`` in the same run:

- ``hand-written``: a GaLore-Adam step with fixed projectors -- project, Adam on the
  low-rank moments, project back, apply -- and nothing else (no refresh logic, no weight
  decay, no bias correction), written the obvious way;
- ``hand-written + lax.cond refresh``: the same with the projectors passed through one ``lax.cond``
  that would recompute them by SVD every 200 steps (never taken in the timed steps): the
  price of a jitted, single-compile refresh;
- ``optax.contrib.galore`` and ``lowrank_jax.galore_adamw``, the latter also with
  ``proj_type="reverse_std"``: the side optax.contrib compresses (galore-torch's ``std``
  compresses the other one).

``--single-thread`` pins XLA's CPU backend to one thread, which makes the ratios far less
sensitive to other load on a shared machine (the matmul-bound GaLore step loses more to a busy
core than the bandwidth-bound AdamW step).

    python benchmarks/galore_breakdown.py --single-thread
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_60m")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--single-thread", action="store_true")
    args = parser.parse_args()
    if args.single_thread:  # before JAX starts
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    import jax
    import jax.numpy as jnp
    import optax

    import lowrank_jax as lr

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from optimizer_step import optax_galore, param_shapes, random_tree

    shapes = param_shapes(args.model)
    params, grads = random_tree(shapes, 0), random_tree(shapes, 1)
    mask = lr.targets.resolve(None, shapes)
    rank = args.rank

    def handwritten_init(p, m):
        if not m:
            return (jnp.zeros_like(p), jnp.zeros_like(p), None)
        n_in, n_out = p.shape
        low = (rank, n_out) if n_in <= n_out else (n_in, rank)
        proj = jnp.zeros((min(n_in, n_out), rank), p.dtype)
        return (jnp.zeros(low, p.dtype), jnp.zeros(low, p.dtype), proj)

    def handwritten_leaf(p, g, state, m):
        mu, nu, proj = state
        wide = m and p.shape[0] <= p.shape[1]
        low = (proj.T @ g if wide else g @ proj) if m else g
        mu = 0.9 * mu + 0.1 * low
        nu = 0.999 * nu + 0.001 * low * low
        n = mu / (jnp.sqrt(nu) + 1e-6)
        if m:
            n = 0.25 * (proj @ n if wide else n @ proj.T)
        return p - 1e-3 * n, (mu, nu, proj)

    def handwritten_step(p, s, g):
        leaves, treedef = jax.tree.flatten(p)
        out = [
            handwritten_leaf(*a)
            for a in zip(
                leaves,
                treedef.flatten_up_to(g),
                treedef.flatten_up_to(s),
                treedef.flatten_up_to(mask),
            )
        ]
        return treedef.unflatten([o[0] for o in out]), treedef.unflatten([o[1] for o in out])

    def svd_projector(g):
        if g.shape[0] <= g.shape[1]:
            return jnp.linalg.svd(g, full_matrices=False)[0][:, :rank]
        return jnp.linalg.svd(g, full_matrices=False)[2][:rank].T

    def cond_step(p, s, g):
        count, s = s
        leaves, treedef = jax.tree.flatten(p)
        g_list, s_list = treedef.flatten_up_to(g), treedef.flatten_up_to(s)
        old = [st[2] for st in s_list]
        fresh = lambda: [None if q is None else svd_projector(x) for q, x in zip(old, g_list)]
        new = jax.lax.cond(count % 200 == 0, fresh, lambda: old)
        s_list = [(mu, nu, q) for (mu, nu, _), q in zip(s_list, new)]
        p, s = handwritten_step(p, treedef.unflatten(s_list), g)
        return p, (count + 1, s)

    def optax_step(tx):
        def step(p, s, g):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        return step, tx.init(params)

    candidates = {
        "optax.adamw": optax_step(optax.adamw(1e-3)),
        "hand-written GaLore-Adam": (
            handwritten_step,
            jax.tree.map(handwritten_init, params, mask),
        ),
        "hand-written + lax.cond refresh": (
            cond_step,
            (jnp.int32(1), jax.tree.map(handwritten_init, params, mask)),
        ),
        "optax.contrib.galore": optax_step(optax_galore(rank, 200, shapes)),
        "lowrank_jax.galore_adamw": optax_step(lr.galore_adamw(1e-3, rank=rank)),
        "lowrank_jax.galore_adamw reverse_std": optax_step(
            lr.galore_adamw(1e-3, rank=rank, proj_type="reverse_std")
        ),
    }
    runners = {}
    for name, (step, state) in candidates.items():
        step = jax.jit(step, donate_argnums=(0, 1))
        p, state = step(jax.tree.map(jnp.copy, params), state, grads)  # compile (+ refresh)
        jax.block_until_ready(p)
        runners[name] = [step, p, state]
    times = {name: [] for name in runners}
    for _ in range(args.rounds):  # interleaved, so load changes hit every candidate alike
        for name, (step, p, state) in runners.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                p, state = step(p, state, grads)
            jax.block_until_ready(p)
            times[name].append((time.perf_counter() - start) / args.steps)
            runners[name][1:] = [p, state]
    base = statistics.median(times["optax.adamw"])
    threads = "1 thread" if args.single_thread else "all threads"
    print(
        f"{args.model}, rank {rank}; {jax.default_backend()}, {threads}; median of "
        f"{args.rounds} x {args.steps} steps, ratio to optax.adamw"
    )
    for name, seconds in times.items():
        print(f"  {name:40s} {statistics.median(seconds) / base:5.2f}x")


if __name__ == "__main__":
    main()
