"""The training loop behind ``lowrank-jax train``: data, model, optimizer, evaluation, checkpoints.

:func:`train` runs a :class:`~lowrank_jax.train.config.RunConfig` and returns the summary it
also writes as the last line of ``out/metrics.jsonl``. Resuming is exact: the parameters,
optimizer state (GaLore's projectors included), step and data position all come from the
checkpoint, the batches are a function of ``(seed, epoch, index)`` and the step is the same
compiled function, so ``N`` steps interrupted at ``k`` and resumed reproduce the losses of ``N``
uninterrupted steps bitwise on the CPU.

Example:
  >>> from lowrank_jax.train import RunConfig, train
  >>> summary = train(RunConfig(model="llama_tiny", steps=6, out="/tmp/run"))  # doctest: +SKIP
  >>> summary["val_ppl"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lowrank_jax import memory, sharding
from lowrank_jax.data import (
    BatchIterator,
    IteratorState,
    build_dataset,
    make_tokenizer,
    resolve_source,
)
from lowrank_jax.models import Llama, get_config
from lowrank_jax.train.checkpoint import Checkpointer
from lowrank_jax.train.config import ConfigError, RunConfig
from lowrank_jax.train.metrics import MetricsWriter, peak_memory, progress_bar
from lowrank_jax.train.registry import OptimizerArgs, get_optimizer
from lowrank_jax.train.step import TrainState, make_eval_step, make_train_step, warmup_cosine

__all__ = ["TrainError", "train"]

# Settings a checkpoint depends on; a resumed run must agree on all of them. (steps, periods,
# out, progress may change between runs.)
_FINGERPRINT = (
    "model",
    "optimizer",
    "rank",
    "update_proj_gap",
    "galore_scale",
    "lr",
    "min_lr_ratio",
    "warmup",
    "weight_decay",
    "grad_clip",
    "batch_size",
    "seq_len",
    "seed",
    "data",
    "tokenizer",
    "bpe_vocab_size",
    "val_fraction",
    "scan_layers",
    "remat",
    "dtype",
    "param_dtype",
    "optimizer_options",
)


class TrainError(RuntimeError):
    """A run that cannot start as asked (e.g. it would overwrite another run's checkpoints)."""


def _fingerprint(cfg: RunConfig, vocab_size: int) -> dict:
    meta = {key: getattr(cfg, key) for key in _FINGERPRINT}
    meta["vocab_size"] = vocab_size
    return meta


def _evaluate(
    eval_step: Callable, params: Any, val: np.ndarray, cfg: RunConfig, place: Callable
) -> float:
    """Mean validation loss over the first ``eval_batches * batch_size`` held-out sequences."""
    blocks = val[: cfg.eval_batches * cfg.batch_size]
    total, count = 0.0, 0
    for start in range(0, len(blocks), cfg.batch_size):
        batch = blocks[start : start + cfg.batch_size]
        total += float(eval_step(params, place(batch))) * len(batch)
        count += len(batch)
    return total / count


def _init_distributed(cfg: RunConfig) -> None:
    """``jax.distributed.initialize`` for ``--distributed`` / ``--coordinator`` (once).

    On the CPU, cross-process collectives go through gloo (JAX's CPU default has none).
    """
    initialized = getattr(jax.distributed, "is_initialized", lambda: False)  # newer JAX only
    if not (cfg.distributed or cfg.coordinator) or initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    given = {
        "coordinator_address": cfg.coordinator,
        "num_processes": cfg.num_processes,
        "process_id": cfg.process_id,
    }
    try:
        jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
    except (RuntimeError, ValueError) as err:
        raise TrainError(
            f"jax.distributed.initialize failed: {str(err).strip().splitlines()[0][:300]} "
            "(check --coordinator, --num-processes and --process-id, and that every process "
            "was started)"
        ) from None


def _make_mesh(cfg: RunConfig) -> jax.sharding.Mesh | None:
    """The run's ``fsdp x tensor`` mesh over every process's devices (``None``: one device)."""
    shape = cfg.mesh_shape
    if shape is None and jax.process_count() == 1:
        return None
    fsdp, tensor = shape or (None, 1)
    try:
        mesh = sharding.make_mesh(fsdp, tensor, explicit=False)
    except ValueError as err:
        raise ConfigError(f"--mesh {cfg.mesh}: {err}") from None
    if cfg.batch_size % mesh.shape["fsdp"]:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must be divisible by the mesh's fsdp size "
            f"{mesh.shape['fsdp']} (each device takes an equal share of the batch)"
        )
    return mesh


class _NoMetrics:
    """What processes other than process 0 write metrics to."""

    def write(self, record: dict) -> None:
        del record

    def close(self) -> None:
        pass


