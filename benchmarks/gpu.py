"""GPU benchmark: pre-training throughput and memory, the Pallas kernels, and a 24 GB search.

Three sections (``--sections``, default all):

- ``train``: tokens/s and peak device memory of LLaMA pre-training (``llama_130m``,
  ``llama_350m``) with AdamW, GaLore, 8-bit GaLore, Fira, APOLLO and LISA -- the names
  registered in :mod:`lowrank_jax.train.registry` (a method that is not registered is skipped
  with a note). Random tokens, steady-state steps (GaLore's projector refresh falls in the
  warm-up; ``benchmarks/train_step.py`` times its amortised cost). Tokens/s is reported as a
  ratio to AdamW's measured in the same invocation; absolute tokens/s only from a GPU, next to
  its name. Peak memory is ``peak_bytes_in_use`` of the device allocator, so each run gets a
  process of its own (``None`` on the CPU, which has no allocator statistics).
- ``kernels``: optimizer-step time with and without the Pallas kernels
  (``lowrank_jax.kernels.kernel_mode``: ``reference`` vs ``auto`` and forced ``pallas``; on
  the CPU ``interpret``, whose time means nothing), for the whole GaLore / 8-bit GaLore step
  (the count of ``pallas_call`` in its program shows whether the transform uses the kernels)
  and for the kernels alone on those optimizers' moment shapes.
- ``cap``: the largest LLaMA config that trains with 8-bit GaLore when the allocator may use
  at most 24 GB (``XLA_PYTHON_CLIENT_MEM_FRACTION`` = cap / device memory), one subprocess
  per config so that running out of memory ends only that child.

Usage::

    python benchmarks/gpu.py                 # on a GPU: the README numbers
    python benchmarks/gpu.py --tiny          # seconds on a CPU: llama_tiny, a smoke test
    python benchmarks/gpu.py --sections cap --cap-gb 16

Writes ``benchmarks/results/gpu_<platform>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

SECTIONS = ("train", "kernels", "cap")
# Display name -> registry names to look for, in order (the first registered one is used).
METHODS = {
    "AdamW": ("adamw",),
    "GaLore": ("galore",),
    "8-bit GaLore": ("galore_adamw_8bit", "galore_8bit"),
    "Fira": ("fira", "fira_adamw"),
    "APOLLO": ("apollo", "apollo_adamw"),
    "LISA": ("lisa", "lisa_adamw"),
}
# The optimizers whose steps run the kernels: display name -> lowrank_jax.optimizers alias.
KERNEL_METHODS = {"GaLore": "galore_adamw", "8-bit GaLore": "galore_adamw_8bit"}
# GaLore paper ranks (Table 2 / galore-torch scripts); others: hidden_size // 4.
PAPER_RANKS = {
    "llama_60m": 128,
    "llama_130m": 256,
    "llama_350m": 256,
    "llama_1b": 512,
    "llama_7b": 1024,
}
CAP_CONFIGS = ("llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b")
GIB = 1 << 30


# ----------------------------------------------------------------------------- child side


def _device() -> dict:
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "bytes_limit": stats.get("bytes_limit"),
        "jax": jax.__version__,
    }


def _peak_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _optimizer(method: str, spec: dict, total_steps: int) -> Any:
    from lowrank_jax.train.registry import OptimizerArgs, get_optimizer

    entry = get_optimizer(method)
    args = OptimizerArgs(
        learning_rate=entry.default_lr,
        rank=spec["rank"],
        update_proj_gap=spec["gap"],
        total_steps=total_steps,
        extra=dict(spec.get("extra") or {}),
    )
    try:
        return entry.factory(args)
    except TypeError as e:  # --opt names an option this method does not take: drop it
        if "unexpected keyword" not in str(e):
            raise
        return entry.factory(dataclasses.replace(args, extra={}))


def _model(spec: dict) -> tuple[Any, Any]:
    """``(graphdef, fresh params)`` of ``spec``'s LLaMA config."""
    from lowrank_jax.models import get_config

    layers = {"num_layers": spec["num_layers"]} if spec.get("num_layers") else {}
    config = get_config(
        spec["model"],
        vocab_size=spec["vocab_size"],
        dtype=spec["dtype"],
        param_dtype=spec["param_dtype"],
        remat=spec["remat"],
        scan_layers=bool(spec.get("layerwise")),
        **layers,
    )
    graphdef, init = _initializer(config)
    return graphdef, init()


