"""The GaLore paper's memory estimate (weights + optimizer states, BF16) for LLaMA 60M..7B.

For each paper config the parameter shapes come from our Flax LLaMA via ``nnx.eval_shape``
(nothing is allocated). Each method's optimizer-state bytes are *measured* with
``lowrank_jax.memory.state_bytes`` on the real transformation, and checked to equal the
method's analytic count; the paper's published totals (GaLore Table 2) sit next to ours.

    python experiments/memory_table.py            # prints the table, writes JSON
    python experiments/memory_table.py --compiled cpu --compiled-models llama_60m,llama_1b
    python experiments/memory_table.py --compiled tpu-v5e   # libtpu (the tpu extra), no TPU

``--compiled TARGET`` adds the compiled train step's peak per method, ordinary and layer-wise
(:func:`lowrank_jax.train.memory_plan.plan_memory`: the real step lowered with abstract
arguments, XLA's memory analysis; batch 1 x 256, float32 on the CPU, bfloat16 on a TPU target)
next to the state: what the step needs, not only what the optimizer keeps.

Ranks follow the paper: 128 / 256 / 256 / 512 for 60M / 130M / 350M / 1B (Table 2) and 1024
for 7B (Table 3); the wave-2 methods (GaLore 2, GoLore, Flora, Q-GaLore, GradNormLoRP, SST and
the LoRA-side optimizers on rank-r adapters) use the same ranks, BAdam one layer block. Q-GaLore
stores INT8 attention/MLP weights, SST the spectral factors, the LoRA rows a frozen BF16 base
plus the adapters: their "total" counts those weights. Embeddings, the LM head and norms keep
full AdamW states (the reference targets only attention and MLP matrices). Fira, APOLLO and
8-bit GaLore use the same ranks; APOLLO-Mini rank 1; LISA two sampled layers; the 8-bit rows
quantize every moment of 4096+ elements. Published totals: GaLore Table 2 (60M-1B) and Table 3
(7B, 8-bit), APOLLO Table 2 for Fira / APOLLO / APOLLO-Mini, Q-GaLore Tables 1-2 (same weights +
states accounting).
"""

from __future__ import annotations

import argparse
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
from lowrank_jax.optimizers import (
    adamw_8bit,
    allora_adamw,
    apollo_adamw,
    apollo_mini,
    badam_adamw,
    fira_adamw,
    flora_adafactor,
    galore2_adamw,
    galore_adamw_8bit,
    golore_adamw,
    lisa_adamw,
    lorafa_adamw,
    loraplus_adamw,
    q_galore_adamw_8bit,
)
from lowrank_jax.transforms import gradnorm_lorp_adamw, lora_ggpo, sst_adamw, sst_init

RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024}
# GaLore paper Table 2: weights + optimizer states, BF16, GB.
PAPER_TOTAL_GB = {
    "adamw": {"llama_60m": 0.36, "llama_130m": 0.76, "llama_350m": 2.06, "llama_1b": 7.80},
    "galore": {"llama_60m": 0.24, "llama_130m": 0.52, "llama_350m": 1.22, "llama_1b": 4.38},
    # GaLore Table 3 (7B, "Mem": weights + states)
    "adamw_8bit": {"llama_7b": 26.0},
    "galore_8bit": {"llama_7b": 18.0},
    # APOLLO Table 2 (weights + optimizer states; rank d/4, which APOLLO's memory column
    # reports equal to GaLore's)
    "fira": {"llama_60m": 0.24, "llama_130m": 0.52, "llama_350m": 1.22, "llama_1b": 4.38},
    "apollo": {"llama_60m": 0.24, "llama_130m": 0.52, "llama_350m": 1.22, "llama_1b": 4.38},
    "apollo_mini": {"llama_60m": 0.12, "llama_130m": 0.25, "llama_350m": 0.69, "llama_1b": 2.60},
    # Q-GaLore Table 1 (INT8 weights + states; 7B: Table 2, the measured ~15 GB of a whole run)
    "q_galore": {"llama_60m": 0.18, "llama_130m": 0.39, "llama_350m": 0.88, "llama_1b": 3.08,
                 "llama_7b": 15.0},
}
# GaLore abstract: 8-bit GaLore cuts optimizer memory by up to 82.5% and total memory by 63.3%
# (7B, against BF16 AdamW).
PAPER_8BIT_GALORE_STATE_SAVING = 0.825
OUT = pathlib.Path(__file__).parent / "results" / "memory_table.json"


class Method(NamedTuple):
    """A row: the optax transformation and the analytic count its state must equal.

    ``tree`` maps the dense shapes to what the optimizer sees (SST's spectral factors, LoRA
    adapters); ``weights`` gives the stored weights' bytes (Q-GaLore's INT8, SST's factors,
    a frozen base plus adapters) when they are not the dense BF16 ones.
    """

    label: str
    make_tx: Callable[[int], optax.GradientTransformation]
    analytic: Callable[[dict, int], int]
    tree: Callable[[dict, int], dict] | None = None
    weights: Callable[[dict, int], int] | None = None


