"""Layer-wise vs ordinary train step: time per step (interleaved) and XLA's compiled memory.

Both steps train the same ``scan_layers`` LLaMA with the same optimizer and batches; rounds
alternate the order so both see the same machine load. Reports the median step time of the
layer-wise step as a ratio to the ordinary one, and each step's compiled temporaries and peak
(``lowrank_jax.memory.compiled_memory``).

    python benchmarks/layerwise_step.py                    # llama_20m, AdamW and GaLore, CPU
    python benchmarks/layerwise_step.py --model llama_60m --vocab-size 32000

Writes ``benchmarks/results/layerwise_step_<model>_<platform>.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import lowrank_jax as lr  # noqa: E402
from lowrank_jax.models import Llama, get_config  # noqa: E402
from lowrank_jax.train.step import TrainState, make_train_step  # noqa: E402


def optimizers(rank: int) -> dict:
    return {
        "adamw": lambda: optax.adamw(1e-3),
        "galore": lambda: lr.galore_adamw(1e-2, rank=rank, update_proj_gap=200),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama_20m")
    p.add_argument("--vocab-size", type=int, default=259)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    config = get_config(args.model, vocab_size=args.vocab_size, scan_layers=True)
    model = Llama(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(0)
    data = [
        jnp.asarray(rng.integers(0, args.vocab_size, (args.batch_size, args.seq_len + 1)))
        for _ in range(4)
    ]
    results = {}
    for name, make in optimizers(config.hidden_size // 4).items():
        tx = make()
        runs = {}
        for mode in ("ordinary", "layerwise"):
            step = make_train_step(graphdef, tx, layerwise=mode == "layerwise")
            state = TrainState(jnp.int32(0), jax.tree.map(jnp.copy, params), tx.init(params))
            compiled = lr.memory.compiled_memory(step, state, data[0])
            state, metrics = step(state, data[0])  # compile, the first refresh
            float(metrics["loss"])
            runs[mode] = {"step": step, "state": state, "times": [], "memory": compiled}
        for r in range(args.rounds):
            for mode in ("ordinary", "layerwise")[:: 1 if r % 2 == 0 else -1]:
                run = runs[mode]
                for i in range(args.steps):
                    began = time.perf_counter()
                    run["state"], metrics = run["step"](run["state"], data[i % 4])
                    float(metrics["loss"])
                    run["times"].append(time.perf_counter() - began)
        ordinary = statistics.median(runs["ordinary"]["times"])
        layerwise = statistics.median(runs["layerwise"]["times"])
        results[name] = {
            "time_ratio_layerwise_vs_ordinary": layerwise / ordinary,
            **{
                f"{mode}_{field}": getattr(runs[mode]["memory"], field)
                for mode in runs
                for field in ("temp_bytes", "peak_bytes")
            },
        }
        m = {mode: runs[mode]["memory"] for mode in runs}
        print(
            f"{name:7s} layer-wise step time {layerwise / ordinary:.2f}x the ordinary step; "
            f"temp {lr.memory.human(m['layerwise'].temp_bytes)} vs "
            f"{lr.memory.human(m['ordinary'].temp_bytes)}, peak "
            f"{lr.memory.human(m['layerwise'].peak_bytes)} vs "
            f"{lr.memory.human(m['ordinary'].peak_bytes)}",
            flush=True,
        )
    platform = jax.devices()[0].platform
    out = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results"
                       / f"layerwise_step_{args.model}_{platform}.json")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "results": results,
              "command": " ".join(["python", "benchmarks/layerwise_step.py", *sys.argv[1:]])}
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