@functools.cache
def _initializer(config: Any) -> tuple[Any, Callable]:
    """The graphdef of ``config`` and its parameter initializer, compiled once."""
    # Jitted: eagerly every op would compile. Called per run: the train step donates params.
    import jax
    from flax import nnx

    from lowrank_jax.models import Llama

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    init = lambda: nnx.to_pure_dict(nnx.state(Llama(config, rngs=nnx.Rngs(0)), nnx.Param))
    return graphdef, jax.jit(init)


def measure_training(spec: dict) -> dict:
    """Tokens/s and peak device memory of ``spec["method"]`` training ``spec["model"]``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lowrank_jax.kernels import current_mode
    from lowrank_jax.train.step import TrainState, make_train_step

    graphdef, params = _model(spec)
    tx = _optimizer(spec["method"], spec, spec["warmup"] + spec["steps"])
    state = TrainState(jnp.int32(0), params, jax.jit(tx.init)(params))
    layerwise = bool(spec.get("layerwise"))
    step = make_train_step(
        graphdef, tx, grad_clip=1.0, layerwise=layerwise, clip_per_layer=layerwise
    )
    rng = np.random.default_rng(0)
    shape = (spec["batch_size"], spec["seq_len"] + 1)
    batches = [jnp.asarray(rng.integers(0, spec["vocab_size"], shape)) for _ in range(4)]
    for i in range(spec["warmup"]):  # compilation and the first projector refresh
        state, metrics = step(state, batches[i % 4])
    float(metrics["loss"])
    began = time.perf_counter()
    for i in range(spec["steps"]):
        state, metrics = step(state, batches[i % 4])
    loss = float(metrics["loss"])
    seconds = time.perf_counter() - began
    return {
        "tokens_per_s": spec["batch_size"] * spec["seq_len"] * spec["steps"] / seconds,
        "step_s": seconds / spec["steps"],
        "peak_bytes": _peak_bytes(),
        "loss": loss,
        "kernel_mode": current_mode(),
    }


def _time(fn: Any, args: tuple, steps: int, feed_back: bool) -> float:
    """Median seconds per call; with ``feed_back`` the outputs are the next call's inputs."""
    import jax

    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        if feed_back:
            args = (*out, *args[len(out) :])
        began = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _moments(state: Any) -> tuple[list, list]:
    """``(adam, adam_8bit)``: (g, m, v) leaf triples of every Adam state inside ``state``."""
    import jax
    import jax.numpy as jnp
    import optax

    from lowrank_jax.quantization import QuantizedArray
    from lowrank_jax.transforms import ScaleByAdam8bitState

    is_state = lambda x: isinstance(x, (optax.ScaleByAdamState, ScaleByAdam8bitState))
    adam, adam_8bit = [], []
    for node in jax.tree.leaves(state, is_leaf=is_state):
        if not is_state(node):
            continue
        is_q = lambda x: isinstance(x, QuantizedArray)
        for m, v in zip(
            jax.tree.leaves(node.mu, is_leaf=is_q),
            jax.tree.leaves(node.nu, is_leaf=is_q),
            strict=True,
        ):
            if isinstance(m, QuantizedArray):
                adam_8bit.append((jnp.ones(m.codes.shape, jnp.float32), m, v))
            elif isinstance(node, optax.ScaleByAdamState):
                adam.append((jnp.ones(m.shape, m.dtype), m, v))
    return adam, adam_8bit


def _programs(tx: Any, mode: str) -> tuple[Callable, Callable]:
    """A fresh optimizer step and a fresh kernels-only function (new identities: new traces)."""
    import optax

    import lowrank_jax.kernels as K

    def opt_step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def kernels_only(adam, adam_8bit):
        out = [
            K.adam_hf_update(g, m, v, b1=0.9, b2=0.999, eps=1e-6, factor=0.5, mode=mode)
            for g, m, v in adam
        ]
        out += [
            K.adam_8bit_update(
                g,
                m,
                v,
                b1=0.9,
                b2=0.999,
                eps=1e-8,
                correction1=0.1,
                correction2=0.01,
                block_size=256,
                mode=mode,
            )
            for g, m, v in adam_8bit
        ]
        return out

    return opt_step, kernels_only


