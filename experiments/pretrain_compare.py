"""Pre-training comparison: the registered optimizers on the embedded corpus, several seeds.

Every method of :data:`METHODS` pre-trains the same LLaMA from scratch on the embedded King
James Bible through the trainer's own Python API (:func:`lowrank_jax.train.train`, what
``lowrank-jax train`` runs: byte tokenizer, warmup + cosine to 10%, gradient clipping 1.0, no
weight decay, the non-finite-step guard), each at its registered default peak learning rate
(``lowrank-jax optimizers``) and the trainer's defaults otherwise (rank ``hidden / 4``,
refresh gap 50). Seed ``s`` sets the model init, the batch order and the optimizer's
randomness, the same for every method. The seeds are the outer loop, so every method's
throughput is measured next to AdamW's in the same process, under the same load.

Reports per method: the final validation loss, mean ± sample standard deviation over the
seeds; the perplexity ``exp`` of that mean; the optimizer state (``lowrank_jax.memory``, exact
bytes) and its ratio to AdamW's on the same model; the compiled train step's peak memory
(:func:`lowrank_jax.train.loop.step_memory`: XLA's memory analysis of the very step the trainer
compiles for the run, parameters + optimizer state + gradients + activations and workspaces, on
this backend, float32; nothing allocated) and its ratio to AdamW's; the training throughput
(compilation and evaluation excluded, mean over the seeds) and its ratio to AdamW's. Writes
``experiments/results/pretrain_compare.json`` and a figure next to it (the validation and the
training loss against the step, one line per method, mean over the seeds, the training loss
smoothed over :data:`SMOOTH` steps; state-memory and throughput bars), drawn by
``lowrank-jax plot``'s :func:`~lowrank_jax.train.plot.draw_figure`.

    python experiments/pretrain_compare.py --tune --seeds 3 --methods adamw galore \
        galore_adamw_8bit fira apollo apollo_mini lisa        # the README's first table: each
                                                              # lr searched on seed 0, 3 seeds
    python experiments/pretrain_compare.py                    # every method at its registered
                                                              # rate, 2 seeds (28 runs, ~25 min)
    python experiments/pretrain_compare.py --seeds 3          # seeds 0, 1, 2
    python experiments/pretrain_compare.py --lr-grid 0.5,1,2  # 0.5x, 1x, 2x each default lr
    python experiments/pretrain_compare.py --ablate rank      # GaLore, rank hidden/32 .. /2
    python experiments/pretrain_compare.py --ablate gap       # GaLore, refresh gap 10 .. 200
    python experiments/pretrain_compare.py --quick            # the test's smoke size
    python experiments/pretrain_compare.py --replot           # redraw the PNG from the JSON
    python experiments/pretrain_compare.py --peaks-only       # measure the step peaks of the
                                                              # JSON's rows (no training)
    python experiments/pretrain_compare.py --reparam          # add LoRA, ReLoRA, Low-Rank rows

``--lr-grid`` and ``--ablate`` write ``pretrain_compare_lr_grid.json`` /
``pretrain_compare_<rank|gap>.json`` (and their figures); ``--ablate`` varies the low-rank
methods named by ``--methods`` (default: GaLore). AdamW at its default rate is always run: it is
the reference of the ratios. Not run (:data:`NOT_RUN`): OwLore, which needs per-layer sampling
probabilities from a trained model's outliers (``--opt probs=...``), and SST, which is not a
trainer optimizer (it trains the weights in spectral form, another parameter tree).

``--reparam`` adds the GaLore paper's other pre-training baselines (its Table 2), which train
adapters or factors rather than the weights, so the trainer cannot run them: LoRA (``W0 + s·A B``
on the frozen random init), ReLoRA (LoRA merged into ``W0`` and restarted every
:data:`RELORA_EVERY` steps, 99% of the adapters' Adam moments pruned, jagged cosine) and Low-Rank
(``W = s·A B``, no base), all at rank 32 with ``alpha = 32`` on the attention and MLP matrices
(embeddings, norms and head trained fully), through :mod:`pretrain_reparam` on the trainer's
data, batches, init, schedule, clipping and evaluation. Each method's learning rate is the best
of :data:`REPARAM_LRS` on seed 0 (extended by half a decade, up to :data:`REPARAM_EXTEND`
times, while the best is at an edge), then every other seed runs at it. The rows go into the
existing JSON (its size and seeds); their throughput ratio is to AdamW runs timed in the same
process (``throughput_reference_tokens_per_s``), as the host's load differs from the other
rows'.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import pathlib
import platform
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import numpy as np

from lowrank_jax import memory
from lowrank_jax.models import get_config
from lowrank_jax.train import RunConfig, TrainError, get_optimizer, step_memory, train
from lowrank_jax.train.plot import draw_figure, read_run

try:
    from experiments import pretrain_reparam
except ModuleNotFoundError:  # run as a script: python experiments/pretrain_compare.py
    import pretrain_reparam

RESULTS = pathlib.Path(__file__).with_name("results")
REFERENCE = "adamw"
METHODS = (
    "adamw", "adamw_8bit", "galore", "galore2", "galore_adamw_8bit", "q_galore", "fira",
    "golore", "gradnorm_lorp", "apollo", "apollo_mini", "flora", "lisa", "badam",
)  # fmt: skip
QUICK_METHODS = ("adamw", "galore")
NOT_RUN = {
    "owlore": "needs --opt probs=[...]: per-layer sampling probabilities from the outlier "
    "scores of a trained model (OWL), which a model pre-trained from scratch does not have",
    "sst": "not a registered optimizer: SST trains the weights in spectral form "
    "(sst_init turns each matrix into U, s, V), another parameter tree than the trainer's model",
}
SIZES = {
    "default": dict(model="llama_tiny", steps=300, batch_size=8, seq_len=128, eval_every=25,
                    eval_batches=8),
    "quick": dict(model="llama_tiny", steps=30, batch_size=4, seq_len=32, eval_every=10,
                  eval_batches=2),
}  # fmt: skip
# --ablate: GaLore's rank as hidden_size // d, and its refresh gap in steps.
RANK_DIVISORS = (32, 16, 8, 4, 2)
GAPS = (10, 25, 50, 100, 200)
# --reparam: the GaLore paper's other pre-training baselines (Table 2), not trainer optimizers:
# row name -> pretrain_reparam kind. Each at rank 32 (the trainer's hidden / 4), LoRA alpha 32.
REPARAM_METHODS = {"lora": "lora", "relora": "relora", "low-rank (W = BA)": "lowrank"}
REPARAM_LRS = (1e-3, 3e-3, 1e-2)  # the seed-0 grid of each; the other seeds at its best
REPARAM_EXTEND = 2  # at most this many half-decade steps past a grid edge that wins
TUNE_EXTEND = 1  # --tune: at most this many half-decade steps past a grid edge that wins
RELORA_EVERY = 50  # steps between ReLoRA's merge-and-restarts
RELORA_WARMUP = 5  # steps of ReLoRA's re-warmup after each restart
SMOOTH = 10  # steps of the training-loss moving average in the figure
TRAINER_DEFAULTS = ("update_proj_gap", "galore_scale", "grad_clip", "weight_decay",
                    "min_lr_ratio", "val_fraction")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Variant:
    """One line of the comparison: a registered optimizer and what differs from its defaults."""

    name: str
    optimizer: str
    lr_multiplier: float = 1.0
    rank: int | None = None  # None: the trainer's hidden_size // 4
    update_proj_gap: int | None = None  # None: the trainer's default
    lr: float | None = None  # an absolute peak lr (--tune); None: default x lr_multiplier


def variants(
    methods: Sequence[str], lr_grid: Sequence[float], ablate: str | None, hidden_size: int
) -> list[Variant]:
    """The variants to run, AdamW at its default rate first (the reference of the ratios).

    Example:
      >>> [v.name for v in variants(["galore"], [1.0, 2.0], None, 128)]
      ['adamw', 'galore', 'galore lr x2']
      >>> [v.name for v in variants(["galore"], [1.0], "rank", 128)][:3]
      ['adamw', 'galore rank 4', 'galore rank 8']
    """
    out = [Variant(REFERENCE, REFERENCE)]
    for method in methods:
        if ablate is not None:
            if not get_optimizer(method).low_rank:
                continue
            if ablate == "rank":
                out += [Variant(f"{method} rank {hidden_size // d}", method,
                                rank=hidden_size // d) for d in RANK_DIVISORS]  # fmt: skip
            else:
                out += [Variant(f"{method} gap {g}", method, update_proj_gap=g) for g in GAPS]
            continue
        for m in lr_grid:
            name = method if m == 1 else f"{method} lr x{m:g}"
            if name != REFERENCE:
                out.append(Variant(name, method, lr_multiplier=m))
    return out


def run_config(variant: Variant, size: dict, seed: int, out: str) -> RunConfig:
    """The trainer's settings for one run of ``variant``."""
    entry = get_optimizer(variant.optimizer)
    overrides = {}
    if variant.lr is not None:
        overrides["lr"] = variant.lr
    elif variant.lr_multiplier != 1:
        overrides["lr"] = entry.default_lr * variant.lr_multiplier
    if variant.rank is not None:
        overrides["rank"] = variant.rank
    if variant.update_proj_gap is not None:
        overrides["update_proj_gap"] = variant.update_proj_gap
    return RunConfig(
        **{k: size[k] for k in ("model", "steps", "batch_size", "seq_len", "eval_every",
                                "eval_batches")},
        optimizer=variant.optimizer, seed=seed, out=out, checkpoint_every=size["steps"],
        keep_checkpoints=1, progress=False, **overrides,
    )  # fmt: skip


