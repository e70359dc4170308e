"""The training loop behind ``lowrank-jax train``: data, model, optimizer, evaluation, checkpoints.

:func:`train` runs a :class:`~lowrank_jax.train.config.RunConfig` and returns the summary it
also writes as the last line of ``out/metrics.jsonl``. Its named steps, in order: check the
settings and ``--out``; open the checkpoints; load the data; the model config; the learning-rate
plan and the optimizer; the abstract train state and its shardings; compile the step (and check
its memory against the device's before anything is allocated); restore the newest intact
checkpoint or initialise; the loop; the summary.

Resuming is exact: the parameters, optimizer state (GaLore's projectors included), step and
data position all come from the checkpoint, the batches are a function of
``(seed, epoch, index)`` and the step is the same compiled function, so ``N`` steps interrupted
at ``k`` and resumed reproduce the losses of ``N`` uninterrupted steps bitwise on the CPU. A
resumed run must agree with the checkpoint on every identity setting
(:mod:`lowrank_jax.train.resume`); a corrupt checkpoint falls back to the newest intact one.

Example:
  >>> from lowrank_jax.train import RunConfig, train
  >>> summary = train(RunConfig(model="llama_tiny", steps=6, out="/tmp/run"))  # doctest: +SKIP
  >>> summary["val_ppl"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lowrank_jax import memory
from lowrank_jax.data import Dataset, IteratorState, build_dataset, make_tokenizer, resolve_source
from lowrank_jax.models import Llama, get_config
from lowrank_jax.train.checkpoint import Checkpointer, CorruptCheckpointError
from lowrank_jax.train.config import ConfigError, RunConfig
from lowrank_jax.train.devices import init_distributed, make_run_mesh, state_shardings
from lowrank_jax.train.layerwise import LayerwiseError
from lowrank_jax.train.memory_check import check_step_memory
from lowrank_jax.train.metrics import warn_line
from lowrank_jax.train.registry import OptimizerArgs, OptimizerEntry, get_optimizer
from lowrank_jax.train.resume import SchedulePlan, fingerprint, fresh_plan, resumed_plan
from lowrank_jax.train.run_loop import TrainError, report, run_steps, summarize
from lowrank_jax.train.step import TrainState, make_eval_step, make_train_step

__all__ = [
    "TrainError",
    "run_dataset",
    "run_model_config",
    "run_optimizer_args",
    "step_memory",
    "train",
]


def train(
    cfg: RunConfig,
    *,
    log: Callable[[str], None] | None = print,
    warn: Callable[[str], None] = warn_line,
) -> dict:
    """Runs ``cfg``; returns the summary (also the last line of ``metrics.jsonl``).

    Args:
      cfg: the run configuration.
      log: where the human-readable lines go: each evaluation's line, resuming, the final
        report (``None``: nowhere; the metrics file has them all).
      warn: where warnings go (a checkpoint fallen back from, a skipped step); stderr.

    Returns:
      The summary dict: ``step``, ``loss``, ``val_loss``, ``val_ppl``, ``tokens_per_s``,
      ``peak_memory_bytes`` and its ``peak_memory_source``, ``opt_state_bytes`` next to
      ``adamw_state_bytes``, ``skipped_steps``, ``checkpoint``.

    Raises:
      ConfigError, DataError, CheckpointError, TrainError, ValueError: one-line problems the
        CLI reports without a traceback.
    """
    cfg.validate()
    check_out(cfg.out)
    init_distributed(cfg)
    primary = jax.process_index() == 0
    if log is None:
        log = lambda line: None  # noqa: E731
    if not primary:
        log = warn = lambda line: None  # noqa: E731 -- process 0 reports
    entry = get_optimizer(cfg.optimizer)
    get_config(cfg.model)  # an unknown model fails before the data is read
    mesh = make_run_mesh(cfg)  # and so does a mesh that does not fit the devices
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return _train(cfg, entry, mesh, primary, log, warn)


def step_memory(cfg: RunConfig, vocab_size: int | None = None) -> memory.CompiledMemory:
    """XLA's memory analysis of the train step :func:`train` would compile for a fresh run of
    ``cfg``: the same model config, optimizer, schedule, clipping, guard and shardings, lowered
    with abstract arguments (nothing is allocated or trained, nothing is written to ``--out``).

    Args:
      cfg: the run configuration.
      vocab_size: the tokenizer's vocabulary; ``None``: the byte tokenizer's, or the BPE
        tokenizer ``--out`` holds, else one trained on ``--data`` as :func:`train` would (not
        saved).

    Example:
      >>> from lowrank_jax.train.loop import step_memory
      >>> cfg = RunConfig(model="llama_tiny", batch_size=2, seq_len=32, out="/tmp/run")
      >>> step_memory(cfg, vocab_size=259).peak_bytes > 0
      True
    """
    cfg.validate()
    entry = get_optimizer(cfg.optimizer)
    if vocab_size is None:
        saved = os.path.join(cfg.out, "tokenizer.json")  # a BPE run's, which train() reuses
        if cfg.tokenizer == "bpe" and os.path.exists(saved):
            tokenizer = make_tokenizer("bpe", path=saved)
        else:
            documents = resolve_source(cfg.data)[1] if cfg.tokenizer == "bpe" else ()
            tokenizer = make_tokenizer(cfg.tokenizer, documents, vocab_size=cfg.bpe_vocab_size)
        vocab_size = tokenizer.vocab_size
    mesh = make_run_mesh(cfg)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        model_config = run_model_config(cfg, vocab_size)
        plan = fresh_plan(cfg, entry.default_lr)
        tx = _optimizer(cfg, entry, model_config, plan)
        setup = _Setup.create(cfg, tx, model_config, mesh)
        return memory.CompiledMemory.of(setup.compile_step(cfg, tx, plan))


def check_out(out: str) -> None:
    """``--out`` is a directory, or can be created: nothing is written yet.

    Raises:
      ConfigError: ``out`` is a file, lies under a file, or its nearest existing folder is not
        writable.
    """
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--out {out} is a file, not a directory; choose another --out")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable; choose another --out")


def _train(
    cfg: RunConfig,
    entry: OptimizerEntry,
    mesh: jax.sharding.Mesh | None,
    primary: bool,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> dict:
    """:func:`train` after the checks, inside the run's mesh (if any)."""
    checkpointer = _open_checkpoints(cfg)
    try:
        dataset = run_dataset(cfg)
        model_config = run_model_config(cfg, dataset.tokenizer.vocab_size)
        plan = _expected_plan(cfg, entry, checkpointer, model_config.vocab_size)
        tx = _optimizer(cfg, entry, model_config, plan)
        setup = _Setup.create(cfg, tx, model_config, mesh)
        train_step = setup.compile_step(cfg, tx, plan)
        state, position, plan, resumed = _restore_or_init(
            cfg, entry, setup, checkpointer, model_config.vocab_size, log, warn
        )
        if plan != setup.plan:  # fell back to a checkpoint of another plan
            tx = _optimizer(cfg, entry, model_config, plan)
            train_step = setup.compile_step(cfg, tx, plan)
        if primary:
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=2)
        result = run_steps(
            cfg,
            train_step=train_step,
            eval_step=make_eval_step(setup.graphdef, mesh),
            state=state,
            position=position,
            dataset=dataset,
            place=setup.place,
            save=lambda step, state, position: checkpointer.save(
                step, state, position, fingerprint(cfg, model_config.vocab_size, plan)
            ),
            saved=resumed,
            primary=primary,
            log=log,
            warn=warn,
        )
    finally:
        checkpointer.close()
    summary = summarize(cfg, result, tx, dataset.name, primary)
    rank = _rank(cfg, model_config) if entry.low_rank else None
    report(cfg, summary, rank, log)
    return summary


