"""Why GaLore's refresh keeps LAPACK's SVD: the Gram-matrix shortcut is faster and wrong.

A ``basis="svd"`` refresh needs, for GaLore's default ``std`` side, the top-``r`` singular
vectors along the shorter axis of each ``(in, out)`` gradient. Two ways:

- ``svd``: ``jnp.linalg.svd`` of the whole matrix (``projection.svd_basis``; LAPACK ``gesdd``
  on the CPU), what the refresh uses;
- ``gram``: the top eigenvectors of ``A Aᵀ`` (a matmul and LAPACK ``syevd`` of
  ``min(in, out)`` square), what the TPU path uses because XLA's TPU SVD compiles for minutes.

Part 1 times both, jitted, per distinct matrix shape of the model (interleaved repeats,
medians), and the whole refresh of the model's targeted matrices as a ratio ``gram / svd``.

Part 2 times the whole refresh of every targeted matrix (one jitted program, random gradients)
for each ``basis`` kind and for the Gram route, as ratios to ``basis="svd"``.

Part 3 checks the vectors on real gradients: it trains the default job's model
(``lowrank-jax train`` defaults: ``llama_20m`` on the embedded corpus) with AdamW and, at a few
steps, compares each float32 basis of every targeted gradient with a float64 SVD of the same
gradient: the sine of the largest principal angle between the top-``k`` subspaces, ``k`` =
16, 32, 48, 64 (median and worst over the matrices), and ``σ_r / σ_1``. Squaring the matrix
squares its spread: where ``σ_i / σ_1`` falls below ~3e-4 the Gram matrix's float32 round-off
swamps ``σ_i²``, and those vectors are noise. Real gradients are that low-rank (``σ_64 / σ_1``
has a median of 5e-5 after 100 steps), so the Gram basis is only right for its first few
vectors, while LAPACK's float32 SVD is right to ~1e-3 for the top 48.

    python benchmarks/svd_basis.py                 # llama_20m shapes, default job's gradients
    python benchmarks/svd_basis.py --model llama_60m --skip-accuracy

Writes ``benchmarks/results/svd_basis_<model>_<platform>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # optimizer_step

import lowrank_jax as lr  # noqa: E402
from lowrank_jax import projection  # noqa: E402


def gram_basis(g: jax.Array, rank: int, side: str) -> jax.Array:
    """Top-``rank`` eigenvectors of the shorter side's Gram matrix (the TPU path's route)."""
    g = g.astype(jnp.float32)
    a = g if side == "in" else jnp.swapaxes(g, -1, -2)
    with jax.default_matmul_precision("float32"):
        _, vectors = jnp.linalg.eigh(a @ jnp.swapaxes(a, -1, -2))
    return vectors[..., ::-1][..., :rank]


def targeted_shapes(model: str) -> dict[tuple[int, int], int]:
    """``{(in, out): count}`` of the matrices GaLore projects in ``model``."""
    from optimizer_step import param_shapes

    shapes = param_shapes(model)
    mask = lr.targets.resolve(None, shapes)
    counts: dict[tuple[int, int], int] = {}
    for leaf, targeted in zip(jax.tree.leaves(shapes), jax.tree.leaves(mask)):
        if targeted:
            key = tuple(int(d) for d in leaf.shape[-2:])
            counts[key] = counts.get(key, 0) + int(np.prod(leaf.shape[:-2], dtype=int))
    return counts


KS = (16, 32, 48, 64)


def _side(shape: tuple[int, int]) -> str:
    return projection.choose_side("std", *shape)


def timing(model: str, rank: int, repeats: int) -> dict:
    counts = targeted_shapes(model)
    rows, total = {}, {"svd": 0.0, "gram": 0.0}
    for (n_in, n_out), count in sorted(counts.items()):
        g = jax.random.normal(jax.random.key(0), (n_in, n_out), jnp.float32)
        side = _side((n_in, n_out))
        fns = {
            "svd": jax.jit(lambda g: projection.svd_basis(g, rank)),
            "gram": jax.jit(lambda g, side=side: gram_basis(g, rank, side)),
        }
        times: dict[str, list[float]] = {name: [] for name in fns}
        for fn in fns.values():
            jax.block_until_ready(fn(g))
        for i in range(repeats):
            for name in fns if i % 2 == 0 else reversed(list(fns)):
                start = time.perf_counter()
                jax.block_until_ready(fns[name](g))
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        rows[f"{n_in}x{n_out}"] = {
            "count": count,
            "side": side,
            "svd_ms": 1e3 * med["svd"],
            "gram_ms": 1e3 * med["gram"],
            "ratio_gram_to_svd": med["gram"] / med["svd"],
        }
        for name in total:
            total[name] += count * med[name]
    return {
        "shapes": rows,
        "refresh_ratio_gram_to_svd": total["gram"] / total["svd"],
        "note": "per-shape medians x the model's count of that shape; one thread of work at a "
        "time, as the refresh's lax.map runs them",
    }


def whole_refresh(model: str, rank: int, repeats: int) -> dict:
    """Seconds to recompute every targeted matrix's projector once (one jitted program, random
    gradients), per basis kind, and ``"gram"``: the Gram matrix's eigenvectors instead."""
    from optimizer_step import param_shapes, random_tree

    shapes = param_shapes(model)
    mask = jax.tree.leaves(lr.targets.resolve(None, shapes))
    mats = [g for g, m in zip(jax.tree.leaves(random_tree(shapes, 1)), mask) if m]

    def one(g: jax.Array, kind: str, key: jax.Array) -> jax.Array:
        side = _side(g.shape)
        if kind == "gram":
            return projection.canonical_signs(gram_basis(g, rank, side))
        proj = projection.compute_projector(g, side, rank, kind, key)
        return proj.in_basis if side == "in" else proj.out_basis

    fns = {
        kind: jax.jit(lambda mats, key, kind=kind: [
            one(g, kind, jax.random.fold_in(key, i)) for i, g in enumerate(mats)
        ])
        for kind in ("gram", *projection.BASIS_KINDS)
    }
    key = jax.random.key(0)
    times: dict[str, list[float]] = {kind: [] for kind in fns}
    for fn in fns.values():
        jax.block_until_ready(fn(mats, key))
    for i in range(repeats):
        for kind in fns if i % 2 == 0 else reversed(list(fns)):
            start = time.perf_counter()
            jax.block_until_ready(fns[kind](mats, key))
            times[kind].append(time.perf_counter() - start)
    seconds = {kind: statistics.median(t) for kind, t in times.items()}
    return {
        "seconds": seconds,
        "ratio_to_svd": {kind: t / seconds["svd"] for kind, t in seconds.items()},
    }


