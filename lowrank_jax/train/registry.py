"""Optimizers by name, for the CLI and configs: ``adamw``, ``galore``, and whatever registers.

A factory receives an :class:`OptimizerArgs` (the run's learning-rate schedule, rank, projector
gap, weight decay, ...) and returns an optax transformation. A method module registers itself at
import time::

    from lowrank_jax.train.registry import register_optimizer

    def _fira(args):
        from lowrank_jax.optimizers import fira_adamw
        return fira_adamw(args.learning_rate, rank=args.rank, ...)

    register_optimizer("fira", _fira, help="Fira: GaLore + full-rank residual", default_lr=1e-2)

This module imports nothing heavy (no JAX, no optax): factories import what they need when
called. :func:`available_optimizers` also loads ``lowrank_jax`` (whose modules register their
methods on import) and the ``lowrank_jax.optimizers`` entry-point group of other packages.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from importlib import metadata
from typing import Any

__all__ = [
    "OptimizerArgs",
    "OptimizerEntry",
    "available_optimizers",
    "build_optimizer",
    "get_optimizer",
    "register_optimizer",
]

ENTRY_POINT_GROUP = "lowrank_jax.optimizers"


@dataclasses.dataclass(frozen=True)
class OptimizerArgs:
    """What a factory may use. Methods ignore the fields they do not need.

    Attributes:
      learning_rate: a float or an optax schedule (the run's warmup + cosine).
      rank: projection rank for low-rank methods.
      update_proj_gap: steps between projector refreshes.
      scale: GaLore's ``α``.
      weight_decay: decoupled weight decay.
      b1, b2: Adam constants; eps: Adam's epsilon (``None``: each method's own default).
      seed: seed for methods with randomness.
      total_steps: length of the run.
      extra: method-specific options (``--opt KEY=VALUE`` on the CLI).
    """

    learning_rate: Any
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float | None = None
    seed: int = 0
    total_steps: int = 1
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OptimizerEntry:
    """A registered optimizer: its factory, a one-line help and its default peak lr."""

    name: str
    factory: Callable[[OptimizerArgs], Any]
    help: str = ""
    default_lr: float = 1e-3
    low_rank: bool = False


_REGISTRY: dict[str, OptimizerEntry] = {}
_PLUGINS_LOADED = False


def register_optimizer(
    name: str,
    factory: Callable[[OptimizerArgs], Any],
    *,
    help: str = "",
    default_lr: float = 1e-3,
    low_rank: bool = False,
    overwrite: bool = False,
) -> OptimizerEntry:
    """Registers ``factory`` under ``name``.

    Args:
      name: the name users pass (``--optimizer NAME``).
      factory: ``OptimizerArgs -> optax.GradientTransformation``.
      help: one line for ``--help`` and error messages.
      default_lr: peak learning rate when the user gives none (the paper's tuned value).
      low_rank: the method uses ``rank`` / ``update_proj_gap`` (shown in the run summary).
      overwrite: replace an existing entry instead of raising.

    Raises:
      ValueError: ``name`` is taken and ``overwrite`` is false.
    """
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"optimizer {name!r} is already registered; pass overwrite=True")
    entry = OptimizerEntry(name, factory, help, default_lr, low_rank)
    _REGISTRY[name] = entry
    return entry


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    importlib.import_module("lowrank_jax")
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()


def available_optimizers() -> dict[str, OptimizerEntry]:
    """Every registered optimizer, by name (plugins loaded)."""
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_optimizer(name: str) -> OptimizerEntry:
    """The entry registered as ``name``.

    Raises:
      ValueError: unknown name; the message lists the choices.
    """
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        choices = ", ".join(available_optimizers())
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {choices}")
    return _REGISTRY[name]


def build_optimizer(name: str, args: OptimizerArgs) -> Any:
    """``get_optimizer(name).factory(args)``."""
    return get_optimizer(name).factory(args)


def _adamw(args: OptimizerArgs) -> Any:
    import optax

    eps = 1e-8 if args.eps is None else args.eps
    return optax.adamw(
        args.learning_rate, b1=args.b1, b2=args.b2, eps=eps, weight_decay=args.weight_decay
    )


def _galore(args: OptimizerArgs) -> Any:
    from lowrank_jax.optimizers import galore_adamw

    options = dict(
        rank=args.rank,
        update_proj_gap=args.update_proj_gap,
        scale=args.scale,
        b1=args.b1,
        b2=args.b2,
        eps=1e-6 if args.eps is None else args.eps,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    return galore_adamw(args.learning_rate, **{**options, **args.extra})


# Default learning rates: the GaLore paper's tuned values (0.01 for GaLore, <= 0.001 for the
# full-rank baseline; reference/galore.md §4.2).
register_optimizer("adamw", _adamw, help="optax.adamw (full-rank baseline)", default_lr=1e-3)
register_optimizer(
    "galore",
    _galore,
    help="lowrank_jax.galore_adamw (GaLore-AdamW as galore-torch)",
    default_lr=1e-2,
    low_rank=True,
)
