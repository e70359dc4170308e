"""Pre-training through a reparametrisation: GaLore's Table 2 baselines LoRA, ReLoRA and Low-Rank.

The trainer (:func:`lowrank_jax.train.train`) trains an optax optimizer over every weight. The
GaLore paper's other pre-training baselines train something else: adapters on a frozen random
base (LoRA), adapters merged into that base and re-initialised every ``T`` steps (ReLoRA), or a
product ``W = s·A B`` with no base at all (Low-Rank). This module runs them on the library's
public pieces, with the trainer's own data, batches, model init, schedule and evaluation, so
their validation loss compares with the trainer's rows of ``pretrain_compare.py``:

- data: the trainer's dataset (``lowrank_jax.train.run_dataset``: byte tokenizer, packed
  blocks, the same held-out split) and :class:`~lowrank_jax.data.BatchIterator` with the run's
  seed (the same batches in the same order);
- model: ``Llama(model_config, rngs=nnx.Rngs(seed))`` as the trainer initialises it;
- adapters: :func:`lowrank_jax.reparam.lora` on the trainer's default targets (the 7
  attention and MLP kernels of every layer, the matrices GaLore projects); embeddings, norms
  and the head are trained fully, as in the paper's baselines;
- step: :func:`lowrank_jax.train.step.make_train_step` with a custom ``loss_fn`` (the frozen
  base passed as a non-donated extra argument), global-norm clipping and the non-finite guard;
- optimizer: the trainer's registered AdamW (``get_optimizer("adamw")``), one over the full
  leaves and one over the adapters (so ReLoRA prunes only the adapters' moments);
- schedule: the trainer's warmup + cosine (``fresh_plan``), ReLoRA's jagged cosine
  (:func:`lowrank_jax.reparam.jagged_cosine_schedule`) for ReLoRA;
- evaluation: the trainer's eval step (:func:`~lowrank_jax.train.step.make_eval_step`) on the
  effective weights, over the same validation blocks (``lowrank_jax.train.evaluate``).

Methods (:data:`KINDS`):

- ``full``: every weight trained by AdamW (no reparam): reproduces the trainer's AdamW run; the
  check that this loop is the trainer's.
- ``lora``: ``W = W0 + s·A B``, ``W0`` the random init (frozen), ``A`` Kaiming-uniform,
  ``B = 0`` (PEFT's init), ``s = alpha / rank``.
- ``relora``: ``lora`` whose product is merged into ``W0`` every ``relora_every`` steps, the
  adapters re-initialised and 99% of their Adam moments pruned by magnitude
  (:class:`lowrank_jax.reparam.ReLoRA`), under the jagged cosine schedule (re-warmed over
  ``relora_warmup`` steps after each restart). No full-rank warm-up (as in the GaLore paper).
- ``lowrank``: ``W = s·A B`` with no base: LoRA on a zero base whose factors start as PiSSA's,
  the top-``rank`` singular triplets of the model's own random init (so the product starts as
  the best rank-``r`` approximation of the init, not as zero). No full-size trained matrix.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lowrank_jax import memory, reparam
from lowrank_jax.data import BatchIterator, IteratorState
from lowrank_jax.models import Llama
from lowrank_jax.targets import path_str
from lowrank_jax.train import (
    RunConfig,
    evaluate,
    get_optimizer,
    run_dataset,
    run_model_config,
    run_optimizer_args,
)
from lowrank_jax.train.resume import fresh_plan
from lowrank_jax.train.step import TrainState, cross_entropy, make_eval_step, make_train_step

__all__ = ["KINDS", "ReparamSpec", "Setup", "build", "train_reparam"]

KINDS = ("full", "lora", "relora", "lowrank")


@dataclasses.dataclass(frozen=True)
class ReparamSpec:
    """What to pre-train: the kind and its hyperparameters (the rest is the run's config)."""

    kind: str
    rank: int = 32
    alpha: float = 32.0  # the GaLore paper's LoRA alpha; s = alpha / rank
    relora_every: int = 50
    relora_warmup: int = 5
    relora_prune: float = 0.99

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


def _is_none(x: Any) -> bool:
    return x is None


def _split(params: Any, paths: set[str]) -> tuple[Any, dict]:
    """``params`` with the leaves at ``paths`` set to ``None`` (an empty subtree to optax), and
    those leaves as ``{path: array}``."""
    taken: dict = {}

    def one(kp: Any, leaf: Any) -> Any:
        path = path_str(kp)
        if path in paths:
            taken[path] = leaf
            return None
        return leaf

    return jax.tree_util.tree_map_with_path(one, params), taken


def _join(dense: Any, leaves: dict) -> Any:
    """Inverse of :func:`_split`: the ``None`` leaves of ``dense`` filled from ``leaves``."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: leaves[path_str(kp)] if x is None else x, dense, is_leaf=_is_none
    )


def two_adam(
    dense: optax.GradientTransformation, lora: optax.GradientTransformation
) -> optax.GradientTransformation:
    """One optax transformation over ``{"dense": ..., "lora": ...}`` made of two: ``dense`` for
    the fully trained leaves, ``lora`` for the adapters. Its state is ``(dense's, lora's)``, so
    a ReLoRA restart prunes the adapters' state alone (with ``lora`` as its ``tx``)."""

    def init(params: Any) -> tuple:
        return (dense.init(params["dense"]), lora.init(params["lora"]))

    def update(grads: Any, state: tuple, params: Any = None) -> tuple[Any, tuple]:
        p = params or {"dense": None, "lora": None}
        ud, sd = dense.update(grads["dense"], state[0], p["dense"])
        ul, sl = lora.update(grads["lora"], state[1], p["lora"])
        return {"dense": ud, "lora": ul}, (sd, sl)

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass
class Setup:
    """One run's pieces: the initial state, the frozen base, the step, the restart, the eval."""

    spec: ReparamSpec
    cfg: RunConfig
    lr: float
    dataset: Any
    graphdef: Any
    state: TrainState
    frozen: dict  # the base of the adapted leaves ({} for full and lowrank)
    template: reparam.Adapters | None  # the adapters' static sites
    tx: optax.GradientTransformation
    schedule: Callable
    train_step: Callable
    restart: Callable | None  # (key, state, frozen) -> (state, frozen): ReLoRA only
    effective: Callable  # (params, frozen) -> the model's full parameter tree
    full_param_count: int

    def eval_params(self, state: TrainState) -> Any:
        return self.effective(state.params, self.frozen)


def build(spec: ReparamSpec, cfg: RunConfig, lr: float) -> Setup:
    """Everything a run of ``spec`` needs, for the trainer settings ``cfg`` at peak rate ``lr``."""
    dataset = run_dataset(cfg)
    model_config = run_model_config(cfg, dataset.tokenizer.vocab_size)
    model = Llama(model_config, rngs=nnx.Rngs(cfg.seed))
    graphdef = nnx.graphdef(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    full_count = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    plan = fresh_plan(cfg, lr)
    if spec.kind == "relora":
        schedule = reparam.jagged_cosine_schedule(
            lr, cfg.steps, plan.warmup_steps, spec.relora_every, spec.relora_warmup,
            plan.min_ratio,
        )  # fmt: skip
    else:
        schedule = plan.schedule()
    adamw = lambda: get_optimizer("adamw").factory(  # noqa: E731 -- the trainer's AdamW
        run_optimizer_args(cfg, schedule, spec.rank)
    )

    if spec.kind == "full":
        tx = adamw()
        state = TrainState(jnp.int32(0), params, tx.init(params))

        def effective(p: Any, frozen: dict) -> Any:
            del frozen
            return p

        def loss_fn(p: Any, batch: jax.Array, frozen: dict) -> tuple[jax.Array, jax.Array]:
            logits = nnx.merge(graphdef, effective(p, frozen))(batch[:, :-1])
            return cross_entropy(logits, batch[:, 1:]), jnp.float32(1)

        train_step = make_train_step(
            None, tx, grad_clip=cfg.grad_clip, schedule=schedule, loss_fn=loss_fn,
            skip_nonfinite=cfg.skip_nonfinite,
        )  # fmt: skip
        return Setup(spec, cfg, lr, dataset, graphdef, state, {}, None, tx, schedule, train_step,
                     None, effective, full_count)  # fmt: skip

    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)  # not the model's init stream
    if spec.kind == "lowrank":
        # PiSSA's factors of the random init: s·A B = its best rank-r approximation.
        params, adapters = reparam.pissa(spec.rank, spec.alpha).init(key, params)
    else:
        params, adapters = reparam.lora(spec.rank, spec.alpha).init(key, params)
    sites = {s.path: s for s in adapters.sites}
    dense, base = _split(params, set(sites))
    template = adapters.replace(trainable=None)
    if spec.kind == "lowrank":
        base = {}  # no base: W = s·A B

        def base_of(frozen: dict) -> dict:
            del frozen
            return {p: jnp.zeros(s.shape, s.dtype) for p, s in sites.items()}
    else:

        def base_of(frozen: dict) -> dict:
            return frozen

    def effective(p: Any, frozen: dict) -> Any:
        full = _join(p["dense"], base_of(frozen))
        return reparam.apply(full, template.replace(trainable=p["lora"]))

    def loss_fn(p: Any, batch: jax.Array, frozen: dict) -> tuple[jax.Array, jax.Array]:
        logits = nnx.merge(graphdef, effective(p, frozen))(batch[:, :-1])
        return cross_entropy(logits, batch[:, 1:]), jnp.float32(1)

    lora_tx = adamw()
    tx = two_adam(adamw(), lora_tx)
    trainable = {"dense": dense, "lora": adapters.trainable}
    state = TrainState(jnp.int32(0), trainable, tx.init(trainable))
    train_step = make_train_step(None, tx, grad_clip=cfg.grad_clip, schedule=schedule,
                                 loss_fn=loss_fn, skip_nonfinite=cfg.skip_nonfinite)  # fmt: skip
    restart = None
    if spec.kind == "relora":
        relora = reparam.ReLoRA(reparam.lora(spec.rank, spec.alpha), every=spec.relora_every,
                                prune_ratio=spec.relora_prune)  # fmt: skip

        @jax.jit
        def restart(key: jax.Array, state: TrainState, frozen: dict) -> tuple[TrainState, dict]:
            full = _join(state.params["dense"], frozen)
            adapters = template.replace(trainable=state.params["lora"])
            merged, fresh, lora_state = relora.restart(
                key, full, adapters, state.opt_state[1], lora_tx
            )
            _, frozen = _split(merged, set(sites))  # the other leaves are not touched by merge
            params = {"dense": state.params["dense"], "lora": fresh.trainable}
            return state._replace(params=params, opt_state=(state.opt_state[0], lora_state)), frozen

        restart = restart.lower(key, state, base).compile()  # compiled before the timed steps

    return Setup(spec, cfg, lr, dataset, graphdef, state, base, template, tx, schedule,
                 train_step, restart, effective, full_count)  # fmt: skip


def step_peak(setup: Setup) -> memory.CompiledMemory:
    """XLA's memory analysis of the run's compiled train step (abstract arguments)."""
    abstract = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree
    )
    batch = jax.ShapeDtypeStruct((setup.cfg.batch_size, setup.cfg.seq_len + 1), jnp.int32)
    lowered = setup.train_step.lower(abstract(setup.state), batch, abstract(setup.frozen))
    return memory.CompiledMemory.of(lowered.compile())