def lora_adapters(shapes: dict, rank: int) -> dict:
    """``{path: {"A": (in, r), "B": (r, out)}}`` for every targeted matrix (LoRA's trainables)."""
    mask = jax.tree.leaves(lr.targets.resolve(None, shapes))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {
        lr.targets.path_str(kp): {
            "A": jax.ShapeDtypeStruct((*x.shape[:-1], rank), x.dtype),
            "B": jax.ShapeDtypeStruct((*x.shape[:-2], rank, x.shape[-1]), x.dtype),
        }
        for (kp, x), m in zip(flat, mask)
        if m
    }


def lora_weights(shapes: dict, rank: int) -> int:
    return lr.memory.param_bytes(shapes) + lr.memory.tree_bytes(lora_adapters(shapes, rank))


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
    "adamw_8bit": Method(
        "8-bit Adam",
        lambda rank: adamw_8bit(1e-3),
        lambda shapes, rank: lr.memory.adam8bit_bytes(shapes),
    ),
    "galore_8bit": Method(
        "8-bit GaLore",
        lambda rank: galore_adamw_8bit(1e-3, rank=rank),
        lambda shapes, rank: lr.memory.galore8bit_bytes(shapes, rank=rank),
    ),
    "fira": Method(
        "Fira",
        lambda rank: fira_adamw(1e-3, rank=rank),
        lambda shapes, rank: lr.memory.fira_bytes(shapes, rank=rank),
    ),
    "apollo": Method(
        "APOLLO",
        lambda rank: apollo_adamw(1e-3, rank=rank),
        lambda shapes, rank: lr.memory.apollo_bytes(shapes, rank=rank),
    ),
    "apollo_mini": Method(
        "APOLLO-Mini",
        lambda rank: apollo_mini(1e-3),
        lambda shapes, rank: lr.memory.apollo_bytes(shapes, rank=1),
    ),
    "lisa": Method(
        "LISA (2 layers)",
        lambda rank: lisa_adamw(1e-3, n_active=2),
        lambda shapes, rank: lr.memory.lisa_bytes(shapes, n_active=2),
    ),
    "galore2": Method(
        "GaLore 2 (rSVD)",
        lambda rank: galore2_adamw(1e-3, rank=rank),
        lambda shapes, rank: lr.memory.galore_bytes(shapes, rank=rank),
    ),
    "golore": Method(
        "GoLore",
        lambda rank: golore_adamw(1e-3, rank=rank, random_after=1000),
        lambda shapes, rank: lr.memory.galore_bytes(shapes, rank=rank),
    ),
    "flora": Method(
        "Flora",
        lambda rank: flora_adafactor(1e-3, rank=rank),
        lambda shapes, rank: lr.memory.flora_bytes(shapes, rank=rank),
    ),
    "badam": Method(
        "BAdam (1 block)",
        lambda rank: badam_adamw(1e-3),
        lambda shapes, rank: lr.memory.badam_bytes(shapes),
    ),
    "q_galore": Method(
        "Q-GaLore (INT8 W)",
        lambda rank: q_galore_adamw_8bit(1e-3, rank=rank),
        lambda shapes, rank: lr.memory.qgalore_bytes(shapes, rank=rank),
        weights=lambda shapes, rank: lr.memory.int8_weight_bytes(shapes),
    ),
    "gradnorm_lorp": Method(
        "GradNormLoRP",
        lambda rank: gradnorm_lorp_adamw(1e-3, rank=rank),
        lambda shapes, rank: lr.memory.gradnorm_lorp_bytes(shapes, rank=rank),
    ),
    "sst": Method(
        "SST (spectral W)",
        lambda rank: sst_adamw(1e-3, rank=rank),
        lambda shapes, rank: lr.memory.sst_bytes(shapes, rank=rank),
        tree=lambda shapes, rank: jax.eval_shape(sst_init, shapes),
        weights=lambda shapes, rank: lr.memory.sst_param_bytes(shapes),
    ),
    "loraplus": Method(
        "LoRA+ (adapters)",
        lambda rank: loraplus_adamw(1e-3),
        lambda shapes, rank: lr.memory.adamw_bytes(lora_adapters(shapes, rank)),
        tree=lora_adapters,
        weights=lora_weights,
    ),
    "allora": Method(
        "ALLoRA (adapters)",
        lambda rank: allora_adamw(1e-3),
        lambda shapes, rank: lr.memory.adamw_bytes(lora_adapters(shapes, rank)),
        tree=lora_adapters,
        weights=lora_weights,
    ),
    "lora_ggpo": Method(
        "LoRA-GGPO (adapt.)",
        lambda rank: lora_ggpo(optax.adamw(1e-3)),
        lambda shapes, rank: lr.memory.ggpo_bytes(lora_adapters(shapes, rank)),
        tree=lora_adapters,
        weights=lora_weights,
    ),
    "lorafa": Method(
        "LoRA-FA (adapters)",
        lambda rank: lorafa_adamw(1e-3),
        lambda shapes, rank: lr.memory.lorafa_bytes(lora_adapters(shapes, rank)),
        tree=lora_adapters,
        weights=lora_weights,
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
            tree = shapes if method.tree is None else method.tree(shapes, rank)
            measured = lr.memory.state_bytes(method.make_tx(rank), tree, scalars=False)
            analytic = method.analytic(shapes, rank)
            if measured != analytic:
                raise AssertionError(f"{name} on {model}: state {measured} != analytic {analytic}")
            stored = weights if method.weights is None else method.weights(shapes, rank)
            row[name] = {
                "state_bytes": measured,
                "weights_bytes": stored,
                "total_bytes": stored + measured,
                "paper_total_gb": PAPER_TOTAL_GB.get(name, {}).get(model),
            }
        rows[model] = row
    return rows


# registry names of the methods whose compiled step --compiled measures
COMPILED = {"adamw": "adamw", "galore": "galore", "galore_8bit": "galore_adamw_8bit",
            "fira": "fira", "apollo": "apollo"}


def compiled_peaks(models: list[str], target: str) -> dict:
    """``{model: {method: {"ordinary": peak, "layerwise": peak}}}`` per device, in bytes."""
    from lowrank_jax.train.memory_plan import plan_memory

    dtype = "float32" if target == "cpu" else "bfloat16"
    out = {}
    for model in models:
        out[model] = {}
        for name, registered in COMPILED.items():
            out[model][name] = {
                mode: plan_memory(
                    model, registered, layerwise=mode == "layerwise", batch_size=1,
                    seq_len=256, dtype=dtype, rank=RANKS.get(model), target=target,
                ).compiled.peak_bytes
                for mode in ("ordinary", "layerwise")
            }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compiled", default=None, help="cpu, gpu or a TPU target (tpu-v5e)")
    parser.add_argument("--compiled-models", default="llama_60m")
    args = parser.parse_args(argv)
    rows = table()
    gb = lambda b: f"{b / 1e9:.2f}"
    print("Weights + optimizer states, BF16, GB (1 GB = 1e9 bytes)")
    print(f"{'model':<11}{'rank':>5}{'params':>9}{'weights':>9}  {'method':<18}"
          f"{'state':>7}{'total':>7}{'paper':>7}")
    for model, row in rows.items():
        params = f"{row['params'] / 1e6:>8.0f}M"
        head = f"{model:<11}{row['rank']:>5}{params}{gb(row['weights_bytes']):>9}"
        for name, method in METHODS.items():
            r = row[name]
            paper = f"{r['paper_total_gb']:.2f}" if r["paper_total_gb"] else "-"
            print(f"{head}  {method.label:<18}{gb(r['state_bytes']):>7}"
                  f"{gb(r['total_bytes']):>7}{paper:>7}")
            head = " " * len(head)
    seven = rows.get("llama_7b")
    if seven:
        adamw = seven["adamw"]["state_bytes"]
        saving = 1 - seven["galore_8bit"]["state_bytes"] / adamw
        # the same count with the projector in 8 bits as well
        int8_projector = lr.memory.galore8bit_bytes(
            bf16_param_shapes("llama_7b"), rank=seven["rank"], projector_dtype=jnp.int8
        )
        print(f"\n7B: 8-bit GaLore states are {100 * saving:.1f}% below BF16 AdamW's (BF16 "
              f"projector); {100 * (1 - int8_projector / adamw):.1f}% if the projector were 8-bit "
              f"too. Paper: {100 * PAPER_8BIT_GALORE_STATE_SAVING:.1f}%.")
    if seven and "q_galore" in seven:
        q = seven["q_galore"]
        print(f"7B Q-GaLore (rank {seven['rank']}): INT8 weights {gb(q['weights_bytes'])} GB + "
              f"states {gb(q['state_bytes'])} GB = {gb(q['total_bytes'])} GB persistent; the "
              f"paper measures ~{PAPER_TOTAL_GB['q_galore']['llama_7b']:.0f} GB for a whole run "
              "(activations and transient gradients included).")
    print("\nEvery state above is measured with jax.eval_shape on the real transformation and "
          "equals its analytic count exactly.")
    if args.compiled:
        models = [m for m in args.compiled_models.split(",") if m]
        peaks = compiled_peaks(models, args.compiled)
        print(f"\nCompiled train step, peak GB per device ({args.compiled}, batch 1 x 256; "
              "ordinary / layer-wise), next to the state:")
        for model, methods in peaks.items():
            for name, peak in methods.items():
                state = rows[model][name]["state_bytes"] if model in rows else None
                rows.setdefault(model, {}).setdefault(name, {})["compiled_peak_bytes"] = {
                    "target": args.compiled, **peak}
                print(f"{model:<11}{METHODS[name].label:<18} state "
                      f"{'-' if state is None else gb(state):>6}  peak {gb(peak['ordinary']):>6}"
                      f" / {gb(peak['layerwise']):>6}")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