def _open_checkpoints(cfg: RunConfig) -> Checkpointer:
    """Creates ``--out`` and opens its checkpoints; refuses to mix two runs in one ``--out``."""
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"--out {cfg.out}: cannot create it ({err.strerror}); choose another --out"
        ) from None
    checkpointer = Checkpointer(os.path.join(cfg.out, "checkpoints"), cfg.keep_checkpoints)
    latest = checkpointer.latest_step()
    if latest is not None and not cfg.resume:
        checkpointer.close()
        raise TrainError(
            f"{cfg.out} already has checkpoints (latest step {latest}); pass --resume to "
            "continue that run, or choose another --out"
        )
    return checkpointer


def run_dataset(cfg: RunConfig) -> Dataset:
    """The run's data as :func:`train` reads it: ``--data``'s documents, the tokenizer (a BPE
    is trained once and kept in ``--out``), packed into ``seq_len + 1`` blocks, split into
    training and held-out blocks. For code that trains something else on the trainer's data
    (``experiments/pretrain_reparam.py``)."""
    name, documents = resolve_source(cfg.data)
    tokenizer = make_tokenizer(
        cfg.tokenizer,
        documents,
        vocab_size=cfg.bpe_vocab_size,
        path=os.path.join(cfg.out, "tokenizer.json") if cfg.tokenizer == "bpe" else None,
    )
    return build_dataset(
        name,
        documents,
        tokenizer,
        seq_len=cfg.seq_len,
        val_fraction=cfg.val_fraction,
        min_train_blocks=cfg.batch_size,
    )