def measure_kernels(spec: dict) -> dict:
    """Optimizer-step and kernel-only times per kernel mode (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    import lowrank_jax.kernels as K
    from lowrank_jax import optimizers

    _, params = _model(spec)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), params)
    rows = {}
    for label, alias in spec["methods"].items():
        tx = getattr(optimizers, alias)(
            1e-3, rank=spec["rank"], update_proj_gap=spec["gap"], basis=spec["basis"]
        )
        state = jax.jit(tx.init)(params)
        adam, adam_8bit = (x[: spec["kernel_leaves"]] for x in _moments(state))

        row = {"optimizer": f"lowrank_jax.{alias}", "moment_leaves": len(adam) + len(adam_8bit)}
        for mode in spec["modes"]:
            # The mode is read when a function is traced and is not part of jit's cache key:
            # fresh functions per mode, traced inside the context.
            opt_step, kernels_only = _programs(tx, mode)
            with K.kernel_mode(mode):
                step_calls = str(jax.make_jaxpr(opt_step)(params, state, grads))
                kernel_calls = str(jax.make_jaxpr(kernels_only)(adam, adam_8bit))
                row[mode] = {
                    "optimizer_step_s": _time(
                        jax.jit(opt_step), (params, state, grads), spec["steps"], feed_back=True
                    ),
                    "optimizer_pallas_calls": step_calls.count("pallas_call"),
                    "kernels_only_s": _time(
                        jax.jit(kernels_only), (adam, adam_8bit), spec["steps"], feed_back=False
                    ),
                    "kernels_pallas_calls": kernel_calls.count("pallas_call"),
                }
        rows[label] = row
    return {"methods": rows}


def run_spec(spec: dict) -> dict:
    """Runs one measurement; errors become ``{"ok": False, ...}`` (OOM flagged)."""
    try:
        if spec["kind"] == "device":
            result = _device()
        elif spec["kind"] == "train":
            result = measure_training(spec)
        else:
            result = measure_kernels(spec)
        return {"ok": True, **result}
    except Exception as err:  # noqa: BLE001 -- reported, the parent goes on
        text = f"{type(err).__name__}: {err}"
        oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))
        return {"ok": False, "oom": oom, "error": text.splitlines()[0][:300]}


# ---------------------------------------------------------------------------- parent side


def spawn(spec: dict, env: dict | None = None, timeout: float = 3600) -> dict:
    """``run_spec`` in a fresh Python process (its own allocator, peak and memory cap)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "oom": False, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    oom = "out of memory" in done.stderr.lower() or done.returncode in (-9, 137)
    return {"ok": False, "oom": oom, "error": f"exit {done.returncode}: {tail[:300]}"}


def resolve_methods(wanted: list[str]) -> tuple[dict[str, str], list[str]]:
    """``({name: registry name}, notes)`` for the methods registered now.

    A name is a key of :data:`METHODS` (its candidates are tried in order) or a registry name.
    """
    from lowrank_jax.train.registry import available_optimizers

    registered = available_optimizers()
    chosen, notes = {}, []
    for label in wanted:
        candidates = METHODS.get(label, (label,))
        name = next((n for n in candidates if n in registered), None)
        if name is None:
            notes.append(
                f"{label}: skipped, none of {list(candidates)} is registered "
                f"(registered: {', '.join(registered)})"
            )
        else:
            chosen[label] = name
    return chosen, notes


