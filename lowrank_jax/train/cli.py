"""``lowrank-jax train``: the command line.

``lowrank-jax train`` with no flags is the README's main job: ``llama_20m`` trained with GaLore
on the embedded King James Bible for 200 steps (a few minutes on a 2-core CPU), ending with the
validation perplexity, the optimizer-state memory next to AdamW's, and where it saved. Every
flag overrides the same key of ``--config FILE`` (TOML or YAML), which overrides the defaults.
Expected problems (unknown names, missing data, a corrupt checkpoint, ...) print one line
``lowrank-jax: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence

from lowrank_jax.train.config import ConfigError, RunConfig, load_config_file

__all__ = ["build_parser", "main"]

# flag -> (type, help); the dest is the RunConfig field of the same name.
_FLAGS = {
    "model": (str, "model config: llama_tiny, llama_20m, llama_60m, ... llama_7b"),
    "optimizer": (str, "optimizer name (see `lowrank-jax optimizers`)"),
    "rank": (int, "projection rank (default: hidden_size // 4)"),
    "update_proj_gap": (int, "steps between projector refreshes"),
    "galore_scale": (float, "GaLore's alpha"),
    "lr": (float, "peak learning rate (default: the optimizer's, e.g. 0.01 galore, 1e-3 adamw)"),
    "min_lr_ratio": (float, "final lr as a fraction of the peak"),
    "warmup": (int, "warmup steps (default: 10%% of --steps)"),
    "weight_decay": (float, "decoupled weight decay"),
    "grad_clip": (float, "clip the gradient's global norm (0: off)"),
    "steps": (int, "optimizer steps"),
    "batch_size": (int, "sequences per step"),
    "seq_len": (int, "tokens per sequence"),
    "seed": (int, "seed of the model, the data order and the optimizer"),
    "data": (str, "text file, directory or glob, or tfds:NAME[:SPLIT] (default: embedded KJV)"),
    "tokenizer": (str, "byte (default) or bpe (trained locally; needs `tokenizers`)"),
    "bpe_vocab_size": (int, "vocabulary size of the bpe tokenizer"),
    "val_fraction": (float, "share of sequences held out for validation"),
    "out": (str, "output directory: metrics.jsonl, checkpoints/, config.json"),
    "eval_every": (int, "evaluate every N steps (and at the end)"),
    "eval_batches": (int, "validation batches per evaluation"),
    "checkpoint_every": (int, "checkpoint every N steps (and at the end)"),
    "keep_checkpoints": (int, "how many checkpoints to keep"),
    "log_every": (int, "write a metrics line every N steps"),
    "dtype": (str, "computation dtype: float32 or bfloat16"),
    "param_dtype": (str, "parameter dtype: float32 or bfloat16"),
    "stop_at": (int, "stop after this step as if preempted (to try --resume)"),
    "mesh": (str, "shard over a FSDPxTP device mesh, e.g. 4x2, or auto (all devices on fsdp)"),
    "coordinator": (str, "multi-process: HOST:PORT of process 0 (jax.distributed.initialize)"),
    "num_processes": (int, "multi-process: how many processes"),
    "process_id": (int, "multi-process: this process's index"),
}
_SWITCHES = {
    "resume": "continue from the latest checkpoint in --out",
    "scan_layers": "stack the layers and run them with lax.scan",
    "remat": "rematerialise layer activations in the backward pass",
    "distributed": "call jax.distributed.initialize (multi-process; cluster auto-detection)",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``lowrank-jax`` argument parser (subcommands ``train`` and ``optimizers``)."""
    parser = argparse.ArgumentParser(
        prog="lowrank-jax", description="Memory-efficient LLM training with low-rank methods."
    )
    commands = parser.add_subparsers(dest="command")
    train = commands.add_parser(
        "train",
        help="train a LLaMA (default: llama_20m + GaLore on the embedded corpus)",
        description=__doc__.split("\n\n")[1],
        argument_default=argparse.SUPPRESS,
    )
    train.add_argument("--config", help="TOML or YAML file of settings (keys as the flags)")
    for name, (kind, text) in _FLAGS.items():
        default = getattr(RunConfig, name)
        suffix = f" [{default}]" if default is not None else ""
        train.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=text + suffix)
    for name, text in _SWITCHES.items():
        train.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true", help=text)
    train.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )
    train.add_argument(
        "--opt",
        dest="optimizer_options",
        action="append",
        type=_option,
        metavar="KEY=VALUE",
        help="extra optimizer argument, e.g. --opt basis=randomized (repeatable)",
    )
    commands.add_parser("optimizers", help="list the registered optimizers")
    return parser


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE a Python literal (number, bool, string, ...) or a bare word."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _config(args: argparse.Namespace) -> RunConfig:
    values = dict(vars(args))
    values.pop("command", None)
    path = values.pop("config", None)
    cfg = RunConfig()
    if path:
        cfg = cfg.replace(**load_config_file(path))
    if "optimizer_options" in values:
        values["optimizer_options"] = {**cfg.optimizer_options, **dict(values["optimizer_options"])}
    return cfg.replace(**values).validate()


def _list_optimizers() -> None:
    from lowrank_jax.train.registry import available_optimizers

    for name, entry in available_optimizers().items():
        print(f"{name:12s} lr {entry.default_lr:<8g} {entry.help}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowrank-jax`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "optimizers":
        _list_optimizers()
        return 0
    from lowrank_jax.data import DataError
    from lowrank_jax.models.hf import UnsupportedCheckpointError
    from lowrank_jax.train.checkpoint import CheckpointError
    from lowrank_jax.train.loop import TrainError, train

    expected = (ConfigError, DataError, CheckpointError, TrainError, UnsupportedCheckpointError)
    try:
        train(_config(args))
    except expected as err:
        print(f"lowrank-jax: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # unknown model / optimizer names, bad options
        print(f"lowrank-jax: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowrank-jax: interrupted; resume with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
