"""Training: the jitted step, optimizers by name, the loop, orbax checkpoints and the CLI.

Names are loaded on first use (PEP 562), so ``import lowrank_jax.train.registry`` -- which a
method module does to register itself -- does not pull in Flax, orbax or the loop.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "lowrank_jax.train.checkpoint",
    "Checkpointer": "lowrank_jax.train.checkpoint",
    "ConfigError": "lowrank_jax.train.config",
    "RunConfig": "lowrank_jax.train.config",
    "TrainError": "lowrank_jax.train.loop",
    "run_dataset": "lowrank_jax.train.loop",
    "run_model_config": "lowrank_jax.train.loop",
    "run_optimizer_args": "lowrank_jax.train.loop",
    "evaluate": "lowrank_jax.train.run_loop",
    "step_memory": "lowrank_jax.train.loop",
    "train": "lowrank_jax.train.loop",
    "OptimizerArgs": "lowrank_jax.train.registry",
    "available_optimizers": "lowrank_jax.train.registry",
    "build_optimizer": "lowrank_jax.train.registry",
    "get_optimizer": "lowrank_jax.train.registry",
    "register_optimizer": "lowrank_jax.train.registry",
    "TrainState": "lowrank_jax.train.step",
    "make_eval_step": "lowrank_jax.train.step",
    "make_train_step": "lowrank_jax.train.step",
    "warmup_cosine": "lowrank_jax.train.step",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lowrank_jax.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
