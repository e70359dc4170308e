"""QLoRA demo: LoRA on a float32 base vs QLoRA (NF4 / int8 base), QDoRA and LoftQ, on a small
pretrained LLaMA.

Reuses ``experiments/finetune.py``'s setting: a LLaMA pre-trained on the embedded King James Bible
(the same cached run directory, ``runs/finetune/<model>-kjv-<steps>``), fine-tuned on Python
source code (the standard-library modules of :data:`finetune.PYTHON_MODULES`). Every method wraps
the same pretrained model with :func:`lowrank_jax.reparam.wrap` (rank ``r``, ``α = r``, every
attention and MLP matrix; embeddings, norms and the head stay float32 and frozen) and trains
only its adapters with AdamW (warmup + cosine, clipping 1.0, same rate, batches and seed):

* ``lora``: the base kernels stay float32 ``nnx.Param`` (frozen);
* ``qlora``: ``quantize_base="nf4"`` (blocks of 64, double-quantized scales);
* ``qlora_int8``: ``quantize_base="int8"`` (absmax per block of 64);
* ``qdora``: DoRA on the NF4 base (the column norm is computed from the dequantized kernel);
* ``loftq``: QLoRA with ``QuantConfig(loftq_iters=2)``: the adapters start from the NF4 error.

Reports per method the base-weight bytes of the adapted matrices (against the same matrices in
float32 and bfloat16), the compiled train step's temp and argument bytes
(``jax.jit(step).lower(...).compile().memory_analysis()``; the temp bytes twice: with XLA:CPU's
default scheduler, which favours concurrency and may dequantize several independent kernels at
once, and, in a child process, with its memory-minimising scheduler, from shapes alone), the
held-out loss before and after, the final training loss and the time of the steps relative to
``lora`` in the same process.
Prints a markdown table and writes ``experiments/results/qlora.json``.

    python experiments/qlora.py           # llama_20m (reuses finetune.py's pre-training cache)
    python experiments/qlora.py --tiny    # llama_tiny smoke run (qlora_tiny.json)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import finetune
from lowrank_jax import memory, reparam
from lowrank_jax.data import BatchIterator, ByteTokenizer, build_dataset
from lowrank_jax.models import Llama, LlamaConfig
from lowrank_jax.train import make_eval_step
from lowrank_jax.train.step import cross_entropy, warmup_cosine

RESULTS = pathlib.Path(__file__).with_name("results")
MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
METHODS = {
    "lora": ("lora", None),
    "qlora": ("lora", "nf4"),
    "qlora_int8": ("lora", "int8"),
    "qdora": ("dora", "nf4"),
    "loftq": ("lora", reparam.QuantConfig("nf4", loftq_iters=2)),
}
SIZES = {
    "default": dict(model="llama_20m", pretrain_steps=300, steps=60, batch_size=8, seq_len=128,
                    rank=8, eval_batches=8, lr=1e-2),
    "tiny": dict(model="llama_tiny", pretrain_steps=20, steps=8, batch_size=4, seq_len=32,
                 rank=4, eval_batches=2, lr=1e-2),
}  # fmt: skip


def base_bytes(model: Any) -> dict:
    """Bytes of the adapted layers' base kernels as stored, and of the same shapes in float32
    and bfloat16 (from the sites' shapes)."""
    sites = reparam.adapters_of(model).sites
    elements = sum(int(np.prod(s.shape)) for s in sites)
    stored = memory.tree_bytes(nnx.state(model, reparam.QuantizedKernel))
    if stored == 0:  # a float base
        stored = sum(
            int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in sites
        )
    return {"stored": stored, "float32": 4 * elements, "bfloat16": 2 * elements}


def wrapped_model(model: Any, name: str, size: dict, seed: int) -> Any:
    """``model`` wrapped with method ``name`` (rank ``r``, ``α = r``, attention and MLP)."""
    family, quantize = METHODS[name]
    make = reparam.lora if family == "lora" else reparam.dora
    return reparam.wrap(model, make(size["rank"], alpha=size["rank"]),
                        key=jax.random.key(seed), quantize_base=quantize)  # fmt: skip


def train_step(graph: Any, size: dict) -> tuple[Any, Any, Any]:
    """``(tx, loss_fn, step)``: AdamW on the adapters, warmup + cosine, clipping 1.0."""
    tx = optax.adamw(warmup_cosine(size["lr"], size["steps"], max(1, size["steps"] // 10)),
                     weight_decay=0.0)  # fmt: skip

    def loss_fn(trainable: Any, rest: Any, batch: jax.Array) -> jax.Array:
        model = nnx.merge(graph, trainable, rest)
        return cross_entropy(model(batch[:, :-1]), batch[:, 1:])

    def step(trainable: Any, opt_state: Any, rest: Any, batch: jax.Array) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(trainable, rest, batch)
        factor = jnp.minimum(1.0, finetune.GRAD_CLIP / (optax.tree.norm(grads) + 1e-6))
        grads = jax.tree.map(lambda g: g * factor, grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return tx, loss_fn, step


def compile_step(graph: Any, trainable: Any, rest: Any, size: dict) -> tuple[Any, Any, Any]:
    """``(tx, loss_fn, compiled step)`` for these (concrete or abstract) arrays."""
    tx, loss_fn, step = train_step(graph, size)
    opt_state = jax.eval_shape(tx.init, trainable)
    batch = jax.ShapeDtypeStruct((size["batch_size"], size["seq_len"] + 1), jnp.int32)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, rest,
                                                          batch).compile()  # fmt: skip
    return tx, loss_fn, compiled


def step_memory(model_config: LlamaConfig, methods: Sequence[str], size: dict, seed: int) -> dict:
    """``{method: {"temp": bytes, "arguments": bytes}}`` of the compiled train step, from shapes
    alone (``nnx.eval_shape``: nothing is allocated or quantized)."""
    out = {}
    for name in methods:
        abstract = nnx.eval_shape(
            lambda name=name: wrapped_model(Llama(model_config, rngs=nnx.Rngs(seed)), name, size,
                                            seed)  # fmt: skip
        )
        graph, trainable, rest = nnx.split(abstract, nnx.LoRAParam, ...)
        analysis = compile_step(graph, trainable, rest, size)[2].memory_analysis()
        out[name] = {"temp": int(analysis.temp_size_in_bytes),
                     "arguments": int(analysis.argument_size_in_bytes)}
    return out


def memory_scheduler_step_memory(
    model_config: LlamaConfig, methods: Sequence[str], size: dict, seed: int
) -> dict:
    """:func:`step_memory` in a child process whose XLA:CPU uses its memory-minimising
    scheduler (the default one favours concurrency and may dequantize several layers at once;
    the flag is read once per process)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} {MEMORY_SCHEDULER}".strip()
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    env = {**os.environ, "XLA_FLAGS": flags,
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "experiments.qlora", "--step-memory",
            json.dumps(dataclasses.asdict(model_config)), "--seed", str(seed), "--methods",
            *methods, *[f"--{k.replace('_', '-')}={v}" for k, v in size.items()]]  # fmt: skip
    done = subprocess.run(args, env=env, cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the step-memory child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_method(name: str, graphdef: Any, params: dict, domain: Any, size: dict, seed: int) -> dict:
    """Wraps the pretrained model with method ``name``, fine-tunes it; returns its record."""
    family, quantize = METHODS[name]
    wrapped = wrapped_model(nnx.merge(graphdef, params), name, size, seed)
    graph, trainable, rest = nnx.split(wrapped, nnx.LoRAParam, ...)
    tx, loss_fn, compiled = compile_step(graph, trainable, rest, size)
    batch_size = size["batch_size"]
    val = domain.val[: size["eval_batches"] * batch_size]
    eval_loss = jax.jit(loss_fn)

    def evaluate(trainable: Any) -> float:
        return float(np.mean([float(eval_loss(trainable, rest, jnp.asarray(val[i:i + batch_size])))
                              for i in range(0, len(val), batch_size)]))  # fmt: skip

    analysis = compiled.memory_analysis()
    record = {
        "family": family,
        "quantize_base": quantize if isinstance(quantize, str | None) else
        {"format": quantize.format, "loftq_iters": quantize.loftq_iters},
        "lr": size["lr"],
        "trainable_params": reparam.num_trainable(reparam.adapters_of(wrapped)),
        "base_bytes": base_bytes(wrapped),
        "frozen_state_bytes": memory.tree_bytes(rest),
        "step_temp_bytes": int(analysis.temp_size_in_bytes),
        "step_argument_bytes": int(analysis.argument_size_in_bytes),
        "val_loss_before": evaluate(trainable),
    }
    opt_state = tx.init(trainable)
    batches = BatchIterator(domain.train, batch_size, seed)
    losses = []
    began = time.perf_counter()
    for _ in range(size["steps"]):
        trainable, opt_state, loss = compiled(trainable, opt_state, rest, next(batches))
        losses.append(loss)
    losses = [float(x) for x in jax.block_until_ready(losses)]
    seconds = time.perf_counter() - began
    tail = max(1, size["steps"] // 5)
    record.update(
        val_loss_after=evaluate(trainable),
        train_loss_first=float(np.mean(losses[:tail])),
        train_loss_last=float(np.mean(losses[-tail:])),
        seconds=seconds,
        losses=losses,
    )
    return record


def table(pretrained: dict, rows: dict) -> str:
    """The markdown table of a run."""
    lines = [
        "| method | base weights (vs f32 / bf16) | step temp (default / memory scheduler) "
        "| step arguments | val loss (before → after) | vs LoRA | time vs LoRA |",
        "|---|---|---|---|---|---|---|",
        f"| pretrained | – | – | – | {pretrained['domain_val_loss']:.3f} | – | – |",
    ]
    lora = rows.get("lora")
    for name, r in rows.items():
        b = r["base_bytes"]
        gap = "–" if lora is None else f"{100 * (r['val_loss_vs_lora'] - 1):+.1f}%"
        ratio = "–" if r.get("time_ratio") is None else f"{r['time_ratio']:.2f}×"
        lines.append(
            f"| {name} | {memory.human(b['stored'])} ({b['stored'] / b['float32']:.3f} / "
            f"{b['stored'] / b['bfloat16']:.3f}) | {memory.human(r['step_temp_bytes'])} / "
            f"{memory.human(r['step_temp_bytes_memory_scheduler'])} "
            f"| {memory.human(r['step_argument_bytes'])} "
            f"| {r['val_loss_before']:.3f} → {r['val_loss_after']:.3f} | {gap} | {ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="llama_tiny smoke sizes")
    parser.add_argument("--pretrained", help="a training run directory to reuse or create "
                        "(default: runs/finetune/<model>-kjv-<steps>, finetune.py's cache)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="the JSON file (default: experiments/results/qlora*.json)")
    parser.add_argument("--step-memory", metavar="LLAMA_CONFIG_JSON",
                        help="only print step_memory(...) as JSON (the child process)")
    for key, value in SIZES["default"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value),
                            help=f"override the size's {key}")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the experiment; returns what it writes to the JSON file."""
    args = parse_args(argv)
    label = "tiny" if args.tiny else "default"
    size = {k: getattr(args, k) or v for k, v in SIZES[label].items()}
    if args.step_memory:
        config = LlamaConfig(**json.loads(args.step_memory))
        print(json.dumps(step_memory(config, args.methods, size, args.seed)))
        return {}
    run_dir = args.pretrained or os.path.join(
        "runs", "finetune", f"{size['model']}-kjv-{size['pretrain_steps']}"
    )
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        print(f"pre-training {size['model']} on the embedded KJV corpus into {run_dir}")
        finetune.pretrain(run_dir, {**size, "eval_batches": size["eval_batches"]}, args.seed)
    run_cfg, graphdef, params, step = finetune.restore_pretrained(run_dir)
    print(f"fine-tuning {run_cfg.model} from {run_dir} (step {step})")
    texts, domain_info = finetune.python_documents()
    domain = build_dataset("python", texts, ByteTokenizer(), seq_len=size["seq_len"],
                           val_fraction=0.05)  # fmt: skip
    val = domain.val[: size["eval_batches"] * size["batch_size"]]
    eval_step = make_eval_step(graphdef)
    pretrained = {
        "dir": run_dir,
        "model": run_cfg.model,
        "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "steps": step,
        "domain_val_loss": finetune.evaluate(eval_step, params, val, size["batch_size"]),
    }
    rows = {}
    for name in args.methods:
        rows[name] = run_method(name, graphdef, params, domain, size, args.seed)
        if not np.all(np.isfinite(rows[name]["losses"])):
            raise SystemExit(f"{name}: the loss is not finite at lr {size['lr']:g}; lower it")
    model_config = nnx.merge(graphdef, params).config
    scheduled = memory_scheduler_step_memory(model_config, args.methods, size, args.seed)
    for name, r in rows.items():
        r["step_temp_bytes_memory_scheduler"] = scheduled[name]["temp"]
    lora = rows.get("lora")
    for r in rows.values():
        r["time_ratio"] = None if lora is None else r["seconds"] / lora["seconds"]
        r["val_loss_vs_lora"] = None if lora is None else r["val_loss_after"] / lora[
            "val_loss_after"]
    result = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "size": size,
        "seed": args.seed,
        "domain": domain_info,
        "pretrained": pretrained,
        "command": " ".join(["python experiments/qlora.py", *(argv or sys.argv[1:])]),
        "methods": rows,
        "table": table(pretrained, rows),
    }
    print(result["table"])
    out = pathlib.Path(args.out or RESULTS / f"qlora{'_tiny' if args.tiny else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
