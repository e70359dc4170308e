"""8-bit optimizer states vs float32 states: same small LM, same data, loss side by side.

A byte-level two-block transformer (d=128, 4 heads, context 64) trained on Python standard
library source text, with AdamW and GaLore-AdamW in float32-state and 8-bit-state versions
(``scale_by_adam_8bit``: block-wise dynamic quantization, 256-element blocks). Same seed, same
batches; reports the mean training loss over the last 50 steps and a held-out loss, and the
8-bit run's gap to its float32 twin.

    python experiments/eight_bit_vs_fp32.py                 # 300 steps (the README numbers)
    python experiments/eight_bit_vs_fp32.py --steps 60      # quick look
    python experiments/eight_bit_vs_fp32.py --seed 1        # another init and batch order

Writes ``experiments/results/eight_bit_vs_fp32.json``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import memory
from lowrank_jax.optimizers import adamw_8bit, galore_adamw_8bit
from lowrank_jax.transforms import galore

RESULTS = pathlib.Path(__file__).with_name("results")
CONFIG = {"d": 128, "heads": 4, "layers": 2, "context": 64, "batch": 16}


def corpus() -> np.ndarray:
    """UTF-8 bytes of a fixed set of standard-library modules (offline, deterministic)."""
    import argparse as m1
    import difflib as m2
    import textwrap as m3
    import typing as m4

    text = "\n".join(inspect.getsource(m) for m in (m1, m2, m3, m4))
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def init_params(key: jax.Array, d: int, layers: int, context: int, **_) -> dict:
    keys = iter(jax.random.split(key, 4 + 6 * layers))
    dense = lambda n_in, n_out: jax.random.normal(next(keys), (n_in, n_out)) * n_in**-0.5
    blocks = {
        str(i): {
            "attn": {f"{n}_proj": {"kernel": dense(d, d)} for n in "qkvo"},
            "mlp": {
                "up_proj": {"kernel": dense(d, 4 * d)},
                "down_proj": {"kernel": dense(4 * d, d)},
            },
            "attn_norm": {"scale": jnp.ones(d)},
            "mlp_norm": {"scale": jnp.ones(d)},
        }
        for i in range(layers)
    }
    return {
        "embed": {"embedding": jax.random.normal(next(keys), (256, d)) * 0.02},
        "pos_embed": {"embedding": jax.random.normal(next(keys), (context, d)) * 0.02},
        "layers": blocks,
        "final_norm": {"scale": jnp.ones(d)},
        "lm_head": {"kernel": dense(d, 256)},
    }


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def forward(params: dict, tokens: jax.Array, heads: int) -> jax.Array:
    b, t = tokens.shape
    x = params["embed"]["embedding"][tokens] + params["pos_embed"]["embedding"][:t]
    causal = jnp.tril(jnp.ones((t, t), bool))
    for block in params["layers"].values():
        h = rms_norm(x, block["attn_norm"]["scale"])
        q, k, v = (
            (h @ block["attn"][n]["kernel"]).reshape(b, t, heads, -1)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        attn = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, -1)
        x = x + attn @ block["attn"]["o_proj"]["kernel"]
        h = rms_norm(x, block["mlp_norm"]["scale"])
        mlp = block["mlp"]
        x = x + jax.nn.gelu(h @ mlp["up_proj"]["kernel"]) @ mlp["down_proj"]["kernel"]
    return rms_norm(x, params["final_norm"]["scale"]) @ params["lm_head"]["kernel"]


def loss_fn(params: dict, batch: jax.Array, heads: int) -> jax.Array:
    logits = forward(params, batch[:, :-1], heads)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def batches(data: np.ndarray, steps: int, batch: int, context: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - context - 1, size=(steps, batch))
    return data[starts[..., None] + np.arange(context + 1)]


def train(tx: optax.GradientTransformation, steps: int, seed: int = 0, **overrides) -> dict:
    """Trains the model; returns per-step losses, the held-out loss, the state and its bytes."""
    cfg = {**CONFIG, **overrides}
    data = corpus()
    split = int(0.9 * len(data))
    train_data, eval_data = data[:split], data[split:]
    params = init_params(jax.random.key(seed), **cfg)
    state = tx.init(params)
    heads = cfg["heads"]

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, heads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for batch in batches(train_data, steps, cfg["batch"], cfg["context"], seed + 1):
        params, state, loss = step(params, state, jnp.asarray(batch))
        losses.append(float(loss))
    held_out = batches(eval_data, 8, cfg["batch"], cfg["context"], seed + 2)
    eval_loss = float(np.mean([loss_fn(params, jnp.asarray(b), heads) for b in held_out]))
    return {
        "losses": losses,
        "final_train": float(np.mean(losses[-min(50, steps) :])),
        "eval": eval_loss,
        "state_bytes": memory.state_bytes(tx, params, scalars=False),
        "state": state,
    }


def optimizers(lr: float, rank: int) -> dict:
    """Each 8-bit optimizer next to its twin that differs only in the state precision."""
    galore_fp32 = galore(optax.scale_by_adam(), rank=rank, update_proj_gap=100, scale=1.0)
    return {
        "adamw fp32": optax.adamw(lr, weight_decay=0.0),
        "adamw 8-bit": adamw_8bit(lr, weight_decay=0.0),
        "galore fp32": optax.chain(galore_fp32, optax.scale_by_learning_rate(lr)),
        "galore 8-bit": galore_adamw_8bit(
            lr, rank=rank, update_proj_gap=100, scale=1.0, weight_decay=0.0
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="model init and batch order")
    args = parser.parse_args()
    rows = {}
    for name, tx in optimizers(args.lr, args.rank).items():
        start = time.perf_counter()
        rows[name] = train(tx, args.steps, seed=args.seed)
        del rows[name]["state"]
        rows[name]["seconds"] = time.perf_counter() - start
    print(f"{'optimizer':14} {'train (last 50)':>16} {'held-out':>9} {'gap':>7} {'state':>10}")
    for name, row in rows.items():
        twin = rows[name.replace("8-bit", "fp32")]
        gap = (row["eval"] - twin["eval"]) / twin["eval"]
        row["gap_to_fp32"] = gap
        print(
            f"{name:14} {row['final_train']:16.4f} {row['eval']:9.4f} {100 * gap:6.2f}% "
            f"{memory.human(row['state_bytes']):>10}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"eight_bit_vs_fp32{'' if args.seed == 0 else f'_seed{args.seed}'}.json"
    out.write_text(json.dumps({"args": vars(args), "config": CONFIG, "runs": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