def step_peak(variant: Variant, size: dict) -> dict:
    """The compiled train step of ``variant`` at ``size`` (the seed changes no shape), as the
    trainer compiles it, measured without training: XLA's bytes per device."""
    with tempfile.TemporaryDirectory() as out:  # step_memory writes nothing there
        stats = step_memory(run_config(variant, size, 0, out))
    return {**stats._asdict(), "peak_bytes": stats.peak_bytes}


def add_step_peaks(rows: dict, size: dict, log=print) -> None:
    """Measures every row's compiled step (:func:`step_peak`); adds ``step_memory`` and its
    ``step_peak_ratio`` to the reference's (the first row, AdamW)."""
    for name, row in rows.items():
        if "reparam" in row:  # not a trainer run: its own compiled step
            spec = pretrain_reparam.ReparamSpec(**row["reparam"])
            cfg = run_config(Variant(REFERENCE, REFERENCE), size, 0, tempfile.gettempdir())
            stats = pretrain_reparam.step_peak(pretrain_reparam.build(spec, cfg, row["lr"]))
            row["step_memory"] = {**stats._asdict(), "peak_bytes": stats.peak_bytes}
        else:
            fields = {f.name: row[f.name] for f in dataclasses.fields(Variant)}
            row["step_memory"] = step_peak(Variant(**fields), size)
        log(f"step peak {name:24} {memory.human(row['step_memory']['peak_bytes'])}")
    reference = rows[REFERENCE]["step_memory"]["peak_bytes"]
    for row in rows.values():
        row["step_peak_ratio"] = row["step_memory"]["peak_bytes"] / reference


