"""Exact SVD vs randomized range-finder projectors: same training run, loss side by side.

Runs the default ``lowrank-jax train`` job (llama_20m + GaLore on the embedded corpus, 200
steps, refresh every 50) twice, with ``basis="svd"`` (galore-torch) and ``basis="randomized"``
(matmul-only subspace iteration), same seed and data, and prints the final training loss (mean
of the last 20 steps) and validation loss of both. The refresh cost itself is measured by
``benchmarks/optimizer_step.py`` on the 60M shapes.

    python experiments/randomized_basis.py [--steps 200] [--model llama_20m]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import numpy as np

from lowrank_jax.train import RunConfig, train

OUT = pathlib.Path(__file__).parent / "results" / "randomized_basis.json"


def run(basis: str, model: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(model=model, steps=steps, out=out, progress=False,
                        optimizer_options={"basis": basis})
        summary = train(cfg, log=lambda line: None)
        with open(pathlib.Path(out) / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
    losses = [r["loss"] for r in records if "loss" in r and not r.get("summary")]
    return {"final_train_loss": float(np.mean(losses[-20:])), "val_loss": summary["val_loss"],
            "tokens_per_s": summary["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_20m")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    results = {basis: run(basis, args.model, args.steps) for basis in ("svd", "randomized")}
    svd, rnd = results["svd"], results["randomized"]
    print(f"{args.model}, {args.steps} steps, GaLore rank hidden/4, refresh every 50")
    print(f"{'basis':<12}{'train loss (last 20)':>22}{'val loss':>10}")
    for basis, r in results.items():
        print(f"{basis:<12}{r['final_train_loss']:>22.4f}{r['val_loss']:>10.4f}")
    gap = rnd["final_train_loss"] / svd["final_train_loss"] - 1
    print(f"randomized vs svd: train loss {gap:+.2%}, "
          f"val loss {rnd['val_loss'] / svd['val_loss'] - 1:+.2%}")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"args": vars(args), "results": results,
                               "train_loss_gap": gap}, indent=1))


if __name__ == "__main__":
    main()
