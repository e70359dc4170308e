"""The run configuration: one dataclass, read from TOML/YAML files and CLI flags.

Each setting is declared once, as a :class:`RunConfig` field whose metadata holds its help text
and whether it is part of a run's *identity* (a resumed run must agree on it with the
checkpoint). The class docstring, the CLI flags (:mod:`lowrank_jax.train.cli`) and the
checkpoint's settings fingerprint (:meth:`RunConfig.identity`) are derived from those fields.

Precedence: defaults < ``--config FILE`` < flags given on the command line. Keys in a file are
the field names (``update_proj_gap``; dashes allowed: ``update-proj-gap``); values are converted
to the field's type whatever the file format (YAML reads ``1e-3`` as a string). The defaults are
``lowrank-jax train``'s main job: ``llama_20m`` trained with GaLore on the embedded corpus in a
few minutes on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import textwrap
import typing
from typing import Any

__all__ = ["ConfigError", "RunConfig", "field_kinds", "flag_name", "load_config_file"]


class ConfigError(ValueError):
    """An unreadable config file, an unknown key or a value out of range."""


def _setting(
    default: Any = None,
    help: str = "",
    *,
    identity: bool = False,
    optimizer_arg: str | None = None,
    flag: str | None = None,
    factory: Any = None,
) -> Any:
    """A :class:`RunConfig` field with its help text in ``metadata``.

    Args:
      default: the default value.
      help: one line for ``--help`` and the class docstring.
      identity: part of the run's identity: a checkpoint written with another value is not
        resumed (the settings fingerprint saved with every checkpoint holds these fields).
      optimizer_arg: the :class:`~lowrank_jax.train.registry.OptimizerArgs` field this setting
        feeds (``--opt`` may not set it a second time).
      flag: the CLI flag's name when it is not the field's (``--opt``).
      factory: a default factory (mutable defaults).
    """
    metadata = {"help": help, "identity": identity}
    if optimizer_arg:
        metadata["optimizer_arg"] = optimizer_arg
    if flag:
        metadata["flag"] = flag
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class RunConfig:
    """Everything a training run depends on."""

    model: str = _setting(
        "llama_20m", "model config: llama_tiny, llama_20m, llama_60m, ... llama_7b", identity=True
    )
    optimizer: str = _setting(
        "galore", "optimizer name (see `lowrank-jax optimizers`)", identity=True
    )
    rank: int | None = _setting(
        None,
        "projection rank (default: hidden_size // 4, the paper's 128/512 ratio of 60M)",
        identity=True,
        optimizer_arg="rank",
    )
    update_proj_gap: int = _setting(
        50,
        "steps between projector refreshes (galore-torch's default; the paper's long runs: 200)",
        identity=True,
        optimizer_arg="update_proj_gap",
    )
    galore_scale: float = _setting(0.25, "GaLore's alpha", identity=True, optimizer_arg="scale")
    lr: float | None = _setting(
        None,
        "peak learning rate (default: the optimizer's, e.g. 0.01 galore, 1e-3 adamw)",
        identity=True,
        optimizer_arg="learning_rate",
    )
    min_lr_ratio: float = _setting(
        0.1, "the cosine ends at lr * min_lr_ratio (paper: 0.1)", identity=True
    )
    warmup: int | None = _setting(
        None, "warmup steps (default: 10% of --steps, as the paper)", identity=True
    )
    weight_decay: float = _setting(
        0.0, "decoupled weight decay", identity=True, optimizer_arg="weight_decay"
    )
    grad_clip: float = _setting(
        1.0, "clip the gradient's global norm (0: off)", identity=True
    )
    steps: int = _setting(
        200,
        "optimizer steps; a resumed run must keep them, unless --extend",
        identity=True,
        optimizer_arg="total_steps",
    )
    batch_size: int = _setting(8, "sequences per step", identity=True)
    seq_len: int = _setting(128, "tokens per sequence", identity=True)
    seed: int = _setting(
        0, "seed of the model, the data order and the optimizer", identity=True,
        optimizer_arg="seed",
    )  # fmt: skip
    data: str | None = _setting(
        None,
        "text file, directory (its *.txt files) or glob, or tfds:NAME[:SPLIT] "
        "(default: the embedded King James Bible)",
        identity=True,
    )
    tokenizer: str = _setting(
        "byte", "byte (default) or bpe (trained locally; needs `tokenizers`)", identity=True
    )
    bpe_vocab_size: int = _setting(4096, "vocabulary size of the bpe tokenizer", identity=True)
    val_fraction: float = _setting(
        0.01, "share of sequences held out for validation", identity=True
    )
    out: str = _setting(
        "runs/lowrank-jax", "output directory: metrics.jsonl, checkpoints/, config.json"
    )
    resume: bool = _setting(False, "continue from the latest checkpoint in --out")
    extend: bool = _setting(
        False,
        "with --resume: train on to a new --steps; the learning rate continues its cosine from "
        "its value at the checkpoint down to the minimum at the new last step (a finished run "
        "holds the minimum; a run still in warmup keeps its warmup)",
    )
    eval_every: int = _setting(50, "evaluate every N steps (and at the end)")
    eval_batches: int = _setting(8, "validation batches per evaluation")
    checkpoint_every: int = _setting(100, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _setting(3, "how many checkpoints to keep")
    log_every: int = _setting(1, "write a metrics line every N steps")
    max_skipped_steps: int = _setting(
        10,
        "a step with a non-finite loss, gradient or update is skipped (parameters and optimizer "
        "state unchanged); stop after this many in a row (0: stop at the first)",
    )
    skip_nonfinite: bool = _setting(
        True,
        "guard each step: one with a non-finite loss, gradient or update is skipped. Without "
        "the guard the step is leaner for GaLore (no lax.cond keeping the gradients alive: "
        "3.2 GB of temporaries at llama_1b) and a non-finite step stops the run before anything "
        "is saved (resume from the last checkpoint)",
    )
    scan_layers: bool = _setting(
        False, "stack the layers and run them with lax.scan", identity=True
    )
    remat: bool = _setting(
        False, "rematerialise layer activations in the backward pass", identity=True
    )
    layerwise: bool = _setting(
        False,
        "update each layer's matrices inside the backward pass, so one layer's gradient is alive "
        "at a time (needs --scan-layers; with --grad-clip, --clip-per-layer)",
    )
    clip_per_layer: bool = _setting(
        False,
        "with --layerwise: clip each layer's gradient, and the other leaves', to --grad-clip "
        "separately (a global norm needs every gradient before the first update)",
        identity=True,
    )
    accum_steps: int = _setting(
        1,
        "gradient accumulation: split each batch of --batch-size rows into this many "
        "microbatches, one forward and backward at a time, summed before the one update (the "
        "activations are a microbatch's; must divide --batch-size; works with --layerwise)",
    )
    dtype: str = _setting("float32", "computation dtype: float32 or bfloat16", identity=True)
    param_dtype: str = _setting(
        "float32", "parameter dtype: float32 or bfloat16", identity=True
    )
    progress: bool = _setting(True, "show a progress bar")
    stop_at: int | None = _setting(
        None, "stop after this step as if preempted (to try --resume)"
    )
    optimizer_options: dict = _setting(
        help="extra optimizer argument KEY=VALUE, e.g. basis=randomized (repeatable); not one "
        "that a flag sets (--rank, --lr, ...)",
        identity=True,
        flag="opt",
        factory=dict,
    )
    mesh: str | None = _setting(
        None,
        "shard over a FSDPxTP device mesh of every process's devices, e.g. 4x2, or auto (all "
        "devices on fsdp); a run may resume on another mesh",
    )
    distributed: bool = _setting(
        False, "call jax.distributed.initialize (multi-process; cluster auto-detection)"
    )
    coordinator: str | None = _setting(
        None, "multi-process: HOST:PORT of process 0 (implies --distributed)"
    )
    num_processes: int | None = _setting(None, "multi-process: how many processes")
    process_id: int | None = _setting(None, "multi-process: this process's index")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            setattr(self, field.name, _typed(field.name, value, field_kinds()[field.name], None))

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every field."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def identity_names(cls) -> list[str]:
        """The fields that make a run's identity (``metadata["identity"]``)."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata["identity"]]

    def identity(self) -> dict[str, Any]:
        """``{field: value}`` of the identity fields: the settings a checkpoint depends on."""
        return {name: getattr(self, name) for name in self.identity_names()}

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` (names and types checked)."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown config keys {unknown}; valid keys: {', '.join(self.field_names())}"
            )
        return dataclasses.replace(self, **changes)

    def validate(self) -> RunConfig:
        """Checks ranges and settings given twice; returns ``self``.

        Raises:
          ConfigError: a value out of range, or an ``optimizer_options`` key that a flag sets.
        """
        positive = [
            "steps",
            "batch_size",
            "accum_steps",
            "seq_len",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "eval_batches",
            "update_proj_gap",
            "bpe_vocab_size",
        ]
        for name in positive:
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{flag_name(name)} must be a positive integer, got {value!r}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"--rank must be a positive integer, got {self.rank!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr!r}")
        if self.warmup is not None and not 0 <= self.warmup < self.steps:
            raise ConfigError(f"--warmup must be in [0, steps), got {self.warmup!r}")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be >= 0, got {self.grad_clip!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.max_skipped_steps < 0:
            raise ConfigError(f"--max-skipped-steps must be >= 0, got {self.max_skipped_steps!r}")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ConfigError(f"--stop-at must be in [1, steps], got {self.stop_at!r}")
        if self.layerwise and not self.scan_layers:
            raise ConfigError(
                "--layerwise walks the stacked layers: add --scan-layers (a new run; a checkpoint "
                "written without it has another layout)"
            )
        if self.batch_size % self.accum_steps:
            raise ConfigError(
                f"--accum-steps {self.accum_steps} must divide --batch-size {self.batch_size} "
                "(the batch is split into that many microbatches)"
            )
        if self.clip_per_layer and not self.layerwise:
            raise ConfigError("--clip-per-layer goes with --layerwise")
        if self.layerwise and self.grad_clip > 0 and not self.clip_per_layer:
            raise ConfigError(
                "--layerwise cannot clip the global gradient norm (it needs every gradient "
                "before the first update): add --clip-per-layer, or --grad-clip 0"
            )
        if self.extend and not self.resume:
            raise ConfigError("--extend continues a run: pass --resume with it")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ConfigError(f"{flag_name(name)} must be float32 or bfloat16")
        self.mesh_shape  # noqa: B018 -- parses --mesh
        if (self.num_processes is None) != (self.process_id is None):
            raise ConfigError("--num-processes and --process-id go together")
        if self.num_processes is not None and not 0 <= self.process_id < self.num_processes:
            raise ConfigError(
                f"--process-id must be in [0, {self.num_processes}), got {self.process_id!r}"
            )
        self._check_options_given_once()
        return self

    def _check_options_given_once(self) -> None:
        """An ``--opt KEY`` that a flag sets would silently win over the flag (and the report)."""
        owners = {f.metadata.get("optimizer_arg"): f.name for f in dataclasses.fields(self)}
        owners.pop(None, None)
        owners.update({name: name for name in self.field_names()})
        for key, value in self.optimizer_options.items():
            if key in owners:
                name = owners[key]
                raise ConfigError(
                    f"--opt {key}={value!r} sets what {flag_name(name)} sets (now "
                    f"{getattr(self, name)!r}): give the setting once, as {flag_name(name)}"
                )

    @property
    def mesh_shape(self) -> tuple[int | None, int] | None:
        """``(fsdp, tensor)`` from ``mesh`` (``fsdp=None``: all the devices), or ``None``.

        Raises:
          ConfigError: ``mesh`` is not ``"auto"`` or ``"FSDPxTP"`` with positive sizes.
        """
        if self.mesh is None:
            return None
        if self.mesh == "auto":
            return None, 1
        fsdp, sep, tensor = str(self.mesh).partition("x")
        if sep and fsdp.isdigit() and tensor.isdigit() and int(fsdp) > 0 and int(tensor) > 0:
            return int(fsdp), int(tensor)
        raise ConfigError(
            f"--mesh must be 'auto' or FSDPxTP with positive sizes (e.g. 4x2), got {self.mesh!r}"
        )

    @property
    def warmup_steps(self) -> int:
        """``warmup`` or 10% of the steps."""
        return self.steps // 10 if self.warmup is None else self.warmup


def flag_name(name: str) -> str:
    """The CLI flag of field ``name`` (``update_proj_gap`` -> ``--update-proj-gap``)."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    flag = fields[name].metadata.get("flag", name) if name in fields else name
    return "--" + flag.replace("_", "-")


def _attributes_doc() -> str:
    lines = ["", "", "    Attributes:"]
    for field in dataclasses.fields(RunConfig):
        tag = " Part of the run's identity." if field.metadata["identity"] else ""
        text = f"{field.name}: {field.metadata['help']}.{tag}"
        lines += textwrap.wrap(text, 96, initial_indent=" " * 6, subsequent_indent=" " * 8)
    return "\n".join(lines) + "\n    "


RunConfig.__doc__ = RunConfig.__doc__ + _attributes_doc()


def field_kinds() -> dict[str, tuple[type, bool]]:
    """``{field: (type, optional)}`` from the annotations (``int | None`` -> ``(int, True)``)."""
    global _KINDS
    if _KINDS is None:
        hints = typing.get_type_hints(RunConfig)
        kinds = {}
        for name, hint in hints.items():
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            kinds[name] = (args[0], True) if args else (hint, False)
        _KINDS = kinds
    return _KINDS


_KINDS: dict[str, tuple[type, bool]] | None = None
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _typed(name: str, value: Any, kind: tuple[type, bool], source: str | None) -> Any:
    """``value`` as field ``name``'s type; strings are parsed only when read from a file."""
    cls, optional = kind
    where = f"--config {source}: {name}" if source else flag_name(name)
    if value is None and optional:
        return None
    if isinstance(value, str) and source is not None and cls is not str:
        text = value.strip().lower()
        if optional and text in ("none", "null", "~"):
            return None
        try:
            if cls is bool:
                if text not in _TRUE + _FALSE:
                    raise ValueError
                return text in _TRUE
            if cls is int:
                return int(text)
            if cls is float:
                return float(text)
        except ValueError:
            pass
    elif cls is bool and isinstance(value, bool):
        return value
    elif cls is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    elif cls is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    elif cls in (str, dict) and isinstance(value, cls):
        return value
    wanted = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    wanted = wanted.get(cls, f"a {cls.__name__}") + (" or null" if optional else "")
    raise ConfigError(f"{where} must be {wanted}, got {value!r} ({type(value).__name__})")


def load_config_file(path: str) -> dict[str, Any]:
    """The ``{field: value}`` mapping in a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file,
    each value converted to its field's type (YAML's ``lr: 1e-3`` is a string to PyYAML).

    Raises:
      ConfigError: missing or unparsable file, unknown keys, not a mapping, or a value that is
        not of its field's type.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            with open(path, "rb") as f:
                raw = _toml().load(f)
        elif ext in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("YAML configs need PyYAML: pip install pyyaml") from None
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        else:
            raise ConfigError(f"--config {path}: use a .toml, .yaml or .yml file")
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 -- any parser error becomes one line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"--config {path}: cannot parse: {first}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(RunConfig.field_names()))
    if unknown:
        raise ConfigError(
            f"--config {path}: unknown keys {unknown}; valid: {', '.join(RunConfig.field_names())}"
        )
    kinds = field_kinds()
    return {name: _typed(name, value, kinds[name], path) for name, value in values.items()}


def _toml() -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("TOML configs on Python 3.10 need tomli: pip install tomli") from None
    return tomllib