def train(cfg: RunConfig, *, log: Callable[[str], None] = print) -> dict:
    """Runs ``cfg``; returns the summary (also the last line of ``metrics.jsonl``).

    Args:
      cfg: the run configuration.
      log: where the human-readable lines go (the final report).

    Returns:
      The summary dict: ``step``, ``loss``, ``val_loss``, ``val_ppl``, ``tokens_per_s``,
      ``peak_memory_bytes`` and its ``peak_memory_source``, ``opt_state_bytes`` next to
      ``adamw_state_bytes``, ``checkpoint``.

    Raises:
      ConfigError, DataError, CheckpointError, TrainError, ValueError: one-line problems the
        CLI reports without a traceback.
    """
    cfg.validate()
    _init_distributed(cfg)
    primary = jax.process_index() == 0
    if not primary:
        log = lambda line: None  # noqa: E731 -- process 0 reports
    entry = get_optimizer(cfg.optimizer)
    get_config(cfg.model)  # an unknown model fails before the data is read
    mesh = _make_mesh(cfg)  # and so does a mesh that does not fit the devices
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return _train(cfg, entry, mesh, primary, log)


def _shardings(tx: Any, abstract: TrainState, model_config: Any, mesh: Any) -> TrainState:
    """A ``NamedSharding`` per leaf of the train state: LLaMA's partition rules for the
    parameters, :func:`lowrank_jax.sharding.state_specs` for the optimizer state."""
    model = nnx.eval_shape(lambda: Llama(model_config, rngs=nnx.Rngs(0)))
    param_specs = sharding.param_specs(nnx.state(model, nnx.Param))
    treedef = jax.tree.structure(abstract.params)
    param_specs = treedef.unflatten(
        [
            sharding.fit_spec(leaf.shape, spec, mesh)
            for leaf, spec in zip(
                treedef.flatten_up_to(abstract.params), treedef.flatten_up_to(param_specs)
            )
        ]
    )
    specs = TrainState(
        P(), param_specs, sharding.state_specs(tx, abstract.params, param_specs, mesh)
    )
    return sharding.named(specs, mesh)


