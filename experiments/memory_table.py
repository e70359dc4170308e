"""The GaLore paper's memory estimate (weights + optimizer states, BF16) for LLaMA 60M..7B.

For each paper config the parameter shapes come from our Flax LLaMA via ``nnx.eval_shape``
(nothing is allocated). Each method's optimizer-state bytes are *measured* with
``lowrank_jax.memory.state_bytes`` on the real transformation, and checked to equal the
method's analytic count; the paper's published totals (GaLore Table 2) sit next to ours.

    python experiments/memory_table.py            # prints the table, writes JSON

Ranks follow the paper: 128 / 256 / 256 / 512 for 60M / 130M / 350M / 1B (Table 2) and 1024
for 7B (Table 3). Embeddings, the LM head and norms keep full AdamW states (the reference
targets only attention and MLP matrices).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lowrank_jax as lr
from lowrank_jax.models.llama import Llama, get_config

RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024}
# GaLore paper Table 2: weights + optimizer states, BF16, GB.
PAPER_TOTAL_GB = {
    "adamw": {"llama_60m": 0.36, "llama_130m": 0.76, "llama_350m": 2.06, "llama_1b": 7.80},
    "galore": {"llama_60m": 0.24, "llama_130m": 0.52, "llama_350m": 1.22, "llama_1b": 4.38},
}
OUT = pathlib.Path(__file__).parent / "results" / "memory_table.json"


class Method(NamedTuple):
    """A row: the optax transformation and the analytic count its state must equal."""

    label: str
    make_tx: Callable[[int], optax.GradientTransformation]
    analytic: Callable[[dict, int], int]


METHODS = {
    "adamw": Method(
        "AdamW (full rank)",
        lambda rank: optax.adamw(1e-3),
        lambda shapes, rank: lr.memory.adamw_bytes(shapes),
    ),
    "galore": Method(
        "GaLore",
        lambda rank: lr.galore_adamw(1e-3, rank=rank),
        lambda shapes, rank: lr.memory.galore_bytes(shapes, rank=rank),
    ),
}


def bf16_param_shapes(model: str) -> dict:
    """Parameter ``ShapeDtypeStruct``s of a paper config in bfloat16 (no allocation)."""
    config = get_config(model, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def table() -> dict:
    rows = {}
    for model, rank in RANKS.items():
        shapes = bf16_param_shapes(model)
        weights = lr.memory.param_bytes(shapes)
        row = {"rank": rank, "params": sum(x.size for x in jax.tree.leaves(shapes)),
               "weights_bytes": weights}
        for name, method in METHODS.items():
            measured = lr.memory.state_bytes(method.make_tx(rank), shapes, scalars=False)
            analytic = method.analytic(shapes, rank)
            if measured != analytic:
                raise AssertionError(f"{name} on {model}: state {measured} != analytic {analytic}")
            row[name] = {
                "state_bytes": measured,
                "total_bytes": weights + measured,
                "paper_total_gb": PAPER_TOTAL_GB.get(name, {}).get(model),
            }
        rows[model] = row
    return rows


def main() -> None:
    rows = table()
    gb = lambda b: f"{b / 1e9:.2f}"
    names = list(METHODS)
    header = f"{'model':<11}{'rank':>5}{'params':>9}{'weights':>9}"
    for name in names:
        header += f"  | {METHODS[name].label[:18]:>18} state  total (paper)"
    print("Weights + optimizer states, BF16, GB (1 GB = 1e9 bytes)\n" + header)
    for model, row in rows.items():
        params = f"{row['params'] / 1e6:>8.0f}M"
        line = f"{model:<11}{row['rank']:>5}{params}{gb(row['weights_bytes']):>9}"
        for name in names:
            r = row[name]
            paper = f"({r['paper_total_gb']:.2f})" if r["paper_total_gb"] else "(-)"
            line += f"  | {'':>18}{gb(r['state_bytes']):>6}{gb(r['total_bytes']):>7} {paper:>6}"
        print(line)
    print("\nEvery state above is measured with jax.eval_shape on the real transformation and "
          "equals its analytic count exactly.")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
