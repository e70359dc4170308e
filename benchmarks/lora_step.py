"""Is the adapter path the bottleneck? LoRA's fine-tuning step against the same model's plain
forward + backward, on SmolLM2-135M's shapes (CPU by default).

Three jitted programs on one batch, timed in interleaved rounds (each round runs every program
once, in a rotating order, so all see the same machine load), reported as tokens/s ratios to
the base model's forward + backward:

* ``base_fwd_bwd``: the base model's loss and its gradient with respect to every weight (what
  any fine-tuning step computes before its optimizer);
* ``lora_fwd_bwd``: the LoRA-wrapped model's loss and its gradient with respect to the
  adapters (the base frozen, passed as an argument as ``lowrank-jax finetune`` does);
* ``lora_step``: ``lowrank-jax finetune``'s whole step for LoRA (``make_train_step`` with a
  custom loss: forward, backward, clipping, the non-finite guard and AdamW on the adapters).

The weights are random: only the shapes matter for time. Issue 11's target is ``lora_step`` at
>= 0.9x the base forward + backward's tokens/s.

    python benchmarks/lora_step.py                 # SmolLM2-135M shapes, 4 x 128 tokens
    python benchmarks/lora_step.py --tiny --rounds 2   # smoke test

Writes ``benchmarks/results/lora_step_<model>_<platform>.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lowrank_jax import reparam
from lowrank_jax.models import Llama, LlamaConfig
from lowrank_jax.train.step import TrainState, make_train_step

RESULTS = pathlib.Path(__file__).parent / "results"
# SmolLM2-135M (HF config): 30 layers, width 576, 9 query / 3 key-value heads, tied embeddings
SMOLLM2_135M = LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
    num_layers=30, rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True,
)  # fmt: skip
TINY = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
    num_layers=2, tie_embeddings=True,
)  # fmt: skip
TARGETS = r"(q|k|v|o|gate|up|down)_proj/kernel"


def _nll(model: Llama, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model(tokens[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]
    )
    return jnp.sum(losses), jnp.float32(losses.size)


def programs(config: LlamaConfig, rank: int) -> tuple[dict, dict]:
    """``({name: jitted fn}, {name: its arguments})`` for the three programs."""
    base = Llama(config, rngs=nnx.Rngs(0))
    graph, weights = nnx.split(base, nnx.Param)

    def base_loss(weights: nnx.State, tokens: jax.Array) -> jax.Array:
        total, count = _nll(nnx.merge(graph, weights), tokens)
        return total / count

    wrapped = reparam.wrap(
        Llama(config, rngs=nnx.Rngs(0)), reparam.lora(rank=rank, alpha=2 * rank, targets=TARGETS),
        key=jax.random.key(0), rngs=nnx.Rngs(dropout=0),
    )  # fmt: skip
    lgraph, adapters, frozen = nnx.split(wrapped, nnx.LoRAParam, ...)
    adapters = nnx.to_pure_dict(adapters)

    def lora_loss(adapters: dict, tokens: jax.Array, frozen: nnx.State) -> tuple:
        return _nll(nnx.merge(lgraph, adapters, frozen), tokens)

    def lora_mean(adapters: dict, tokens: jax.Array, frozen: nnx.State) -> jax.Array:
        total, count = lora_loss(adapters, tokens, frozen)
        return total / count

    tx = optax.adamw(1e-3, weight_decay=0.0)
    step = make_train_step(None, tx, grad_clip=1.0, loss_fn=lora_loss)
    fns = {
        "base_fwd_bwd": jax.jit(jax.value_and_grad(base_loss)),
        "lora_fwd_bwd": jax.jit(jax.value_and_grad(lora_mean)),
        "lora_step": step,
    }
    owned = jax.tree.map(jnp.copy, adapters)  # the step donates its state
    state = TrainState(jnp.int32(0), owned, tx.init(owned))
    args = {
        "base_fwd_bwd": (weights,),
        "lora_fwd_bwd": (adapters, None, frozen),
        "lora_step": (state, None, frozen),
    }
    return fns, args


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="calls per program per round")
    parser.add_argument("--out", help="the JSON file (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    config = TINY if args.tiny else SMOLLM2_135M
    fns, inputs = programs(config, args.rank)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(
        rng.integers(0, config.vocab_size, (args.batch_size, args.seq_len + 1)), jnp.int32
    )
    state = {"lora_step": inputs["lora_step"][0]}

    def call(name: str) -> None:
        if name == "lora_step":  # the state is donated: carry it
            state[name], metrics = fns[name](state[name], tokens, inputs[name][2])
            jax.block_until_ready(metrics)
        elif name == "lora_fwd_bwd":
            jax.block_until_ready(fns[name](inputs[name][0], tokens, inputs[name][2]))
        else:
            jax.block_until_ready(fns[name](inputs[name][0], tokens))

    names = list(fns)
    for name in names:  # compile and warm up
        call(name)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            began = time.perf_counter()
            for _ in range(args.steps):
                call(name)
            seconds[name].append((time.perf_counter() - began) / args.steps)
    tokens_per_step = args.batch_size * args.seq_len
    base = statistics.median(seconds["base_fwd_bwd"])
    results = {
        name: {
            "median_seconds": statistics.median(times),
            "seconds": times,
            "tokens_per_s": tokens_per_step / statistics.median(times),
            "tokens_per_s_vs_base_fwd_bwd": base / statistics.median(times),
        }
        for name, times in seconds.items()
    }
    model = "tiny" if args.tiny else "smollm2_135m"
    record = {
        "command": " ".join(["python benchmarks/lora_step.py", *(argv or [])]),
        "model": model,
        "batch": [args.batch_size, args.seq_len],
        "rank": args.rank,
        "device": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "results": results,
    }
    out = pathlib.Path(args.out or RESULTS / f"lora_step_{model}_{jax.default_backend()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"| program | tokens/s vs base forward + backward ({model}, "
          f"{args.batch_size} x {args.seq_len}, rank {args.rank}) |")  # fmt: skip
    print("|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['tokens_per_s_vs_base_fwd_bwd']:.2f}x |")
    return record


if __name__ == "__main__":
    main()