def run_model_config(cfg: RunConfig, vocab_size: int) -> Any:
    """The :class:`~lowrank_jax.models.LlamaConfig` :func:`train` builds for ``cfg`` and a
    tokenizer of ``vocab_size`` ids (positions at least ``seq_len``)."""
    model_config = get_config(
        cfg.model,
        vocab_size=vocab_size,
        scan_layers=cfg.scan_layers,
        remat=cfg.remat,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )
    return dataclasses.replace(
        model_config,
        max_position_embeddings=max(cfg.seq_len, model_config.max_position_embeddings),
    )


def _rank(cfg: RunConfig, model_config: Any) -> int:
    return cfg.rank or max(1, model_config.hidden_size // 4)


def _expected_plan(
    cfg: RunConfig, entry: OptimizerEntry, checkpointer: Checkpointer, vocab_size: int
) -> SchedulePlan:
    """The learning-rate plan the latest checkpoint implies, read from its settings only (so
    the step compiles before anything is restored, and an incompatible or finished run stops
    before it compiles); a fresh plan without one, or when the latest is corrupt (the restore
    falls back).

    Raises:
      CheckpointError: the latest checkpoint's settings are not this run's.
      TrainError: the latest checkpoint is at ``--stop-at`` / ``--steps`` already.
    """
    plan = fresh_plan(cfg, entry.default_lr)
    latest = checkpointer.latest_step()
    if latest is None:
        return plan
    try:
        verified = checkpointer.verify_files(latest)
        saved = checkpointer.read_meta(latest)
    except CorruptCheckpointError:
        return plan
    now = fingerprint(cfg, vocab_size, plan)
    plan = resumed_plan(cfg, now, saved, latest, checkpointer.path(latest), entry.default_lr)
    if verified:  # its arrays are as written: it will restore (else the restore decides)
        _check_not_finished(cfg, latest)
    return plan


def _check_not_finished(cfg: RunConfig, step: int) -> None:
    if step >= (cfg.stop_at or cfg.steps):
        raise TrainError(
            f"the run in {cfg.out} is already at step {step}; raise --steps (with --extend) to "
            "train further"
        )


def run_optimizer_args(cfg: RunConfig, learning_rate: Any, rank: int) -> OptimizerArgs:
    """The :class:`~lowrank_jax.train.OptimizerArgs` :func:`train` gives the registered
    optimizer's factory: ``learning_rate`` (a schedule or a number), ``rank``, and the run's
    refresh gap, scale, weight decay, seed, step count and ``--opt`` options."""
    return OptimizerArgs(
        learning_rate=learning_rate,
        rank=rank,
        update_proj_gap=cfg.update_proj_gap,
        scale=cfg.galore_scale,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        total_steps=cfg.steps,
        extra=dict(cfg.optimizer_options),
    )


def _optimizer(
    cfg: RunConfig, entry: OptimizerEntry, model_config: Any, plan: SchedulePlan
) -> Any:
    try:
        return entry.factory(
            run_optimizer_args(cfg, plan.schedule(), _rank(cfg, model_config))
        )
    except TypeError as err:  # an option the optimizer does not take
        raise TrainError(f"optimizer {cfg.optimizer!r}: {err} (check --opt)") from err


@dataclasses.dataclass
class _Setup:
    """The model's structure, the abstract train state and where each of its leaves lives."""

    graphdef: nnx.GraphDef
    init: Callable[[], TrainState]
    abstract: TrainState
    state_sharding: TrainState | None
    batch_sharding: NamedSharding | None
    mesh: jax.sharding.Mesh | None
    plan: SchedulePlan | None = None

    @classmethod
    def create(cls, cfg: RunConfig, tx: Any, model_config: Any, mesh: Any) -> _Setup:
        def init() -> TrainState:
            model = Llama(model_config, rngs=nnx.Rngs(cfg.seed))
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            return TrainState(jnp.int32(0), params, tx.init(params))

        graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(model_config, rngs=nnx.Rngs(0))))
        abstract = jax.eval_shape(init)
        if mesh is None:
            return cls(graphdef, init, abstract, None, None, None)
        state_sharding = state_shardings(tx, abstract, model_config, mesh)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            state_sharding,
        )
        return cls(graphdef, init, abstract, state_sharding, NamedSharding(mesh, P("fsdp")), mesh)

    def compile_step(self, cfg: RunConfig, tx: Any, plan: SchedulePlan) -> Callable:
        """The train step compiled ahead of time for this state and batch shape; its memory is
        checked against the devices' before anything is allocated (:mod:`.memory_check`)."""
        step = make_train_step(
            self.graphdef,
            tx,
            grad_clip=cfg.grad_clip,
            schedule=plan.schedule(),
            state_sharding=self.state_sharding,
            batch_sharding=self.batch_sharding,
            layerwise=cfg.layerwise,
            clip_per_layer=cfg.clip_per_layer,
            accum_steps=cfg.accum_steps,
            skip_nonfinite=cfg.skip_nonfinite,
        )
        batch = jax.ShapeDtypeStruct(
            (cfg.batch_size, cfg.seq_len + 1), jnp.int32, sharding=self.batch_sharding
        )
        try:
            lowered = step.lower(self.abstract, batch)
        except LayerwiseError as err:  # the method or model cannot run layer by layer
            raise ConfigError(f"--layerwise: {err}") from None
        compiled = lowered.compile()
        check_step_memory(compiled, cfg, self.mesh)
        self.plan = plan
        return compiled

    def place(self, batch: np.ndarray) -> jax.Array:
        """A host batch (the same on every process) as a global array sharded over fsdp."""
        if self.mesh is None:
            return jnp.asarray(batch)
        spec = P("fsdp") if len(batch) % self.mesh.shape["fsdp"] == 0 else P()
        return jax.make_array_from_callback(
            batch.shape, NamedSharding(self.mesh, spec), lambda index: batch[index]
        )


