"""Optimizers by name, for the CLI and configs: one table of the built-in aliases, and plugins.

Every built-in is a row of :data:`BUILTINS`: the alias it calls (``lowrank_jax.galore_adamw``,
``optax.adamw``, ...), its default peak learning rate (the paper's tuned value), which run
settings (:class:`OptimizerArgs` fields) it takes, and its own defaults. The library's method
modules know nothing about the trainer; this table is the one place that maps run settings
onto their arguments. Other packages add methods through the ``lowrank_jax.optimizers``
entry-point group (a module that calls :func:`register_optimizer` when loaded) or by calling
:func:`register_optimizer` themselves::

    from lowrank_jax.train.registry import register_optimizer

    def _lion(args):
        import optax
        return optax.lion(args.learning_rate, weight_decay=args.weight_decay)

    register_optimizer("lion", _lion, help="optax.lion", default_lr=1e-4)

This module imports nothing heavy (no JAX, no optax): a row's alias is imported when the
optimizer is built.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

__all__ = [
    "BUILTINS",
    "Builtin",
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
      extra: method-specific options (``--opt KEY=VALUE`` on the CLI); they override the run
        settings of the same name.
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
    """A registered optimizer: its factory, a one-line help and its default peak lr.

    ``low_rank`` marks methods that use ``rank`` (shown in the run summary).
    """

    name: str
    factory: Callable[[OptimizerArgs], Any]
    help: str = ""
    default_lr: float = 1e-3
    low_rank: bool = False


_ADAM = ("b1", "b2", "eps", "weight_decay")
_PROJECTED = ("rank", "update_proj_gap", "seed")


@dataclasses.dataclass(frozen=True)
class Builtin:
    """One row of the built-in table.

    Attributes:
      name: the name users pass (``--optimizer NAME``).
      alias: ``"module:function"``, called as ``function(learning_rate, **kwargs)``.
      help: one line for ``lowrank-jax optimizers`` and error messages.
      default_lr: peak learning rate when the run gives none.
      takes: the :class:`OptimizerArgs` fields passed on (``scale`` is passed as ``scale``).
      eps: the alias's epsilon when the run does not set one (HF-style Adam: 1e-6).
      required: ``--opt`` keys the method cannot run without, with the error text.
    """

    name: str
    alias: str
    help: str
    default_lr: float
    takes: tuple[str, ...]
    eps: float = 1e-8
    required: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def low_rank(self) -> bool:
        return "rank" in self.takes

    def build(self, args: OptimizerArgs) -> Any:
        """``alias(args.learning_rate, **taken settings, **args.extra)``."""
        for key, text in self.required.items():
            if key not in args.extra:
                raise ValueError(f"{self.name} needs --opt {key}=...: {text}")
        module, _, attr = self.alias.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        kwargs = {field: getattr(args, field) for field in self.takes}
        if "eps" in kwargs and kwargs["eps"] is None:
            kwargs["eps"] = self.eps
        return fn(args.learning_rate, **{**kwargs, **args.extra})


# Default learning rates are the papers' tuned values (reference/galore.md §4.2 and
# fira_lisa_apollo.md): 0.01 for GaLore, Fira and APOLLO below 1B, <= 1e-3 for full rank.
# APOLLO's `scale` is not GaLore's alpha, so `scale` is not taken (use --opt scale=...);
# APOLLO-Mini keeps rank 1 unless --opt rank=... says otherwise. OwLore's script: lr 3e-4.
BUILTINS: tuple[Builtin, ...] = (
    Builtin("adamw", "optax:adamw", "optax.adamw (full-rank baseline)", 1e-3, _ADAM),
    Builtin(
        "galore",
        "lowrank_jax.optimizers:galore_adamw",
        "lowrank_jax.galore_adamw (GaLore-AdamW as galore-torch)",
        1e-2,
        (*_PROJECTED, "scale", *_ADAM),
        eps=1e-6,
    ),
    Builtin(
        "fira",
        "lowrank_jax.optimizers:fira_adamw",
        "lowrank_jax.fira_adamw (Fira-AdamW as the fira package)",
        1e-2,
        (*_PROJECTED, "scale", *_ADAM),
        eps=1e-6,
    ),
    Builtin(
        "apollo",
        "lowrank_jax.optimizers:apollo_adamw",
        "lowrank_jax.apollo_adamw (APOLLO as apollo-torch; random projection, channel scaling)",
        1e-2,
        (*_PROJECTED, *_ADAM),
        eps=1e-6,
    ),
    Builtin(
        "apollo_mini",
        "lowrank_jax.optimizers:apollo_mini",
        "lowrank_jax.apollo_mini (rank 1, tensor-wise scaling, scale 128)",
        1e-2,
        ("update_proj_gap", "seed", *_ADAM),
        eps=1e-6,
    ),
    Builtin(
        "adamw_8bit",
        "lowrank_jax.optimizers:adamw_8bit",
        "lowrank_jax.adamw_8bit (AdamW with block-wise 8-bit moments)",
        1e-3,
        _ADAM,
    ),
    Builtin(
        "galore_adamw_8bit",
        "lowrank_jax.optimizers:galore_adamw_8bit",
        "lowrank_jax.galore_adamw_8bit (8-bit GaLore: 8-bit Adam in the low-rank space)",
        1e-2,
        (*_PROJECTED, "scale", *_ADAM),
    ),
    Builtin(
        "galore2",
        "lowrank_jax.optimizers:galore2_adamw",
        "lowrank_jax.galore2_adamw (GaLore 2: GaLore-AdamW with randomized-SVD refreshes)",
        1e-2,
        (*_PROJECTED, "scale", *_ADAM),
        eps=1e-6,
    ),
    Builtin(
        "golore",
        "lowrank_jax.optimizers:golore_adamw",
        "lowrank_jax.golore_adamw (GoLore: SVD bases, random ones after 80% of the run; "
        "--opt random_ratio=...)",
        1e-2,
        (*_PROJECTED, "scale", "total_steps", *_ADAM),
        eps=1e-6,
    ),
    Builtin(
        "flora",
        "lowrank_jax.optimizers:flora_adafactor",
        "lowrank_jax.flora_adafactor (Flora: Adafactor, momentum compressed by regenerated "
        "random projections; --opt kappa=...)",
        1e-2,
        ("rank", "seed", "weight_decay"),
    ),
    Builtin(
        "badam",
        "lowrank_jax.optimizers:badam_adamw",
        "lowrank_jax.badam_adamw (BAdam: one layer block at a time, ascending, switched every "
        "50 steps; --opt switch_every=... order=...)",
        1e-3,
        ("seed", *_ADAM),
    ),
    Builtin(
        "q_galore",
        "lowrank_jax.optimizers:q_galore_adamw_8bit",
        "lowrank_jax.q_galore_adamw_8bit (Q-GaLore: 8-bit GaLore, INT4 projectors, lazy "
        "refresh; float weights)",
        1e-2,
        (*_PROJECTED, "scale", *_ADAM),
    ),
    Builtin(
        "gradnorm_lorp",
        "lowrank_jax.transforms:gradnorm_lorp_adamw",
        "lowrank_jax.gradnorm_lorp_adamw (GradNormLoRP: weight normalisation, GaLore on the "
        "direction's gradient; --opt reference_quirks=true for the authors' code)",
        1e-2,
        (*_PROJECTED, "scale", *_ADAM),
        eps=1e-6,
    ),
    Builtin(
        "lisa",
        "lowrank_jax.optimizers:lisa_adamw",
        "lowrank_jax.lisa_adamw (2 sampled layers every 20 steps + embedding/norm/head; "
        "--opt n_active=... interval=...)",
        1e-3,
        ("seed", *_ADAM),
    ),
    Builtin(
        "owlore",
        "lowrank_jax.optimizers:owlore_adamw",
        "lowrank_jax.owlore_adamw (outlier-weighted layer sampling + GaLore; --opt probs=[...], "
        "which finetune computes when absent)",
        3e-4,
        (*_PROJECTED, *_ADAM),
        eps=1e-6,
        required={
            "probs": "the layer probabilities [p_0,...,p_{L-1}] (from lowrank_jax.transforms."
            "owl_probabilities(outlier_scores(params, input_norms)))"
        },
    ),
)

_REGISTRY: dict[str, OptimizerEntry] = {
    row.name: OptimizerEntry(row.name, row.build, row.help, row.default_lr, row.low_rank)
    for row in BUILTINS
}
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
    """Registers ``factory`` under ``name`` (for plugins; the built-ins are :data:`BUILTINS`).

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