def run_one(variant: Variant, size: dict, seed: int, out: str) -> dict:
    """Trains one seed of ``variant`` into ``out``; returns its record (a run stopped by the
    trainer, e.g. too many non-finite steps in a row, keeps its curves and its error)."""
    cfg = run_config(variant, size, seed, out)
    warnings: list[str] = []
    began = time.perf_counter()
    summary, error = {}, None
    try:
        summary = train(cfg, log=None, warn=warnings.append)
    except TrainError as err:  # stopped mid-run; one that never started is not caught
        if not (pathlib.Path(out) / "metrics.jsonl").is_file():
            raise
        error = str(err)
    curves = read_run(out)
    return {
        "seed": seed,
        "lr": cfg.lr or get_optimizer(variant.optimizer).default_lr,
        "val_loss": summary.get("val_loss"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "opt_state_bytes": summary.get("opt_state_bytes"),
        "adamw_state_bytes": summary.get("adamw_state_bytes"),
        "param_count": summary.get("param_count"),
        "skipped_steps": summary.get("skipped_steps", len(warnings)),
        "error": error,
        "seconds": time.perf_counter() - began,
        "val_curve": [curves.val_steps, curves.val_loss],
        "train_curve": [curves.train_steps, curves.train_loss],
    }


def mean_curve(curves: Sequence[Sequence[list]]) -> tuple[list[int], list[float]]:
    """The pointwise mean over seeds of ``[steps, values]`` curves (a step that some seed
    lacks, e.g. a skipped step, is averaged over the seeds that have it)."""
    points: dict[int, list[float]] = {}
    for steps, values in curves:
        for step, value in zip(steps, values):
            points.setdefault(step, []).append(value)
    steps = sorted(points)
    return steps, [float(np.mean(points[s])) for s in steps]


def aggregate(variant: Variant, runs: list[dict], reference: dict | None) -> dict:
    """The row of ``variant`` over its seeds; the ratios are to ``reference`` (AdamW's row)."""
    finished = [r for r in runs if r["error"] is None]
    losses = [r["val_loss"] for r in finished]
    rates = [r["tokens_per_s"] for r in finished if r["tokens_per_s"]]
    state = finished[0]["opt_state_bytes"] if finished else None
    mean = float(np.mean(losses)) if losses else None
    tokens_per_s = float(np.mean(rates)) if rates else None
    row = {
        **dataclasses.asdict(variant),
        "lr": runs[0]["lr"],
        "seeds": [r["seed"] for r in runs],
        "finished": len(finished),
        "val_loss_mean": mean,
        "val_loss_std": float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0,
        "val_ppl": math.exp(mean) if mean is not None else None,
        "opt_state_bytes": state,
        "adamw_state_bytes": finished[0]["adamw_state_bytes"] if finished else None,
        "tokens_per_s": tokens_per_s,
        "skipped_steps": sum(r["skipped_steps"] for r in runs),
        "val_curve": mean_curve([r["val_curve"] for r in runs]),
        "train_curve": mean_curve([r["train_curve"] for r in runs]),
        "runs": [{k: x for k, x in r.items() if k != "train_curve"} for r in runs],
    }
    ref = reference or row
    ratio = lambda a, b: a / b if a is not None and b else None
    row["state_ratio"] = ratio(state, ref["opt_state_bytes"])
    row["throughput_ratio"] = ratio(tokens_per_s, ref["tokens_per_s"])
    return row


def table(rows: dict) -> str:
    """The markdown table of the rows."""
    lines = [
        "| method | lr | val loss (mean ± std) | val ppl | optimizer state | vs AdamW "
        "| step peak | vs AdamW | tokens/s | vs AdamW |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x, spec, unit="": "–" if x is None else f"{x:{spec}}{unit}"
    for name, r in rows.items():
        loss = "diverged" if r["val_loss_mean"] is None else (
            f"{r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f}")  # fmt: skip
        if r["finished"] < len(r["seeds"]):
            loss += f" ({len(r['seeds']) - r['finished']} of {len(r['seeds'])} seeds stopped)"
        state = "–" if r["opt_state_bytes"] is None else memory.human(r["opt_state_bytes"])
        peak = "–" if "step_memory" not in r else memory.human(r["step_memory"]["peak_bytes"])
        edge = " (grid edge)" if r.get("lr_at_grid_edge") else ""
        lines.append(
            f"| {name} | {r['lr']:g}{edge} | {loss} | {fmt(r['val_ppl'], '.2f')} | {state} "
            f"| {fmt(r['state_ratio'], '.2f', '×')} | {peak} "
            f"| {fmt(r.get('step_peak_ratio'), '.2f', '×')} | {fmt(r['tokens_per_s'], ',.0f')} "
            f"| {fmt(r['throughput_ratio'], '.2f', '×')} |"
        )
    return "\n".join(lines)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start)."""
    cumulative = np.cumsum([0.0, *values])
    return [
        float((cumulative[i + 1] - cumulative[max(0, i + 1 - window)]) / min(window, i + 1))
        for i in range(len(values))
    ]


def save_figure(rows: dict, path: pathlib.Path, title: str) -> None:
    """The curves (mean over seeds) and bars of the rows, drawn by ``lowrank-jax plot``."""
    from cycler import cycler
    from matplotlib import colormaps, rc_context

    data = {
        "train_loss": {n: (r["train_curve"][0], smooth(r["train_curve"][1], SMOOTH))
                       for n, r in rows.items()},
        "val_loss": {n: tuple(r["val_curve"]) for n, r in rows.items()},
    }  # fmt: skip
    for panel, key, scale in (
        ("opt_state_mb", "opt_state_bytes", 1e-6),
        ("adamw_state_mb", "adamw_state_bytes", 1e-6),
        ("tokens_per_s", "tokens_per_s", 1.0),
    ):
        data[panel] = {n: r[key] * scale for n, r in rows.items() if r[key] is not None}
    # lowrank-jax plot's 10 colours, then again dashed: 20 methods tell apart
    cycle = cycler(linestyle=["-", "--"]) * cycler(color=colormaps["tab10"].colors)
    with rc_context({"axes.prop_cycle": cycle, "legend.fontsize": "x-small"}):
        figure = draw_figure(data)
        figure.set_size_inches(14, 10)
        for bars in figure.axes[2:]:  # up to 20 names under the bars
            bars.tick_params(axis="x", labelrotation=60)
        figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(path, format="png", dpi=100)


def figure_title(result: dict) -> str:
    size, seeds = result["size"], len(result["seeds"])
    return (f"{size['model']}, {size['steps']} steps, {size['batch_size']}x{size['seq_len']} "
            f"tokens/step, mean of {seeds} seed{'s' * (seeds > 1)}")  # fmt: skip


def command(argv: Sequence[str] | None) -> str:
    return " ".join(["python experiments/pretrain_compare.py", *(argv or sys.argv[1:])])


def step_memory_info() -> dict:
    """How the rows' ``step_memory`` was measured (the JSON's ``step_memory_source``)."""
    return {
        "step_memory_source": (
            "lowrank_jax.train.step_memory: XLA's memory_analysis() of the train step the "
            "trainer compiles for the run (float32, no remat, unscanned layers), per device; "
            "peak = arguments + outputs - aliased + temporaries"
        ),
        "step_memory_backend": jax.default_backend(),
        "step_memory_jax": jax.__version__,
    }


def run_fixed(todo: Sequence[Variant], size: dict, seeds: int, root: str, log=print) -> dict:
    """Every variant on every seed (seeds the outer loop, every other one in reverse order, so
    no method always runs first); the rows, AdamW's (the reference of the ratios) first."""
    runs: dict[str, list[dict]] = {v.name: [] for v in todo}
    for seed in range(seeds):
        for v in todo if seed % 2 == 0 else todo[::-1]:
            run_dir = str(pathlib.Path(root) / f"{v.name.replace(' ', '_')}-seed{seed}")
            record = run_one(v, size, seed, run_dir)
            runs[v.name].append(record)
            status = record["error"] or f"val loss {record['val_loss']:.4f}"
            log(f"seed {seed} {v.name:24} {status} ({record['seconds']:.0f} s)", flush=True)
    reference = aggregate(todo[0], runs[REFERENCE], None)
    return {
        v.name: reference if v.name == REFERENCE else aggregate(v, runs[v.name], reference)
        for v in todo
    }