def base_spec(args: argparse.Namespace, model: str) -> dict:
    from lowrank_jax.models import get_config

    hidden = get_config(model).hidden_size
    return {
        "model": model,
        "vocab_size": args.vocab_size,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "dtype": args.dtype,
        "param_dtype": args.param_dtype,
        "remat": args.remat,
        "rank": PAPER_RANKS.get(model, max(1, hidden // 4)),
        "gap": args.gap,
        "num_layers": args.num_layers,
        "kernel_leaves": args.kernel_leaves,
        "basis": args.basis,
        "extra": dict(kv.split("=", 1) for kv in args.opt),
    }


def train_section(args: argparse.Namespace, run: Callable, methods: dict, on_gpu: bool) -> dict:
    """Per model and method: tokens/s (ratio to AdamW), peak memory."""
    out = {}
    for model in args.models:
        rows = {}
        for label, name in methods.items():
            result = run({**base_spec(args, model), "kind": "train", "method": name})
            rows[label] = {"registry_name": name, **result}
        for label, name in methods.items() if args.layerwise else ():
            if label in ("LISA",) or name.startswith("lisa"):
                continue  # layer sampling has no per-layer state to fuse (refused)
            spec = {**base_spec(args, model), "kind": "train", "method": name, "layerwise": True}
            rows[f"{label} LW"] = {"registry_name": name, "layerwise": True, **run(spec)}
        base = rows.get("AdamW", {}).get("tokens_per_s")
        for row in rows.values():
            if row.get("ok") and base:
                row["ratio_vs_adamw"] = row["tokens_per_s"] / base
            if not on_gpu:  # absolute throughput only from a GPU
                row.pop("tokens_per_s", None)
        out[model] = rows
    return out


def kernels_section(args: argparse.Namespace, run: Callable, on_accelerator: bool) -> dict:
    """Per model: optimizer-step and kernel-only times per kernel mode."""
    from lowrank_jax import optimizers

    chosen = {k: v for k, v in KERNEL_METHODS.items() if hasattr(optimizers, v)}
    modes = ["reference", "auto", "pallas"] if on_accelerator else ["reference", "interpret"]
    return {
        model: run(
            {
                **base_spec(args, model),
                "kind": "kernels",
                "methods": chosen,
                "modes": modes,
                "num_layers": args.kernel_layers or args.num_layers,
            }
        )
        for model in args.models
    }


def cap_section(
    args: argparse.Namespace, run_capped: Callable, total_bytes: int | None, configs: list[str]
) -> dict:
    """The configs, smallest first, that train under the memory cap; the largest of them."""
    cap = args.cap_gb * 1e9
    fraction = min(1.0, cap / total_bytes) if total_bytes else 1.0
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.4f}"}
    out = {
        "cap_bytes": cap,
        "mem_fraction": env["XLA_PYTHON_CLIENT_MEM_FRACTION"],
        "device_bytes": total_bytes,
        "configs": {},
        "largest": None,
    }
    if total_bytes is None:
        out["note"] = "no device memory statistics (CPU): the cap is not enforced"
    elif total_bytes < cap:
        out["note"] = f"the device has only {total_bytes / 1e9:.1f} GB: it bounds the search"
    for model in configs:
        spec = {
            **base_spec(args, model),
            "kind": "train",
            "method": args.cap_method,
            "batch_size": args.cap_batch_size,
            "steps": 2,
            "warmup": 1,
            "layerwise": args.cap_layerwise,
        }
        result = run_capped(spec, env)
        out["configs"][model] = result
        if not result["ok"]:
            break  # the configs grow: a larger one will not fit either
        out["largest"] = model
    return out


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f} GiB"


