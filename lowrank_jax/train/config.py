"""The run configuration: one dataclass, read from TOML/YAML files and CLI flags.

Precedence: defaults < ``--config FILE`` < flags given on the command line. Keys in a file are
the field names (``update_proj_gap``; dashes allowed: ``update-proj-gap``). The defaults are
``lowrank-jax train``'s main job: ``llama_20m`` trained with GaLore on the embedded corpus in a
few minutes on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__all__ = ["ConfigError", "RunConfig", "load_config_file"]


class ConfigError(ValueError):
    """An unreadable config file, an unknown key or a value out of range."""


@dataclasses.dataclass
class RunConfig:
    """Everything a training run depends on.

    Attributes:
      model: a name of :data:`lowrank_jax.models.CONFIGS`.
      optimizer: a name of :func:`lowrank_jax.train.registry.available_optimizers`.
      rank: projection rank (``None``: ``hidden_size // 4``, the paper's 128/512 ratio of 60M).
      update_proj_gap: steps between projector refreshes (galore-torch's argparse default 50;
        the paper's long runs use 200).
      galore_scale: GaLore's ``α``.
      lr: peak learning rate (``None``: the optimizer's registered default, the paper's value).
      min_lr_ratio: the cosine ends at ``lr * min_lr_ratio`` (paper: 0.1).
      warmup: warmup steps (``None``: 10% of ``steps``, as the paper).
      weight_decay: decoupled weight decay (paper: 0).
      grad_clip: clip the global gradient norm to this (``0``: no clipping).
      steps: optimizer steps. batch_size: sequences per step. seq_len: tokens per sequence.
      seed: model initialisation, data order and the optimizer's seed.
      data: ``None`` (embedded corpus), a path, directory or glob, or ``tfds:NAME[:SPLIT]``.
      tokenizer: ``"byte"`` or ``"bpe"`` (trained locally, ``bpe_vocab_size`` ids).
      val_fraction: share of sequences held out for validation.
      out: output directory (``metrics.jsonl``, ``checkpoints/``, ``config.json``).
      resume: continue from the latest checkpoint in ``out``.
      eval_every, eval_batches: evaluation period (steps; also at the end) and its size.
      checkpoint_every, keep_checkpoints: checkpoint period (also at the end), how many kept.
      log_every: write a metrics line every this many steps.
      scan_layers, remat, dtype, param_dtype: model options (:class:`LlamaConfig`).
      progress: show a progress bar.
      stop_at: stop after this step as if preempted (tests and demos of ``resume``).
      optimizer_options: extra keyword arguments for the optimizer's factory, e.g.
        ``{"basis": "randomized"}`` (``--opt basis=randomized`` on the command line).
      mesh: ``None`` (one device, no sharding), ``"FSDPxTP"`` (e.g. ``"4x2"``: parameters,
        optimizer states and batches sharded over a ``fsdp x tensor`` mesh of all the devices
        of all the processes) or ``"auto"`` (every device on the fsdp axis). Not part of a
        checkpoint's identity: a run may resume on another mesh.
      distributed: call ``jax.distributed.initialize`` first (multi-process training; on a
        cluster JAX finds the coordinator itself, elsewhere give the next three).
      coordinator, num_processes, process_id: ``jax.distributed.initialize`` arguments
        (``coordinator`` implies ``distributed``).
    """

    model: str = "llama_20m"
    optimizer: str = "galore"
    rank: int | None = None
    update_proj_gap: int = 50
    galore_scale: float = 0.25
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    data: str | None = None
    tokenizer: str = "byte"
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.01
    out: str = "runs/lowrank-jax"
    resume: bool = False
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    scan_layers: bool = False
    remat: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    progress: bool = True
    stop_at: int | None = None
    optimizer_options: dict = dataclasses.field(default_factory=dict)
    mesh: str | None = None
    distributed: bool = False
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every field."""
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` (names checked)."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown config keys {unknown}; valid keys: {', '.join(self.field_names())}"
            )
        return dataclasses.replace(self, **changes)

    def validate(self) -> RunConfig:
        """Checks ranges; returns ``self``.

        Raises:
          ConfigError: a value out of range.
        """
        positive = [
            "steps",
            "batch_size",
            "seq_len",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "eval_batches",
            "update_proj_gap",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value!r}"
                )
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"--rank must be a positive integer, got {self.rank!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr!r}")
        if self.warmup is not None and not 0 <= self.warmup < self.steps:
            raise ConfigError(f"--warmup must be in [0, steps), got {self.warmup!r}")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be >= 0, got {self.grad_clip!r}")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ConfigError(f"--stop-at must be in [1, steps], got {self.stop_at!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ConfigError(f"--{name.replace('_', '-')} must be float32 or bfloat16")
        self.mesh_shape  # noqa: B018 -- parses --mesh
        if (self.num_processes is None) != (self.process_id is None):
            raise ConfigError("--num-processes and --process-id go together")
        if self.num_processes is not None and not 0 <= self.process_id < self.num_processes:
            raise ConfigError(
                f"--process-id must be in [0, {self.num_processes}), got {self.process_id!r}"
            )
        return self

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


def load_config_file(path: str) -> dict[str, Any]:
    """The ``{field: value}`` mapping in a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file.

    Raises:
      ConfigError: missing or unparsable file, unknown keys, or not a mapping.
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
    return values


def _toml() -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("TOML configs on Python 3.10 need tomli: pip install tomli") from None
    return tomllib