def run_tuned(methods: Sequence[str], size: dict, seeds: int, extend: int, root: str,
              log=print) -> dict:  # fmt: skip
    """``--tune``: each method's peak lr searched on seed 0, then its other seeds at the best.

    The seed-0 grid is the registered default and its two half-decade neighbours on the 1, 3,
    10 ladder (1e-3: 3e-4, 1e-3, 3e-3), extended half a decade past an edge that wins, at most
    ``extend`` times (:func:`next_lr`); the lowest final validation loss wins (a run that
    diverged or stopped loses). Seeds ``1 .. seeds-1`` then run at the winner, every other
    seed in reverse method order. Returns the rows (AdamW's, at its own best, first: the
    reference of the ratios), each with its ``lr_grid_seed0`` and ``lr_at_grid_edge``.
    """
    methods = [REFERENCE, *[m for m in methods if m != REFERENCE]]
    grids: dict[str, dict[float, dict]] = {}
    for method in methods:
        default = get_optimizer(method).default_lr
        grid: dict[float, dict] = {}
        todo = [half_decade(default, -1), default, half_decade(default, 1)]
        for extra in range(extend + 1):
            for lr in todo:
                run_dir = f"{root}/{method}-lr{lr:g}-seed0"
                grid[lr] = run_one(Variant(method, method, lr=lr), size, 0, run_dir)
                status = grid[lr]["error"] or f"val loss {grid[lr]['val_loss']:.4f}"
                log(f"seed 0 {method:20} lr {lr:<8g} {status} ({grid[lr]['seconds']:.0f} s)",
                    flush=True)  # fmt: skip
            lr = next_lr(losses(grid))
            if lr is None or extra == extend:
                break
            log(f"{method}: the best lr is at the grid's edge; adding {lr:g}", flush=True)
            todo = [lr]
        grids[method] = dict(sorted(grid.items()))
    finite = lambda g: {lr: math.inf if v is None else v for lr, v in losses(g).items()}
    best = {m: min(g, key=finite(g).get) for m, g in grids.items()}
    runs = {m: [grids[m][best[m]]] for m in methods}
    for seed in range(1, seeds):
        for method in methods if seed % 2 == 0 else methods[::-1]:
            run_dir = f"{root}/{method}-lr{best[method]:g}-seed{seed}"
            record = run_one(Variant(method, method, lr=best[method]), size, seed, run_dir)
            runs[method].append(record)
            status = record["error"] or f"val loss {record['val_loss']:.4f}"
            log(f"seed {seed} {method:20} lr {best[method]:<8g} {status} "
                f"({record['seconds']:.0f} s)", flush=True)  # fmt: skip
    rows: dict[str, dict] = {}
    for method in methods:
        variant = Variant(method, method, lr=best[method])
        row = aggregate(variant, runs[method], rows.get(REFERENCE))
        row["lr_grid_seed0"] = [{"lr": lr, "val_loss": r["val_loss"], "error": r["error"]}
                                for lr, r in grids[method].items()]  # fmt: skip
        row["lr_at_grid_edge"] = next_lr(losses(grids[method])) is not None
        rows[method] = row
    return rows


