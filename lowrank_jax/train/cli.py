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
import dataclasses
import sys
from collections.abc import Sequence

from lowrank_jax.train import plot
from lowrank_jax.train.config import (
    ConfigError,
    RunConfig,
    field_kinds,
    flag_name,
    load_config_file,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``lowrank-jax`` argument parser (subcommands ``train``, ``optimizers``, ``memory``,
    ``plot``, ``finetune``, ``generate``)."""
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
    kinds = field_kinds()
    for field in dataclasses.fields(RunConfig):
        name, text = field.name, field.metadata["help"].replace("%", "%%")
        kind, _ = kinds[name]
        if kind is dict:  # --opt KEY=VALUE, repeatable
            train.add_argument(
                flag_name(name), dest=name, action="append", type=_option, metavar="KEY=VALUE",
                help=text,
            )  # fmt: skip
        elif kind is bool and field.default:  # on by default: --no-NAME turns it off
            flag = f"--no-{name.replace('_', '-')}"
            train.add_argument(flag, dest=name, action="store_false", help=f"{flag}: not {text}")
        elif kind is bool:
            train.add_argument(flag_name(name), dest=name, action="store_true", help=text)
        else:
            suffix = f" [{field.default}]" if field.default is not None else ""
            train.add_argument(flag_name(name), dest=name, type=kind, help=text + suffix)
    commands.add_parser("optimizers", help="list the registered optimizers")
    mem = commands.add_parser(
        "memory",
        help="compile a train step abstractly and print its memory (nothing is allocated)",
        description="Will it fit? The compiled train step's memory per device, before renting "
        "the hardware: parameters, optimizer state, gradients, activations, XLA's peak. "
        "TPU targets compile with libtpu on this host (the tpu extra), no TPU needed.",
    )
    mem.add_argument("--model", default="llama_1b", help="a LLaMA config name [llama_1b]")
    mem.add_argument("--optimizer", default="galore", help="a registered optimizer [galore]")
    mem.add_argument("--layerwise", action="store_true", help="the layer-wise train step")
    mem.add_argument("--batch-size", type=int, default=1, help="sequences per step [1]")
    mem.add_argument("--seq-len", type=int, default=256, help="tokens per sequence [256]")
    mem.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16 [bfloat16]")
    mem.add_argument("--rank", type=int, default=None, help="projection rank [hidden / 4]")
    mem.add_argument("--opt", action="append", type=_option, default=[], metavar="KEY=VALUE",
                     help="optimizer option, repeatable")  # fmt: skip
    mem.add_argument("--target", default="cpu", help="cpu, gpu, tpu-v5e, tpu-v4, tpu-v5p, tpu-v6e")
    mem.add_argument("--mesh", default="1x1", help="FSDPxTP devices [1x1]")
    mem.add_argument("--device-memory-gb", type=float, default=None,
                     help="memory per device in GiB [the TPU target's HBM]")  # fmt: skip
    mem.add_argument("--remat", action="store_true", help="rematerialise layer activations")
    mem.add_argument("--no-skip-nonfinite", dest="skip_nonfinite", action="store_false",
                     help="without the non-finite-step guard (see README)")  # fmt: skip
    mem.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary")
    mem.add_argument("--accum-steps", type=int, default=1,
                     help="microbatches per step (gradient accumulation) [1]")  # fmt: skip
    plot.add_command(commands)  # lowrank-jax plot RUN_DIR ... [--out FILE]
    from lowrank_jax.train.finetune_cli import add_finetune_commands

    add_finetune_commands(commands, _option)  # lowrank-jax finetune / generate
    return parser


def _memory(args: argparse.Namespace) -> None:
    from lowrank_jax.train.memory_plan import format_plan, plan_memory

    fsdp, sep, tensor = args.mesh.partition("x")
    if not (sep and fsdp.isdigit() and tensor.isdigit() and int(fsdp) > 0 and int(tensor) > 0):
        raise ConfigError(f"--mesh must be FSDPxTP with positive sizes (4x2), got {args.mesh!r}")
    for name in ("batch_size", "seq_len", "accum_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
    gib = args.device_memory_gb
    plan = plan_memory(
        args.model,
        args.optimizer,
        layerwise=args.layerwise,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        dtype=args.dtype,
        rank=args.rank,
        options=dict(args.opt),
        target=args.target,
        mesh=(int(fsdp), int(tensor)),
        device_memory=None if gib is None else int(gib * 2**30),
        remat=args.remat,
        vocab_size=args.vocab_size,
        skip_nonfinite=args.skip_nonfinite,
        accum_steps=args.accum_steps,
    )
    print(format_plan(plan))


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
    if args.command == "plot":
        return plot.run_command(args)
    if args.command == "memory":
        try:
            _memory(args)
        except ValueError as err:  # unknown names, a target without its backend, bad options
            print(f"lowrank-jax: error: {str(err).splitlines()[0]}", file=sys.stderr)
            return 2
        return 0
    if args.command in ("finetune", "generate"):
        from lowrank_jax.train.finetune_cli import run_finetune_command

        return run_finetune_command(args)
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