def report(results: dict) -> None:
    dev = results["device"]
    print(f"device: {dev['platform']} ({dev['device_kind']}), jax {dev['jax']}")
    for note in results.get("notes", []):
        print(f"note: {note}")
    for model, rows in results.get("train", {}).items():
        print(
            f"\n{model} training, batch {results['args']['batch_size']} x "
            f"{results['args']['seq_len']} tokens"
        )
        print(f"{'method':17s} {'registry':18s} {'tok/s':>10s} {'vs AdamW':>9s} {'peak':>12s}")
        for label, r in rows.items():
            if not r["ok"]:
                print(f"{label:17s} {r['registry_name']:18s} failed: {r['error']}")
                continue
            tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
            ratio = f"{r['ratio_vs_adamw']:.2f}x" if "ratio_vs_adamw" in r else "-"
            print(
                f"{label:17s} {r['registry_name']:18s} {tps:>10s} {ratio:>9s} "
                f"{_gib(r['peak_bytes']):>12s}"
            )
    for model, result in results.get("kernels", {}).items():
        print(f"\n{model}: optimizer step / kernels alone (ms) per kernel mode")
        if not result["ok"]:
            print(f"failed: {result['error']}")
            continue
        for label, row in result["methods"].items():
            for mode, r in row.items():
                if isinstance(r, dict):
                    print(
                        f"{label:17s} {mode:10s} step {1e3 * r['optimizer_step_s']:9.2f}  "
                        f"kernels {1e3 * r['kernels_only_s']:9.2f}  "
                        f"pallas_calls: step {r['optimizer_pallas_calls']}, "
                        f"kernels {r['kernels_pallas_calls']}"
                    )
    if "cap" in results:
        cap = results["cap"]
        print(
            f"\n{cap['cap_bytes'] / 1e9:.0f} GB cap (XLA_PYTHON_CLIENT_MEM_FRACTION="
            f"{cap['mem_fraction']}), {results['args']['cap_method']}"
            f"{' layer-wise' if results['args'].get('cap_layerwise') else ''}:"
        )
        for model, r in cap["configs"].items():
            state = "fits" if r["ok"] else ("OOM" if r.get("oom") else f"failed: {r['error']}")
            print(f"  {model:12s} {state:6s} peak {_gib(r.get('peak_bytes'))}")
        print(f"  largest: {cap['largest']}" + (f" ({cap['note']})" if "note" in cap else ""))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="llama_tiny, 2 steps, in-process: CPU")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--models", default="llama_130m,llama_350m")
    p.add_argument("--methods", default=",".join(METHODS), help="METHODS or registry names")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compile, refresh)")
    p.add_argument("--gap", type=int, default=200, help="projector refresh period")
    p.add_argument("--dtype", default="bfloat16", help="computation dtype")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--num-layers", type=int, default=None, help="override the configs' depth")
    p.add_argument("--kernel-layers", type=int, default=None, help="depth in the kernels section")
    p.add_argument("--kernel-leaves", type=int, default=None, help="moments timed per kernel")
    p.add_argument(
        "--basis", default="svd", help="GaLore basis in the kernels section (tiny: random)"
    )
    p.add_argument(
        "--layerwise", action="store_true", help="also layer-wise rows (scan_layers models)"
    )
    p.add_argument(
        "--opt", action="append", default=[], metavar="KEY=VALUE",
        help="optimizer options (OptimizerArgs.extra), e.g. basis=randomized",
    )
    p.add_argument("--cap-layerwise", action="store_true", help="the cap search layer-wise")
    p.add_argument("--cap-gb", type=float, default=24.0)
    p.add_argument("--cap-method", default="8-bit GaLore", help="a METHODS name or registry name")
    p.add_argument("--cap-batch-size", type=int, default=4)
    p.add_argument("--cap-configs", default=",".join(CAP_CONFIGS))
    p.add_argument(
        "--device-memory-gb", type=float, default=None, help="override the detected memory"
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="no subprocess per measurement (the peak memory then accumulates over runs)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.cap_configs, args.in_process = "llama_tiny", "llama_tiny", True
        args.batch_size, args.seq_len, args.vocab_size = 2, 16, 259
        args.steps, args.warmup, args.dtype, args.cap_batch_size = 2, 1, "float32", 2
        # compile time dominates on the CPU: kernels on one layer and one moment, no SVD
        args.kernel_layers, args.kernel_leaves, args.basis = 1, 1, "random"
    for name in ("sections", "models", "methods", "cap_configs"):
        setattr(args, name, [s for s in getattr(args, name).split(",") if s])
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.child:
        print(json.dumps(run_spec(json.loads(args.child))))
        return {}
    run = run_spec if args.in_process else (lambda spec: spawn(spec, timeout=args.timeout))
    # The parent stays off the device when measurements run in subprocesses: a GPU backend
    # here would preallocate the memory the children need.
    info_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "1.0"}
    device = (
        run_spec({"kind": "device"})
        if args.in_process
        else spawn({"kind": "device"}, info_env, args.timeout)
    )
    if not device["ok"]:
        raise SystemExit(f"cannot query the device: {device['error']}")
    on_gpu = device["platform"] == "gpu"
    methods, notes = resolve_methods(args.methods)
    results: dict[str, Any] = {
        "device": device,
        "notes": notes,
        "args": vars(args),
        "command": " ".join(["python", "benchmarks/gpu.py", *sys.argv[1:]]),
    }
    if not on_gpu:
        notes.append(
            f"{device['platform']}: tokens/s as ratios to AdamW only; no peak device "
            "memory (no allocator statistics)"
            if device["platform"] == "cpu"
            else f"{device['platform']}: absolute tokens/s only from a GPU"
        )
    if "train" in args.sections:
        results["train"] = train_section(args, run, methods, on_gpu)
    if "kernels" in args.sections:
        results["kernels"] = kernels_section(args, run, device["platform"] != "cpu")
    cap_method = resolve_methods([args.cap_method])[0].get(args.cap_method)
    if "cap" in args.sections and cap_method is None:
        notes.append(f"cap: skipped, {args.cap_method!r} is not registered")
    elif "cap" in args.sections:
        args.cap_method = cap_method
        results["cap"] = cap_section(
            args,
            lambda spec, env: spawn(spec, env, args.timeout),
            args.device_memory_gb * 1e9 if args.device_memory_gb else device["bytes_limit"],
            args.cap_configs,
        )
    report(results)
    path = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"gpu_{'tiny_' if args.tiny else ''}{device['platform']}.json",
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