def _restore_or_init(
    cfg: RunConfig,
    entry: OptimizerEntry,
    setup: _Setup,
    checkpointer: Checkpointer,
    vocab_size: int,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> tuple[TrainState, IteratorState, SchedulePlan, str | None]:
    """The newest intact checkpoint's state, data position and plan (checked against this
    run's settings), or a fresh state; and the restored checkpoint's directory."""
    now = fingerprint(cfg, vocab_size, fresh_plan(cfg, entry.default_lr))

    def accept(saved: dict, step: int) -> None:
        resumed_plan(cfg, now, saved, step, checkpointer.path(step), entry.default_lr)

    found = checkpointer.restore_latest(setup.abstract, accept, warn)
    if found is None:
        if cfg.resume:
            log(f"no checkpoint in {checkpointer.directory}; starting from step 0")
        state = jax.jit(setup.init, out_shardings=setup.state_sharding)()
        return state, IteratorState(0, 0), fresh_plan(cfg, entry.default_lr), None
    step, state, position, saved = found
    plan = resumed_plan(cfg, now, saved, step, checkpointer.path(step), entry.default_lr)
    _check_not_finished(cfg, step)
    log(f"resuming from {checkpointer.path(step)} (step {step})")
    return state, position, plan, checkpointer.path(step)
