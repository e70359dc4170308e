"""Whole train-step throughput and memory: GaLore vs AdamW on a LLaMA config (CPU by default).

Times the complete jitted step of ``lowrank_jax.train`` (forward, backward, clipping, optimizer
update) for ``optax.adamw`` and ``lowrank_jax.galore_adamw``, interleaved in one process (rounds
alternate the order) so both see the same machine load, and reports tokens/s as a ratio to
AdamW's. GaLore's projector refresh (an SVD per matrix every ``update_proj_gap`` steps) is timed
separately -- the benchmark runs GaLore with a refresh every ``--probe-gap`` steps -- and
amortized over the gaps in the table (50: the CLI's default, 200: the paper's).

Memory, three ways, each labelled: the optimizer state (``lowrank_jax.memory.state_bytes``,
exact); XLA's buffer assignment for the compiled step (arguments + temporaries + outputs -
aliased, i.e. the step's peak live bytes); and the peak RSS of a fresh process that builds and
runs the step (includes the Python/XLA runtime and compilation, so differences are diluted).

Usage::

    python benchmarks/train_step.py                       # llama_20m, batch 8 x 128 tokens
    python benchmarks/train_step.py --model llama_60m --vocab-size 32000 --rounds 5

Writes ``benchmarks/results/train_step_<model>_<platform>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lowrank_jax as lr
from lowrank_jax.models import Llama, get_config
from lowrank_jax.train.step import TrainState, make_train_step

OPTIMIZERS = ("adamw", "galore")
GAPS = (50, 200)


def build(args: argparse.Namespace, name: str):
    """(jitted step, initial TrainState, tx) for optimizer ``name``."""
    config = get_config(args.model, vocab_size=args.vocab_size)
    rank = args.rank or config.hidden_size // 4
    if name == "adamw":
        tx = optax.adamw(1e-3)
    else:
        tx = lr.galore_adamw(1e-2, rank=rank, update_proj_gap=args.probe_gap)
    model = Llama(config, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = TrainState(jnp.int32(0), params, tx.init(params))
    return make_train_step(nnx.graphdef(model), tx, grad_clip=1.0), state, tx


def batches(args: argparse.Namespace):
    rng = np.random.default_rng(0)
    while True:
        yield jnp.asarray(rng.integers(0, args.vocab_size, (args.batch_size, args.seq_len + 1)))


def xla_step_bytes(step, state, batch) -> int:
    """Peak live bytes of the compiled step by XLA's buffer assignment."""
    analysis = step.lower(state, batch).compile().memory_analysis()
    return int(
        analysis.argument_size_in_bytes
        + analysis.temp_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def child_rss(args: argparse.Namespace, name: str) -> int:
    """Peak RSS (bytes) of a fresh process that builds and runs ``name``'s step a few times."""
    cmd = [sys.executable, __file__, "--child", name] + [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k in ("model", "vocab_size", "batch_size", "seq_len", "rank", "probe_gap") and v
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["rss"])


def run_child(args: argparse.Namespace) -> None:
    from lowrank_jax.train.metrics import peak_rss

    step, state, _ = build(args, args.child)
    data = batches(args)
    for _ in range(3):
        state, metrics = step(state, next(data))
    float(metrics["loss"])
    print(json.dumps({"rss": peak_rss()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama_20m")
    parser.add_argument("--vocab-size", type=int, default=259, help="259: the byte tokenizer's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=None, help="default hidden_size // 4")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probe-gap", type=int, default=5, help="GaLore refresh period timed")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    data = batches(args)
    runs = {}
    for name in OPTIMIZERS:
        step, state, tx = build(args, name)
        runs[name] = {
            "step": step,
            "state": state,
            "times": [],
            "refresh_times": [],
            "state_bytes": lr.memory.state_bytes(tx, state.params),
            "xla_bytes": xla_step_bytes(step, state, next(data)),
        }
        runs[name]["state"], metrics = step(runs[name]["state"], next(data))  # compile + refresh
        float(metrics["loss"])
    for r in range(args.rounds):
        for name in OPTIMIZERS if r % 2 == 0 else OPTIMIZERS[::-1]:
            run = runs[name]
            for _ in range(args.steps):
                count = int(run["state"].step)
                batch = next(data)
                began = time.perf_counter()
                run["state"], metrics = run["step"](run["state"], batch)
                float(metrics["loss"])
                elapsed = time.perf_counter() - began
                refresh = name == "galore" and count % args.probe_gap == 0
                run["refresh_times" if refresh else "times"].append(elapsed)

    tokens = args.batch_size * args.seq_len
    # Two estimators of a step's cost on a shared machine: the median (typical) and the minimum
    # (least disturbed by other processes). The refresh overhead is taken the same way.
    stats = {"median": statistics.median, "min": min}
    rows, refresh_extra = {}, {}
    for stat, fn in stats.items():
        adamw_step = fn(runs["adamw"]["times"])
        galore_step = fn(runs["galore"]["times"])
        extra = max(0.0, fn(runs["galore"]["refresh_times"]) - galore_step)
        refresh_extra[stat] = extra
        rows[stat] = [("adamw", adamw_step), ("galore (steady state, no refresh)", galore_step)]
        rows[stat] += [(f"galore (refresh every {g} steps)", galore_step + extra / g) for g in GAPS]
    rss = {name: child_rss(args, name) for name in OPTIMIZERS}
    device = jax.devices()[0]
    result = {
        "model": args.model,
        "vocab_size": args.vocab_size,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rank": args.rank or get_config(args.model).hidden_size // 4,
        "device": f"{device.platform}: {device.device_kind}, {os.cpu_count()} cores",
        "refresh_extra_s": refresh_extra,
        "throughput": {
            stat: {
                label: {"tokens_per_s": tokens / t, "ratio_vs_adamw": table[0][1] / t}
                for label, t in table
            }
            for stat, table in rows.items()
        },
        "memory": {
            name: {
                "opt_state_bytes": runs[name]["state_bytes"],
                "xla_step_peak_bytes": runs[name]["xla_bytes"],
                "process_peak_rss_bytes": rss[name],
            }
            for name in OPTIMIZERS
        },
        "command": " ".join(["python", "benchmarks/train_step.py"] + sys.argv[1:]),
    }
    print(
        f"{args.model}, batch {args.batch_size} x {args.seq_len} tokens, rank {result['rank']}, "
        f"{result['device']}; {args.rounds} rounds x {args.steps} steps"
    )
    print(
        f"{'train step':36s} {'tok/s median':>12s} {'vs adamw':>9s} "
        f"{'tok/s best':>11s} {'vs adamw':>9s}"
    )
    for (label, t_med), (_, t_min) in zip(rows["median"], rows["min"], strict=True):
        base_med, base_min = rows["median"][0][1], rows["min"][0][1]
        print(
            f"{label:36s} {tokens / t_med:12,.0f} {base_med / t_med:8.2f}x "
            f"{tokens / t_min:11,.0f} {base_min / t_min:8.2f}x"
        )
    print(f"\n{'memory':34s} {'adamw':>12s} {'galore':>12s} {'ratio':>7s}")
    for key, label in [
        ("opt_state_bytes", "optimizer state (exact)"),
        ("xla_step_peak_bytes", "train step peak (XLA buffers)"),
        ("process_peak_rss_bytes", "process peak RSS"),
    ]:
        a, g = (result["memory"][n][key] for n in OPTIMIZERS)
        print(f"{label:34s} {lr.memory.human(a):>12s} {lr.memory.human(g):>12s} {g / a:7.2f}")
    path = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"train_step_{args.model}_{device.platform}.json",
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
