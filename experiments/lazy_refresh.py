"""Q-GaLore's lazy projector refresh: how many SVDs it skips, and what it costs in loss.

The small LM of ``experiments/eight_bit_vs_fp32.py`` trained with GaLore-Adam (rank 32,
``update_proj_gap`` 10) with every-gap refreshes, and with ``AdaptiveRefresh`` (Q-GaLore's
threshold 0.4 over a FIFO of 5, gap doubling; signed cosine as the reference, and the
sign-invariant fix). Counts the SVDs actually computed (``lowrank_jax.transforms.svd_count``).

    python experiments/lazy_refresh.py                 # 300 steps
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import jax
import optax

from experiments.eight_bit_vs_fp32 import CONFIG, init_params, train
from lowrank_jax.targets import resolve
from lowrank_jax.transforms import AdaptiveRefresh, galore, svd_count

RESULTS = pathlib.Path(__file__).with_name("results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--gap", type=int, default=10)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    params = jax.eval_shape(lambda: init_params(jax.random.key(0), **CONFIG))
    matrices = sum(jax.tree.leaves(resolve(None, params)))
    variants = {
        "every gap": None,
        "lazy (signed cos)": AdaptiveRefresh(threshold=0.4, queue_size=5),
        "lazy (|cos|)": AdaptiveRefresh(threshold=0.4, queue_size=5, sign_invariant=True),
    }
    rows = {}
    for name, adaptive in variants.items():
        tx = optax.chain(
            galore(
                optax.scale_by_adam(),
                rank=args.rank,
                update_proj_gap=args.gap,
                scale=1.0,
                adaptive_refresh=adaptive,
            ),
            optax.scale_by_learning_rate(args.lr),
        )
        run = train(tx, args.steps)
        svds = (
            matrices * math.ceil(args.steps / args.gap)
            if adaptive is None
            else svd_count(run["state"])
        )
        rows[name] = {"svds": svds, "eval": run["eval"], "final_train": run["final_train"]}
    base = rows["every gap"]
    print(f"{'refresh':18} {'SVDs':>6} {'share':>6} {'held-out':>9}")
    for name, row in rows.items():
        share = row["svds"] / base["svds"]
        print(f"{name:18} {row['svds']:6d} {100 * share:5.1f}% {row['eval']:9.4f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "lazy_refresh.json"
    out.write_text(json.dumps({"args": vars(args), "runs": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
