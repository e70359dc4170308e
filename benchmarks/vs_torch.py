"""Whole train-step throughput: lowrank_jax against the PyTorch stack a user would pick instead.

For each method the complete step (forward, backward, global-norm clipping to 1.0, optimizer
update; float32, the 32k-vocabulary LM head and cross-entropy included) of both stacks on the
same LLaMA shape and the same token batches, timed in interleaved rounds (the order alternates
round by round) so both see the same machine load:

=========  ===========================================  ==========================================
method     ours (``make_train_step``, jitted, donated)  peer (transformers ``LlamaForCausalLM``)
=========  ===========================================  ==========================================
adamw      ``optax.adamw``                              ``torch.optim.AdamW``
galore     ``lowrank_jax.galore_adamw``                 ``galore_torch.GaLoreAdamW``
fira       ``lowrank_jax.fira_adamw``                   ``fira.FiraAdamW``
apollo     ``lowrank_jax.apollo_adamw``                 ``apollo_torch.APOLLOAdamW``
lora       ``reparam.wrap(model, reparam.lora(...))``   ``peft.get_peft_model`` + AdamW
=========  ===========================================  ==========================================

The projected methods use rank ``hidden // 4`` (128 at llama_60m), a refresh every 200 steps
and GaLore's scale 0.25 (Fira's alpha too; APOLLO keeps its own scale 1) on the attention and
MLP matrices, so the one refresh of a run this short falls in the warm-up steps on both sides:
the timed steps are the steady state. LoRA: rank 8, alpha 16 on the same matrices, the base
frozen. Our optimizers come from the registry (``lowrank_jax.train.registry``) under the names
above. The torch half runs in a subprocess of the same Python (commands over a pipe, so the
rounds interleave), only when torch and transformers are importable; without them the script
reports our side alone. Torch keeps its defaults (SDPA attention, its thread count).

Usage::

    python benchmarks/vs_torch.py --model llama_60m           # the README's table
    python benchmarks/vs_torch.py --model llama_20m --methods adamw,galore --steps 6

Prints a markdown table (tokens/s, median and best step, and ours / torch) and writes
``benchmarks/results/vs_torch_<model>_<platform>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np

METHODS = ("adamw", "galore", "fira", "apollo", "lora")
# what each method needs on the torch side, besides torch and transformers
PEER_PACKAGES = {"galore": "galore_torch", "fira": "fira", "apollo": "apollo_torch", "lora": "peft"}
PEER_NAMES = {
    "adamw": "torch.optim.AdamW",
    "galore": "galore_torch.GaLoreAdamW",
    "fira": "fira.FiraAdamW",
    "apollo": "apollo_torch.APOLLOAdamW",
    "lora": "peft LoRA + torch.optim.AdamW",
}
OUR_NAMES = {
    "adamw": "optax.adamw",
    "galore": "lowrank_jax.galore_adamw",
    "fira": "lowrank_jax.fira_adamw",
    "apollo": "lowrank_jax.apollo_adamw",
    "lora": "lowrank_jax.reparam.lora + optax.adamw",
}
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEARNING_RATE = 1e-3
GRAD_CLIP = 1.0


def token_batches(vocab_size: int, batch_size: int, seq_len: int) -> Iterator[np.ndarray]:
    """The same stream of random ``int32[batch, seq_len + 1]`` batches in either process."""
    rng = np.random.default_rng(0)
    while True:
        yield rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)


def architecture(args: argparse.Namespace) -> dict:
    """The shared shape: ``get_config(model)`` with the benchmark's vocabulary, in float32."""
    from lowrank_jax.models import get_config

    cfg = get_config(args.model, vocab_size=args.vocab_size)
    return {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
    }


# ----------------------------------------------------------------------------- ours (JAX)


def build_ours(args: argparse.Namespace, method: str) -> Callable[[np.ndarray], float]:
    """A function ``batch -> loss`` that runs one whole jitted step of ``method`` and waits."""
    import jax.numpy as jnp
    from flax import nnx

    from lowrank_jax.models import Llama, get_config
    from lowrank_jax.train.registry import OptimizerArgs, build_optimizer
    from lowrank_jax.train.step import TrainState, make_train_step

    model = Llama(get_config(args.model, vocab_size=args.vocab_size), rngs=nnx.Rngs(0))
    if method == "lora":
        return _lora_step(model, args.lora_rank)
    settings = OptimizerArgs(LEARNING_RATE, rank=args.rank, update_proj_gap=args.gap, scale=0.25)
    tx = build_optimizer(method, settings)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = TrainState(jnp.int32(0), params, tx.init(params))
    step = make_train_step(nnx.graphdef(model), tx, grad_clip=GRAD_CLIP)
    holder = [state]

    def run(batch: np.ndarray) -> float:
        holder[0], metrics = step(holder[0], jnp.asarray(batch))
        return float(metrics["loss"])

    return run


