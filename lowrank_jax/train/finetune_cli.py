"""The ``lowrank-jax finetune`` and ``lowrank-jax generate`` subcommands: their flags and their
dispatch (the work is :mod:`lowrank_jax.train.finetune`). Nothing heavy is imported until a
command runs, so ``lowrank-jax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["add_finetune_commands", "run_finetune_command"]

FINETUNE_HELP = (
    "Fine-tune a pretrained checkpoint (HF directory, .gguf or hub id) on JSONL records "
    "(prompt/response, messages or text) with an adapter method (lora, dora, pissa, ...) or "
    "a registered optimizer (galore, fira, apollo, lisa, adamw_8bit, adamw, ...). The loss "
    "counts response tokens only; records longer than --max-seq-len are truncated (plain text "
    "is cut into pieces). Writes OUT/metrics.jsonl and OUT/adapter (a PEFT directory for "
    "LoRA/DoRA/PiSSA/OLoRA), OUT/merged with --merge, or OUT/model for optimizer methods."
)


def add_finetune_commands(
    commands: argparse._SubParsersAction, option: Callable[[str], tuple[str, object]]
) -> None:
    """Adds the ``finetune`` and ``generate`` subparsers; ``option`` parses ``KEY=VALUE``."""
    ft = commands.add_parser(
        "finetune", help="fine-tune a pretrained checkpoint (LoRA family, QLoRA, GaLore, ...)",
        description=FINETUNE_HELP,
    )  # fmt: skip
    ft.add_argument("--model", required=True, help="HF checkpoint directory, .gguf file or hub id")
    ft.add_argument("--data", required=True, help="a .jsonl file of records, or a text file")
    ft.add_argument("--out", required=True, help="the run directory")
    ft.add_argument("--method", default="lora", help="adapter method or optimizer name [lora]")
    ft.add_argument("--targets", help="regex over leaf paths [attention and MLP matrices]")
    ft.add_argument("--rank", type=int, default=8, help="adapter / projection rank [8]")
    ft.add_argument("--alpha", type=float, help="adapter scale numerator [the method's]")
    ft.add_argument("--opt", dest="options", action="append", type=option, default=[],
                    metavar="KEY=VALUE", help="method / optimizer option, repeatable")  # fmt: skip
    ft.add_argument("--lr", type=float, help="peak learning rate [2e-4 adapters; optimizer's]")
    ft.add_argument("--steps", type=int, default=100, help="training steps [100]")
    ft.add_argument("--batch-size", type=int, default=4, help="packed rows per step [4]")
    ft.add_argument("--accum-steps", type=int, default=1,
                    help="microbatches per step, gradients summed (accumulation) [1]")  # fmt: skip
    ft.add_argument("--layerwise", action="store_true",
                    help="full-parameter methods: update each layer inside the backward pass, "
                    "clipping per layer (one layer's gradient alive)")  # fmt: skip
    ft.add_argument("--max-seq-len", type=int, default=512,
                    help="tokens per row; longer records are truncated [512]")  # fmt: skip
    ft.add_argument("--seed", type=int, default=0, help="seed of init, split and batches [0]")
    ft.add_argument("--quantize-base", choices=("nf4", "int8"), help="QLoRA: quantized base")
    ft.add_argument("--loftq-iters", type=int, default=0, metavar="T",
                    help="with --quantize-base, lora/dora: init the adapters from the "
                    "quantization error by T LoftQ alternations [0: B = 0]")  # fmt: skip
    ft.add_argument("--adapter-optimizer", default="adamw",
                    help="adamw, loraplus, lorafa (--method lora), allora, ggpo [adamw]")
    ft.add_argument("--eval-every", type=int, default=0, help="steps between evaluations [end]")
    ft.add_argument("--eval-generate", type=int, default=0, metavar="N",
                    help="greedy replies to N held-out prompts per evaluation [0]")  # fmt: skip
    ft.add_argument("--eval-max-new-tokens", type=int, default=32, help="reply length [32]")
    ft.add_argument("--merge", action="store_true", help="also write the merged HF checkpoint")
    ft.add_argument("--val-fraction", type=float, default=0.1, help="records held out [0.1]")
    ft.add_argument("--tokenizer", help="directory with tokenizer.json [the checkpoint's]")
    ft.add_argument("--log-every", type=int, default=10, help="steps between loss lines [10]")
    ft.add_argument("--checkpoint-every", type=int, default=0,
                    help="steps between checkpoints in OUT/checkpoints [0: none]")  # fmt: skip
    ft.add_argument("--resume", action="store_true", help="continue from OUT's newest checkpoint")
    ft.add_argument("--calibration-rows", type=int, default=16, metavar="N",
                    help="--method owlore without --opt probs: the training rows whose "
                    "activations give the layer probabilities [16]")  # fmt: skip
    gen = commands.add_parser(
        "generate", help="print a model's reply to a prompt (optionally with an adapter)"
    )
    gen.add_argument("--model", required=True, help="HF checkpoint directory, .gguf or hub id")
    gen.add_argument("--adapter", help="a PEFT adapter directory (or reparam.save's)")
    gen.add_argument("--prompt", required=True, help="the prompt (chat template applied if any)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="reply length limit [64]")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy [0]")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass [1]")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed [0]")


def run_finetune_command(args: argparse.Namespace) -> int:
    """Runs ``finetune`` or ``generate``; expected errors print one line and return 2."""
    from lowrank_jax.data import DataError
    from lowrank_jax.models.hf import UnsupportedCheckpointError
    from lowrank_jax.train.checkpoint import CheckpointError
    from lowrank_jax.train.config import ConfigError
    from lowrank_jax.train.finetune import FinetuneConfig, finetune
    from lowrank_jax.train.finetune_export import generate_text

    values = dict(vars(args))
    command = values.pop("command")
    try:
        if command == "generate":
            print(generate_text(values.pop("model"), values.pop("prompt"), **values))
        else:
            values["options"] = dict(values["options"])
            finetune(FinetuneConfig(**values))
    except (ConfigError, DataError, UnsupportedCheckpointError, CheckpointError) as err:
        print(f"lowrank-jax: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # bad method options, targets that match nothing, ...
        print(f"lowrank-jax: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
