"""Smoke run of ``experiments/pretrain_compare.py`` at its quick size: the JSON, table and figure
it writes, the ratios to AdamW, the compiled step peaks (also re-measured by ``--peaks-only``),
and that every method's loss goes down."""

import json
import math

import pytest


def test_pretrain_compare_quick(tmp_path):
    from experiments import pretrain_compare

    out = tmp_path / "pretrain_compare.json"
    result = pretrain_compare.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    size = pretrain_compare.SIZES["quick"]
    assert saved["size"] == size and saved["seeds"] == [0]
    assert set(saved["not_run"]) == {"owlore", "sst"}

    rows = saved["methods"]
    assert list(rows) == list(pretrain_compare.QUICK_METHODS)
    for name, row in rows.items():
        assert row["finished"] == 1 and row["skipped_steps"] == 0, name
        assert row["val_loss_std"] == 0.0  # one seed
        (run,) = row["runs"]
        assert run["error"] is None and run["val_loss"] == row["val_loss_mean"]
        steps, val = row["val_curve"]
        assert steps == list(range(size["eval_every"], size["steps"] + 1, size["eval_every"]))
        assert val[-1] == row["val_loss_mean"] and val[-1] < val[0], name
        steps, train = row["train_curve"]
        assert steps == list(range(1, size["steps"] + 1))
        assert sum(train[-5:]) < sum(train[:5]), name
        assert abs(row["val_ppl"] - 2.718281828 ** row["val_loss_mean"]) < 1e-6 * row["val_ppl"]
        assert row["tokens_per_s"] > 0
        # AdamW's state on the same model (the run's AdamW also counts its schedule's step)
        assert 0 <= rows["adamw"]["opt_state_bytes"] - row["adamw_state_bytes"] < 64
        peak = row["step_memory"]
        assert peak["peak_bytes"] == (peak["argument_bytes"] + peak["output_bytes"]
                                      - peak["alias_bytes"] + peak["temp_bytes"])  # fmt: skip
        assert peak["argument_bytes"] > row["opt_state_bytes"] and peak["temp_bytes"] > 0
        assert row["step_peak_ratio"] == peak["peak_bytes"] / rows["adamw"]["step_memory"][
            "peak_bytes"]  # fmt: skip
    assert saved["step_memory_backend"] == "cpu"

    adamw, galore = rows["adamw"], rows["galore"]
    assert adamw["lr"] == 1e-3 and galore["lr"] == 1e-2  # the registered defaults
    assert adamw["state_ratio"] == adamw["throughput_ratio"] == 1.0
    assert galore["state_ratio"] == galore["opt_state_bytes"] / adamw["opt_state_bytes"] < 0.5
    assert galore["throughput_ratio"] == galore["tokens_per_s"] / adamw["tokens_per_s"]
    # the step's arguments differ by the optimizer states (same parameters and batch)
    a, g = adamw["step_memory"], galore["step_memory"]
    saved_state = adamw["opt_state_bytes"] - galore["opt_state_bytes"]
    assert abs(a["argument_bytes"] - g["argument_bytes"] - saved_state) < 64
    assert adamw["step_peak_ratio"] == 1.0 and galore["step_peak_ratio"] < 1.0

    lines = saved["table"].splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == 11 for line in lines)
    assert "step peak" in lines[0]

    # --peaks-only: the peaks of a JSON without them, measured again without training
    for row in saved["methods"].values():
        del row["step_memory"], row["step_peak_ratio"]
    out.write_text(json.dumps(saved))
    again = pretrain_compare.main(["--quick", "--out", str(out), "--peaks-only"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(again))
    assert again["table"] == result["table"]
    assert again["commands"][-1].endswith("--peaks-only")
    first = json.loads(json.dumps(result))["methods"]
    for name, row in again["methods"].items():
        assert row["step_memory"] == first[name]["step_memory"], name
        assert row["val_curve"] == first[name]["val_curve"], name  # untouched


def test_pretrain_compare_variants():
    from experiments.pretrain_compare import GAPS, RANK_DIVISORS, variants

    grid = variants(["adamw", "galore"], [0.5, 1.0, 2.0], None, 256)
    assert [(v.name, v.optimizer, v.lr_multiplier) for v in grid] == [
        ("adamw", "adamw", 1.0),
        ("adamw lr x0.5", "adamw", 0.5),
        ("adamw lr x2", "adamw", 2.0),
        ("galore lr x0.5", "galore", 0.5),
        ("galore", "galore", 1.0),
        ("galore lr x2", "galore", 2.0),
    ]
    ranks = variants(["galore", "lisa"], [1.0], "rank", 256)  # LISA has no rank: left out
    assert [v.rank for v in ranks] == [None] + [256 // d for d in RANK_DIVISORS]
    gaps = variants(["galore"], [1.0], "gap", 256)
    assert [v.update_proj_gap for v in gaps[1:]] == list(GAPS)
    assert gaps[0].name == "adamw"  # the reference is always run


# --reparam: the GaLore paper's LoRA, ReLoRA and Low-Rank (W = BA) baselines, pre-trained through
# experiments/pretrain_reparam.py on the trainer's data, schedule and evaluation.

TINY = dict(model="llama_tiny", steps=6, batch_size=2, seq_len=16, eval_every=3, eval_batches=1)


def _cfg(tmp_path, seed=0, **size):
    from experiments import pretrain_compare as pc

    variant = pc.Variant(pc.REFERENCE, pc.REFERENCE)
    return pc.run_config(variant, {**TINY, **size}, seed, str(tmp_path / f"run{seed}"))


def test_reparam_full_is_the_trainer(tmp_path):
    """The custom loop with every weight trained is the trainer's AdamW run: same data, batches,
    init, schedule, clipping and evaluation (so the reparam rows' val losses compare)."""
    from experiments import pretrain_compare as pc
    from experiments import pretrain_reparam as pr

    variant = pc.Variant(pc.REFERENCE, pc.REFERENCE)
    trainer = pc.run_one(variant, TINY, 1, str(tmp_path / "trainer"))
    ours = pr.train_reparam(pr.ReparamSpec("full"), _cfg(tmp_path, seed=1), 1e-3)
    assert ours["val_curve"][0] == trainer["val_curve"][0] == [3, 6]
    for a, b in zip(ours["val_curve"][1], trainer["val_curve"][1]):
        assert abs(a - b) < 1e-5
    assert ours["opt_state_bytes"] == trainer["opt_state_bytes"]
    assert ours["trainable_params"] == ours["param_count"] == trainer["param_count"]


def test_relora_restarts_merge_and_reinitialise(tmp_path):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import pretrain_reparam as pr

    spec = pr.ReparamSpec("relora", rank=8, alpha=8.0, relora_every=3)
    setup = pr.build(spec, _cfg(tmp_path), 1e-2)
    state, frozen = setup.state, setup.frozen
    assert len(frozen) == 28  # q, k, v, o, gate, up, down of 4 layers: frozen at the init
    tokens = np.asarray(setup.dataset.train[:2])
    for _ in range(3):
        state, _ = setup.train_step(state, jnp.asarray(tokens), frozen)
    before = jax.device_get(setup.effective(state.params, frozen))
    lora_before = jax.device_get(state.params["lora"])
    assert max(float(np.abs(x["B"]).max()) for x in lora_before.values()) > 0  # B trained
    dense_state = jax.device_get(state.opt_state[0])
    state, merged = setup.restart(jax.random.key(3), state, frozen)
    for path, w in merged.items():
        # the base moved by s·A B, so the model is unchanged; the adapters start afresh
        assert not np.allclose(w, frozen[path]), path
        assert float(jnp.abs(w - frozen[path]).max()) > 1e-4
        new = state.params["lora"][path]
        assert float(jnp.abs(new["B"]).max()) == 0.0
        assert not np.allclose(new["A"], lora_before[path]["A"])
    after = setup.effective(state.params, merged)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # the adapters' Adam moments are pruned to 1%; the full leaves' are kept
    adam = state.opt_state[1][0]
    for moment in (adam.mu, adam.nu):
        leaves = jax.tree.leaves(moment)
        nonzero = sum(int(jnp.count_nonzero(x)) for x in leaves)
        assert 0 < nonzero <= 0.011 * sum(x.size for x in leaves)
    for x, y in zip(jax.tree.leaves(dense_state), jax.tree.leaves(state.opt_state[0])):
        np.testing.assert_array_equal(x, y)
    # the training loop restarts every 3 steps (not after the last)
    run = pr.train_reparam(spec, _cfg(tmp_path, steps=7), 1e-2)
    assert run["restarts"] == [3, 6] and run["val_loss"] is not None


def test_lowrank_has_no_full_size_trained_matrix(tmp_path):
    import jax
    import numpy as np

    from experiments import pretrain_reparam as pr

    setup = pr.build(pr.ReparamSpec("lowrank", rank=8, alpha=8.0), _cfg(tmp_path), 1e-2)
    assert setup.frozen == {}  # no base
    sites = {s.path: s for s in setup.template.sites}
    assert len(sites) == 28
    trained = {"/".join(map(str, (getattr(k, "key", k) for k in kp))): leaf for kp, leaf in
               jax.tree_util.tree_flatten_with_path(setup.state.params)[0]}  # fmt: skip
    for path, leaf in trained.items():
        if path.startswith("lora/"):
            assert 8 in leaf.shape, path  # a factor, (in, 8) or (8, out)
        else:
            assert path[len("dense/"):] not in sites, path  # the adapted matrices are not trained
            assert "proj" not in path, path
    full = setup.effective(setup.state.params, setup.frozen)
    lora = pr.build(pr.ReparamSpec("lora", rank=8, alpha=8.0), _cfg(tmp_path), 1e-2)
    # trained: the unadapted leaves and the factors; the adapted matrices are LoRA's frozen base
    counted = sum(leaf.size for leaf in trained.values())
    factors = sum(x.size for x in jax.tree.leaves(setup.state.params["lora"]))
    bases = sum(x.size for x in lora.frozen.values())
    assert counted == setup.full_param_count - bases + factors < setup.full_param_count
    w = np.asarray(full["layers"][0]["mlp"]["up_proj"]["kernel"])
    assert np.linalg.matrix_rank(w, tol=1e-6) == 8  # W = s·A B, rank 8 at init
    # ... the best rank-8 approximation of the model's own random init (PiSSA's factors)
    w0 = np.asarray(lora.frozen["layers/0/mlp/up_proj/kernel"])
    u, s, vh = np.linalg.svd(w0, full_matrices=False)
    np.testing.assert_allclose(w, (u[:, :8] * s[:8]) @ vh[:8], atol=1e-5)
    # the compiled step takes no base: its arguments are smaller than LoRA's by it
    base = sum(x.nbytes for x in lora.frozen.values())
    low, lo = pr.step_peak(setup), pr.step_peak(lora)
    assert abs(lo.argument_bytes - low.argument_bytes - base) < 64


def test_next_lr_brackets_the_grid():
    from experiments.pretrain_compare import next_lr

    assert next_lr({1e-3: 2.0, 3e-3: 2.5, 1e-2: None}) == 3e-4  # best at the low edge
    assert next_lr({3e-4: 2.1, 1e-3: 2.0, 3e-3: 2.5}) is None  # bracketed
    assert next_lr({1e-3: 2.0, 3e-3: 1.9, 1e-2: 1.8}) == 3e-2
    assert next_lr({3e-4: 2.0, 1e-3: 2.5}) == 1e-4
    assert next_lr({1e-3: None, 1e-2: None}) == 3e-4  # all diverged: go lower


def test_pretrain_compare_reparam_rows(tmp_path):
    from experiments import pretrain_compare as pc

    out = tmp_path / "pretrain_compare.json"
    argv = ["--quick", "--reparam", "--out", str(out), "--reparam-lrs", "1e-3,1e-2",
            "--relora-every", "10", "--reparam-extend", "0"]  # fmt: skip
    result = pc.main(argv)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    rows = saved["methods"]
    assert list(rows) == ["adamw", "lora", "relora", "low-rank (W = BA)"]
    adamw = rows["adamw"]
    # the AdamW run of this process is the reference row (no file to add to)
    (invocation,) = saved["reparam"]["invocations"]
    assert invocation["adamw_rerun"][0]["val_loss"] == adamw["val_loss_mean"]
    for name in ("lora", "relora", "low-rank (W = BA)"):
        row = rows[name]
        grid = row["lr_grid_seed0"]
        assert [g["lr"] for g in grid] == [1e-3, 1e-2]
        assert row["lr"] == min(grid, key=lambda g: g["val_loss"])["lr"]
        assert row["lr_at_grid_edge"] == (row["lr"] in (1e-3, 1e-2))  # two points: an edge
        assert row["val_loss_mean"] == min(g["val_loss"] for g in grid)
        assert row["finished"] == 1 and row["seeds"] == [0] and row["skipped_steps"] == 0
        steps, val = row["val_curve"]
        assert steps == [10, 20, 30] and val[-1] < math.log(259), name  # beats uniform bytes
        if name != "relora":  # restarted every 10 of 30 steps, it may not gain by step 30
            assert val[-1] < val[0], name
        assert row["reparam"]["rank"] == 32 and row["reparam"]["alpha"] == 32.0
        assert row["trainable_params"] < row["runs"][0]["param_count"]
        assert row["state_ratio"] == row["opt_state_bytes"] / adamw["opt_state_bytes"] < 0.5
        assert row["throughput_ratio"] == (row["tokens_per_s"]
                                           / row["throughput_reference_tokens_per_s"])  # fmt: skip
        peak = row["step_memory"]["peak_bytes"]
        assert row["step_peak_ratio"] == peak / adamw["step_memory"]["peak_bytes"]
    assert rows["relora"]["restarts"] == [10, 20] and rows["lora"]["restarts"] == []
    assert rows["low-rank (W = BA)"]["frozen_params"] == 0
    assert rows["lora"]["frozen_params"] == rows["relora"]["frozen_params"] > 0
    assert (rows["lora"]["frozen_params"] + rows["lora"]["trainable_params"]
            > rows["lora"]["runs"][0]["param_count"])  # fmt: skip
    lines = saved["table"].splitlines()
    assert len(lines) == 2 + len(rows) and "low-rank (W = BA)" in lines[-1]
    # --peaks-only re-measures the reparam rows' own steps, not the trainer's
    again = pc.main(["--peaks-only", "--out", str(out)])["methods"]
    for name, row in rows.items():
        assert again[name]["step_memory"] == row["step_memory"], name
    # --reparam-grid-from: no search; every seed at the earlier best, its grid kept
    out2 = tmp_path / "more_seeds.json"
    more = pc.main(["--quick", "--reparam", "--reparam-methods", "lora", "--seeds", "2",
                    "--reparam-grid-from", str(out), "--out", str(out2)])["methods"]  # fmt: skip
    lora = more["lora"]
    assert lora["lr"] == rows["lora"]["lr"] and lora["seeds"] == [0, 1]
    assert lora["lr_grid_seed0"] == rows["lora"]["lr_grid_seed0"]
    assert lora["runs"][0]["val_loss"] == rows["lora"]["val_loss_mean"]  # seed 0 reproduced
    assert lora["lr_grid_from"] == rows["lora"]["command"]
    with pytest.raises(SystemExit, match="no lr search of relora"):
        pc.main(["--quick", "--reparam", "--reparam-methods", "relora", "--reparam-grid-from",
                 str(out2), "--out", str(tmp_path / "x.json")])  # fmt: skip


def test_pretrain_compare_tune_searches_each_lr_on_seed_0_then_runs_the_best(tmp_path):
    from experiments import pretrain_compare as pc
    from lowrank_jax.train import get_optimizer

    out = tmp_path / "tuned.json"
    result = pc.main(["--quick", "--tune", "--tune-extend", "0", "--seeds", "2", "--out",
                      str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["lr_grid"] == "tuned" and saved["tune"]["extend"] == 0
    rows = result["methods"]
    assert list(rows) == list(pc.QUICK_METHODS)
    for name, row in rows.items():
        default = get_optimizer(name).default_lr
        grid = {g["lr"]: g["val_loss"] for g in row["lr_grid_seed0"]}
        assert sorted(grid) == [pc.half_decade(default, -1), default, pc.half_decade(default, 1)]
        finite = {lr: v for lr, v in grid.items() if v is not None}
        assert row["lr"] == min(finite, key=finite.get)  # the winner runs every seed
        assert [r["lr"] for r in row["runs"]] == [row["lr"]] * 2 and row["seeds"] == [0, 1]
        assert row["runs"][0]["val_loss"] == grid[row["lr"]]  # seed 0 is the grid's run
        assert row["lr_at_grid_edge"] == (pc.next_lr(grid) is not None)
    assert rows["adamw"]["throughput_ratio"] == 1.0
    assert f"| galore | {rows['galore']['lr']:g}" in saved["table"]
    with pytest.raises(SystemExit, match="--tune searches"):
        pc.main(["--quick", "--tune", "--lr-grid", "0.5,1", "--out", str(out)])


def test_half_decade_walks_the_1_3_10_ladder():
    from experiments.pretrain_compare import half_decade

    assert [half_decade(1e-3, k) for k in (-2, -1, 0, 1, 2)] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert half_decade(3e-3, 1) == 1e-2 and half_decade(3e-3, -1) == 1e-3