def accuracy(rank_div: int, checkpoints: list[int], out_dir: str) -> list[dict]:
    import optax
    from flax import nnx

    from lowrank_jax.models import Llama
    from lowrank_jax.train import RunConfig, run_dataset, run_model_config
    from lowrank_jax.train.step import _loss_fn

    cfg = RunConfig(out=out_dir)  # the BPE tokenizer is trained once and kept there
    data = run_dataset(cfg)
    model_config = run_model_config(cfg, data.tokenizer.vocab_size)
    model = Llama(model_config, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    loss = _loss_fn(nnx.graphdef(model))
    tx = optax.adamw(3e-3)
    opt_state = tx.init(params)
    rank = model_config.hidden_size // rank_div
    mask = lr.targets.resolve(None, params)

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    train = np.asarray(data.train)
    rng = np.random.default_rng(0)
    out = []
    for it in range(max(checkpoints) + 1):
        batch = jnp.asarray(train[rng.integers(0, len(train), cfg.batch_size)])
        params, opt_state, grads = step(params, opt_state, batch)
        if it not in checkpoints:
            continue
        rows = []
        for g, targeted in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)):
            if not targeted:
                continue
            side = _side(g.shape)
            x = np.asarray(g, np.float64)
            u, sigma, vt = np.linalg.svd(x, full_matrices=False)
            exact = u[:, :rank] if side == "in" else vt[:rank].T
            lapack = projection.svd_basis(g, rank)
            bases = {"svd": np.asarray(lapack[0] if side == "in" else lapack[1], np.float64),
                     "gram": np.asarray(gram_basis(g, rank, side), np.float64)}
            row = {"sigma_r_over_sigma_1": float(sigma[rank - 1] / sigma[0])}
            for name, b in bases.items():
                for k in KS:
                    cos = np.linalg.svd(exact[:, :k].T @ b[:, :k], compute_uv=False)
                    row[f"{name}_top{k}"] = float(np.sqrt(max(0.0, 1 - cos.min() ** 2)))
            rows.append(row)
        worst = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            worst[key] = {"median": float(np.median(values)), "max": float(np.max(values)),
                          "min": float(np.min(values))}
        out.append({"step": it, **worst})
        print(f"step {it}: sigma_r/sigma_1 median {worst['sigma_r_over_sigma_1']['median']:.1e}; "
              + "; ".join(f"top-{k} sin angle svd {worst[f'svd_top{k}']['median']:.1e} / gram "
                          f"{worst[f'gram_top{k}']['median']:.1e}" for k in KS), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_20m")
    parser.add_argument("--rank", type=int, default=None, help="default hidden_size // 4")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--accuracy-steps", default="0,10,100,300",
                        help="AdamW steps at which the bases are compared")
    parser.add_argument("--run-dir", default=os.path.join(tempfile.gettempdir(),
                                                          "lowrank_jax_svd_basis"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from lowrank_jax.models import get_config

    config = get_config(args.model)
    rank = args.rank or config.hidden_size // 4
    result = {
        "model": args.model,
        "rank": rank,
        "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} cores",
        "timing": timing(args.model, rank, args.repeats),
        "command": " ".join(["python benchmarks/svd_basis.py", *(sys.argv[1:] if argv is None
                                                                   else argv)]),
    }
    for shape, row in result["timing"]["shapes"].items():
        print(f"{shape} x{row['count']} ({row['side']}): svd {row['svd_ms']:.1f} ms, "
              f"gram {row['gram_ms']:.1f} ms, ratio {row['ratio_gram_to_svd']:.2f}")
    print(f"whole refresh: gram / svd = {result['timing']['refresh_ratio_gram_to_svd']:.2f}")
    result["whole_refresh"] = whole_refresh(args.model, rank, max(3, args.repeats // 4))
    print("whole refresh, one program, time / basis='svd': " + ", ".join(
        f"{kind} {r:.2f}x" for kind, r in result["whole_refresh"]["ratio_to_svd"].items()))
    if not args.skip_accuracy:
        result["accuracy"] = {
            "gradients": "lowrank-jax train defaults (llama_20m, embedded corpus), AdamW 3e-3",
            "rank": "hidden_size // 4",
            "checkpoints": accuracy(
                4, [int(x) for x in args.accuracy_steps.split(",")], args.run_dir
            ),
        }
    path = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"svd_basis_{args.model}_{jax.default_backend()}.json",
    )
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
