"""Fine-tuning demo: LoRA, DoRA and PiSSA vs full fine-tuning vs GaLore on a small pretrained LLaMA.

1. Pre-trains a LLaMA on the embedded King James Bible with our own trainer
   (``lowrank_jax.train.train``: AdamW, byte tokenizer) and restores its parameters from the
   orbax checkpoint. The run directory is a cache: ``--pretrained DIR`` reuses any
   ``lowrank-jax train`` run with a byte tokenizer (its latest checkpoint) instead of training.
2. Fine-tunes a copy of it on a different domain, Python source code: a fixed list of modules
   of the interpreter's own standard library (:data:`PYTHON_MODULES`, PSF licence; the same
   text on any machine with the same Python minor version, recorded in the JSON with the
   text's SHA-256), packed and split by :func:`lowrank_jax.data.build_dataset` (every 20th
   sequence held out).
3. Every method gets the same steps, batches, seed, warmup + cosine schedule, gradient clipping
   (1.0) and no weight decay; only the learning rate is per method (:data:`LEARNING_RATES`,
   chosen by ``--sweep``, see below):

   * ``full``: ``optax.adamw`` on every parameter;
   * ``galore``: :func:`lowrank_jax.galore_adamw` (rank ``r``, ``α = 2``, every parameter
     trained; attention/MLP matrices through the rank-``r`` projection);
   * ``lora``, ``dora``, ``pissa``: :mod:`lowrank_jax.reparam` adapters of rank ``r``,
     ``α = r``, on every attention and MLP matrix; ``optax.adamw`` on ``adapters.trainable``
     only, the loss computed on ``reparam.apply(params, adapters)``.

``--methods`` also runs the rest of the LoRA family at LoRA's rate (not swept): :data:`FAMILY`
trained like LoRA, and :data:`SCHEDULED`, whose training needs loop pieces of their own, wired
through the library's APIs by a :class:`Plan` (:func:`scheduled`, :func:`mos_setup`; settings
derived from ``r`` and the step count ``T``; the constants below):

* ``sora``: :func:`~lowrank_jax.reparam.sora` (``r_max = r``, ``α = r``, gates ``N(0, 1)``)
  trained by :func:`~lowrank_jax.reparam.sora_optimizer` (AdamW on the factors, Adam on the
  gates, both at the shared schedule, then the proximal L1 step with ``ξ =`` :data:`SORA_XI` per
  step), plus ``η·sora_l1`` (``η =`` :data:`SORA_L1`) in the loss. Reports the effective rank
  (nonzero gates, :func:`~lowrank_jax.reparam.sora_rank`);
* ``dylora``: :func:`~lowrank_jax.reparam.dylora` (``r_max = r``, ``α = r``, ``r_min = 1``,
  the reference's frozen-lower mode), a rank drawn every step by
  :func:`~lowrank_jax.reparam.dylora_sample_rank`; evaluated at ``r_max``, and the validation
  loss at ``r/4, r/2, r`` (:func:`~lowrank_jax.reparam.dylora_set_rank`) is reported;
* ``adalora``: :func:`~lowrank_jax.reparam.adalora` (``init_r = 3r/2``, ``α = init_r``: PEFT's
  12 → 8 at ``r = 8``) with :class:`~lowrank_jax.reparam.AdaLoRASchedule` (``target_r = r``,
  ``t_i = T/10``, ``t_f = T/5``, ``ΔT = T/30``, PEFT's β and orthogonality weight 0.5, its
  regulariser in the loss, its ``update`` after every optimizer step with that step's clipped
  gradients). Reports the rank budget (initial, target, final) and the final allocation;
* ``increlora``: :func:`~lowrank_jax.reparam.increlora` (``2r`` slots, ``init_rank = r/4``,
  ``reserve = r/2``: the reference's map for an average rank of 8, ``α = r``) with
  :class:`~lowrank_jax.reparam.IncreLoRASchedule` (``target_rank = r``, warm-up ``T/10``,
  growth every ``T/40`` steps, :data:`INCRELORA_TOP_H` matrices each, its regulariser in the
  loss), the importance scores from :func:`~lowrank_jax.reparam.increlora_value_and_grad`.
  Reports the total rank (initial, target, final), the allocation and the values trained at
  the end (:func:`~lowrank_jax.reparam.increlora_num_trainable`);
* ``mos``: :func:`~lowrank_jax.reparam.mos` (rank ``r`` per layer, equivalent rank ``r/2``
  (at least 2), private rank 1, 2 shards, ``α = r``) with one shard pool per projection type
  shared by all the layers, as the reference: the layers' matrices are stacked
  ``[L, in, out]`` for the adapters and split back for the model. Reports its trained values
  against the de-sharded per-layer LoRA's (:func:`~lowrank_jax.reparam.mos_to_lora`).

The mixtures of LoRA experts (:data:`ROUTED`, ``--methods ...``, at LoRA's rate too) add
per-token routed experts (:func:`~lowrank_jax.reparam.wrap_experts`) to every attention and MLP
matrix of the pre-trained model; the gates depend on the token, so the wrapped model runs as
it is (a :class:`Mixture`: ``nnx.LoRAParam`` arrays trained, the rest frozen), never merged.
The Python modules are split into :data:`TASKS` contiguous groups, a block's task id the group
most of its tokens come from (:func:`task_labels`; every row sees the same batches):

* ``xlora``: :func:`~lowrank_jax.reparam.xlora` over :data:`TASKS` frozen rank-``r`` LoRA
  experts, each first trained like the ``lora`` row on its task's blocks for ``T/TASKS`` steps
  (``T`` in all, not counted in the row), then :class:`~lowrank_jax.reparam.XLoRA`'s scaling
  head (depth 1, shared by the layers, softmax) trained for ``T`` steps. The head reads the
  input of the final norm (``lm_head``'s input is flattened to tokens in this model);
* ``mola``: :func:`~lowrank_jax.reparam.mola` (:data:`MOLA_EXPERTS` experts of rank ``r``,
  ``α = r``, from the bottom layer group up, top-2 softmax routing) with its balance loss,
  summed over the routed matrices, in the loss at weight :data:`MOLA_BALANCE`;
* ``smora``: :func:`~lowrank_jax.reparam.smora` (:data:`SMORA_RANKS` ``· r`` rank-1 experts,
  the top ``r`` per token, ``α = r``, the reference's bias update rate ``1e-5``): no loss term,
  the router bias is moved by the balancing rule in every training forward;
* ``meteora``: :func:`~lowrank_jax.reparam.meteora` (one rank-``r`` expert per task, trained,
  top-2) with :func:`~lowrank_jax.reparam.gate_loss` against the blocks' task ids in the loss
  at weight :data:`METEORA_GATE`.

Their reported loss is the cross-entropy alone (the added term is in ``aux_losses``); the
figures, on the held-out Python blocks, are the load shares per layer (mean over its
matrices), the balance ``E Σ f_e P̄_e`` (1 when balanced), the added term, the gates'
mean absolute change, and X-LoRA's scalings by task, MeteoRA's share of tokens whose top
expert is their task's, SMoRA's range of load shares and bias.

Reports per method the trainable parameters, the optimizer-state bytes
(``lowrank_jax.memory.state_bytes`` of what is optimized), the held-out loss on the new domain
before and after, the KJV held-out loss after (forgetting; the pre-training run's own split)
and the wall-clock time of the fine-tuning steps (compilation excluded) relative to ``full``
in the same process. Prints a markdown table and writes ``experiments/results/finetune.json``.

    python experiments/finetune.py            # llama_20m, the README table (about 5 min on 2
                                              # CPU cores, 3 min once the pre-training is cached)
    python experiments/finetune.py --tiny     # llama_tiny smoke run (finetune_tiny.json)
    python experiments/finetune.py --sweep    # the learning-rate sweep behind LEARNING_RATES

``--sweep`` fine-tunes every method at every rate of :data:`SWEEP_GRID` (same settings
otherwise), picks per method the rate with the lowest mean training loss over the last 20% of
steps (every fine-tuning batch is new: the run sees less than one epoch, so this is a held-out
estimate and the validation split stays untouched), and writes ``finetune_sweep.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from lowrank_jax import memory, reparam
from lowrank_jax.data import BatchIterator, ByteTokenizer, Dataset, build_dataset, resolve_source
from lowrank_jax.models import Llama, get_config
from lowrank_jax.optimizers import galore_adamw
from lowrank_jax.targets import path_str
from lowrank_jax.train import Checkpointer, RunConfig, make_eval_step, train
from lowrank_jax.train.step import cross_entropy, warmup_cosine

RESULTS = pathlib.Path(__file__).with_name("results")
METHODS = ("full", "galore", "lora", "dora", "pissa")
# More of the LoRA family (--methods ...): trained like LoRA (AdamW on the adapters' trainable
# arrays), at LoRA's learning rate (not swept); rank r, alpha r where the method has one.
FAMILY = ("wegeft", "lamda", "loldu", "randlora", "miss", "hydra", "vera", "lora_xs")
# The rest of the family (--methods ...), at LoRA's rate too, each with its training-loop pieces
# (a Plan; the settings are in the module docstring).
SCHEDULED = ("sora", "dylora", "adalora", "increlora", "mos")
SORA_L1 = 0.1  # η: the weight of sora_l1 (the mean |gate|) in the loss
SORA_XI = 1e-3  # ξ: the proximal step's threshold per step (not scaled by the learning rate)
INCRELORA_TOP_H = 4  # matrices grown per growth step
# The mixtures of LoRA experts (--methods ...), at LoRA's rate too: routed adapters
# (reparam.wrap_experts), computed per token, so they run as a wrapped model (a Mixture), not as
# a rewrite of the weights (the settings are in the module docstring).
ROUTED = ("xlora", "mola", "smora", "meteora")
TASKS = 4  # pseudo-tasks: PYTHON_MODULES in this many contiguous groups (X-LoRA's, MeteoRA's)
MOLA_EXPERTS = (2, 4, 6, 8)  # the paper's "2468", bottom to top
MOLA_BALANCE = 1e-3  # MoLA's weight of the summed balance loss
SMORA_RANKS = 8  # SMoRA: SMORA_RANKS * r rank-1 experts, the top r per token
METEORA_GATE = 50.0  # MeteoRA's weight of its gate loss

# Standard-library modules (single files in Python 3.10-3.13), in this order.
PYTHON_MODULES = (
    "argparse.py", "ast.py", "calendar.py", "configparser.py", "contextlib.py", "csv.py",
    "dataclasses.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "heapq.py",
    "inspect.py", "json/decoder.py", "json/encoder.py", "pprint.py", "shutil.py",
    "statistics.py", "string.py", "textwrap.py", "tokenize.py",
)  # fmt: skip

SIZES = {
    "default": dict(model="llama_20m", pretrain_steps=300, steps=120, batch_size=8, seq_len=128,
                    rank=8, gap=40, eval_batches=8),
    "tiny": dict(model="llama_tiny", pretrain_steps=40, steps=30, batch_size=4, seq_len=32,
                 rank=4, gap=10, eval_batches=4),
}  # fmt: skip

# Peak learning rates, per size: the --sweep winners (experiments/results/finetune*_sweep.json).
LEARNING_RATES = {
    "default": {"full": 1e-3, "galore": 3e-3, "lora": 1e-2, "dora": 1e-2, "pissa": 3e-3},
    "tiny": {"full": 3e-3, "galore": 3e-2, "lora": 1e-2, "dora": 3e-2, "pissa": 3e-2},
}
SWEEP_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
GALORE_SCALE = 2.0  # the GaLore paper's GLUE setting for rank 8 (Table 7)
GRAD_CLIP = 1.0


def python_documents() -> tuple[list[str], dict]:
    """The texts of :data:`PYTHON_MODULES` and a description (Python version, SHA-256)."""
    root = pathlib.Path(os.__file__).parent
    texts = [(root / name).read_text(encoding="utf-8") for name in PYTHON_MODULES]
    digest = hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()
    info = {
        "source": "Python standard library source",
        "python": platform.python_version(),
        "modules": list(PYTHON_MODULES),
        "bytes": sum(len(t.encode("utf-8")) for t in texts),
        "sha256": digest,
    }
    return texts, info


def pretrain(run_dir: str, size: dict, seed: int) -> None:
    """Pre-trains ``size['model']`` with AdamW on the embedded corpus into ``run_dir``."""
    cfg = RunConfig(
        model=size["model"],
        optimizer="adamw",
        steps=size["pretrain_steps"],
        batch_size=size["batch_size"],
        seq_len=size["seq_len"],
        seed=seed,
        out=run_dir,
        eval_every=size["pretrain_steps"],
        eval_batches=size["eval_batches"],
        checkpoint_every=size["pretrain_steps"],
        keep_checkpoints=1,
        progress=False,
    )
    train(cfg, log=lambda line: print(f"  [pre-train] {line}"))


def restore_pretrained(run_dir: str) -> tuple[RunConfig, nnx.GraphDef, dict, int]:
    """``(run config, graphdef, params, step)`` of the latest checkpoint of a training run.

    Only the parameters are read (whatever the run's optimizer), matched by path against the
    model that the run's ``config.json`` describes.
    """
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = RunConfig(**json.load(f))
    if cfg.tokenizer != "byte":
        raise SystemExit(f"{run_dir}: fine-tuning needs a byte-tokenizer run, not {cfg.tokenizer}")
    model_config = get_config(
        cfg.model,
        vocab_size=ByteTokenizer.vocab_size,
        scan_layers=cfg.scan_layers,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )
    abstract = nnx.eval_shape(lambda: Llama(model_config, rngs=nnx.Rngs(0)))
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
    step = checkpointer.latest_step()
    item = os.path.join(checkpointer.path(step), "state")
    checkpointer.close()
    with ocp.StandardCheckpointer() as reader:
        saved = reader.restore(item)["train"]["params"]
    found = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(saved)[0]}

    def take(kp: Any, want: Any) -> jax.Array:
        got = found[path_str(kp)]
        if np.shape(got) != want.shape:
            raise SystemExit(f"{item}: {path_str(kp)} has shape {np.shape(got)}, not {want.shape}")
        return jnp.asarray(got, want.dtype)

    return cfg, nnx.graphdef(abstract), jax.tree_util.tree_map_with_path(take, target), step


def evaluate(eval_step: Callable, params: Any, blocks: np.ndarray, batch_size: int) -> float:
    """Mean loss over ``blocks`` (a whole number of batches)."""
    losses = [
        float(eval_step(params, jnp.asarray(blocks[i : i + batch_size])))
        for i in range(0, len(blocks), batch_size)
    ]
    return float(np.mean(losses))


def setup(name: str, params: dict, size: dict, schedule: Any, seed: int) -> tuple:
    """``(trainable, context, tx, effective, plan)`` for one method.

    ``effective(trainable, context)`` is the parameter tree the model runs with; ``context``
    holds the frozen arrays (passed to the jitted step as an argument, not baked in); ``plan``
    is ``None`` or the method's :class:`Plan`.
    """
    rank, gap = size["rank"], size["gap"]
    if name == "mos":
        trainable, context, effective = mos_setup(params, rank, seed)
        return trainable, context, optax.adamw(schedule, weight_decay=0.0), effective, None
    if name in SCHEDULED:
        return scheduled(name, params, rank, size["steps"], schedule, seed)
    if name in ("full", "galore"):
        if name == "full":
            tx = optax.adamw(schedule, weight_decay=0.0)
        else:
            tx = galore_adamw(schedule, rank=rank, update_proj_gap=gap, scale=GALORE_SCALE,
                              seed=seed)  # fmt: skip
        return jax.tree.map(jnp.copy, params), None, tx, lambda trainable, _: trainable, None
    make = getattr(reparam, name)
    accepted = inspect.signature(make).parameters
    options = {next(iter(accepted)): rank}  # rank, or Hydra's parallel_rank: the adapter size
    if "alpha" in accepted:
        options["alpha"] = rank
    base, adapters = jax.jit(make(**options).init)(jax.random.key(seed), params)

    def effective(trainable: Any, context: tuple) -> Any:
        base, adapters = context
        return reparam.apply(base, adapters.replace(trainable=trainable))

    context = (base, adapters.replace(trainable={}))
    return adapters.trainable, context, optax.adamw(schedule, weight_decay=0.0), effective, None


def _apply(trainable: Any, context: tuple) -> Any:
    base, adapters = context
    return reparam.apply(base, adapters.replace(trainable=trainable))


def _value_and_grad(loss_of_params: Callable, base: Any, adapters: reparam.Adapters) -> tuple:
    """``(loss, grads of adapters.trainable, None)``: no scores besides the gradients."""
    loss, grads = jax.value_and_grad(lambda t: loss_of_params(_apply(t, (base, adapters))))(
        adapters.trainable
    )
    return loss, grads, None


@dataclasses.dataclass(frozen=True)
class Plan:
    """A method's training-loop pieces beyond the optimizer on its trainable arrays.

    Each step: ``used = prepare(adapters, t)`` is what this step's forward sees (DyLoRA's drawn
    rank); ``value_and_grad(loss_of_params, base, used)`` gives ``(loss, grads, scores)``;
    ``penalty(adapters)``'s gradient is added (a regulariser, not in the reported loss); the
    clipped gradients update the trainable arrays; then ``finish(t, adapters, grads, scores,
    state)`` (a rank allocator) returns the next ``(adapters, state)``. The adapters' frozen
    arrays (IncreLoRA's active ranks) travel with ``state`` from step to step.
    """

    prepare: Callable = lambda adapters, t: adapters
    value_and_grad: Callable = _value_and_grad
    penalty: Callable | None = None
    init: Callable = lambda adapters: ()
    finish: Callable = lambda t, adapters, grads, scores, state: (adapters, state)


def scheduled(name: str, params: dict, rank: int, steps: int, schedule: Any, seed: int) -> tuple:
    """``(trainable, context, tx, effective, plan)`` for SoRA, DyLoRA, AdaLoRA or IncreLoRA
    (the settings are in the module docstring)."""
    key = jax.random.key(seed)
    tx = optax.adamw(schedule, weight_decay=0.0)
    if name == "sora":
        make = reparam.sora(rank, alpha=rank)
        tx = reparam.sora_optimizer(tx, optax.adam(schedule), SORA_XI)
        plan = Plan(penalty=lambda adapters: SORA_L1 * reparam.sora_l1(adapters))
    elif name == "dylora":
        make = reparam.dylora(rank, alpha=rank)
        draws = jax.random.fold_in(key, 1)
        plan = Plan(
            prepare=lambda adapters, t: reparam.dylora_sample_rank(
                jax.random.fold_in(draws, t), adapters
            )
        )
    elif name == "adalora":
        init_r = 3 * rank // 2
        make = reparam.adalora(init_r, alpha=init_r)
        allocator = reparam.AdaLoRASchedule(
            total_step=steps,
            target_r=rank,
            tinit=steps // 10,
            tfinal=steps // 5,
            delta_t=max(1, steps // 30),
        )
        plan = Plan(
            penalty=allocator.regularizer,
            init=allocator.init,
            finish=lambda t, adapters, grads, _, state: allocator.update(t, adapters, grads, state),
        )
    elif name == "increlora":
        make = reparam.increlora(2 * rank, init_rank=max(1, rank // 4), alpha=rank,
                                 reserve=max(1, rank // 2))  # fmt: skip
        grower = reparam.IncreLoRASchedule(target_rank=rank, init_warmup=steps // 10,
                                           incre_interval=max(1, steps // 40),
                                           top_h=INCRELORA_TOP_H)  # fmt: skip
        plan = Plan(
            value_and_grad=reparam.increlora_value_and_grad,
            penalty=grower.regularizer,
            init=grower.init,
            finish=lambda t, adapters, _, scores, state: grower.update(t, adapters, scores, state),
        )
    else:
        raise ValueError(f"no plan for {name!r}; one of {SCHEDULED}")
    base, adapters = jax.jit(make.init)(key, params)
    return adapters.trainable, (base, adapters.replace(trainable={})), tx, _apply, plan


def mos_setup(params: dict, rank: int, seed: int) -> tuple:
    """``(trainable, context, effective)`` for MoS with one shard pool per projection type shared
    by every layer: the adapters see the layers stacked (``layers/q_proj/kernel: [L, in, out]``),
    the model gets them back one layer each."""
    layers = params["layers"]
    order = sorted(layers)
    stacked = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[i] for i in order))}
    make = reparam.mos(rank, max(2, rank // 2), private_rank=1, shards=2, alpha=rank)
    stacked, adapters = jax.jit(make.init)(jax.random.key(seed), stacked)
    rest = {k: v for k, v in params.items() if k != "layers"}

    def effective(trainable: Any, context: tuple) -> Any:
        rest, stacked, skeleton = context
        adapted = _apply(trainable, (stacked, skeleton))["layers"]
        return {**rest, "layers": {i: jax.tree.map(lambda x, i=n: x[i], adapted)
                                   for n, i in enumerate(order)}}  # fmt: skip

    return adapters.trainable, (rest, stacked, adapters.replace(trainable={})), effective


def task_labels(texts: Sequence[str], size: dict, val_fraction: float) -> tuple:
    """``(train, val)`` task ids of the packed blocks (as :func:`build_dataset` packs and splits
    them): the documents in :data:`TASKS` contiguous groups, a block's task the one most of its
    tokens come from."""
    groups = np.array_split(np.arange(len(texts)), TASKS)
    owner = np.empty(len(texts), np.int32)
    for task, docs in enumerate(groups):
        owner[docs] = task
    lengths = [len(ByteTokenizer().encode(t)) + 1 for t in texts]  # each document, then eos
    tokens = np.repeat(owner, lengths)
    block = size["seq_len"] + 1
    n = len(tokens) // block
    per_block = tokens[: n * block].reshape(n, block)
    labels = np.array([np.bincount(b, minlength=TASKS).argmax() for b in per_block], np.int32)
    period = max(2, round(1 / val_fraction))
    is_val = np.arange(n) % period == period - 1
    return labels[~is_val], labels[is_val]


@dataclasses.dataclass(frozen=True)
class Mixture:
    """A routed method's wrapped model, split for the jitted step.

    The model is ``nnx.merge(graphdef, trainable, bias, rest)``: ``trainable`` the
    ``nnx.LoRAParam`` arrays (experts, routers, X-LoRA's head), ``bias`` SMoRA's
    :class:`~lowrank_jax.reparam.RouterBias` (updated by the forward, carried from step to
    step), ``rest`` the frozen arrays. Batches carry the task id as a last column.
    ``aux(records, labels)`` is the method's term added to the loss (``None``: none).
    """

    name: str
    train_graph: nnx.GraphDef
    eval_graph: nnx.GraphDef
    aux: Callable | None
    info: dict

    def forward(self, graph: nnx.GraphDef, trainable: Any, bias: Any, rest: Any, batch: Any):
        """``(cross-entropy, records, bias after the call)``."""
        model = nnx.merge(graph, trainable, bias, rest)
        with reparam.collect_routing() as records:
            logits = model(batch[:, :-2])
        bias = nnx.to_pure_dict(nnx.state(model, reparam.RouterBias))
        return cross_entropy(logits, batch[:, 1:-1]), records, bias

    def loss(self, trainable: Any, rest: Any, bias: Any, batch: Any) -> tuple:
        """``(objective, (cross-entropy, aux term, bias))``."""
        ce, records, bias = self.forward(self.train_graph, trainable, bias, rest, batch)
        aux = jnp.float32(0.0) if self.aux is None else self.aux(records, batch[:, -1])
        return ce + aux, (ce, aux, bias)

    def eval_step(self, state: tuple, batch: Any) -> jax.Array:
        trainable, rest, bias = state
        return self.forward(self.eval_graph, trainable, bias, rest, batch)[0]

    def routing(self, state: tuple, batch: Any) -> dict:
        """Per routed matrix (in layer order): load shares, balance and, with a router, the
        share of tokens whose top expert is the block's task; X-LoRA: the head's scalings."""
        trainable, rest, bias = state
        ce, records, _ = self.forward(self.eval_graph, trainable, bias, rest, batch)
        out = {"load": [r.load for r in records], "balance": [r.balance for r in records]}
        if records[0].logits is not None:
            label = batch[:, -1][:, None]
            out["top_is_task"] = [jnp.mean(jnp.argmax(r.logits, -1) == label) for r in records]
        if self.aux is not None:
            out["aux"] = self.aux(records, batch[:, -1])
        if self.name == "xlora":
            model = nnx.merge(self.eval_graph, trainable, bias, rest)
            scalings = model.scalings(model.hidden(batch[:, :-2]))  # (batch, seq, layers, E)
            out["scalings"] = jnp.mean(scalings, axis=(1, 2))  # (batch, E)
        return out


def _lora_expert(graphdef, params, blocks, size, lr, steps, seed) -> reparam.Adapters:
    """A rank-r LoRA trained like the ``lora`` row, on ``blocks`` for ``steps`` steps."""
    schedule = warmup_cosine(lr, steps, max(1, steps // 10))
    trainable, context, tx, effective, _ = setup("lora", params, size, schedule, seed)

    def loss_fn(trainable, batch):
        model = nnx.merge(graphdef, effective(trainable, context))
        return cross_entropy(model(batch[:, :-1]), batch[:, 1:])

    @jax.jit
    def step(trainable, opt_state, batch):
        grads = jax.grad(loss_fn)(trainable, batch)
        factor = jnp.minimum(1.0, GRAD_CLIP / (optax.tree.norm(grads) + 1e-6))
        updates, opt_state = tx.update(jax.tree.map(lambda g: g * factor, grads), opt_state,
                                       trainable)  # fmt: skip
        return optax.apply_updates(trainable, updates), opt_state

    opt_state = tx.init(trainable)
    batches = BatchIterator(blocks, size["batch_size"], seed)
    for _ in range(steps):
        trainable, opt_state = step(trainable, opt_state, jnp.asarray(next(batches)))
    return context[1].replace(trainable=trainable)


def routed_setup(name: str, graphdef: nnx.GraphDef, params: dict, size: dict, lr: float,
                 seed: int, train: np.ndarray) -> tuple:  # fmt: skip
    """``(trainable, rest, bias, tx-less Mixture)`` for X-LoRA, MoLA, SMoRA or MeteoRA on the
    pretrained model (the settings are in the module docstring); ``train`` are the training
    blocks with their task id as a last column (X-LoRA's experts)."""
    rank, rngs = size["rank"], nnx.Rngs(params=seed)
    model = nnx.merge(graphdef, params)
    info: dict = {}
    aux = None
    if name == "xlora":
        steps = max(1, size["steps"] // TASKS)
        experts = [
            _lora_expert(graphdef, params, train[train[:, -1] == k, :-1], size, lr, steps,
                         seed + 1 + k)
            for k in range(TASKS)
        ]  # fmt: skip
        model = reparam.wrap_experts(model, reparam.xlora(TASKS), experts=experts)
        model = reparam.XLoRA(model, hidden_size=model.config.hidden_size,
                              hidden_from="final_norm", rngs=rngs)  # fmt: skip
        info = {"expert_steps": steps, "expert_params": TASKS * sum(
            int(np.size(x)) for x in jax.tree.leaves(experts[0].trainable))}  # fmt: skip
    elif name == "mola":
        layers = len(params["layers"])
        routing = reparam.mola(MOLA_EXPERTS, num_layers=layers, rank=rank, alpha=rank)
        model = reparam.wrap_experts(model, routing, rngs=rngs)
        aux = lambda records, labels: MOLA_BALANCE * records.balance_loss()
    elif name == "smora":
        routing = reparam.smora(SMORA_RANKS * rank, top_k=rank, alpha=rank)
        model = reparam.wrap_experts(model, routing, rngs=rngs)
    elif name == "meteora":
        model = reparam.wrap_experts(model, reparam.meteora(TASKS, rank=rank), rngs=rngs)
        aux = lambda records, labels: METEORA_GATE * reparam.gate_loss(records, labels)
    else:
        raise ValueError(f"no mixture for {name!r}; one of {ROUTED}")
    model.train()
    train_graph, trainable, bias, rest = nnx.split(model, nnx.LoRAParam, reparam.RouterBias, ...)
    model.eval()
    eval_graph = nnx.graphdef(model)
    pure = nnx.to_pure_dict
    mixture = Mixture(name, train_graph, eval_graph, aux, info)
    return pure(trainable), pure(rest), pure(bias), mixture


def gate_change(start: Any, trainable: Any) -> float:
    """The mean absolute change of the gates' parameters (the routers, X-LoRA's head)."""
    gates = lambda tree: [np.ravel(x) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                          if "router" in path_str(kp) or "head" in path_str(kp)]  # fmt: skip
    before, after = np.concatenate(gates(start)), np.concatenate(gates(trainable))
    return float(np.mean(np.abs(after - before)))


def routed_figures(mixture: Mixture, state: tuple, blocks: np.ndarray, batch_size: int) -> dict:
    """What a routed run says after training, on the held-out Python blocks: the experts'
    load shares per layer (mean over its matrices), the balance loss ``E Σ f_e P̄_e`` (1 when
    balanced; per matrix, averaged), the method's term (MoLA's weighted balance loss,
    MeteoRA's weighted gate loss), and per method: X-LoRA's mean scalings per task, MeteoRA's
    share of tokens routed first to their task's expert, SMoRA's bias range."""
    report = jax.jit(mixture.routing)
    runs = [jax.device_get(report(state, jnp.asarray(blocks[i : i + batch_size])))
            for i in range(0, len(blocks), batch_size)]  # fmt: skip
    mean = lambda key: [np.mean([r[key][m] for r in runs], axis=0)
                        for m in range(len(runs[0][key]))]  # fmt: skip
    loads, balance = mean("load"), mean("balance")
    paths: list[str] = []  # the records' order: the order the routed matrices run in

    def probe(state: tuple, batch: Any) -> jax.Array:
        trainable, rest, bias = state
        ce, records, _ = mixture.forward(mixture.eval_graph, trainable, bias, rest, batch)
        paths.extend(r.path for r in records)
        return ce

    jax.eval_shape(probe, state, jnp.asarray(blocks[:batch_size]))
    by_layer: dict[str, list] = {}
    for path, load in zip(paths, loads):
        by_layer.setdefault(path.split("/")[1], []).append(load)
    out = {
        "experts_per_layer": {k: int(len(v[0])) for k, v in by_layer.items()},
        "load_shares": {k: np.round(np.mean(v, axis=0), 4).tolist() for k, v in by_layer.items()},
        "balance": float(np.mean(balance)),
        "balance_range": [float(np.min(balance)), float(np.max(balance))],
        **mixture.info,
    }
    if "aux" in runs[0]:
        out["aux_loss"] = float(np.mean([r["aux"] for r in runs]))
    if "top_is_task" in runs[0]:
        out["top_expert_is_task"] = float(np.mean(mean("top_is_task")))
    if mixture.name == "xlora":
        scal = np.concatenate([r["scalings"] for r in runs])
        labels = blocks[: len(scal), -1]
        out["scalings_by_task"] = {str(k): np.round(scal[labels == k].mean(0), 4).tolist()
                                   for k in range(TASKS) if np.any(labels == k)}  # fmt: skip
    if mixture.name == "smora":
        shares = np.concatenate(loads)
        out["load_share_range"] = [float(shares.min()), float(shares.max())]
        bias = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state[2])])
        out["bias_range"] = [float(bias.min()), float(bias.max())]
    return out


def figures(name: str, size: dict, adapters: reparam.Adapters, start: Any, val: Callable) -> dict:
    """What the run says about a :data:`SCHEDULED` method after training.

    ``adapters`` are the trained ones, ``start`` their trainable arrays before training and
    ``val(adapters)`` the held-out loss with other adapters (the same frozen base)."""
    rank = size["rank"]
    if name == "sora":
        ranks = reparam.sora_rank(adapters)
        moved = [np.abs(np.asarray(adapters.trainable[p]["g"]) - start[p]["g"]) for p in ranks]
        return {
            "effective_rank_total": int(sum(ranks.values())),
            "max_rank_total": rank * len(ranks),
            "gate_mean_abs_change": float(np.mean(np.concatenate(moved))),
            "effective_ranks": ranks,
        }
    if name == "dylora":
        at = sorted({max(1, rank // 4), max(1, rank // 2), rank})
        return {"val_loss_at_rank": {str(b): val(reparam.dylora_set_rank(adapters, b)) for b in at}}
    if name == "adalora":
        schedule = reparam.AdaLoRASchedule(total_step=size["steps"], target_r=rank)
        initial, target = schedule.budgets(adapters)
        ranks = {p: int(np.count_nonzero(t["E"])) for p, t in adapters.trainable.items()}
        return {"rank_budget_initial": initial, "rank_budget_target": target,
                "rank_budget_final": sum(ranks.values()), "ranks": ranks}  # fmt: skip
    if name == "increlora":
        ranks = reparam.increlora_ranks(adapters)
        return {
            "rank_total_initial": max(1, rank // 4) * len(ranks),
            "rank_total_target": rank * len(ranks),
            "rank_total_final": int(sum(ranks.values())),
            "trained_params_final": reparam.increlora_num_trainable(adapters),
            "ranks": ranks,
        }
    if name == "mos":
        method = adapters.sites[0].method
        return {
            "per_layer_rank": method.rank,
            "equivalent_rank": method.equivalent_rank,
            "lora_equivalent_params": reparam.num_trainable(reparam.mos_to_lora(adapters)),
        }
    raise ValueError(f"no figures for {name!r}")


def summary(name: str, values: dict) -> str:
    """One line of a :data:`SCHEDULED` method's figures."""
    if name == "sora":
        return (f"effective rank {values['effective_rank_total']} of "
                f"{values['max_rank_total']} (nonzero gates)")  # fmt: skip
    if name == "dylora":
        ranks = values["val_loss_at_rank"]
        return "val loss at rank " + ", ".join(f"{b}: {v:.3f}" for b, v in ranks.items())
    if name == "adalora":
        return (
            f"rank budget {values['rank_budget_initial']} → {values['rank_budget_final']} "
            f"(target {values['rank_budget_target']})"
        )
    if name == "increlora":
        return (f"total rank {values['rank_total_initial']} → {values['rank_total_final']} "
                f"(target {values['rank_total_target']}), "
                f"{values['trained_params_final']:,} values trained at the end")  # fmt: skip
    if name in ROUTED:
        loads = "; ".join(f"layer {k}: " + "/".join(f"{x:.2f}" for x in v)
                          for k, v in values["load_shares"].items())  # fmt: skip
        line = f"balance {values['balance']:.3f} (1 = balanced)"
        if "aux_loss" in values:
            line += f", aux term {values['aux_loss']:.4f}"
        if name == "smora":
            low, high = values["load_share_range"]
            return line + f", rank load shares {low:.3f} to {high:.3f}"
        if name == "meteora":
            line += f", top expert = task for {values['top_expert_is_task']:.1%} of tokens"
        if name == "xlora":
            by_task = values["scalings_by_task"].items()
            return (
                line
                + "; mean scalings by task: "
                + "; ".join(f"{k}: " + "/".join(f"{x:.2f}" for x in v) for k, v in by_task)
            )
        return line + "; load shares " + loads
    return (f"rank {values['per_layer_rank']} per layer from pools of equivalent rank "
            f"{values['equivalent_rank']}; the de-sharded LoRA has "
            f"{values['lora_equivalent_params']:,} values")  # fmt: skip


def finetune(
    name: str,
    lr: float,
    graphdef: nnx.GraphDef,
    eval_step: Callable,
    params: dict,
    domain: Dataset,
    kjv_val: np.ndarray,
    size: dict,
    seed: int,
    tasks: tuple | None = None,
) -> dict:
    """Fine-tunes ``params`` with method ``name`` at peak rate ``lr``; returns its record.

    ``tasks``: the ``(train, val)`` task ids of the domain's blocks (:func:`task_labels`), for
    the :data:`ROUTED` methods (their batches carry them as a last column)."""
    steps, batch_size = size["steps"], size["batch_size"]
    schedule = warmup_cosine(lr, steps, steps // 10)
    train_blocks, val = domain.train, domain.val[: size["eval_batches"] * batch_size]
    kjv = kjv_val
    mixture = None
    if name in ROUTED:
        if tasks is None:
            raise ValueError(f"{name}: the routed methods need the blocks' task ids (tasks=)")
        train_blocks = np.concatenate([domain.train, tasks[0][:, None]], axis=1)
        val = np.concatenate([val, tasks[1][: len(val), None]], axis=1)
        kjv = np.concatenate([kjv_val, np.zeros((len(kjv_val), 1), kjv_val.dtype)], axis=1)
        trainable, rest, bias, mixture = routed_setup(name, graphdef, params, size, lr, seed,
                                                      train_blocks)  # fmt: skip
        context, tx, plan = rest, optax.adamw(schedule, weight_decay=0.0), None
        effective = None
        eval_step = jax.jit(mixture.eval_step)
    else:
        trainable, context, tx, effective, plan = setup(name, params, size, schedule, seed)

    def model_loss(params: Any, batch: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        return cross_entropy(model(batch[:, :-1]), batch[:, 1:])

    def clipped(grads: Any) -> Any:
        factor = jnp.minimum(1.0, GRAD_CLIP / (optax.tree.norm(grads) + 1e-6))
        return jax.tree.map(lambda g: g * factor, grads)

    def step(trainable, opt_state, carry, context, batch, t) -> tuple:
        if mixture is not None:  # carry: SMoRA's bias; the loss: cross-entropy and aux term
            grads, (ce, aux, carry) = jax.grad(mixture.loss, has_aux=True)(
                trainable, context, carry, batch
            )
            updates, opt_state = tx.update(clipped(grads), opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, carry, jnp.stack([ce, aux])
        if plan is None:
            loss_fn = lambda trainable: model_loss(effective(trainable, context), batch)
            loss, grads = jax.value_and_grad(loss_fn)(trainable)
            grads = clipped(grads)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, carry, loss
        (base, skeleton), (frozen, state) = context, carry
        adapters = skeleton.replace(trainable=trainable, frozen=frozen)
        used = plan.prepare(adapters, t)
        loss, grads, scores = plan.value_and_grad(lambda p: model_loss(p, batch), base, used)
        if plan.penalty is not None:
            penalty = jax.grad(lambda tr: plan.penalty(used.replace(trainable=tr)))(trainable)
            grads = jax.tree.map(jnp.add, grads, penalty)
        grads = clipped(grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        adapters = adapters.replace(trainable=optax.apply_updates(trainable, updates))
        adapters, state = plan.finish(t, adapters, grads, scores, state)
        return adapters.trainable, opt_state, (adapters.frozen, state), loss

    if mixture is None:
        merged = jax.jit(effective)  # one compile instead of many eager ops per evaluation
    else:
        merged = lambda trainable, rest: (trainable, rest, bias)  # the eval_step's state
    record = {
        "lr": lr,
        "trainable_params": int(sum(np.size(x) for x in jax.tree.leaves(trainable))),
        "opt_state_bytes": memory.state_bytes(tx, trainable),
        "val_loss_before": evaluate(eval_step, merged(trainable, context), val, batch_size),
    }
    copies = name in SCHEDULED + ROUTED  # of the arrays before training (they are donated)
    start = jax.tree.map(np.array, trainable) if copies else None
    opt_state = tx.init(trainable)
    carry = bias if mixture is not None else ()
    if plan is not None:
        skeleton = context[-1]
        carry = (skeleton.frozen, plan.init(skeleton.replace(trainable=trainable)))
    batch = jax.ShapeDtypeStruct(train_blocks[:batch_size].shape, jnp.int32)
    t = jax.ShapeDtypeStruct((), jnp.int32)
    compiled = (
        jax.jit(step, donate_argnums=(0, 1))  # not the carry: a schedule's state may alias
        .lower(trainable, opt_state, carry, context, batch, t)
        .compile()
    )
    batches = BatchIterator(train_blocks, batch_size, seed)  # the same permutation for all
    losses = []
    began = time.perf_counter()
    for i in range(steps):
        trainable, opt_state, carry, loss = compiled(
            trainable, opt_state, carry, context, next(batches), jnp.asarray(i, jnp.int32)
        )
        losses.append(loss)
    values = np.asarray(jax.device_get(jax.block_until_ready(losses)), np.float64)
    seconds = time.perf_counter() - began
    losses = values.reshape(steps, -1)[:, 0].tolist()  # the cross-entropy
    if plan is not None:  # the frozen arrays the schedule ended with (IncreLoRA's ranks)
        context = (context[0], context[1].replace(frozen=carry[0]))
    if mixture is not None:
        bias = carry  # the bias the balancing rule ended with (SMoRA)
    final = merged(trainable, context)
    tail = max(1, steps // 5)
    record.update(
        val_loss_after=evaluate(eval_step, final, val, batch_size),
        kjv_val_loss_after=evaluate(eval_step, final, kjv, batch_size),
        train_loss_first=float(np.mean(losses[:tail])),
        train_loss_last=float(np.mean(losses[-tail:])),
        seconds=seconds,
        losses=losses,
    )
    if mixture is not None:
        aux = values[:, 1].tolist()
        record["figures"] = {
            "aux_loss_train_last": float(np.mean(aux[-tail:])),
            "gate_mean_abs_change": gate_change(start, trainable),
            **routed_figures(mixture, final, val, batch_size),
        }
        record["aux_losses"] = aux
    if name in SCHEDULED:
        *frozen, skeleton = context
        val_at = lambda adapters: evaluate(
            eval_step, merged(adapters.trainable, (*frozen, adapters.replace(trainable={}))),
            val, batch_size,
        )  # fmt: skip
        trained = skeleton.replace(trainable=trainable)
        record["figures"] = figures(name, size, trained, start, val_at)
    return record


def table(pretrained: dict, rows: dict) -> str:
    """The markdown table of a run."""
    lines = [
        "| method | lr | trainable params | optimizer state | Python val loss (before → after) "
        "| KJV val loss after | time vs full |",
        "|---|---|---|---|---|---|---|",
        f"| pretrained (no fine-tuning) | – | – | – | {pretrained['domain_val_loss']:.3f} "
        f"| {pretrained['kjv_val_loss']:.3f} | – |",
    ]
    total = pretrained["params"]
    for name, r in rows.items():
        share = 100 * r["trainable_params"] / total
        ratio = "–" if r.get("time_ratio") is None else f"{r['time_ratio']:.2f}×"
        lines.append(
            f"| {name} | {r['lr']:g} | {r['trainable_params']:,} ({share:.2f}%) "
            f"| {memory.human(r['opt_state_bytes'])} "
            f"| {r['val_loss_before']:.3f} → {r['val_loss_after']:.3f} "
            f"| {r['kjv_val_loss_after']:.3f} | {ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="llama_tiny smoke sizes")
    parser.add_argument("--pretrained", help="a training run directory to reuse or create "
                        "(default: runs/finetune/<model>-kjv-<steps>)")  # fmt: skip
    parser.add_argument("--methods", nargs="+", choices=METHODS + FAMILY + SCHEDULED + ROUTED,
                        default=list(METHODS), help="the methods to run "
                        "(FAMILY, SCHEDULED and ROUTED at LoRA's rate)")  # fmt: skip
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR",
                        help="override LEARNING_RATES, e.g. --lr full=3e-4 lora=1e-3")  # fmt: skip
    parser.add_argument("--sweep", action="store_true", help="run SWEEP_GRID for every method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="the JSON file (default: experiments/results/finetune*.json)")
    for key, value in SIZES["default"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value),
                            help=f"override the size's {key}")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the experiment; returns what it writes to the JSON file."""
    args = parse_args(argv)
    label = "tiny" if args.tiny else "default"
    size = {k: getattr(args, k) or v for k, v in SIZES[label].items()}
    rates = dict(LEARNING_RATES[label])
    rates.update({name: rates["lora"] for name in FAMILY + SCHEDULED + ROUTED})
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in rates:
            raise SystemExit(f"--lr {item}: the method must be one of {tuple(rates)}")
        rates[name] = float(value)
    run_dir = args.pretrained or os.path.join(
        "runs", "finetune", f"{size['model']}-kjv-{size['pretrain_steps']}"
    )
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        print(f"pre-training {size['model']} on the embedded KJV corpus into {run_dir}")
        pretrain(run_dir, size, args.seed)
    run_cfg, graphdef, params, step = restore_pretrained(run_dir)
    print(f"fine-tuning {run_cfg.model} from {run_dir} (step {step}, {run_cfg.optimizer})")

    texts, domain_info = python_documents()
    tokenizer = ByteTokenizer()
    domain = build_dataset("python", texts, tokenizer, seq_len=size["seq_len"], val_fraction=0.05)
    kjv_name, kjv_docs = resolve_source(run_cfg.data)
    # The pre-training run's own held-out split.
    kjv = build_dataset(kjv_name, kjv_docs, tokenizer, seq_len=run_cfg.seq_len,
                        val_fraction=run_cfg.val_fraction)  # fmt: skip
    kjv_val = kjv.val[: size["eval_batches"] * size["batch_size"]]
    domain_info.update(train_sequences=len(domain.train), val_sequences=len(domain.val))
    tasks = task_labels(texts, size, val_fraction=0.05)
    if (len(tasks[0]), len(tasks[1])) != (len(domain.train), len(domain.val)):
        raise SystemExit("task ids do not match the packed blocks")  # the packing changed
    eval_step = make_eval_step(graphdef)
    val = domain.val[: size["eval_batches"] * size["batch_size"]]
    pretrained = {
        "dir": run_dir,
        "model": run_cfg.model,
        "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "optimizer": run_cfg.optimizer,
        "steps": step,
        "data": kjv_name,
        "domain_val_loss": evaluate(eval_step, params, val, size["batch_size"]),
        "kjv_val_loss": evaluate(eval_step, params, kjv_val, size["batch_size"]),
    }
    common = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "size": size,
        "seed": args.seed,
        "galore_scale": GALORE_SCALE,
        "grad_clip": GRAD_CLIP,
        "domain": domain_info,
        "pretrained": pretrained,
        "command": " ".join(["python experiments/finetune.py", *(argv or sys.argv[1:])]),
    }
    suffix = ("_tiny" if args.tiny else "") + ("_sweep" if args.sweep else "")
    out = pathlib.Path(args.out or RESULTS / f"finetune{suffix}.json")
    run = lambda name, lr: finetune(
        name, lr, graphdef, eval_step, params, domain, kjv_val, size, args.seed, tasks
    )

    if args.sweep:
        sweep: dict[str, dict] = {}
        for name in args.methods:
            sweep[name] = {}
            for lr in SWEEP_GRID:
                r = run(name, lr)
                sweep[name][f"{lr:g}"] = {k: v for k, v in r.items() if k != "losses"}
                print(f"{name:7} lr {lr:<7g} train loss (last 20%) {r['train_loss_last']:.4f}  "
                      f"val {r['val_loss_after']:.4f}")  # fmt: skip
        final = lambda runs, lr: np.nan_to_num(runs[lr]["train_loss_last"], nan=np.inf)
        best = {n: min(runs, key=lambda lr: final(runs, lr)) for n, runs in sweep.items()}
        print("best learning rates:", best)
        result = {**common, "grid": list(SWEEP_GRID), "best": best, "runs": sweep}
    else:
        rows = {name: run(name, rates[name]) for name in args.methods}
        for name, r in rows.items():
            if not np.all(np.isfinite(r["losses"])):
                raise SystemExit(f"{name}: the loss is not finite at lr {r['lr']:g}; lower it")
        full = rows.get("full")
        for r in rows.values():
            r["time_ratio"] = None if full is None else r["seconds"] / full["seconds"]
        result = {**common, "methods": rows, "table": table(pretrained, rows)}
        print(result["table"])
        for name, r in rows.items():
            if "figures" in r:
                print(f"{name}: {summary(name, r['figures'])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