def _lora_step(model, rank: int) -> Callable[[np.ndarray], float]:
    """The adapter step as ``lowrank-jax finetune`` trains it: ``reparam.wrap`` (``x@W +
    s·(x@A)@B``, no ``ΔW``), the frozen base passed as an argument (not baked into the program
    as constants), gradients of the adapters only, clipped, AdamW, the non-finite guard
    (``make_train_step(loss_fn=...)``); jitted, state donated."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from lowrank_jax import reparam
    from lowrank_jax.train.step import TrainState, make_train_step

    model = reparam.wrap(
        model, reparam.lora(rank=rank, alpha=2 * rank), key=jax.random.key(0), rngs=nnx.Rngs(0)
    )
    graph, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    trainable = nnx.to_pure_dict(adapters)
    tx = optax.adamw(LEARNING_RATE, weight_decay=0)

    def loss_fn(trainable, batch, rest):
        logits = nnx.merge(graph, trainable, rest)(batch[:, :-1])
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch[:, 1:]
        )
        return jnp.sum(losses), jnp.float32(losses.size)

    step = make_train_step(None, tx, grad_clip=GRAD_CLIP, loss_fn=loss_fn)
    holder = [TrainState(jnp.int32(0), trainable, tx.init(trainable))]

    def run(batch: np.ndarray) -> float:
        holder[0], metrics = step(holder[0], jnp.asarray(batch), rest)
        return float(metrics["loss"])

    return run


# ----------------------------------------------------------------------------- peer (PyTorch)


def build_torch(spec: dict, method: str) -> Callable[[np.ndarray], float]:
    """The peer's ``batch -> loss``: ``LlamaForCausalLM`` of ``spec``, the method's optimizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = spec["architecture"]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=arch["vocab_size"],
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_heads"],
        num_key_value_heads=arch["num_kv_heads"],
        rms_norm_eps=arch["rms_norm_eps"],
        rope_theta=arch["rope_theta"],
        max_position_embeddings=arch["max_position_embeddings"],
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).float().train()
    rank, gap = spec["rank"], spec["gap"]
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=spec["lora_rank"],
            lora_alpha=2 * spec["lora_rank"],
            target_modules=list(LORA_MODULES),
            lora_dropout=0.0,
        )
        model = get_peft_model(model, lora)
    # the projected methods' targets: the attention and MLP matrices (our default targets)
    projected = [
        m.weight for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name)
    ]  # fmt: skip
    ids = {id(p) for p in projected}
    regular = [p for p in model.parameters() if id(p) not in ids]
    low_rank = {"params": projected, "rank": rank, "update_proj_gap": gap, "proj_type": "std"}
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    elif method == "lora":
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0)
    elif method == "galore":
        from galore_torch import GaLoreAdamW

        opt = GaLoreAdamW([{"params": regular}, {**low_rank, "scale": 0.25}], lr=LEARNING_RATE)
    elif method == "fira":
        from fira import FiraAdamW

        opt = FiraAdamW(
            [{"params": regular}, {**low_rank, "alpha": 0.25}],
            lr=LEARNING_RATE,
            no_deprecation_warning=True,
        )
    elif method == "apollo":
        from apollo_torch import APOLLOAdamW

        apollo = {**low_rank, "proj": "random", "scale_type": "channel", "scale": 1}
        opt = APOLLOAdamW([{"params": regular}, apollo], lr=LEARNING_RATE)
    else:
        raise ValueError(f"unknown method {method!r}")
    params = [p for p in model.parameters() if p.requires_grad]

    def run(batch: np.ndarray) -> float:
        tokens = torch.from_numpy(batch).long()
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return run


def torch_worker() -> None:
    """The subprocess: JSON commands on stdin, one JSON reply per line on the real stdout.

    Libraries' prints go to stderr (stdout is pointed there), so the reply channel stays clean.
    """
    import torch
    import transformers

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    runner, data = None, None

    def reply(obj: dict) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    reply(
        {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
        }
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "build":
            runner = None  # free the previous method's model first
            spec = cmd["spec"]
            if spec["threads"]:
                torch.set_num_threads(spec["threads"])
            runner = build_torch(spec, cmd["method"])
            data = token_batches(
                spec["architecture"]["vocab_size"], spec["batch_size"], spec["seq_len"]
            )
            losses = [runner(next(data)) for _ in range(spec["warmup"])]
            reply({"first_loss": losses[0] if losses else None})
        elif cmd["cmd"] == "run":
            times = []
            for _ in range(cmd["steps"]):
                batch = next(data)
                began = time.perf_counter()
                runner(batch)
                times.append(time.perf_counter() - began)
            reply({"times": times})
        elif cmd["cmd"] == "quit":
            return


class TorchPeer:
    """The torch worker process, driven one command at a time."""

    def __init__(self):
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--torch-worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
        )  # fmt: skip
        self.versions = self.receive()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            raise RuntimeError(f"the torch worker stopped; its stderr ends with:\n{tail}")
        return json.loads(line)

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def ask(self, **cmd) -> dict:
        self.send(**cmd)
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()


def torch_available(method: str) -> str | None:
    """``None`` when the peer of ``method`` can run here, else why not."""
    for module in ("torch", "transformers", PEER_PACKAGES.get(method)):
        if module and importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


# ----------------------------------------------------------------------------- the benchmark