def train_reparam(
    spec: ReparamSpec, cfg: RunConfig, lr: float, log: Callable[[str], None] = lambda s: None
) -> dict:
    """Pre-trains ``spec`` for ``cfg.steps`` steps as the trainer would; returns the record
    (the fields of ``pretrain_compare.run_one``'s, plus ``restarts`` and ``trainable_params``).

    Throughput: tokens per second of the timed steps (the first excluded, as the trainer's),
    a step's time including ReLoRA's restart when one follows it.
    """
    began = time.perf_counter()
    setup = build(spec, cfg, lr)
    state, frozen = setup.state, setup.frozen
    batches = BatchIterator(setup.dataset.train, cfg.batch_size, cfg.seed, IteratorState(0, 0))
    eval_step = make_eval_step(setup.graphdef)
    effective = jax.jit(setup.effective)
    restart_key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
    train_steps, train_loss, val_steps, val_loss = [], [], [], []
    timed_steps, timed_seconds, skipped, restarts = 0, 0.0, 0, []
    for step in range(1, cfg.steps + 1):
        batch = jnp.asarray(next(batches))
        t0 = time.perf_counter()
        state, out = setup.train_step(state, batch, frozen)
        loss = float(out["loss"])
        if setup.restart is not None and step % spec.relora_every == 0 and step < cfg.steps:
            state, frozen = setup.restart(jax.random.fold_in(restart_key, step), state, frozen)
            jax.block_until_ready(frozen)
            restarts.append(step)
        seconds = time.perf_counter() - t0
        if step > 1:
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + seconds
        skipped += bool(out["skipped"])
        train_steps.append(step)
        train_loss.append(loss)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            value = evaluate(eval_step, effective(state.params, frozen), setup.dataset.val,
                              cfg, jnp.asarray)  # fmt: skip
            val_steps.append(step)
            val_loss.append(value)
            log(f"{spec.kind} lr {lr:g} seed {cfg.seed} step {step}: val loss {value:.4f}")
    setup.frozen = frozen
    final = val_loss[-1] if val_loss and math.isfinite(val_loss[-1]) else None
    tokens = cfg.batch_size * cfg.seq_len
    return {
        "seed": cfg.seed,
        "lr": lr,
        "val_loss": final,
        "tokens_per_s": tokens * timed_steps / timed_seconds if timed_steps else None,
        "opt_state_bytes": memory.state_bytes(setup.tx, state.params),
        "adamw_state_bytes": memory.state_bytes(optax.adamw(1e-3), setup.eval_params(state)),
        "param_count": setup.full_param_count,
        "trainable_params": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
        "frozen_params": int(sum(np.size(x) for x in jax.tree.leaves(frozen))),
        "skipped_steps": skipped,
        "restarts": restarts,
        "error": None if final is not None else "non-finite validation loss",
        "seconds": time.perf_counter() - began,
        "val_curve": [val_steps, val_loss],
        "train_curve": [train_steps, train_loss],
        "_setup": setup,
        "_state": state,
    }