def _train(
    cfg: RunConfig, entry: Any, mesh: Any, primary: bool, log: Callable[[str], None]
) -> dict:
    """:func:`train` after the checks, inside the run's mesh (if any)."""
    os.makedirs(cfg.out, exist_ok=True)
    checkpointer = Checkpointer(os.path.join(cfg.out, "checkpoints"), cfg.keep_checkpoints)
    latest = checkpointer.latest_step()
    if latest is not None and not cfg.resume:
        raise TrainError(
            f"{cfg.out} already has checkpoints (latest step {latest}); pass --resume to "
            "continue that run, or choose another --out"
        )

    name, documents = resolve_source(cfg.data)
    tokenizer = make_tokenizer(
        cfg.tokenizer,
        documents,
        vocab_size=cfg.bpe_vocab_size,
        path=os.path.join(cfg.out, "tokenizer.json") if cfg.tokenizer == "bpe" else None,
    )
    dataset = build_dataset(
        name,
        documents,
        tokenizer,
        seq_len=cfg.seq_len,
        val_fraction=cfg.val_fraction,
        min_train_blocks=cfg.batch_size,
    )
    model_config = get_config(
        cfg.model,
        vocab_size=tokenizer.vocab_size,
        scan_layers=cfg.scan_layers,
        remat=cfg.remat,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )
    model_config = dataclasses.replace(
        model_config,
        max_position_embeddings=max(cfg.seq_len, model_config.max_position_embeddings),
    )
    rank = cfg.rank or max(1, model_config.hidden_size // 4)
    peak_lr = cfg.lr if cfg.lr is not None else entry.default_lr
    schedule = warmup_cosine(peak_lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
    try:
        tx = entry.factory(
            OptimizerArgs(
                learning_rate=schedule,
                rank=rank,
                update_proj_gap=cfg.update_proj_gap,
                scale=cfg.galore_scale,
                weight_decay=cfg.weight_decay,
                seed=cfg.seed,
                total_steps=cfg.steps,
                extra=dict(cfg.optimizer_options),
            )
        )
    except TypeError as err:  # an option the optimizer does not take
        raise TrainError(f"optimizer {cfg.optimizer!r}: {err} (check --opt)") from err

    def init_state() -> TrainState:
        model = Llama(model_config, rngs=nnx.Rngs(cfg.seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return TrainState(jnp.int32(0), params, tx.init(params))

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(model_config, rngs=nnx.Rngs(0))))
    abstract = jax.eval_shape(init_state)
    state_sharding = batch_sharding = None
    if mesh is not None:
        state_sharding = _shardings(tx, abstract, model_config, mesh)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            state_sharding,
        )
        batch_sharding = NamedSharding(mesh, P("fsdp"))

    def place(batch: np.ndarray) -> jax.Array:
        """A host batch (the same on every process) as a global array sharded over fsdp."""
        if mesh is None:
            return jnp.asarray(batch)
        spec = P("fsdp") if len(batch) % mesh.shape["fsdp"] == 0 else P()
        return jax.make_array_from_callback(
            batch.shape, NamedSharding(mesh, spec), lambda index: batch[index]
        )

    meta = _fingerprint(cfg, model_config.vocab_size)
    if latest is not None:
        state, data_state = checkpointer.restore(latest, abstract, meta)
        log(f"resuming from {checkpointer.path(latest)} (step {latest})")
    else:
        if cfg.resume:
            log(f"no checkpoint in {checkpointer.directory}; starting from step 0")
        state = jax.jit(init_state, out_shardings=state_sharding)()
        data_state = IteratorState(0, 0)
    start = int(state.step)
    end = cfg.stop_at or cfg.steps
    if start >= end:
        raise TrainError(
            f"the run in {cfg.out} is already at step {start}; raise --steps to train further"
        )
    if primary:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    train_step = make_train_step(
        graphdef,
        tx,
        grad_clip=cfg.grad_clip,
        schedule=schedule,
        state_sharding=state_sharding,
        batch_sharding=batch_sharding,
    )
    eval_step = make_eval_step(graphdef, mesh)
    batches = BatchIterator(dataset.train, cfg.batch_size, cfg.seed, data_state)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    metrics = MetricsWriter(metrics_path, resume_step=start) if primary else _NoMetrics()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = progress_bar(cfg.steps, start, cfg.progress and primary)
    timed_steps, timed_seconds = 0, 0.0
    loss, val_loss = float("nan"), None
    saved = checkpointer.path(latest) if latest is not None else None
    try:
        for step in range(start + 1, end + 1):
            batch = place(next(batches))
            began = time.perf_counter()
            state, out = train_step(state, batch)
            loss = float(out["loss"])
            seconds = time.perf_counter() - began
            if step > start + 1:  # the first step of a process includes compilation
                timed_steps, timed_seconds = timed_steps + 1, timed_seconds + seconds
            if not math.isfinite(loss):
                raise TrainError(f"the loss is {loss} at step {step}; lower --lr or --grad-clip")
            rate = tokens_per_step / seconds
            if step % cfg.log_every == 0 or step == end:
                metrics.write(
                    {
                        "step": step,
                        "loss": loss,
                        "grad_norm": float(out["grad_norm"]),
                        "lr": float(out["lr"]),
                        "tokens": step * tokens_per_step,
                        "tokens_per_s": rate,
                        "epoch": round(batches.epoch_fraction, 4),
                    }
                )
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = _evaluate(eval_step, state.params, dataset.val, cfg, place)
                metrics.write(
                    {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700))}
                )
                ppl = math.exp(min(val_loss, 700))
                if primary:
                    bar.write(f"step {step}: val_loss {val_loss:.4f}, val_ppl {ppl:.2f}")
            if step % cfg.checkpoint_every == 0 or step == end:
                saved = checkpointer.save(step, state, batches.state, meta)
    finally:
        bar.close()
        checkpointer.close()

    memory_bytes, memory_source = peak_memory()
    params = state.params
    adamw_bytes = memory.state_bytes(optax.adamw(1e-3), params)
    opt_bytes = memory.state_bytes(tx, params)
    summary = {
        "summary": True,
        "step": end,
        "loss": loss,
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 700)) if val_loss is not None else None,
        # Excludes each process's first step, which includes compilation.
        "tokens_per_s": tokens_per_step * timed_steps / timed_seconds if timed_steps else None,
        "peak_memory_bytes": memory_bytes,
        "peak_memory_source": memory_source,
        "optimizer": cfg.optimizer,
        "opt_state_bytes": opt_bytes,
        "adamw_state_bytes": adamw_bytes,
        "param_count": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "model": cfg.model,
        "data": dataset.name,
        "checkpoint": saved,
    }
    metrics.write(summary)
    metrics.close()
    _report(cfg, summary, rank if entry.low_rank else None, log)
    return summary


def _report(cfg: RunConfig, s: dict, rank: int | None, log: Callable[[str], None]) -> None:
    method = f"{cfg.optimizer} (rank {rank})" if rank else cfg.optimizer
    log(
        f"trained {cfg.model} ({s['param_count'] / 1e6:.2f}M params) with {method} on "
        f"{s['data']} for {s['step']} of {cfg.steps} steps"
    )
    if s["val_ppl"] is not None:
        log(f"validation loss {s['val_loss']:.4f}, perplexity {s['val_ppl']:.2f}")
    ratio = s["opt_state_bytes"] / s["adamw_state_bytes"]
    log(
        f"optimizer state {memory.human(s['opt_state_bytes'])} "
        f"(AdamW: {memory.human(s['adamw_state_bytes'])}, {ratio:.0%})"
    )
    if s["tokens_per_s"]:
        log(f"throughput {s['tokens_per_s']:,.0f} tokens/s")
    log(f"peak memory {memory.human(s['peak_memory_bytes'])} ({s['peak_memory_source']})")
    log(f"checkpoint: {s['checkpoint']}")
    log(f"metrics: {os.path.join(cfg.out, 'metrics.jsonl')}")
