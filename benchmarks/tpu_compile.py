"""Compile the train step for real TPU topologies on this CPU host: time and per-chip memory.

libtpu (``pip install 'lowrank_jax[tpu]'``) compiles for a TPU topology without a TPU:
``jax.experimental.topologies`` gives the topology's devices, the step is lowered with
abstract arguments sharded over a mesh of them, and ``.compile().memory_analysis()`` reports
what one chip would hold. For every (model, optimizer, ordinary / layer-wise) row this prints
the compile time and the per-chip peak next to AdamW's, and writes JSON.

    python benchmarks/tpu_compile.py          # llama_60m and llama_1b, v5e
    python benchmarks/tpu_compile.py --models llama_7b --mesh 4x1 \
        --optimizers adamw,galore_adamw_8bit
    python benchmarks/tpu_compile.py --target tpu-v4 --mesh 2x2
    python benchmarks/tpu_compile.py --models llama_60m --optimizers all   # every registered one
    python benchmarks/tpu_compile.py --target cpu --dtype float32 --models llama_1b \
        --optimizers sgd,adamw,galore,galore_randomized,galore_adamw_8bit  # the CPU backend

Batch 1 x 256 tokens, bfloat16 parameters and computation (the GaLore paper's setting).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import optax

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no TPU is opened

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from lowrank_jax import memory  # noqa: E402
from lowrank_jax.train.layerwise import LayerwiseError  # noqa: E402
from lowrank_jax.train.memory_plan import plan_memory  # noqa: E402

RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024}
OUT = pathlib.Path(__file__).parent / "results" / "tpu_compile.json"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llama_60m,llama_1b")
    parser.add_argument(
        "--optimizers", default="adamw,galore,galore_randomized,galore_adamw_8bit,fira,apollo"
    )
    parser.add_argument("--target", default="tpu-v5e")
    parser.add_argument("--mesh", default="1x1", help="FSDPxTP devices")
    parser.add_argument("--modes", default="ordinary,layerwise")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    fsdp, tensor = (int(n) for n in args.mesh.split("x"))
    names = args.optimizers.split(",")
    if args.optimizers == "all":  # every registered optimizer
        from lowrank_jax.train.registry import available_optimizers

        names = list(available_optimizers())
    rows = []
    for model in args.models.split(","):
        for name in names:
            optimizer, options = name, {}
            if name == "galore_randomized":
                optimizer, options = "galore", {"basis": "randomized"}
            elif name == "sgd":  # the floor: no state, the gradients and activations only
                optimizer = optax.sgd(1e-3)
            for mode in args.modes.split(","):
                try:
                    plan = plan_memory(
                        model,
                        optimizer,
                        layerwise=mode == "layerwise",
                        batch_size=args.batch_size,
                        seq_len=args.seq_len,
                        dtype=args.dtype,
                        rank=RANKS.get(model),
                        options=options,
                        target=args.target,
                        mesh=(fsdp, tensor),
                    )
                except LayerwiseError as err:  # LISA, OwLore, BAdam: refused by name
                    print(f"{model:10s} {name:18s} {mode:9s} refused: {str(err)[:90]}", flush=True)
                    rows.append({"model": model, "optimizer": name, "mode": mode,
                                 "refused": str(err)})  # fmt: skip
                    continue
                except ValueError as err:  # OwLore needs its layer probabilities (--opt probs)
                    if "needs --opt" not in str(err):
                        raise
                    print(f"{model:10s} {name:18s} {mode:9s} not run: {str(err)[:90]}", flush=True)
                    rows.append({"model": model, "optimizer": name, "mode": mode,
                                 "not_run": str(err)})  # fmt: skip
                    continue
                row = {
                    "model": model,
                    "optimizer": name,
                    "mode": mode,
                    "target": args.target,
                    "mesh": args.mesh,
                    "compile_s": round(plan.compile_seconds, 1),
                    "peak_bytes": plan.compiled.peak_bytes,
                    "temp_bytes": plan.compiled.temp_bytes,
                    "param_bytes": plan.param_bytes,
                    "state_bytes": plan.state_bytes,
                }
                rows.append(row)
                _write(args.out, rows)  # after every row: a long run that stops keeps its rows
                print(
                    f"{model:10s} {name:18s} {mode:9s} compile {row['compile_s']:6.1f}s  "
                    f"peak {memory.human(row['peak_bytes']):>10}  temp "
                    f"{memory.human(row['temp_bytes']):>10}  state "
                    f"{memory.human(row['state_bytes']):>10}",
                    flush=True,
                )
    _write(args.out, rows)
    return rows


def _write(out: str, rows: list[dict]) -> None:
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