def summary(times: list[float], tokens: int) -> dict:
    return {
        "step_s": times,
        "tokens_per_s": {"median": tokens / statistics.median(times), "best": tokens / min(times)},
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama_60m", help="a lowrank_jax.models config name")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--rank", type=int, default=None, help="default hidden_size // 4")
    parser.add_argument("--gap", type=int, default=200, help="projector refresh period")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile, refresh)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per stack and method")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds the steps span")
    parser.add_argument("--torch-threads", type=int, default=None, help="default: torch's own")
    parser.add_argument("--no-torch", action="store_true", help="our side only")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    args.methods = methods
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be positive")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(argv)
    if args.torch_worker:
        torch_worker()
        return None
    import jax

    arch = architecture(args)
    args.rank = args.rank or arch["hidden_size"] // 4
    tokens = args.batch_size * args.seq_len
    spec = {
        "architecture": arch, "rank": args.rank, "gap": args.gap, "lora_rank": args.lora_rank,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "warmup": args.warmup,
        "threads": args.torch_threads,
    }  # fmt: skip
    missing = {m: "--no-torch" if args.no_torch else torch_available(m) for m in args.methods}
    peer = TorchPeer() if any(why is None for why in missing.values()) else None
    per_round = [len(r) for r in np.array_split(np.arange(args.steps), args.rounds) if len(r)]
    rows = {}
    try:
        for method in args.methods:
            with_peer = peer is not None and missing[method] is None
            if with_peer:  # the peer builds and warms up while we do (nothing is timed yet)
                peer.send(cmd="build", method=method, spec=spec)
            ours = build_ours(args, method)
            data = token_batches(args.vocab_size, args.batch_size, args.seq_len)
            first = [ours(next(data)) for _ in range(args.warmup)][0]
            row = {"ours": {"name": OUR_NAMES[method], "first_loss": first}, "torch": None}
            times = {"ours": [], "torch": []}
            if with_peer:
                built = peer.receive()
                row["torch"] = {"name": PEER_NAMES[method], "first_loss": built["first_loss"]}
            for r, steps in enumerate(per_round):
                sides = ["ours", "torch"] if r % 2 == 0 else ["torch", "ours"]
                for side in sides:
                    if side == "torch" and row["torch"] is not None:
                        times["torch"] += peer.ask(cmd="run", steps=steps)["times"]
                    elif side == "ours":
                        for _ in range(steps):
                            batch = next(data)
                            began = time.perf_counter()
                            ours(batch)
                            times["ours"].append(time.perf_counter() - began)
            row["ours"].update(summary(times["ours"], tokens))
            if row["torch"] is not None:
                row["torch"].update(summary(times["torch"], tokens))
                row["ratio_ours_vs_torch"] = {
                    stat: row["ours"]["tokens_per_s"][stat] / row["torch"]["tokens_per_s"][stat]
                    for stat in ("median", "best")
                }
            else:
                row["torch_skipped"] = missing[method]
            rows[method] = row
            del ours
    finally:
        if peer is not None:
            peer.close()

    if peer is not None and args.torch_threads:
        peer.versions["threads"] = args.torch_threads
    device = jax.devices()[0]
    result = {
        "model": args.model,
        "architecture": arch,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "dtype": "float32",
        "rank": args.rank,
        "update_proj_gap": args.gap,
        "lora_rank": args.lora_rank,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "rounds": len(per_round),
        "device": f"{device.platform}: {device.device_kind}, {os.cpu_count()} cores",
        "jax": jax.__version__,
        "torch": None if peer is None else peer.versions,
        "results": rows,
        "command": " ".join(["python", "benchmarks/vs_torch.py", *(argv or sys.argv[1:])]),
    }
    print(table(result))
    path = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"vs_torch_{args.model}_{device.platform}.json",
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {path}")
    return result


def table(result: dict) -> str:
    """The markdown table: tokens/s of each side (median step; best step) and ours / torch."""
    torch = result["torch"]
    lines = [
        f"{result['model']} ({result['architecture']['vocab_size']} vocab), batch "
        f"{result['batch_size']} x {result['seq_len']} tokens, float32, rank {result['rank']}; "
        f"{result['device']}; jax {result['jax']}"
        + (f", torch {torch['torch']} ({torch['threads']} threads)" if torch else ", no torch")
        + f"; {result['timed_steps']} timed steps in {result['rounds']} interleaved rounds",
        "",
        "| method | lowrank_jax tok/s (median / best) | PyTorch peer | torch tok/s (median / best) "
        "| ours / torch (median / best) |",
        "|---|---:|---|---:|---:|",
    ]
    for method, row in result["results"].items():
        ours = row["ours"]["tokens_per_s"]
        cells = [method, f"{ours['median']:,.0f} / {ours['best']:,.0f}"]
        if row["torch"] is None:
            cells += [f"- ({row['torch_skipped']})", "-", "-"]
        else:
            theirs, ratio = row["torch"]["tokens_per_s"], row["ratio_ours_vs_torch"]
            cells += [
                row["torch"]["name"],
                f"{theirs['median']:,.0f} / {theirs['best']:,.0f}",
                f"{ratio['median']:.2f}x / {ratio['best']:.2f}x",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
