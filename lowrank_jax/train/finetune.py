"""``lowrank-jax finetune`` and ``lowrank-jax generate``: supervised fine-tuning of a pretrained
checkpoint in one command, and sampling from the result.

``finetune`` loads a model and its tokenizer (a local HF checkpoint directory, a ``.gguf`` file
or a hub id: :func:`~lowrank_jax.models.pretrained.load_pretrained`), reads a JSONL file of
prompt/response, messages or text records (or a plain-text file;
:func:`~lowrank_jax.data.sft.read_examples`), holds out a seeded ``val_fraction`` of the
records, packs the rest into rows of ``max_seq_len`` tokens
(:func:`~lowrank_jax.data.sft_packing.pack_examples`, documents kept apart by segment ids) and
trains on the response tokens only:

* an adapter method (``lora``, ``dora``, ``pissa``, ... :data:`ADAPTER_METHODS`): the model is
  wrapped by :func:`lowrank_jax.reparam.wrap` (optionally on an NF4/int8 base: QLoRA) and AdamW
  trains the adapters; the adapter is exported as a PEFT directory (LoRA, DoRA and the
  residual inits, converted by :func:`~lowrank_jax.reparam.to_base_lora`) or in
  :func:`lowrank_jax.reparam.save`'s format (the other methods); ``merge`` also writes the
  merged HF checkpoint. ``dylora`` trains as the paper: each step draws one rank
  ``b ~ U{r_min..r_max}`` for every site (:func:`~lowrank_jax.reparam.dylora_sample_rank`,
  from the step's key, inside the one compiled step); evaluation, the returned model and the
  export are at ``r_max``. ``sora``, ``adalora`` and ``increlora`` are refused
  (:data:`SCHEDULED_ADAPTERS`: their per-step schedules are not run here);
* a registered optimizer (``galore``, ``fira``, ``apollo``, ``lisa``, ``adamw_8bit``,
  ``adamw``, ...: ``lowrank-jax optimizers``): every parameter is trained and the HF
  checkpoint is written.

**Too-long records are truncated.** A prompt/response or chat record longer than
``max_seq_len`` tokens keeps its first ``max_seq_len`` tokens; one left without a response
token is dropped; plain text is cut into pieces. The counts are in the ``data`` line of
``metrics.jsonl``; a file where nothing fits is an error.

``metrics.jsonl`` holds a ``data`` line, training lines (``step``, ``loss``, ``lr``,
``tokens``), evaluation lines (step ``0`` before training, every ``eval_every`` steps and at the
end: ``step``, ``val_loss``, ``val_ppl``; with ``eval_generate``
also ``generations`` and, when the records have answers, ``exact_match``) and a final
``summary`` line. Expected problems raise :class:`~lowrank_jax.train.config.ConfigError`,
:class:`~lowrank_jax.data.DataError` or ``UnsupportedCheckpointError`` (one line each).

Example:
  >>> from lowrank_jax.train.finetune import FinetuneConfig, finetune
  >>> summary = finetune(FinetuneConfig(model="ckpt/", data="train.jsonl", out="runs/ft",
  ...                                   method="lora", rank=8, steps=100))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lowrank_jax import memory, reparam
from lowrank_jax.data.sft import Example, prompt_ids, read_examples, tokenize_example
from lowrank_jax.data.sft_packing import SFTData, pack_examples, split_examples
from lowrank_jax.data.sources import DataError
from lowrank_jax.train.config import ConfigError
from lowrank_jax.train.finetune_export import save_outputs
from lowrank_jax.train.metrics import MetricsWriter
from lowrank_jax.train.step import TrainState, make_train_step, warmup_cosine

__all__ = [
    "ADAPTER_METHODS",
    "DEFAULT_TARGETS",
    "SCHEDULED_ADAPTERS",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
]

# Reparameterizations that train with plain AdamW on their trainable arrays and need no
# calibration data (EVA, LoRA-GA) or schedule of their own (SCHEDULED_ADAPTERS); DyLoRA's
# schedule (a rank drawn every step) is wired into the step here.
ADAPTER_METHODS = (
    "lora", "dora", "pissa", "olora", "ffa_lora", "lora_xs", "vera", "nola", "dylora", "lamda",
    "loldu", "miss", "bone", "randlora", "wegeft", "hydra",
)  # fmt: skip
DEFAULT_TARGETS = r"(q|k|v|o|gate|up|down)_proj/kernel"
# Reparameterizations whose training needs a per-step schedule that ``finetune`` does not run:
# refused with the APIs that do (experiments/finetune.py wires them), not trained without it.
SCHEDULED_ADAPTERS = {
    "sora": "its gates' proximal L1 step (reparam.sora_optimizer) and the sora_l1 penalty",
    "adalora": "its rank allocation (reparam.AdaLoRASchedule: regularizer, then update after "
    "each optimizer step)",
    "increlora": "its rank growth (reparam.IncreLoRASchedule with "
    "reparam.increlora_value_and_grad)",
}
# The fold_in index of DyLoRA's rank draw from a step's key (the dropout streams use 0, 1, ...)
DYLORA_RANK_STREAM = 2**31 - 1
# The settings a checkpoint must agree on to be resumed (the others only change what is logged).
RUN_SHAPING = (
    "model", "data", "method", "targets", "rank", "alpha", "options", "lr", "steps",
    "batch_size", "accum_steps", "layerwise", "max_seq_len", "seed", "quantize_base",
    "loftq_iters", "val_fraction", "tokenizer", "adapter_optimizer", "calibration_rows",
)  # fmt: skip
# The optimizers of the adapter methods (--adapter-optimizer): AdamW, or a LoRA-side rule on
# the factors A and B (lowrank_jax.optimizers: LoRA+, LoRA-FA, ALLoRA; LoRA-GGPO).
ADAPTER_OPTIMIZERS = ("adamw", "loraplus", "lorafa", "allora", "ggpo")
# LoRA-GGPO's noise scale and gradient weight (the public port's defaults)
GGPO_SIGMA, GGPO_BETA = 0.03, 0.01
ADAPTER_LR = 2e-4  # the QLoRA paper's rate for small models
# OwLore without --opt probs: the outlier threshold m of its layer scores (OWL's M)
OWLORE_M = 5.0


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The settings of one fine-tuning run (the ``lowrank-jax finetune`` flags).

    Attributes:
      model: local HF checkpoint directory, ``.gguf`` file or hub id.
      data: ``.jsonl`` records (prompt/response, messages or text) or a plain-text file.
      out: the run directory (metrics.jsonl, adapter/, model/ or merged/).
      method: an adapter method (:data:`ADAPTER_METHODS`) or a registered optimizer name.
      targets: regex over leaf paths of the matrices to adapt or project
        (default :data:`DEFAULT_TARGETS` for adapters, the optimizer's own otherwise).
      rank: adapter rank, or projection rank of a low-rank optimizer.
      alpha: adapter scale numerator (default: the method's own; adapters only).
      options: extra keyword arguments of the adapter factory or the optimizer alias.
      lr: peak learning rate (default :data:`ADAPTER_LR` or the optimizer's registry default).
      steps, batch_size, max_seq_len, seed: the run's length, rows per step, tokens per row
        (longer records are truncated) and seed.
      accum_steps: split each step's ``batch_size`` rows into this many microbatches whose
        gradients are summed before the one update (gradient accumulation: one microbatch's
        activations; the loss is still the mean over all the batch's response tokens). With
        ``layerwise`` too the microbatches pass through the stacked layers one layer at a
        time and each layer is updated once, with its gradient summed over them.
      layerwise: full-parameter methods: the model is loaded with its layers stacked and
        the optimizer updates each layer's weights inside the backward pass, as soon as their
        gradient exists (``make_train_step(layerwise=True)``; at most one layer's gradient is
        alive); the gradients are then clipped per layer (to norm 1) rather than globally.
        Goes with ``accum_steps`` (exact: the same loss and update as one whole batch).
      quantize_base: ``"nf4"`` or ``"int8"``: QLoRA (adapter methods only).
      loftq_iters: with ``quantize_base`` and ``method`` lora or dora: ``T > 0`` LoftQ
        alternations initialise the adapters from the quantization error, so that base plus
        adapter starts near the float weights (``QuantConfig(loftq_iters=T)``; ``1`` is
        ZeroQuant-V2's low-rank compensation); ``0``: the method's own init (B = 0). Such an
        adapter belongs to the quantized base: the merged export (``--merge``, into the
        dequantized base) is the faithful one.
      adapter_optimizer: what trains the adapters (:data:`ADAPTER_OPTIMIZERS`): ``adamw``;
        ``loraplus`` (``B`` at 16x the rate, :func:`~lowrank_jax.optimizers.loraplus_adamw`);
        ``lorafa`` (``A`` frozen, ``B``'s gradient projected; ``method="lora"`` only,
        :func:`~lowrank_jax.optimizers.lorafa_adamw`); ``allora`` (per-row adaptive rates,
        :func:`~lowrank_jax.optimizers.allora_adamw`); ``ggpo`` (LoRA-GGPO: AdamW, and in each
        training forward the adapted weights get Gaussian noise per output unit scaled by
        their weight and gradient norms, :func:`~lowrank_jax.transforms.lora_ggpo` and
        :func:`~lowrank_jax.transforms.ggpo_perturb`, sigma 0.03, beta 0.01; float bases
        only). The LoRA-side rules need adapters with
        ``A``/``B`` factors (lora, dora, pissa, olora, ...).
      eval_every: evaluate every this many steps (``0``: at the end only).
      eval_generate: greedy replies to this many held-out prompts at each evaluation.
      eval_max_new_tokens: length limit of those replies.
      merge: also write the merged HF checkpoint (adapter methods).
      val_fraction: share of the records held out.
      tokenizer: a directory with ``tokenizer.json`` replacing the checkpoint's own.
      log_every: steps between training lines.
      checkpoint_every: save the training state every this many steps (``0``: never) under
        ``out/checkpoints`` (:class:`~lowrank_jax.train.checkpoint.Checkpointer`).
      resume: continue from the newest intact checkpoint in ``out`` (the settings that shape
        the run must be the same; a fresh start when there is none).
      stop_at: stop after this step with a checkpoint, as an interrupted run would (tests,
        time-limited jobs); resume later with ``resume``.
      calibration_rows: ``method="owlore"`` without ``options["probs"]``: the layer
        probabilities are computed from the pretrained model on the first this many packed
        training rows (:func:`~lowrank_jax.models.owlore_probabilities`, padding left out,
        ``m =`` :data:`OWLORE_M`), logged and recorded in ``metrics.jsonl`` (an ``owlore``
        line and the summary). Explicit ``probs`` are used as given.
    """

    model: str
    data: str
    out: str
    method: str = "lora"
    targets: str | None = None
    rank: int = 8
    alpha: float | None = None
    options: dict = dataclasses.field(default_factory=dict)
    lr: float | None = None
    steps: int = 100
    batch_size: int = 4
    accum_steps: int = 1
    layerwise: bool = False
    max_seq_len: int = 512
    seed: int = 0
    quantize_base: str | None = None
    loftq_iters: int = 0
    adapter_optimizer: str = "adamw"
    eval_every: int = 0
    eval_generate: int = 0
    eval_max_new_tokens: int = 32
    merge: bool = False
    val_fraction: float = 0.1
    tokenizer: str | None = None
    log_every: int = 10
    checkpoint_every: int = 0
    resume: bool = False
    stop_at: int | None = None
    calibration_rows: int = 16

    @property
    def adapter(self) -> bool:
        """``True`` when ``method`` is a reparameterization (else an optimizer)."""
        return self.method in ADAPTER_METHODS

    def validate(self) -> FinetuneConfig:
        """Checks names and ranges without loading anything; returns ``self``.

        Raises:
          ConfigError: the setting and the fix, in one line.
        """
        from lowrank_jax.train.registry import available_optimizers

        if self.method in SCHEDULED_ADAPTERS:
            raise ConfigError(
                f"--method {self.method}: finetune does not run "
                f"{SCHEDULED_ADAPTERS[self.method]}, which it needs to train; train it from "
                f"Python with those APIs (as experiments/finetune.py --methods {self.method} "
                "does) or use another adapter method (lora, dylora, ...)"
            )
        if not self.adapter and self.method not in available_optimizers():
            adapters, optimizers = ", ".join(ADAPTER_METHODS), ", ".join(available_optimizers())
            raise ConfigError(
                f"--method {self.method!r} is neither an adapter method ({adapters}) nor a "
                f"registered optimizer ({optimizers})"
            )
        for name in ("steps", "batch_size", "accum_steps", "rank", "eval_max_new_tokens",
                     "log_every", "calibration_rows"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.batch_size % self.accum_steps:
            raise ConfigError(
                f"--accum-steps {self.accum_steps} must divide --batch-size {self.batch_size} "
                "(each microbatch has batch_size / accum_steps rows)"
            )
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ConfigError(f"--stop-at must be in [1, steps], got {self.stop_at!r}")
        for name in ("eval_every", "eval_generate", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 or more")
        if self.max_seq_len < 2:
            raise ConfigError(f"--max-seq-len must be at least 2, got {self.max_seq_len}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.quantize_base not in (None, "nf4", "int8"):
            raise ConfigError(f"--quantize-base must be nf4 or int8, got {self.quantize_base!r}")
        if isinstance(self.loftq_iters, bool) or not (
            isinstance(self.loftq_iters, int) and self.loftq_iters >= 0
        ):
            raise ConfigError(f"--loftq-iters must be an int >= 0, got {self.loftq_iters!r}")
        if self.loftq_iters and not self.quantize_base:
            raise ConfigError(
                "--loftq-iters initialises the adapters from the base's quantization error; "
                "add --quantize-base nf4 (or int8)"
            )
        if self.loftq_iters and self.method not in ("lora", "dora"):
            raise ConfigError(
                f"--loftq-iters initialises LoRA or DoRA factors, not {self.method!r}'s; use "
                "--method lora or dora, or drop the flag"
            )
        if self.adapter_optimizer not in ADAPTER_OPTIMIZERS:
            raise ConfigError(
                f"--adapter-optimizer must be one of {', '.join(ADAPTER_OPTIMIZERS)}, got "
                f"{self.adapter_optimizer!r}"
            )
        if self.adapter_optimizer == "ggpo" and self.quantize_base:
            raise ConfigError(
                "--adapter-optimizer ggpo perturbs the frozen base weights in the forward; "
                "it needs a float base, not --quantize-base"
            )
        if self.adapter_optimizer == "lorafa" and self.method != "lora":
            raise ConfigError(
                "--adapter-optimizer lorafa freezes LoRA's A and rescales B's gradient by "
                f"LoRA's (A, scale): it goes with --method lora, not {self.method!r}"
            )
        if self.layerwise and self.adapter:
            raise ConfigError(
                f"--layerwise updates every weight inside the backward pass (full-parameter "
                f"methods: galore, adamw, ...); {self.method!r} trains adapters. Drop the flag"
            )
        if not self.adapter:
            if self.adapter_optimizer != "adamw":
                raise ConfigError(
                    f"--adapter-optimizer trains adapters; {self.method!r} trains every weight "
                    "with its own optimizer. Drop the flag or use an adapter method"
                )
            for flag, value in (("--quantize-base", self.quantize_base), ("--merge", self.merge)):
                if value:
                    raise ConfigError(
                        f"{flag} applies to adapter methods (lora, dora, ...); {self.method!r} "
                        "trains every weight in place. Drop the flag or use an adapter method"
                    )
            if self.alpha is not None:
                raise ConfigError(
                    f"--alpha is the adapter scale; for {self.method!r} use --opt scale=VALUE"
                )
        return self


class FinetuneResult(NamedTuple):
    """What :func:`finetune` returns: the ``summary`` record (also the last line of
    ``metrics.jsonl``), the trained model (wrapped by :func:`lowrank_jax.reparam.wrap` for
    adapter methods) and its tokenizer."""

    summary: dict
    model: Any
    tokenizer: Any


def _load(cfg: FinetuneConfig) -> tuple[Any, Any]:
    from lowrank_jax.models.pretrained import load_pretrained

    try:
        return load_pretrained(cfg.model, tokenizer_path=cfg.tokenizer, scan_layers=cfg.layerwise)
    except DataError as err:
        if cfg.tokenizer:
            raise
        raise DataError(
            f"{err}; or pass --tokenizer DIR (a directory with tokenizer.json)"
        ) from None


def _adapter_factory(cfg: FinetuneConfig) -> reparam.Reparam:
    make = getattr(reparam, cfg.method)
    accepted = inspect.signature(make).parameters
    kwargs = dict(cfg.options)
    kwargs["targets"] = cfg.targets or DEFAULT_TARGETS
    if cfg.alpha is not None:
        if "alpha" not in accepted:
            raise ConfigError(f"--alpha: {cfg.method} has no alpha; drop the flag")
        kwargs["alpha"] = cfg.alpha
    first = next(iter(accepted))  # rank, blocks, parallel_rank, ...: the size of the adapter
    try:
        return make(**{first: cfg.rank}, **kwargs)
    except TypeError as err:
        raise ConfigError(f"--opt for {cfg.method}: {err}") from None


def _adapter_optimizer(cfg: FinetuneConfig, schedule: Any, model: Any = None) -> Any:
    """``cfg.adapter_optimizer`` over the adapter tree (no weight decay, as before); ``model``
    (the wrapped model) gives LoRA-GGPO its scale and the base weights' mean row norms."""
    from lowrank_jax import optimizers

    if cfg.adapter_optimizer == "ggpo":
        from lowrank_jax import transforms

        sites = _ggpo_sites(model)
        norms = {site: float(jnp.mean(jnp.linalg.norm(base[...].astype(jnp.float32), axis=-2)))
                 for site, (_, base) in sites.items()}  # fmt: skip
        return transforms.lora_ggpo(
            optax.adamw(schedule, weight_decay=0.0),
            scaling={site: layer.site.method.scale for site, (layer, _) in sites.items()},
            base_row_norms=norms,
            seed=cfg.seed,
        )

    if cfg.adapter_optimizer == "loraplus":
        return optimizers.loraplus_adamw(schedule)
    if cfg.adapter_optimizer == "lorafa":  # LoRA's scale: alpha / rank (alpha defaults to rank)
        scale = (cfg.alpha if cfg.alpha is not None else cfg.rank) / cfg.rank
        return optimizers.lorafa_adamw(schedule, scaling=scale)
    if cfg.adapter_optimizer == "allora":
        return optimizers.allora_adamw(schedule)
    return optax.adamw(schedule, weight_decay=0.0)


def _ggpo_sites(model: Any) -> dict[str, tuple[Any, Any]]:
    """``{adapter site: (adapted layer, its frozen base kernel variable)}`` of a wrapped model;
    the site is the adapter's path as LoRA-GGPO keys it (``.../q_proj/adapter``).

    Raises:
      ConfigError: an adapter without ``A``/``B`` factors or a base without a float kernel.
    """
    from lowrank_jax.reparam.nnx import Adapted

    sites = {}
    for path, layer in nnx.iter_graph(model):
        if not isinstance(layer, Adapted):
            continue
        base = getattr(getattr(layer, "base", None), "kernel", None)
        plain = (
            base is not None
            and jnp.issubdtype(base[...].dtype, jnp.floating)
            and base[...].ndim == 2
            and hasattr(layer.site.method, "scale")
        )
        if not plain:
            raise ConfigError(
                "--adapter-optimizer ggpo needs LoRA-style adapters (A, B and a scale) on "
                f"float (in, out) kernels; {'/'.join(str(p) for p in path)} is not one"
            )
        sites["/".join(str(p) for p in path) + "/adapter"] = (layer, base)
    if not sites:
        raise ConfigError("--adapter-optimizer ggpo: the model has no adapted layers")
    return sites


def _owlore_calibration(
    cfg: FinetuneConfig, model: Any, train: SFTData, log: Callable[[str], None]
) -> dict:
    """OwLore's layer probabilities from ``model`` on the first ``cfg.calibration_rows`` rows.

    The rows run ``batch_size`` at a time (the feature norms of the chunks add up in squares);
    the padding is left out.
    """
    from lowrank_jax.models import input_feature_norms
    from lowrank_jax.transforms import outlier_scores, owl_probabilities

    rows = np.arange(min(cfg.calibration_rows, len(train.inputs)))
    squares: dict[str, np.ndarray] = {}
    for start in range(0, len(rows), cfg.batch_size):
        batch = train.batch(rows[start : start + cfg.batch_size])
        segments = jnp.asarray(batch["segment_ids"])
        norms = input_feature_norms(
            model, jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), segments,
            mask=segments > 0,
        )  # fmt: skip
        for path, norm in norms.items():
            squares[path] = squares.get(path, 0.0) + np.square(norm.astype(np.float64))
    norms = {path: np.sqrt(total) for path, total in squares.items()}
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    try:
        scores = outlier_scores(params, norms, m=OWLORE_M)
        probs = owl_probabilities(scores)
    except ValueError as err:
        raise ConfigError(
            f"--method owlore: no layer probabilities from the calibration rows ({err}); "
            "pass --opt probs=[p_0,...,p_{L-1}]"
        ) from None
    calibration = {
        "probs": [float(p) for p in probs],
        "outlier_scores": [float(x) for x in scores],
        "calibration_rows": len(rows),
        "m": OWLORE_M,
    }
    log(
        f"owlore: layer probabilities from {len(rows)} calibration rows (m = {OWLORE_M:g}): "
        + " ".join(f"{p:.3f}" for p in probs)
    )
    return calibration


def _optimizer(cfg: FinetuneConfig, schedule: Any, probs: Any = None) -> Any:
    from lowrank_jax.train.registry import OptimizerArgs, build_optimizer

    extra = dict(cfg.options)
    if probs is not None:
        extra["probs"] = probs
    if cfg.targets:
        extra["targets"] = cfg.targets
    args = OptimizerArgs(schedule, rank=cfg.rank, seed=cfg.seed, total_steps=cfg.steps, extra=extra)
    try:
        return build_optimizer(cfg.method, args)
    except TypeError as err:
        raise ConfigError(f"--opt / --targets for {cfg.method}: {err}") from None


def _pack(cfg: FinetuneConfig, tokenizer: Any) -> tuple[SFTData, SFTData, list[Example], dict]:
    examples = read_examples(cfg.data)
    train_examples, held_out = split_examples(examples, cfg.val_fraction, seed=cfg.seed)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    train, stats = pack_examples(
        [tokenize_example(e, tokenizer) for e in train_examples], cfg.max_seq_len, pad_id=pad
    )
    val, val_stats = pack_examples(
        [tokenize_example(e, tokenizer) for e in held_out], cfg.max_seq_len, pad_id=pad
    )
    info = {
        "data": cfg.data,
        "records": len(examples),
        "train_examples": stats.examples,
        "val_examples": val_stats.examples,
        "train_rows": stats.rows,
        "val_rows": val_stats.rows,
        "train_loss_tokens": stats.loss_tokens,
        "truncated": stats.truncated + val_stats.truncated,
        "dropped": stats.dropped + val_stats.dropped,
        "fill": round(stats.fill, 4),
    }
    return train, val, held_out, info


def _rows(count: int, batch_size: int, seed: int) -> Any:
    """Row indices of each batch: seeded permutations, one after another (epochs)."""
    rng = np.random.default_rng(seed)
    pending = np.zeros(0, np.int64)
    while True:
        while len(pending) < batch_size:
            pending = np.concatenate([pending, rng.permutation(count)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _losses(graph: Any, prepare: Callable | None = None) -> tuple[Callable, Callable]:
    """``(loss, summed)``: ``(sum, count)`` of the response-token cross-entropy, to train
    (``make_train_step``'s ``loss_fn``) and to evaluate.

    ``loss(trainable, batch, rest, key)`` trains: adapter dropout draws from ``key`` (one per
    step, so a resumed run draws the same masks), and so does ``prepare(frozen, key)``, when
    given: the non-trained state of the training forward (DyLoRA's rank: :func:`_dylora_draw`).
    ``summed(trainable, rest, batch)`` evaluates, dropout off, the model as stored.
    """

    def forward(
        trainable: Any, rest: tuple, batch: dict, key: Any, noise: Any = None
    ) -> tuple[jax.Array, jax.Array]:
        rngs, frozen = rest
        if key is not None:  # fresh dropout keys (a different one per stream), counts at 0
            leaves, tree = jax.tree.flatten(rngs)
            leaves = [
                jax.random.fold_in(key, i)
                if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                else jnp.zeros_like(x)
                for i, x in enumerate(leaves)
            ]
            rngs = jax.tree.unflatten(tree, leaves)
        if key is not None and prepare is not None:
            frozen = prepare(frozen, key)
        if key is not None and noise is not None:  # LoRA-GGPO: noisy base weights
            frozen = _ggpo_perturb(frozen, noise)
        model = nnx.merge(graph, trainable, rngs, frozen)
        if key is None:
            model.eval()
        logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        nll = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["targets"]
        )
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(nll * mask), jnp.sum(mask)

    def loss(trainable: Any, batch: dict, rest: Any, key: jax.Array, noise: Any = None) -> tuple:
        return forward(trainable, rest, batch, key, noise)

    def summed(trainable: Any, rest: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
        return forward(trainable, rest, batch, None)

    return loss, summed


def _dylora_draw(model: Any) -> Callable[[Any, jax.Array], dict] | None:
    """DyLoRA's schedule for the training forward of a wrapped model (``None`` without DyLoRA
    sites): ``draw(frozen, key)`` is the model's non-trained state (a plain dict) with one rank
    ``b ~ U{r_min..r_max}`` for every site (:func:`~lowrank_jax.reparam.dylora_sample_rank`),
    drawn from the step's ``key``. ``b`` is a traced array, so one compiled step serves every
    rank; the stored ``b`` (``r_max``), which evaluation and the export use, is not changed."""
    from lowrank_jax.reparam.core import Adapters
    from lowrank_jax.reparam.dylora import DyLoRA
    from lowrank_jax.reparam.nnx import Adapted

    layers = {
        path: layer.site
        for path, layer in nnx.iter_graph(model)
        if isinstance(layer, Adapted) and isinstance(layer.site.method, DyLoRA)
    }
    if not layers:
        return None

    def draw(frozen: Any, key: jax.Array) -> dict:
        tree = dict(nnx.to_pure_dict(frozen) if isinstance(frozen, nnx.State) else frozen)
        nodes = {}  # the adapter dict of each site, in this (fresh) tree
        for path, site in layers.items():
            node = tree
            for name in (*path, "adapter"):
                node[name] = dict(node[name])  # copied along the path: nothing shared changes
                node = node[name]
            nodes[site.path] = node
        sites = tuple(layers.values())
        now = Adapters({}, {p: {"b": node["b"]} for p, node in nodes.items()}, sites)
        drawn = reparam.dylora_sample_rank(jax.random.fold_in(key, DYLORA_RANK_STREAM), now)
        for p, node in nodes.items():
            node["b"] = drawn.frozen[p]["b"]
        return tree

    return draw


def _ggpo_perturb(frozen: Any, noise: Any) -> dict:
    """``frozen`` (the wrapped model's non-trained state) as a plain dict with LoRA-GGPO's
    noise added to the base kernel of every adapted layer, for one training forward.
    ``noise`` is the :class:`~lowrank_jax.transforms.GGPOState` (norms, key and step; no
    inner state); its sites are the adapters' paths (``.../q_proj/adapter``), whose base
    kernels are at ``.../q_proj/base/kernel``."""
    from lowrank_jax import transforms

    frozen = nnx.to_pure_dict(frozen) if isinstance(frozen, nnx.State) else frozen
    nested: dict = {}
    for site in noise.weight_norms:
        *parents, _ = site.split("/")
        node, base = nested, frozen
        for name in parents:
            node, base = node.setdefault(name, {}), base[_key(base, name)]
        node["adapter"] = base["base"]["kernel"]
    noisy = transforms.ggpo_perturb(nested, noise, sigma=GGPO_SIGMA, beta=GGPO_BETA)

    def replace(tree: Any, new: Any) -> Any:
        if not isinstance(new, dict):
            return tree
        out = dict(tree)
        for name, value in new.items():
            if name == "adapter":
                out["base"] = {**out["base"], "kernel": value}
            else:
                out[_key(tree, name)] = replace(tree[_key(tree, name)], value)
        return out

    return replace(frozen, noisy)


def _key(tree: dict, name: str) -> Any:
    """``name`` as ``tree`` spells its key (layer indices are ints in NNX states)."""
    return int(name) if name not in tree and name.isdigit() else name


def _ggpo_noise_state(opt_state: Any) -> Any:
    """The :class:`~lowrank_jax.transforms.GGPOState` in ``opt_state`` without its inner
    state, copied (the step donates ``opt_state``): what the next forward's noise needs."""
    from lowrank_jax.transforms import GGPOState

    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GGPOState))
             if isinstance(x, GGPOState)]  # fmt: skip
    return jax.tree.map(jnp.copy, found[0]._replace(inner_state=None))


def _layerwise_loss(
    batch: dict,
) -> tuple[tuple, Callable[[jax.Array], tuple[jax.Array, jax.Array]]]:
    """The layer-wise step's form of the response-token loss: the model's inputs and, as a
    function of the logits, the summed loss over ``batch``'s response tokens and their
    count (so that with ``accum_steps`` the step divides the microbatches' summed totals by
    their summed counts: the mean over all the batch's response tokens)."""

    def loss(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        nll = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["targets"]
        )
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(nll * mask), jnp.sum(mask)

    return (batch["inputs"], batch["positions"], batch["segment_ids"]), loss


def _evaluate(summed: Callable, trainable: Any, rest: Any, val: SFTData, batch_size: int) -> float:
    total = count = 0.0
    rows = np.arange(len(val.inputs))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = val.batch(np.resize(chunk, batch_size))  # one shape: repeats are masked out
        batch["loss_mask"] = batch["loss_mask"] & (np.arange(batch_size) < len(chunk))[:, None]
        s, c = summed(trainable, rest, batch)
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def _generations(model: Any, tokenizer: Any, held_out: list[Example], cfg: FinetuneConfig) -> dict:
    from lowrank_jax.data.evaluation import exact_match
    from lowrank_jax.generate import generate_ids

    examples = [e for e in held_out if e.kind != "text"][: cfg.eval_generate]
    eos = getattr(tokenizer, "eos_ids", None) or (tokenizer.eos_id,)
    prompts = [prompt_ids(e, tokenizer).tolist() for e in examples]
    outputs = generate_ids(model, prompts, max_new_tokens=cfg.eval_max_new_tokens, eos_ids=eos)
    rows = [
        {
            "prompt": next(m["content"] for m in reversed(e.messages) if m["role"] == "user"),
            "output": tokenizer.decode([t for t in ids if t not in eos]),
            "answer": e.answer,
        }
        for e, ids in zip(examples, outputs, strict=True)
    ]
    record: dict[str, Any] = {"generations": rows}
    answered = [r for r in rows if r["answer"] is not None]
    if answered:
        record["exact_match"] = exact_match(
            [r["output"] for r in answered], [r["answer"] for r in answered]
        )
    return record


class _Checkpoints:
    """The run's orbax checkpoints (``out/checkpoints``), opened only when they are used."""

    def __init__(self, cfg: FinetuneConfig, log: Callable[[str], None]):
        from lowrank_jax.train.checkpoint import Checkpointer

        self.cfg, self.log = cfg, log
        self.meta = json.loads(json.dumps({k: getattr(cfg, k) for k in RUN_SHAPING}))
        used = cfg.checkpoint_every or cfg.resume or cfg.stop_at
        self.manager = Checkpointer(os.path.join(cfg.out, "checkpoints"), keep=2) if used else None

    def restore(self, state: dict) -> tuple[int, dict]:
        """``(step, state)`` of the newest intact checkpoint with ``resume``, else ``(0, state)``.

        Raises:
          CheckpointError: written by a run with other settings, or none intact.
        """
        from lowrank_jax.train.checkpoint import CheckpointError

        if not self.cfg.resume:
            return 0, state

        def accept(saved: dict, step: int) -> None:
            different = [
                k for k in sorted(set(saved) | set(self.meta)) if saved.get(k) != self.meta.get(k)
            ]
            if different:
                raise CheckpointError(
                    f"checkpoint {self.manager.path(step)} was written with other settings ("
                    + ", ".join(
                        f"{k}={saved.get(k)!r}, now {self.meta.get(k)!r}" for k in different
                    )
                    + "); use the same settings or another --out"
                )

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        found = self.manager.restore_latest(abstract, accept, self.log)
        if found is None:
            self.log(f"no checkpoint in {self.cfg.out}; starting from step 0")
            return 0, state
        step, restored, _, _ = found
        self.log(f"resumed from step {step}")
        return step, restored

    def save(self, step: int, state: dict) -> None:
        """Writes ``state`` as ``step`` (the data position is the step itself)."""
        from lowrank_jax.data.packing import IteratorState

        batch = self.cfg.batch_size
        self.manager.save(step, state, IteratorState(0, step * batch), self.meta)

    def close(self) -> None:
        """Releases the checkpoint manager (if one was opened)."""
        if self.manager is not None:
            self.manager.close()


def finetune(cfg: FinetuneConfig, log: Callable[[str], None] = print) -> FinetuneResult:
    """Fine-tunes ``cfg.model`` on ``cfg.data`` (see the module docstring).

    Args:
      cfg: the run's :class:`FinetuneConfig`.
      log: where progress lines go.

    Returns:
      A :class:`FinetuneResult`; its ``summary`` has ``val_loss``, ``val_ppl``,
      ``trainable_params``, ``optimizer_state_bytes``, ``saved`` (paths), ...

    Raises:
      ConfigError, DataError, UnsupportedCheckpointError: bad settings, data or checkpoint.
    """
    from lowrank_jax.train.loop import check_out

    cfg = cfg.validate()
    check_out(cfg.out)
    model, tokenizer = _load(cfg)
    train_data, val_data, held_out, info = _pack(cfg, tokenizer)
    if cfg.eval_generate and not any(e.kind != "text" for e in held_out):
        raise ConfigError("--eval-generate needs prompt/response or messages records held out")
    lr = cfg.lr or (ADAPTER_LR if cfg.adapter else _default_lr(cfg.method))
    schedule = warmup_cosine(lr, cfg.steps, max(1, cfg.steps // 10))
    initial = calibration = None
    if cfg.adapter:
        model = reparam.wrap(
            model,
            _adapter_factory(cfg),
            key=jax.random.key(cfg.seed),
            rngs=nnx.Rngs(dropout=cfg.seed),
            quantize_base=(
                reparam.QuantConfig(cfg.quantize_base, loftq_iters=cfg.loftq_iters)
                if cfg.loftq_iters
                else cfg.quantize_base
            ),
        )
        # a copy: the training step donates the adapters' arrays
        initial = jax.tree.map(jnp.copy, reparam.adapters_of(model))
        tx = _adapter_optimizer(cfg, schedule, model)
        graph, adapters, rngs, frozen = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
        trainable = nnx.to_pure_dict(adapters)
    else:
        graph, params, rngs, frozen = nnx.split(model, nnx.Param, nnx.RngState, ...)
        trainable = nnx.to_pure_dict(params)  # plain dicts: what the optimizers' targets see
        if cfg.method == "owlore" and "probs" not in cfg.options:
            calibration = _owlore_calibration(cfg, model, train_data, log)
        tx = _optimizer(cfg, schedule, calibration and calibration["probs"])
    rest = (rngs, frozen)  # what the model needs besides the trained arrays
    # DyLoRA trains at a rank drawn every step (from the step's key, inside the compiled step)
    loss_fn, summed = _losses(graph, _dylora_draw(model) if cfg.adapter else None)
    # the pre-training step: global-norm clipping at 1, the non-finite guard (a bad batch is
    # skipped, nothing changes), gradient accumulation; state donated
    if cfg.layerwise:  # full-parameter methods only (validate): nothing besides the weights
        train_step = make_train_step(
            graph, tx, grad_clip=1.0, clip_per_layer=True, schedule=schedule, layerwise=True,
            accum_steps=cfg.accum_steps, layerwise_loss=_layerwise_loss,
        )  # fmt: skip
        extra = lambda key: ()
    else:
        train_step = make_train_step(
            None, tx, grad_clip=1.0, schedule=schedule, accum_steps=cfg.accum_steps,
            loss_fn=loss_fn,
        )  # fmt: skip
        ggpo = cfg.adapter and cfg.adapter_optimizer == "ggpo"
        extra = lambda key: (
            rest, key, _ggpo_noise_state(train_state.opt_state) if ggpo else None
        )  # fmt: skip

    trainable_params = int(sum(np.size(x) for x in jax.tree.leaves(trainable)))
    state_bytes = memory.state_bytes(tx, trainable)
    log(
        f"{cfg.method} on {cfg.model}: {trainable_params:,} trainable parameters, optimizer "
        f"state {memory.human(state_bytes)}; {info['train_rows']} rows of {cfg.max_seq_len} "
        f"tokens ({info['truncated']} records truncated, {info['dropped']} dropped)"
    )
    state = {"trainable": trainable, "opt_state": tx.init(trainable), "tokens": jnp.int32(0)}
    os.makedirs(cfg.out, exist_ok=True)
    checkpoints = _Checkpoints(cfg, log)
    start, state = checkpoints.restore(state)
    if start >= cfg.steps:
        raise ConfigError(
            f"the run in {cfg.out} already finished its {cfg.steps} steps; choose another --out"
        )
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    metrics = MetricsWriter(os.path.join(cfg.out, "metrics.jsonl"), start if start else None)
    summed = jax.jit(summed)
    batches = _rows(len(train_data.inputs), cfg.batch_size, cfg.seed)
    for _ in range(start):  # the batches a resumed run has already seen
        next(batches)
    # compiled once, for the run and for XLA's memory analysis of the step (nothing allocated)
    key = jax.random.key(cfg.seed)
    train_state = TrainState(jnp.int32(start), state["trainable"], state["opt_state"])
    train_step = train_step.lower(
        train_state, train_data.batch(np.arange(cfg.batch_size) % len(train_data.inputs)),
        *extra(key),
    ).compile()  # fmt: skip
    compiled = memory.CompiledMemory.of(train_step)
    log(
        f"compiled step: {memory.human(compiled.temp_bytes)} of temporaries, peak "
        f"{memory.human(compiled.peak_bytes)} (XLA's analysis)"
    )

    def evaluate(at: int) -> dict:
        val_loss = _evaluate(summed, state["trainable"], rest, val_data, cfg.batch_size)
        out = {"step": at, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 80.0))}
        if cfg.eval_generate:
            model = nnx.merge(graph, state["trainable"], *rest)
            out.update(_generations(model, tokenizer, held_out, cfg))
        metrics.write(out)
        log(f"step {at}: validation loss {val_loss:.4f}, perplexity {out['val_ppl']:.2f}")
        return out

    if start:
        before = next(r for r in metrics.resumed_records if r.get("step") == 0 and "val_loss" in r)
    else:
        metrics.write(info)
        if calibration:
            metrics.write({"owlore": calibration})
        before = evaluate(0)
    began = time.perf_counter()
    skipped = run_of_skips = 0
    for at in range(start + 1, (cfg.stop_at or cfg.steps) + 1):
        batch = train_data.batch(next(batches))
        train_state, step_metrics = train_step(
            train_state, batch, *extra(jax.random.fold_in(key, at))
        )
        tokens = state["tokens"] + int(batch["loss_mask"].sum())
        state = {"trainable": train_state.params, "opt_state": train_state.opt_state,
                 "tokens": tokens}  # fmt: skip
        if bool(step_metrics["skipped"]):  # nothing changed: the guard kept the old state
            skipped, run_of_skips = skipped + 1, run_of_skips + 1
            log(f"step {at}: skipped (the loss or a gradient is not finite)")
            if run_of_skips >= cfg.log_every:
                raise ConfigError(
                    f"{run_of_skips} steps in a row up to step {at} had a non-finite loss or "
                    f"gradient and were skipped; lower --lr ({lr:g})"
                )
        else:
            run_of_skips = 0
        if at % cfg.log_every == 0 or at == cfg.steps:
            loss = float(step_metrics["loss"])
            metrics.write({"step": at, "loss": loss, "lr": float(schedule(at - 1)),
                           "tokens": int(tokens), "skipped": skipped})  # fmt: skip
            log(f"step {at}: loss {loss:.4f}")
        if (cfg.eval_every and at % cfg.eval_every == 0) or at == cfg.steps:
            record = evaluate(at)
        if (cfg.checkpoint_every and at % cfg.checkpoint_every == 0) or at == cfg.stop_at:
            checkpoints.save(at, state)
    seconds = time.perf_counter() - began
    checkpoints.close()
    model = nnx.merge(graph, state["trainable"], *rest)
    model.eval()  # for inference: adapter dropout off
    if cfg.stop_at is not None and cfg.stop_at < cfg.steps:
        metrics.close()
        log(f"stopped after step {cfg.stop_at}; continue with --resume")
        return FinetuneResult({"stopped_at": cfg.stop_at}, model, tokenizer)
    saved = save_outputs(cfg, model, initial, tokenizer)
    summary = {
        "summary": True,
        "method": cfg.method,
        "steps": cfg.steps,
        "val_loss_before": before["val_loss"],
        "val_loss": record["val_loss"],
        "val_ppl": record["val_ppl"],
        "trainable_params": trainable_params,
        "optimizer_state_bytes": state_bytes,
        "step_temp_bytes": compiled.temp_bytes,
        "step_peak_bytes": compiled.peak_bytes,
        "skipped_steps": skipped,
        "train_tokens": int(state["tokens"]),
        "seconds": round(seconds, 2),
        "saved": saved,
    }
    if calibration:
        summary["owlore"] = calibration
    if "exact_match" in record:
        summary["exact_match_before"] = before["exact_match"]
        summary["exact_match"] = record["exact_match"]
    metrics.write(summary)
    metrics.close()
    scored = (
        f", exact match {before['exact_match']:.3f} -> {record['exact_match']:.3f}"
        if "exact_match" in record
        else ""
    )
    log(
        f"done: validation loss {before['val_loss']:.4f} -> {record['val_loss']:.4f} "
        f"(perplexity {record['val_ppl']:.2f}){scored}; {trainable_params:,} trainable "
        f"parameters, optimizer state {memory.human(state_bytes)}; saved "
        f"{', '.join(saved.values())}"
    )
    return FinetuneResult(summary, model, tokenizer)


def _default_lr(method: str) -> float:
    from lowrank_jax.train.registry import get_optimizer

    return get_optimizer(method).default_lr
