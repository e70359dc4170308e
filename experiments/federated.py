"""Federated LoRA on client splits of the embedded corpus: FedAvg vs FLoRA vs FFA-LoRA vs Fed-SB
vs LoRA-FAIR (and FFA-LoRA with DP-FedAvg noise), next to centralised LoRA.

1. Pre-trains a small LLaMA (``llama_tiny``, byte tokenizer, layers scanned) with AdamW on the
   Old Testament of the embedded King James Bible (Genesis-Malachi).
2. Splits the New Testament into ``clients`` contiguous groups of whole books (gospels, Acts
   and letters, ..., Revelation: a non-IID split by genre), each packed and split by
   :func:`lowrank_jax.data.build_dataset` (every 20th sequence held out). Client weights are
   ``p_k ∝`` training sequences. Every method adapts the attention ``q`` and ``v`` projections.
3. Every federated method runs ``rounds`` rounds; in each, every client starts from the server's
   adapter, takes ``local_steps`` AdamW steps (fresh optimizer state, gradient clipping 1.0) on
   its own batches, and uploads its trainable arrays; the server aggregates with
   :mod:`lowrank_jax.reparam.federated`:

   * ``fedavg``: LoRA rank ``r``; ``reparam.fedavg`` (averages ``A`` and ``B``: biased);
   * ``lora_fair``: the same clients; ``reparam.lora_fair`` (refined ``B``);
   * ``flora``: LoRA of heterogeneous ranks (``2r, r, r/2, ...``); ``reparam.flora_stack``
     (exact), merged into the base every round; clients restart from fresh adapters;
   * ``ffa``: FFA-LoRA (``A`` frozen from one key); ``reparam.ffa_aggregate`` (exact);
   * ``ffa_dp``: FFA-LoRA with ``reparam.dp_fedavg`` (clip ``C``, noise ``σ``; no privacy
     accounting is done here -- it shows the mechanism and its cost in loss);
   * ``fed_sb``: LoRA-SB rank ``2r`` (``r``-independent ``(2r)²`` upload), initialised from
     the mean gradient of one batch per client; ``reparam.fed_sb_aggregate`` (exact);
   * ``centralized``: one LoRA rank ``r`` trained on the pooled client data for the same
     number of steps as all clients together (the target federated methods approximate).

Reports per method the held-out loss on the clients' pooled validation data after every round,
the final per-client losses, the upload per client per round (floats), the aggregation error
against the centralised average of the client updates (``reparam.aggregation_gap``, mean over
the adapted matrices, per round; for ``lora_fair`` also FedAvg's on the same clients) and the
wall-clock time relative to ``fedavg`` in the same process. Prints a markdown table and
writes ``experiments/results/federated.json``.

    python experiments/federated.py           # the README table (about 3 CPU-minutes)
    python experiments/federated.py --tiny    # smoke sizes (federated_tiny.json)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lowrank_jax import reparam
from lowrank_jax.data import ByteTokenizer, build_dataset, embedded_corpus
from lowrank_jax.models import Llama, get_config
from lowrank_jax.train.step import cross_entropy

RESULTS = pathlib.Path(__file__).with_name("results")
METHODS = ("centralized", "fedavg", "lora_fair", "flora", "ffa", "ffa_dp", "fed_sb")
SIZES = {
    "default": dict(pretrain_steps=300, rounds=6, local_steps=15, clients=4, batch_size=8,
                    seq_len=64, rank=4, eval_batches=6),
    "tiny": dict(pretrain_steps=4, rounds=2, local_steps=2, clients=3, batch_size=2, seq_len=16,
                 rank=2, eval_batches=1),
}  # fmt: skip
MODEL = {  # llama_tiny, shrunk for the smoke run
    "default": {},
    "tiny": dict(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=2, head_dim=16,
                 num_layers=2),
}  # fmt: skip
PRETRAIN_LR = 3e-3
LEARNING_RATES = {"centralized": 1e-2, "fedavg": 1e-2, "lora_fair": 1e-2, "flora": 1e-2,
                  "ffa": 2e-2, "ffa_dp": 2e-2, "fed_sb": 1e-2}  # fmt: skip
DP_CLIP, DP_NOISE = 0.5, 0.3
SB_LR = 1e-3  # LoRA-SB's η: the first-step approximation -η·sign(ḡ) it starts from
GRAD_CLIP = 1.0
TARGETS = r"attn/(q|v)_proj"  # as FedIT, FLoRA and PEFT's LLaMA default
_BOOK = re.compile(r"^(\d?[A-Za-z]+)\d+:")
_APPLY = jax.jit(reparam.apply)  # the effective weights (one compile per adapter layout)
_GAP = jax.jit(reparam.aggregation_gap, static_argnums=3)  # weights: a tuple


def testaments() -> tuple[str, list[tuple[str, str]]]:
    """``(old testament text, [(book, text), ...] of the new testament)``."""
    lines = embedded_corpus().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Mat1:1 "))
    books: dict[str, list[str]] = {}
    for line in lines[start:]:
        books.setdefault(_BOOK.match(line).group(1), []).append(line)
    return "\n".join(lines[:start]), [(b, "\n".join(v)) for b, v in books.items()]


def client_split(books: list[tuple[str, str]], clients: int) -> list[list[str]]:
    """Contiguous groups of whole books with about equal text each."""
    total = sum(len(t) for _, t in books)
    groups: list[list[str]] = [[] for _ in range(clients)]
    done = 0
    for name, text in books:
        k = min(clients - 1, int(clients * done / total))
        groups[k].append(name)
        done += len(text)
    return groups


def make_functions(graphdef: nnx.GraphDef) -> tuple:
    """``(local_train, evaluate)``, jitted once per adapter layout."""

    def loss_fn(trainable: Any, adapters: Any, base: Any, batch: jax.Array) -> jax.Array:
        params = reparam.apply(base, adapters.replace(trainable=trainable))
        return cross_entropy(nnx.merge(graphdef, params)(batch[:, :-1]), batch[:, 1:])

    @jax.jit
    def local_train(adapters: Any, base: Any, batches: jax.Array, lr: jax.Array) -> tuple:
        tx = optax.adamw(lr, weight_decay=0.0)

        def step(carry: tuple, batch: jax.Array) -> tuple:
            trainable, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(trainable, adapters, base, batch)
            factor = jnp.minimum(1.0, GRAD_CLIP / (optax.tree.norm(grads) + 1e-6))
            grads = jax.tree.map(lambda g: g * factor, grads)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), loss

        init = (adapters.trainable, tx.init(adapters.trainable))
        (trainable, _), losses = jax.lax.scan(step, init, batches)
        return adapters.replace(trainable=trainable), losses

    @jax.jit
    def evaluate(params: Any, blocks: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        per_batch = jax.vmap(lambda b: cross_entropy(model(b[:, :-1]), b[:, 1:]))
        return jnp.mean(per_batch(blocks))

    grad = jax.jit(
        jax.grad(lambda p, b: cross_entropy(nnx.merge(graphdef, p)(b[:, :-1]), b[:, 1:]))
    )
    return local_train, evaluate, grad


def pretrain(graphdef: nnx.GraphDef, params: Any, blocks: np.ndarray, size: dict, seed: int):
    """AdamW on ``blocks`` for ``pretrain_steps`` steps."""
    tx = optax.adamw(PRETRAIN_LR, weight_decay=0.0)

    @jax.jit
    def step(params: Any, opt_state: Any, batch: jax.Array) -> tuple:
        loss = lambda p: cross_entropy(nnx.merge(graphdef, p)(batch[:, :-1]), batch[:, 1:])
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(seed)
    opt_state = tx.init(params)
    for _ in range(size["pretrain_steps"]):
        batch = blocks[rng.integers(len(blocks), size=size["batch_size"])]
        params, opt_state, _ = step(params, opt_state, jnp.asarray(batch))
    return params


class Federation:
    """The clients' data and the shared machinery of one run."""

    def __init__(self, graphdef: nnx.GraphDef, base: Any, datasets: list, size: dict, seed: int):
        self.graphdef, self.base, self.datasets, self.size = graphdef, base, datasets, size
        self.seed = seed
        self.local_train, self.evaluate_fn, self.grad = make_functions(graphdef)
        counts = [len(d.train) for d in datasets]
        self.p = [c / sum(counts) for c in counts]
        per = size["eval_batches"] * size["batch_size"]
        self.val = [d.val[:per] for d in datasets]
        self.rng = np.random.default_rng(seed)

    def batches(self, k: int, steps: int) -> jax.Array:
        train = self.datasets[k].train
        picks = self.rng.integers(len(train), size=(steps, self.size["batch_size"]))
        return jnp.asarray(train[picks])

    def losses(self, params: Any) -> list[float]:
        out = []
        for v in self.val:
            blocks = v.reshape(-1, self.size["batch_size"], v.shape[-1])
            out.append(float(self.evaluate_fn(params, jnp.asarray(blocks))))
        return out

    def pooled(self, losses: list[float]) -> float:
        return float(np.dot(self.p, losses))


