"""The devices of a run: ``jax.distributed`` for several processes, the ``fsdp x tensor`` mesh,
and a ``NamedSharding`` for every leaf of the train state on it."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from lowrank_jax import sharding
from lowrank_jax.models import Llama
from lowrank_jax.train.config import ConfigError, RunConfig
from lowrank_jax.train.run_loop import TrainError
from lowrank_jax.train.step import TrainState

__all__ = ["init_distributed", "make_run_mesh", "state_shardings"]


def init_distributed(cfg: RunConfig) -> None:
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


def make_run_mesh(cfg: RunConfig) -> jax.sharding.Mesh | None:
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


def state_shardings(tx: Any, abstract: TrainState, model_config: Any, mesh: Any) -> TrainState:
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
