"""Fine-tuning demo: LoRA, DoRA and PiSSA vs full fine-tuning vs GaLore on a small pretrained LLaMA.

1. Pre-trains a LLaMA on the embedded King James Bible with our own trainer
   (``lowrank_jax.train.train``: AdamW, byte tokenizer) and restores its parameters from the
   orbax checkpoint. The run directory is a cache: ``--pretrained DIR`` reuses any
   ``lowrank-jax train`` run with a byte tokenizer (its latest checkpoint) instead of training.
2. Fine-tunes a copy of it on a different domain, Python source code: a fixed list of modules
   of the interpreter's own standard library (:data:`PYTHON_MODULES`, PSF licence; the same
   text on any machine with the same Python minor version, recorded in the JSON with the
   text's SHA-256), packed and split by :func:`lowrank_jax.data.build_dataset` (every 20th
   sequence held out).
3. Every method gets the same steps, batches, seed, warmup + cosine schedule, gradient clipping
   (1.0) and no weight decay; only the learning rate is per method (:data:`LEARNING_RATES`,
   chosen by ``--sweep``, see below):

   * ``full``: ``optax.adamw`` on every parameter;
   * ``galore``: :func:`lowrank_jax.galore_adamw` (rank ``r``, ``α = 2``, every parameter
     trained; attention/MLP matrices through the rank-``r`` projection);
   * ``lora``, ``dora``, ``pissa``: :mod:`lowrank_jax.reparam` adapters of rank ``r``,
     ``α = r``, on every attention and MLP matrix; ``optax.adamw`` on ``adapters.trainable``
     only, the loss computed on ``reparam.apply(params, adapters)``.

Reports per method the trainable parameters, the optimizer-state bytes
(``lowrank_jax.memory.state_bytes`` of what is optimized), the held-out loss on the new domain
before and after, the KJV held-out loss after (forgetting; the pre-training run's own split)
and the wall-clock time of the fine-tuning steps (compilation excluded) relative to ``full``
in the same process. Prints a markdown table and writes ``experiments/results/finetune.json``.

    python experiments/finetune.py            # llama_20m, the README table (about 5 min on 2
                                              # CPU cores, 3 min once the pre-training is cached)
    python experiments/finetune.py --tiny     # llama_tiny smoke run (finetune_tiny.json)
    python experiments/finetune.py --sweep    # the learning-rate sweep behind LEARNING_RATES

``--sweep`` fine-tunes every method at every rate of :data:`SWEEP_GRID` (same settings
otherwise), picks per method the rate with the lowest mean training loss over the last 20% of
steps (every fine-tuning batch is new: the run sees less than one epoch, so this is a held-out
estimate and the validation split stays untouched), and writes ``finetune_sweep.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from lowrank_jax import memory, reparam
from lowrank_jax.data import BatchIterator, ByteTokenizer, Dataset, build_dataset, resolve_source
from lowrank_jax.models import Llama, get_config
from lowrank_jax.optimizers import galore_adamw
from lowrank_jax.targets import path_str
from lowrank_jax.train import Checkpointer, RunConfig, make_eval_step, train
from lowrank_jax.train.step import cross_entropy, warmup_cosine

RESULTS = pathlib.Path(__file__).with_name("results")
METHODS = ("full", "galore", "lora", "dora", "pissa")
# More of the LoRA family (--methods ...): trained like LoRA (AdamW on the adapters' trainable
# arrays), at LoRA's learning rate (not swept); rank r, alpha r where the method has one.
FAMILY = ("wegeft", "lamda", "loldu", "randlora", "miss", "hydra", "vera", "lora_xs")

# Standard-library modules (single files in Python 3.10-3.13), in this order.
PYTHON_MODULES = (
    "argparse.py", "ast.py", "calendar.py", "configparser.py", "contextlib.py", "csv.py",
    "dataclasses.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "heapq.py",
    "inspect.py", "json/decoder.py", "json/encoder.py", "pprint.py", "shutil.py",
    "statistics.py", "string.py", "textwrap.py", "tokenize.py",
)  # fmt: skip

SIZES = {
    "default": dict(model="llama_20m", pretrain_steps=300, steps=120, batch_size=8, seq_len=128,
                    rank=8, gap=40, eval_batches=8),
    "tiny": dict(model="llama_tiny", pretrain_steps=40, steps=30, batch_size=4, seq_len=32,
                 rank=4, gap=10, eval_batches=4),
}  # fmt: skip

# Peak learning rates, per size: the --sweep winners (experiments/results/finetune*_sweep.json).
LEARNING_RATES = {
    "default": {"full": 1e-3, "galore": 3e-3, "lora": 1e-2, "dora": 1e-2, "pissa": 3e-3},
    "tiny": {"full": 3e-3, "galore": 3e-2, "lora": 1e-2, "dora": 3e-2, "pissa": 3e-2},
}
SWEEP_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
GALORE_SCALE = 2.0  # the GaLore paper's GLUE setting for rank 8 (Table 7)
GRAD_CLIP = 1.0


def python_documents() -> tuple[list[str], dict]:
    """The texts of :data:`PYTHON_MODULES` and a description (Python version, SHA-256)."""
    root = pathlib.Path(os.__file__).parent
    texts = [(root / name).read_text(encoding="utf-8") for name in PYTHON_MODULES]
    digest = hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()
    info = {
        "source": "Python standard library source",
        "python": platform.python_version(),
        "modules": list(PYTHON_MODULES),
        "bytes": sum(len(t.encode("utf-8")) for t in texts),
        "sha256": digest,
    }
    return texts, info


def pretrain(run_dir: str, size: dict, seed: int) -> None:
    """Pre-trains ``size['model']`` with AdamW on the embedded corpus into ``run_dir``."""
    cfg = RunConfig(
        model=size["model"],
        optimizer="adamw",
        steps=size["pretrain_steps"],
        batch_size=size["batch_size"],
        seq_len=size["seq_len"],
        seed=seed,
        out=run_dir,
        eval_every=size["pretrain_steps"],
        eval_batches=size["eval_batches"],
        checkpoint_every=size["pretrain_steps"],
        keep_checkpoints=1,
        progress=False,
    )
    train(cfg, log=lambda line: print(f"  [pre-train] {line}"))


def restore_pretrained(run_dir: str) -> tuple[RunConfig, nnx.GraphDef, dict, int]:
    """``(run config, graphdef, params, step)`` of the latest checkpoint of a training run.

    Only the parameters are read (whatever the run's optimizer), matched by path against the
    model that the run's ``config.json`` describes.
    """
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = RunConfig(**json.load(f))
    if cfg.tokenizer != "byte":
        raise SystemExit(f"{run_dir}: fine-tuning needs a byte-tokenizer run, not {cfg.tokenizer}")
    model_config = get_config(
        cfg.model,
        vocab_size=ByteTokenizer.vocab_size,
        scan_layers=cfg.scan_layers,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )
    abstract = nnx.eval_shape(lambda: Llama(model_config, rngs=nnx.Rngs(0)))
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
    step = checkpointer.latest_step()
    item = os.path.join(checkpointer.path(step), "state")
    checkpointer.close()
    with ocp.StandardCheckpointer() as reader:
        saved = reader.restore(item)["train"]["params"]
    found = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(saved)[0]}

    def take(kp: Any, want: Any) -> jax.Array:
        got = found[path_str(kp)]
        if np.shape(got) != want.shape:
            raise SystemExit(f"{item}: {path_str(kp)} has shape {np.shape(got)}, not {want.shape}")
        return jnp.asarray(got, want.dtype)

    return cfg, nnx.graphdef(abstract), jax.tree_util.tree_map_with_path(take, target), step


def evaluate(eval_step: Callable, params: Any, blocks: np.ndarray, batch_size: int) -> float:
    """Mean loss over ``blocks`` (a whole number of batches)."""
    losses = [
        float(eval_step(params, jnp.asarray(blocks[i : i + batch_size])))
        for i in range(0, len(blocks), batch_size)
    ]
    return float(np.mean(losses))


def setup(name: str, params: dict, rank: int, gap: int, schedule: Any, seed: int) -> tuple:
    """``(trainable, context, tx, effective)`` for one method.

    ``effective(trainable, context)`` is the parameter tree the model runs with; ``context``
    holds the frozen arrays (passed to the jitted step as an argument, not baked in).
    """
    if name in ("full", "galore"):
        if name == "full":
            tx = optax.adamw(schedule, weight_decay=0.0)
        else:
            tx = galore_adamw(schedule, rank=rank, update_proj_gap=gap, scale=GALORE_SCALE,
                              seed=seed)  # fmt: skip
        return jax.tree.map(jnp.copy, params), None, tx, lambda trainable, _: trainable
    make = getattr(reparam, name)
    accepted = inspect.signature(make).parameters
    options = {next(iter(accepted)): rank}  # rank, or Hydra's parallel_rank: the adapter size
    if "alpha" in accepted:
        options["alpha"] = rank
    base, adapters = jax.jit(make(**options).init)(jax.random.key(seed), params)

    def effective(trainable: Any, context: tuple) -> Any:
        base, adapters = context
        return reparam.apply(base, adapters.replace(trainable=trainable))

    context = (base, adapters.replace(trainable={}))
    return adapters.trainable, context, optax.adamw(schedule, weight_decay=0.0), effective


def finetune(
    name: str,
    lr: float,
    graphdef: nnx.GraphDef,
    eval_step: Callable,
    params: dict,
    domain: Dataset,
    kjv_val: np.ndarray,
    size: dict,
    seed: int,
) -> dict:
    """Fine-tunes ``params`` with method ``name`` at peak rate ``lr``; returns its record."""
    steps, batch_size = size["steps"], size["batch_size"]
    schedule = warmup_cosine(lr, steps, steps // 10)
    trainable, context, tx, effective = setup(name, params, size["rank"], size["gap"], schedule,
                                              seed)  # fmt: skip

    def loss_fn(trainable: Any, context: Any, batch: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, effective(trainable, context))
        return cross_entropy(model(batch[:, :-1]), batch[:, 1:])

    def step(trainable: Any, opt_state: Any, context: Any, batch: jax.Array) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(trainable, context, batch)
        factor = jnp.minimum(1.0, GRAD_CLIP / (optax.tree.norm(grads) + 1e-6))
        grads = jax.tree.map(lambda g: g * factor, grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    val = domain.val[: size["eval_batches"] * batch_size]
    merged = jax.jit(effective)  # one compile instead of many eager ops per evaluation
    record = {
        "lr": lr,
        "trainable_params": int(sum(np.size(x) for x in jax.tree.leaves(trainable))),
        "opt_state_bytes": memory.state_bytes(tx, trainable),
        "val_loss_before": evaluate(eval_step, merged(trainable, context), val, batch_size),
    }
    opt_state = tx.init(trainable)
    batch = jax.ShapeDtypeStruct(domain.train[:batch_size].shape, jnp.int32)
    compiled = (
        jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, context, batch).compile()
    )
    batches = BatchIterator(domain.train, batch_size, seed)
    losses = []
    began = time.perf_counter()
    for _ in range(steps):
        trainable, opt_state, loss = compiled(trainable, opt_state, context, next(batches))
        losses.append(loss)
    losses = [float(x) for x in jax.block_until_ready(losses)]
    seconds = time.perf_counter() - began
    final = merged(trainable, context)
    tail = max(1, steps // 5)
    record.update(
        val_loss_after=evaluate(eval_step, final, val, batch_size),
        kjv_val_loss_after=evaluate(eval_step, final, kjv_val, batch_size),
        train_loss_first=float(np.mean(losses[:tail])),
        train_loss_last=float(np.mean(losses[-tail:])),
        seconds=seconds,
        losses=losses,
    )
    return record


def table(pretrained: dict, rows: dict) -> str:
    """The markdown table of a run."""
    lines = [
        "| method | lr | trainable params | optimizer state | Python val loss (before → after) "
        "| KJV val loss after | time vs full |",
        "|---|---|---|---|---|---|---|",
        f"| pretrained (no fine-tuning) | – | – | – | {pretrained['domain_val_loss']:.3f} "
        f"| {pretrained['kjv_val_loss']:.3f} | – |",
    ]
    total = pretrained["params"]
    for name, r in rows.items():
        share = 100 * r["trainable_params"] / total
        ratio = "–" if r.get("time_ratio") is None else f"{r['time_ratio']:.2f}×"
        lines.append(
            f"| {name} | {r['lr']:g} | {r['trainable_params']:,} ({share:.2f}%) "
            f"| {memory.human(r['opt_state_bytes'])} "
            f"| {r['val_loss_before']:.3f} → {r['val_loss_after']:.3f} "
            f"| {r['kjv_val_loss_after']:.3f} | {ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="llama_tiny smoke sizes")
    parser.add_argument("--pretrained", help="a training run directory to reuse or create "
                        "(default: runs/finetune/<model>-kjv-<steps>)")  # fmt: skip
    parser.add_argument("--methods", nargs="+", choices=METHODS + FAMILY, default=list(METHODS),
                        help="the methods to run (FAMILY ones at LoRA's rate)")  # fmt: skip
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR",
                        help="override LEARNING_RATES, e.g. --lr full=3e-4 lora=1e-3")  # fmt: skip
    parser.add_argument("--sweep", action="store_true", help="run SWEEP_GRID for every method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="the JSON file (default: experiments/results/finetune*.json)")
    for key, value in SIZES["default"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value),
                            help=f"override the size's {key}")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the experiment; returns what it writes to the JSON file."""
    args = parse_args(argv)
    label = "tiny" if args.tiny else "default"
    size = {k: getattr(args, k) or v for k, v in SIZES[label].items()}
    rates = dict(LEARNING_RATES[label])
    rates.update({name: rates["lora"] for name in FAMILY})
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in METHODS + FAMILY:
            raise SystemExit(f"--lr {item}: the method must be one of {METHODS + FAMILY}")
        rates[name] = float(value)
    run_dir = args.pretrained or os.path.join(
        "runs", "finetune", f"{size['model']}-kjv-{size['pretrain_steps']}"
    )
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        print(f"pre-training {size['model']} on the embedded KJV corpus into {run_dir}")
        pretrain(run_dir, size, args.seed)
    run_cfg, graphdef, params, step = restore_pretrained(run_dir)
    print(f"fine-tuning {run_cfg.model} from {run_dir} (step {step}, {run_cfg.optimizer})")

    texts, domain_info = python_documents()
    tokenizer = ByteTokenizer()
    domain = build_dataset("python", texts, tokenizer, seq_len=size["seq_len"], val_fraction=0.05)
    kjv_name, kjv_docs = resolve_source(run_cfg.data)
    # The pre-training run's own held-out split.
    kjv = build_dataset(kjv_name, kjv_docs, tokenizer, seq_len=run_cfg.seq_len,
                        val_fraction=run_cfg.val_fraction)  # fmt: skip
    kjv_val = kjv.val[: size["eval_batches"] * size["batch_size"]]
    domain_info.update(train_sequences=len(domain.train), val_sequences=len(domain.val))
    eval_step = make_eval_step(graphdef)
    val = domain.val[: size["eval_batches"] * size["batch_size"]]
    pretrained = {
        "dir": run_dir,
        "model": run_cfg.model,
        "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "optimizer": run_cfg.optimizer,
        "steps": step,
        "data": kjv_name,
        "domain_val_loss": evaluate(eval_step, params, val, size["batch_size"]),
        "kjv_val_loss": evaluate(eval_step, params, kjv_val, size["batch_size"]),
    }
    common = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "size": size,
        "seed": args.seed,
        "galore_scale": GALORE_SCALE,
        "grad_clip": GRAD_CLIP,
        "domain": domain_info,
        "pretrained": pretrained,
        "command": " ".join(["python experiments/finetune.py", *(argv or sys.argv[1:])]),
    }
    suffix = ("_tiny" if args.tiny else "") + ("_sweep" if args.sweep else "")
    out = pathlib.Path(args.out or RESULTS / f"finetune{suffix}.json")
    run = lambda name, lr: finetune(
        name, lr, graphdef, eval_step, params, domain, kjv_val, size, args.seed
    )

    if args.sweep:
        sweep: dict[str, dict] = {}
        for name in args.methods:
            sweep[name] = {}
            for lr in SWEEP_GRID:
                r = run(name, lr)
                sweep[name][f"{lr:g}"] = {k: v for k, v in r.items() if k != "losses"}
                print(f"{name:7} lr {lr:<7g} train loss (last 20%) {r['train_loss_last']:.4f}  "
                      f"val {r['val_loss_after']:.4f}")  # fmt: skip
        final = lambda runs, lr: np.nan_to_num(runs[lr]["train_loss_last"], nan=np.inf)
        best = {n: min(runs, key=lambda lr: final(runs, lr)) for n, runs in sweep.items()}
        print("best learning rates:", best)
        result = {**common, "grid": list(SWEEP_GRID), "best": best, "runs": sweep}
    else:
        rows = {name: run(name, rates[name]) for name in args.methods}
        for name, r in rows.items():
            if not np.all(np.isfinite(r["losses"])):
                raise SystemExit(f"{name}: the loss is not finite at lr {r['lr']:g}; lower it")
        full = rows.get("full")
        for r in rows.values():
            r["time_ratio"] = None if full is None else r["seconds"] / full["seconds"]
        result = {**common, "methods": rows, "table": table(pretrained, rows)}
        print(result["table"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