def init_adapters(method: str, fed: Federation, key: jax.Array, rank: int) -> Any:
    r = fed.size["rank"]
    if method in ("ffa", "ffa_dp"):
        return reparam.ffa_lora(rank=r, alpha=2 * r, targets=TARGETS).init(key, fed.base)[1]
    if method == "fed_sb":
        rp = reparam.lora_sb(rank=2 * r, lr=SB_LR, targets=TARGETS)
        cal = rp.calibration(fed.base)
        for k in range(len(fed.datasets)):  # one batch per client: the server's init gradient
            cal.add_gradients(fed.grad(fed.base, fed.batches(k, 1)[0]))
        return rp.init(key, fed.base, calibration=cal)[1]
    return reparam.lora(rank=rank, alpha=2 * rank, targets=TARGETS).init(key, fed.base)[1]


def _mean(gaps: dict) -> float:
    return float(np.mean([float(g) for g in gaps.values()]))


def flora_ranks(rank: int, clients: int) -> list[int]:
    pattern = (2 * rank, rank, max(1, rank // 2))
    return [pattern[k % 3] for k in range(clients)]


def run_method(method: str, fed: Federation) -> dict:
    size, lr = fed.size, jnp.float32(LEARNING_RATES[method])
    rounds, steps, r = size["rounds"], size["local_steps"], size["rank"]
    key = jax.random.key(fed.seed + 1)
    base = fed.base
    record: dict[str, Any] = {"lr": float(lr), "val_loss": [], "gap": [], "upload": None}
    began = time.perf_counter()
    if method == "centralized":
        adapters = init_adapters(method, fed, key, r)
        total = rounds * steps * len(fed.datasets)
        pooled = np.concatenate([d.train for d in fed.datasets])
        picks = fed.rng.integers(len(pooled), size=(total, size["batch_size"]))
        for chunk in np.array_split(picks, rounds):
            adapters, _ = fed.local_train(adapters, base, jnp.asarray(pooled[chunk]), lr)
            record["val_loss"].append(fed.pooled(fed.losses(_APPLY(base, adapters))))
        final = _APPLY(base, adapters)
        record["trainable_params"] = reparam.num_trainable(adapters)
    else:
        server = None if method == "flora" else init_adapters(method, fed, key, r)
        for rnd in range(rounds):
            clients = []
            for k in range(len(fed.datasets)):
                start = server
                if method == "flora":
                    ck = jax.random.fold_in(jax.random.fold_in(key, rnd), k)
                    start = init_adapters(method, fed, ck, flora_ranks(r, len(fed.datasets))[k])
                trained, _ = fed.local_train(start, base, fed.batches(k, steps), lr)
                clients.append(trained)
            record["upload"] = [reparam.num_trainable(c) for c in clients]
            if method == "fedavg":
                server = reparam.fedavg(clients, fed.p)
            elif method == "lora_fair":
                server = reparam.lora_fair(clients, fed.p)
                plain = _GAP(base, reparam.fedavg(clients, fed.p), clients, tuple(fed.p))
                record.setdefault("gap_fedavg", []).append(_mean(plain))
            elif method in ("ffa", "fed_sb"):
                agg = reparam.ffa_aggregate if method == "ffa" else reparam.fed_sb_aggregate
                server = agg(clients, fed.p)
            elif method == "ffa_dp":
                rk = jax.random.fold_in(key, 1000 + rnd)
                server = reparam.dp_fedavg(server, clients, l2_norm_clip=DP_CLIP,
                                           noise_multiplier=DP_NOISE, key=rk)  # fmt: skip
            else:
                server = reparam.flora_stack(clients, fed.p)
            weights = None if method == "ffa_dp" else tuple(fed.p)  # DP-FedAvg: uniform
            gaps = _GAP(base, server, clients, weights)
            record["gap"].append(_mean(gaps))
            current = _APPLY(base, server)
            if method == "flora":  # merged into the base; next round's clients start fresh
                base = current
            record["val_loss"].append(fed.pooled(fed.losses(current)))
        final = current
        record["trainable_params"] = max(record["upload"])
    jax.block_until_ready(final)
    record["seconds"] = time.perf_counter() - began
    record["client_val_loss"] = fed.losses(final)
    return record


def table(before: float, rows: dict) -> str:
    lines = [
        "| method | upload / client / round (floats) | held-out loss after each round "
        "| final | aggregation error | time vs fedavg |",
        "|---|---|---|---|---|---|",
        f"| pretrained base | – | – | {before:.3f} | – | – |",
    ]
    for name, r in rows.items():
        upload = (
            "–" if r["upload"] is None else "/".join(f"{u:,}" for u in sorted(set(r["upload"])))
        )
        losses = " ".join(f"{x:.3f}" for x in r["val_loss"])
        gap = "–" if not r["gap"] else f"{np.mean(r['gap']):.3g}"
        ratio = "–" if r.get("time_ratio") is None else f"{r['time_ratio']:.2f}×"
        lines.append(f"| {name} | {upload} | {losses} | {r['val_loss'][-1]:.3f} | {gap} "
                     f"| {ratio} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the experiment; returns what it writes to the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke sizes")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", help="the JSON file (default: experiments/results/federated*.json)"
    )
    args = parser.parse_args(argv)
    size = SIZES["tiny" if args.tiny else "default"]
    tokenizer = ByteTokenizer()
    old, books = testaments()
    groups = client_split(books, size["clients"])
    by_name = dict(books)
    if args.tiny:  # a few verses per client keep the smoke run in seconds
        old = old[:20000]
        by_name = {b: t[: 4000 // len(g)] for g in groups for b, t in by_name.items() if b in g}
    datasets = [
        build_dataset(f"client{k}", [by_name[b] for b in g], tokenizer, seq_len=size["seq_len"],
                      val_fraction=0.05, min_train_blocks=size["batch_size"])
        for k, g in enumerate(groups)
    ]  # fmt: skip
    ot = build_dataset("kjv-ot", [old], tokenizer, seq_len=size["seq_len"])
    overrides = MODEL["tiny" if args.tiny else "default"]
    config = get_config(
        "llama_tiny", vocab_size=tokenizer.vocab_size, scan_layers=True, **overrides
    )
    model = Llama(config, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    print(f"pre-training llama_tiny on the Old Testament ({size['pretrain_steps']} steps)")
    params = pretrain(graphdef, params, ot.train, size, args.seed)
    fed = Federation(graphdef, params, datasets, size, args.seed)
    before = fed.pooled(fed.losses(params))
    rows = {}
    for method in args.methods:
        rows[method] = run_method(method, fed)
        print(f"{method:12} held-out loss {' '.join(f'{x:.3f}' for x in rows[method]['val_loss'])}")
    for r in rows.values():
        r["time_ratio"] = r["seconds"] / rows["fedavg"]["seconds"] if "fedavg" in rows else None
    result = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "size": size,
        "model": {"name": "llama_tiny", **overrides},
        "seed": args.seed,
        "learning_rates": {m: LEARNING_RATES[m] for m in args.methods},
        "dp": {"l2_norm_clip": DP_CLIP, "noise_multiplier": DP_NOISE},
        "clients": [
            {"books": g, "train_sequences": len(d.train), "weight": p}
            for g, d, p in zip(groups, datasets, fed.p)
        ],  # fmt: skip
        "flora_ranks": flora_ranks(size["rank"], size["clients"]),
        "pretrained_val_loss": before,
        "methods": rows,
        "table": table(before, rows),
        "command": " ".join(["python experiments/federated.py", *(argv or sys.argv[1:])]),
    }
    print(result["table"])
    out = pathlib.Path(args.out or RESULTS / f"federated{'_tiny' if args.tiny else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
