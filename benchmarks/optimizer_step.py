"""Optimizer step time and state memory on LLaMA parameter shapes.

Steady-state step (jitted, params and state donated, no projector refresh) for optax.adamw,
optax.contrib.galore, lowrank_jax.galore_adamw (and galore-torch next to torch's AdamW when
torch is installed), Fira, APOLLO, APOLLO-Mini, 8-bit AdamW, 8-bit GaLore, LISA (no
resampling in the timed steps either), GaLore 2, GoLore (random phase), Flora, BAdam, Q-GaLore
(INT4 projectors, float weights), GradNormLoRP and SST (no resampling or re-SVD timed), every
time also as a ratio to optax.adamw measured in
the same run; plus the cost of one projector refresh per basis kind. Embeddings, head and
norms are not projected by any of the GaLore variants.

    python benchmarks/optimizer_step.py                    # llama_60m, rank 128 (the README)
    python benchmarks/optimizer_step.py --model llama_tiny --rank 8 --rounds 2   # smoke test

Writes ``benchmarks/results/optimizer_step_<model>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lowrank_jax as lr
from lowrank_jax import projection
from lowrank_jax.models.llama import Llama, get_config
from lowrank_jax.optimizers import (
    adamw_8bit,
    apollo_adamw,
    apollo_mini,
    badam_adamw,
    fira_adamw,
    flora_adafactor,
    galore2_adamw,
    galore_adamw_8bit,
    golore_adamw,
    lisa_adamw,
    q_galore_adamw_8bit,
)
from lowrank_jax.transforms import gradnorm_lorp_adamw, sst_adamw, sst_init

RESULTS = pathlib.Path(__file__).with_name("results")


def param_shapes(model: str) -> dict:
    """``{path: ShapeDtypeStruct}`` of a LLaMA config, without allocating it (nnx.eval_shape)."""
    abstract = nnx.eval_shape(lambda: Llama(get_config(model), rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def random_tree(shapes: dict, seed: int) -> dict:
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)]
    )


def optax_galore(rank: int, gap: int, shapes: dict) -> optax.GradientTransformation:
    """optax.contrib.galore on the same targets as ours (its default also projects embeddings)."""
    mask = lr.targets.resolve(None, shapes)
    dims = jax.tree.map(
        lambda m: optax.contrib.GaLoreDimensionNumbers(0, 1) if m else None, mask
    )
    return optax.contrib.galore(
        1e-3, rank=rank, update_proj_gap=gap, scale=0.25, weight_dimension_numbers=lambda p: dims
    )


def candidates(
    rank: int, gap: int, shapes: dict
) -> dict[str, Callable[[], optax.GradientTransformation]]:
    return {
        "optax.adamw": lambda: optax.adamw(1e-3),
        "optax.contrib.galore": lambda: optax_galore(rank, gap, shapes),
        "lowrank_jax.galore_adamw": lambda: lr.galore_adamw(1e-3, rank=rank, update_proj_gap=gap),
        "lowrank_jax.fira_adamw": lambda: fira_adamw(1e-3, rank=rank, update_proj_gap=gap),
        "lowrank_jax.apollo_adamw": lambda: apollo_adamw(1e-3, rank=rank, update_proj_gap=gap),
        "lowrank_jax.apollo_mini": lambda: apollo_mini(1e-3, update_proj_gap=gap),
        "lowrank_jax.adamw_8bit": lambda: adamw_8bit(1e-3, weight_decay=0.0),
        "lowrank_jax.galore_adamw_8bit": lambda: galore_adamw_8bit(
            1e-3, rank=rank, update_proj_gap=gap, weight_decay=0.0
        ),
        "lowrank_jax.lisa_adamw": lambda: lisa_adamw(1e-3, n_active=2, interval=gap),
        "lowrank_jax.galore2_adamw": lambda: galore2_adamw(1e-3, rank=rank, update_proj_gap=gap),
        "lowrank_jax.golore_adamw": lambda: golore_adamw(
            1e-3, rank=rank, update_proj_gap=gap, random_after=0
        ),
        "lowrank_jax.flora_adafactor": lambda: flora_adafactor(1e-3, rank=rank, kappa=gap),
        "lowrank_jax.badam_adamw": lambda: badam_adamw(1e-3, switch_every=gap),
        "lowrank_jax.q_galore_adamw_8bit": lambda: q_galore_adamw_8bit(
            1e-3, rank=rank, update_proj_gap=gap
        ),
        "lowrank_jax.gradnorm_lorp_adamw": lambda: gradnorm_lorp_adamw(
            1e-3, rank=rank, update_proj_gap=gap
        ),
        # SST updates its spectral factors (sst_init) from the dense gradient
        "lowrank_jax.sst_adamw": lambda: sst_adamw(1e-3, rank=rank, iteration=gap),
    }


# the optimizers whose parameters are not the dense ones: how to build them
PARAMS_OF = {"lowrank_jax.sst_adamw": sst_init}



def time_jax(make_tx, params, grads, rounds: int, steps: int) -> tuple[list[float], int]:
    """Per-step seconds for ``rounds`` timed blocks of ``steps`` steadystate steps."""
    tx = make_tx()
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, params)
    params, state = step(params, state, grads)  # compile + step 0 (the refresh)
    jax.block_until_ready(params)
    return _rounds(lambda p, s: step(p, s, grads), params, state, rounds, steps)


def _rounds(run, params, state, rounds, steps):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            params, state = run(params, state)
        jax.block_until_ready((params, state))
        times.append((time.perf_counter() - start) / steps)
    return times, lr.memory.tree_bytes(state)


def time_torch(
    shapes: dict, rank: int, gap: int, rounds: int, steps: int
) -> dict[str, list[float]]:
    """galore-torch GaLoreAdamW and torch.optim.AdamW on the same shapes (PyTorch layout)."""
    import torch
    from galore_torch import GaLoreAdamW

    mask = lr.targets.resolve(None, shapes)
    flat = [
        (s.shape[::-1] if len(s.shape) == 2 else s.shape, m)
        for s, m in zip(jax.tree.leaves(shapes), jax.tree.leaves(mask))
    ]
    out = {}
    for name in ("torch.optim.AdamW", "galore_torch.GaLoreAdamW"):
        params = [torch.nn.Parameter(0.02 * torch.randn(shape)) for shape, _ in flat]
        for p in params:
            p.grad = 0.02 * torch.randn(p.shape)
        if name == "torch.optim.AdamW":
            opt = torch.optim.AdamW(params, lr=1e-3)
        else:
            galore = [p for p, (_, m) in zip(params, flat) if m]
            regular = [p for p, (_, m) in zip(params, flat) if not m]
            opt = GaLoreAdamW(
                [
                    {"params": regular},
                    {"params": galore, "rank": rank, "update_proj_gap": gap, "scale": 0.25,
                     "proj_type": "std"},
                ],
                lr=1e-3,
            )
        opt.step()  # the refresh step
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times.append((time.perf_counter() - start) / steps)
        out[name] = times
    return out


def refresh_costs(shapes: dict, grads: dict, rank: int, rounds: int) -> dict[str, float]:
    """Seconds to recompute every projector once, per basis kind."""
    mask = jax.tree.leaves(lr.targets.resolve(None, shapes))
    mats = [g for g, m in zip(jax.tree.leaves(grads), mask) if m]
    costs = {}
    for kind in projection.BASIS_KINDS:

        @jax.jit
        def refresh(mats, key, kind=kind):
            out = []
            for i, g in enumerate(mats):
                side = projection.choose_side("std", *g.shape)
                out.append(
                    projection.compute_projector(
                        g, side, min(rank, *g.shape), kind, jax.random.fold_in(key, i)
                    )
                )
            return out

        key = jax.random.key(0)
        jax.block_until_ready(refresh(mats, key))
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            jax.block_until_ready(refresh(mats, key))
            times.append(time.perf_counter() - start)
        costs[kind] = statistics.median(times)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_60m")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="skip galore-torch")
    args = parser.parse_args()
    if args.steps * args.rounds >= args.gap:
        parser.error("--rounds x --steps must stay below --gap (steady state = no refresh)")

    shapes = param_shapes(args.model)
    params, grads = random_tree(shapes, 0), random_tree(shapes, 1)
    results: dict[str, dict] = {}
    txs = candidates(args.rank, args.gap, shapes)
    for name, make_tx in txs.items():
        start = PARAMS_OF.get(name, lambda p: p)(params)
        times, state = time_jax(make_tx, start, grads, args.rounds, args.steps)
        results[name] = {"seconds": times, "state_bytes": state}
    have_torch = all(importlib.util.find_spec(m) for m in ("torch", "galore_torch"))
    if have_torch and not args.no_torch:
        for name, times in time_torch(shapes, args.rank, args.gap, args.rounds, args.steps).items():
            results[name] = {"seconds": times, "state_bytes": None}
    refresh = refresh_costs(shapes, grads, args.rank, args.rounds)

    base = statistics.median(results["optax.adamw"]["seconds"])
    print(f"\n{args.model}, rank {args.rank}, T={args.gap}; {jax.devices()[0].device_kind}, "
          f"{platform.machine()}; median of {args.rounds} x {args.steps} steady-state steps")
    print(f"{'optimizer':<34}{'step / optax.adamw':>20}{'state':>12}")
    for name, r in results.items():
        r["median_seconds"] = statistics.median(r["seconds"])
        r["ratio_to_optax_adamw"] = r["median_seconds"] / base
        state = lr.memory.human(r["state_bytes"]) if r["state_bytes"] else "-"
        print(f"{name:<34}{r['ratio_to_optax_adamw']:>19.2f}x{state:>12}")
    if "galore_torch.GaLoreAdamW" in results:
        ratio = (results["galore_torch.GaLoreAdamW"]["median_seconds"]
                 / results["torch.optim.AdamW"]["median_seconds"])
        print(f"{'galore-torch / torch AdamW':<34}{ratio:>19.2f}x")
    ours = results["lowrank_jax.galore_adamw"]["median_seconds"]
    theirs = results["optax.contrib.galore"]["median_seconds"]
    print(f"{'lowrank_jax / optax galore':<34}{ours / theirs:>19.2f}x")
    print(f"\nprojector refresh (all {args.model} matrices), ratio to exact SVD:")
    for kind, seconds in refresh.items():
        print(f"  {kind:<12}{seconds / refresh['svd']:>8.3f}x")

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"optimizer_step_{args.model}.json"
    out.write_text(json.dumps({
        "args": vars(args),
        "device": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "results": results,
        "refresh_seconds": refresh,
        "refresh_ratio_to_svd": {k: v / refresh["svd"] for k, v in refresh.items()},
    }, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