def losses(grid: dict[float, dict]) -> dict[float, float | None]:
    """``{lr: final val loss}`` of a grid of run records (``None``: stopped or diverged)."""
    return {lr: None if r["error"] else r["val_loss"] for lr, r in grid.items()}


def reparam_spec(kind: str, args: argparse.Namespace, hidden: int) -> pretrain_reparam.ReparamSpec:
    """The spec of a ``--reparam`` method: the trainer's rank (``hidden / 4``), alpha 32."""
    return pretrain_reparam.ReparamSpec(
        kind, rank=max(1, hidden // 4), alpha=32.0, relora_every=args.relora_every,
        relora_warmup=args.relora_warmup, relora_prune=args.relora_prune,
    )  # fmt: skip


def half_decade(lr: float, steps: int) -> float:
    """``lr`` moved ``steps`` half decades on the 1, 3, 10 ladder.

    Example:
      >>> half_decade(1e-3, 1), half_decade(1e-2, -1), half_decade(3e-3, -2)
      (0.003, 0.003, 0.0003)
    """
    value = lr * math.sqrt(10) ** steps
    exponent = math.floor(math.log10(value))
    mantissa = value / 10**exponent  # to the ladder: 3.16e-4 -> 3e-4, 9.5e-5 -> 1e-4
    mantissa = 1 if mantissa < 1.7 else 3 if mantissa < 5.5 else 10
    return float(f"{mantissa * 10**exponent:.0e}")


def next_lr(grid: dict[float, float | None]) -> float | None:
    """The next learning rate of a seed-0 grid ``{lr: val loss}`` (``None``: diverged): half a
    decade (on the 1, 3, 10 ladder) past the edge that holds the best loss, or ``None`` when the
    best is inside the grid (bracketed).

    Example:
      >>> next_lr({1e-3: 2.0, 3e-3: 2.5, 1e-2: None}), next_lr({1e-3: 2.0, 3e-3: 1.5, 1e-2: 3.0})
      (0.0003, None)
    """
    losses = {lr: (math.inf if v is None else v) for lr, v in grid.items()}
    best = min(losses, key=losses.get)
    if best not in (min(losses), max(losses)):
        return None
    return half_decade(best, -1 if best == min(losses) else 1)


def reparam_row(name: str, spec, runs: list[dict], grid: list[dict], reference: dict,
                adamw_rate: float | None) -> dict:  # fmt: skip
    """A ``--reparam`` row: :func:`aggregate`'s fields (its state ratio to the reference row's
    AdamW state), the spec, the seed-0 lr grid, and the throughput ratio to the AdamW runs
    timed in the same process (``throughput_reference_tokens_per_s``)."""
    row = aggregate(Variant(name, "adamw"), runs, reference)
    row["optimizer"] = "adamw (over the adapters and the unadapted leaves)"
    row["reparam"] = dataclasses.asdict(spec)
    row["lr_grid_seed0"] = [{"lr": r["lr"], "val_loss": r["val_loss"]} for r in grid]
    row["trainable_params"] = runs[0]["trainable_params"]
    row["frozen_params"] = runs[0]["frozen_params"]
    row["restarts"] = runs[0]["restarts"]
    row["throughput_reference_tokens_per_s"] = adamw_rate
    row["throughput_ratio"] = (
        row["tokens_per_s"] / adamw_rate if row["tokens_per_s"] and adamw_rate else None
    )
    return row


def run_reparam(args: argparse.Namespace, argv, size: dict, seeds: int, out: pathlib.Path,
                log=print) -> dict:  # fmt: skip
    """``--reparam``: LoRA, ReLoRA and Low-Rank (:mod:`pretrain_reparam`) at the JSON's size,
    added to its rows (a new JSON with AdamW's row when there is none). Each method's lr is the
    best of :data:`REPARAM_LRS` on seed 0; the other seeds run at it. AdamW runs first on every
    seed through the trainer, in this process: the throughput reference of these rows, and a
    check that the data and evaluation are the existing rows' (its val loss is recorded)."""
    result = json.loads(out.read_text()) if out.is_file() else None
    if result is not None:
        size = result["size"]
        seeds = len(result["seeds"])
    hidden = get_config(size["model"]).hidden_size
    lrs = [float(x) for x in args.reparam_lrs.split(",")] if args.reparam_lrs else REPARAM_LRS
    names = args.reparam_methods or list(REPARAM_METHODS)
    searched = {}  # --reparam-grid-from: the rows whose seed-0 search is reused
    if args.reparam_grid_from:
        searched = json.loads(pathlib.Path(args.reparam_grid_from).read_text())["methods"]
        missing = [n for n in names if "lr_grid_seed0" not in searched.get(n, {})]
        if missing:
            raise SystemExit(f"--reparam-grid-from {args.reparam_grid_from} has no lr search "
                             f"of {', '.join(missing)}: run --reparam without it")  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        adamw_runs = []
        for seed in range(seeds):
            record = run_one(Variant(REFERENCE, REFERENCE), size, seed, f"{root}/adamw-{seed}")
            adamw_runs.append(record)
            log(f"seed {seed} adamw (trainer, reference) val loss {record['val_loss']:.4f}, "
                f"{record['tokens_per_s']:,.0f} tokens/s", flush=True)  # fmt: skip
    if result is None:
        reference = aggregate(Variant(REFERENCE, REFERENCE), adamw_runs, None)
        rows = {REFERENCE: reference}
        add_step_peaks(rows, size, log)
        result = {
            "command": command(argv), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(), "size": size,
            "seeds": list(range(seeds)), "lr_grid": [1.0], "ablate": None,
            "trainer_defaults": {"rank": max(1, hidden // 4), **{k: getattr(RunConfig(), k)
                                 for k in TRAINER_DEFAULTS}},
            "not_run": NOT_RUN, "reference": REFERENCE, **step_memory_info(), "methods": rows,
        }  # fmt: skip
    rows = result["methods"]
    reference = rows[REFERENCE]
    adamw_rate = float(np.mean([r["tokens_per_s"] for r in adamw_runs]))
    cfg = lambda seed: run_config(Variant(REFERENCE, REFERENCE), size, seed, tempfile.gettempdir())
    for name in names:
        spec = reparam_spec(REPARAM_METHODS[name], args, hidden)
        grid, todo = [], [searched[name]["lr"]] if searched else sorted(lrs)
        for extra in range(1 if searched else args.reparam_extend + 1):
            for lr in todo:
                record = pretrain_reparam.train_reparam(spec, cfg(0), lr)
                grid.append(record)
                log(f"seed 0 {name:24} lr {lr:g}: val loss {record['val_loss']} "
                    f"({record['seconds']:.0f} s)", flush=True)  # fmt: skip
            lr = next_lr({r["lr"]: r["val_loss"] for r in grid})
            if searched or lr is None or extra == args.reparam_extend:
                break
            log(f"{name}: the best lr is at the grid's edge; adding {lr:g}")
            todo = [lr]
        grid.sort(key=lambda r: r["lr"])
        finite = [r for r in grid if r["val_loss"] is not None]
        best = min(finite, key=lambda r: r["val_loss"]) if finite else grid[0]
        runs = [best]
        for seed in range(1, seeds):
            record = pretrain_reparam.train_reparam(spec, cfg(seed), best["lr"])
            runs.append(record)
            log(f"seed {seed} {name:24} lr {best['lr']:g}: val loss {record['val_loss']} "
                f"({record['seconds']:.0f} s)", flush=True)  # fmt: skip
        stats = pretrain_reparam.step_peak(best["_setup"])
        runs = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
        grid = [{k: v for k, v in r.items() if not k.startswith("_")} for r in grid]
        if searched:  # the earlier search's grid, and where it came from
            grid = searched[name]["lr_grid_seed0"]
        row = reparam_row(name, spec, runs, grid, reference, adamw_rate)
        row["lr_at_grid_edge"] = next_lr({r["lr"]: r["val_loss"] for r in grid}) is not None
        if searched:
            row["lr_grid_from"] = searched[name].get("command", args.reparam_grid_from)
        row["step_memory"] = {**stats._asdict(), "peak_bytes": stats.peak_bytes}
        if "step_memory" in reference:
            row["step_peak_ratio"] = stats.peak_bytes / reference["step_memory"]["peak_bytes"]
        rows[name] = row
    invocation = {
        "command": command(argv),
        "methods": names,
        "lr_grid": lrs,
        "lr_grid_extend": args.reparam_extend,
        "adamw_rerun": [{"seed": r["seed"], "val_loss": r["val_loss"],
                         "tokens_per_s": r["tokens_per_s"]} for r in adamw_runs],  # fmt: skip
    }
    for name in names:
        rows[name]["command"] = invocation["command"]
    before = result.get("reparam", {})
    if "adamw_rerun" in before:  # the first --reparam run's record, before invocations
        first = {k: before.pop(k) for k in ("lr_grid", "adamw_rerun")}
        before["invocations"] = [{"command": result["commands"][-1],
                                  "methods": list(before["methods"]), **first}]  # fmt: skip
    result["reparam"] = {
        "methods": {**before.get("methods", {}), **{n: REPARAM_METHODS[n] for n in names}},
        "relora_every": args.relora_every,
        "relora_warmup": args.relora_warmup,
        "relora_prune": args.relora_prune,
        "alpha": 32.0,
        "how": pretrain_reparam.__doc__.split("\n\n")[0],
        "invocations": [*before.get("invocations", []), invocation],
    }
    result["table"] = table(rows)
    result["commands"] = [*result.get("commands", [result["command"]]), command(argv)]
    return write_result(result, rows, out, log)


def write_result(result: dict, rows: dict, out: pathlib.Path, log=print) -> dict:
    """Logs ``result``'s table and writes the JSON and the figure next to it."""
    log(result["table"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    save_figure(rows, out.with_suffix(".png"), figure_title(result))
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke size: {', '.join(QUICK_METHODS)}, 1 seed")  # fmt: skip
    parser.add_argument("--methods", nargs="+", help="registered optimizer names "
                        "(default: METHODS; with --ablate: galore)")  # fmt: skip
    parser.add_argument("--seeds", type=int, help="seeds 0 .. N-1 (default 2; --quick 1)")
    parser.add_argument("--lr-grid", default="1", metavar="M,M,...",
                        help="multipliers of each method's default lr: 0.5,1,2 [1]")  # fmt: skip
    parser.add_argument("--tune", action="store_true",
                        help="search each method's lr on seed 0 (its default and the half "
                        "decades around it), then run the other seeds at the best")  # fmt: skip
    parser.add_argument("--tune-extend", type=int, default=TUNE_EXTEND,
                        help="with --tune: lrs added past a winning grid edge, half a decade "
                        f"each [{TUNE_EXTEND}]")  # fmt: skip
    parser.add_argument("--ablate", choices=("rank", "gap"),
                        help="GaLore's rank or refresh gap instead of the comparison")  # fmt: skip
    parser.add_argument("--runs", help="keep the run directories here (lowrank-jax plot reads "
                        "them; default: a temporary directory)")  # fmt: skip
    parser.add_argument("--out", help="the JSON file; the PNG goes next to it "
                        "(default: experiments/results/pretrain_compare*.json)")  # fmt: skip
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the PNG from the JSON file that --out names")  # fmt: skip
    parser.add_argument("--peaks-only", action="store_true",
                        help="no training: measure the compiled step peak of every row of the "
                        "JSON file that --out names, rewrite its rows and table")  # fmt: skip
    parser.add_argument("--reparam", action="store_true",
                        help="pre-train LoRA, ReLoRA and Low-Rank (W = BA) through "
                        "pretrain_reparam and add their rows to the JSON file (the default one, "
                        "or --out)")  # fmt: skip
    parser.add_argument("--reparam-methods", nargs="+", choices=list(REPARAM_METHODS),
                        help="with --reparam: which of them [all]")  # fmt: skip
    parser.add_argument("--reparam-lrs", metavar="LR,LR,...",
                        help=f"with --reparam: the seed-0 lr grid [{REPARAM_LRS}]")  # fmt: skip
    parser.add_argument("--reparam-extend", type=int, default=REPARAM_EXTEND,
                        help="with --reparam: lrs added past a winning grid edge, half a decade "
                        f"each [{REPARAM_EXTEND}]")  # fmt: skip
    parser.add_argument("--reparam-grid-from", metavar="JSON",
                        help="with --reparam: no lr search; each method runs every seed at "
                        "the best lr of its row in this earlier JSON (its grid kept)")  # fmt: skip
    parser.add_argument("--relora-every", type=int, default=RELORA_EVERY,
                        help=f"with --reparam: ReLoRA's restart period [{RELORA_EVERY}]")
    parser.add_argument("--relora-warmup", type=int, default=RELORA_WARMUP,
                        help=f"with --reparam: ReLoRA's re-warmup steps [{RELORA_WARMUP}]")
    parser.add_argument("--relora-prune", type=float, default=0.99,
                        help="with --reparam: the fraction of the adapters' Adam moments ReLoRA "
                        "zeroes at a restart [0.99]")  # fmt: skip
    for key, value in SIZES["default"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value),
                            help=f"override the size's {key} [{value}]")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the comparison; returns what it writes to the JSON file."""
    args = parse_args(argv)
    label = "quick" if args.quick else "default"
    size = {k: getattr(args, k) or v for k, v in SIZES[label].items()}
    seeds = args.seeds or (1 if args.quick else 2)
    lr_grid = [float(m) for m in args.lr_grid.split(",")]
    methods = args.methods or (
        ["galore"] if args.ablate else list(QUICK_METHODS if args.quick else METHODS)
    )
    for name in [m for m in methods if m in NOT_RUN]:
        print(f"not running {name}: {NOT_RUN[name]}")
    methods = [m for m in methods if m not in NOT_RUN]
    for name in methods:
        get_optimizer(name)  # an unknown name fails before anything runs
    hidden = get_config(size["model"]).hidden_size
    todo = variants(methods, lr_grid, args.ablate, hidden)
    if args.tune and (args.ablate or lr_grid != [1.0]):
        raise SystemExit("--tune searches each method's lr itself: no --lr-grid or --ablate")
    stem = "pretrain_compare" + "_quick" * args.quick + "_lr_grid" * (lr_grid != [1.0])
    stem += f"_{args.ablate}" if args.ablate else ""
    out = pathlib.Path(args.out or RESULTS / f"{stem}.json")
    if args.replot:
        result = json.loads(out.read_text())
        save_figure(result["methods"], out.with_suffix(".png"), figure_title(result))
        print(f"wrote {out.with_suffix('.png')}")
        return result
    if args.peaks_only:
        result = json.loads(out.read_text())
        add_step_peaks(result["methods"], result["size"])
        result.update(step_memory_info(), table=table(result["methods"]))
        result["commands"] = [*result.get("commands", [result["command"]]), command(argv)]
        print(result["table"])
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
        return result
    if args.reparam:
        out = pathlib.Path(args.out or RESULTS / f"{stem.replace('_lr_grid', '')}.json")
        return run_reparam(args, argv, size, seeds, out)
    with contextlib.ExitStack() as stack:
        root = args.runs or stack.enter_context(tempfile.TemporaryDirectory())
        if args.tune:
            print(f"{len(methods)} methods: seed-0 lr search, then {seeds - 1} more seeds at "
                  f"the best, on {size['model']}, {size['steps']} steps")  # fmt: skip
            rows = run_tuned(methods, size, seeds, args.tune_extend, root)
        else:
            print(f"{len(todo)} variants x {seeds} seeds on {size['model']}, "
                  f"{size['steps']} steps")  # fmt: skip
            rows = run_fixed(todo, size, seeds, root)
    add_step_peaks(rows, size)
    result = {
        "command": command(argv),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "size": size,
        "seeds": list(range(seeds)),
        "lr_grid": "tuned" if args.tune else lr_grid,
        **({"tune": {"grid": "the registered default lr and its half-decade neighbours on the "
                     "1, 3, 10 ladder, seed 0; extended past a winning edge",
                     "extend": args.tune_extend}} if args.tune else {}),
        "ablate": args.ablate,
        "trainer_defaults": {"rank": max(1, hidden // 4), **{k: getattr(RunConfig(), k) for k in
                             TRAINER_DEFAULTS}},  # fmt: skip
        "not_run": NOT_RUN,
        "reference": REFERENCE,
        **step_memory_info(),
        "table": table(rows),
        "methods": rows,
    }
    return write_result(result, rows, out)


if __name__ == "__main__":
    main()
