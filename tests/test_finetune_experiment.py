"""Smoke run of ``experiments/finetune.py`` at a tiny size: the JSON and table it writes, the
parameter and optimizer-state accounting, and that every method's loss goes down."""

import json

from lowrank_jax.models import get_config


def test_finetune_experiment_tiny(tmp_path, capsys):
    from experiments import finetune

    out = tmp_path / "finetune.json"
    pretrained = tmp_path / "pretrained"
    result = finetune.main(["--tiny", "--pretrained", str(pretrained), "--out", str(out)])
    assert "pre-training llama_tiny" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["python"] and len(saved["domain"]["sha256"]) == 64
    assert saved["domain"]["modules"] == list(finetune.PYTHON_MODULES)
    assert saved["pretrained"]["model"] == "llama_tiny"
    assert saved["pretrained"]["steps"] == finetune.SIZES["tiny"]["pretrain_steps"]

    rows = saved["methods"]
    assert list(rows) == list(finetune.METHODS)
    for name, row in rows.items():
        assert row["lr"] == finetune.LEARNING_RATES["tiny"][name]
        assert len(row["losses"]) == finetune.SIZES["tiny"]["steps"]
        assert row["train_loss_last"] < row["train_loss_first"], name
        assert row["val_loss_after"] < row["val_loss_before"], name
        assert row["kjv_val_loss_after"] > 0 and row["seconds"] > 0

    # Every method starts from the pretrained model (LoRA/DoRA are no-ops at init, PiSSA's
    # residual base plus its adapter equals the weight).
    base = saved["pretrained"]["domain_val_loss"]
    for row in rows.values():
        assert abs(row["val_loss_before"] - base) < 1e-3

    # Trainable parameters: everything for full/GaLore, r(in + out) per matrix for LoRA/PiSSA,
    # plus one magnitude per output column for DoRA.
    cfg = get_config("llama_tiny")
    rank = finetune.SIZES["tiny"]["rank"]
    h, m = cfg.hidden_size, cfg.intermediate_size
    shapes = [(h, h)] * 4 + [(h, m)] * 2 + [(m, h)]
    lora = cfg.num_layers * sum(rank * (i + o) for i, o in shapes)
    columns = cfg.num_layers * sum(o for _, o in shapes)
    total = saved["pretrained"]["params"]
    assert rows["full"]["trainable_params"] == rows["galore"]["trainable_params"] == total
    assert rows["lora"]["trainable_params"] == rows["pissa"]["trainable_params"] == lora
    assert rows["dora"]["trainable_params"] == lora + columns

    # Optimizer state: AdamW keeps two float32 moments per trainable parameter (plus counters);
    # GaLore's low-rank moments and projectors are smaller than full AdamW's.
    for name in ("full", "lora", "dora", "pissa"):
        moments = 8 * rows[name]["trainable_params"]
        assert moments <= rows[name]["opt_state_bytes"] < moments + 64, name
    assert rows["galore"]["opt_state_bytes"] < rows["full"]["opt_state_bytes"] / 4
    assert rows["full"]["time_ratio"] == 1.0

    lines = saved["table"].splitlines()
    assert len(lines) == 3 + len(finetune.METHODS)
    assert all(line.count("|") == 8 for line in lines)
    assert lines[2].startswith("| pretrained")


def test_finetune_experiment_runs_the_lora_family(tmp_path):
    """``--methods`` takes the rest of the family (:data:`FAMILY`), at LoRA's learning rate:
    each row trains (the held-out loss falls) and counts its own trainable arrays."""
    from experiments import finetune

    out = tmp_path / "family.json"
    saved = finetune.main(["--tiny", "--pretrained", str(tmp_path / "pre"), "--out", str(out),
                           "--methods", "lora", "wegeft", "loldu"])  # fmt: skip
    rows = saved["methods"]
    assert list(rows) == ["lora", "wegeft", "loldu"]
    for name, row in rows.items():
        assert row["lr"] == finetune.LEARNING_RATES["tiny"]["lora"], name
        assert row["val_loss_after"] < row["val_loss_before"], name
    # LoLDU trains a diagonal and a scale per matrix: far fewer values than LoRA's factors
    assert 0 < rows["loldu"]["trainable_params"] < rows["lora"]["trainable_params"] / 50
    assert json.loads(out.read_text())["methods"].keys() == rows.keys()


def test_finetune_experiment_runs_the_scheduled_family(tmp_path):
    """The methods with loop pieces of their own (:data:`SCHEDULED`) train through them: SoRA's
    proximal step zeroes gates, DyLoRA's drawn ranks train the lower components, AdaLoRA's
    allocator cuts the budget to its target and moves ranks between matrices, IncreLoRA's
    grows the total rank, and MoS shares one pool per projection type across the layers."""
    from experiments import finetune

    saved = finetune.main(["--tiny", "--pretrained", str(tmp_path / "pre"), "--out",
                           str(tmp_path / "scheduled.json"), "--methods",
                           *finetune.SCHEDULED])  # fmt: skip
    rows = saved["methods"]
    assert list(rows) == list(finetune.SCHEDULED)
    for name, row in rows.items():
        assert row["lr"] == finetune.LEARNING_RATES["tiny"]["lora"], name
        assert row["val_loss_after"] < row["val_loss_before"] - 0.02, name

    cfg = get_config("llama_tiny")
    rank, layers = finetune.SIZES["tiny"]["rank"], cfg.num_layers
    h, m = cfg.hidden_size, cfg.intermediate_size
    shapes = [(h, h)] * 4 + [(h, m)] * 2 + [(m, h)]
    matrices = layers * len(shapes)
    lora = layers * sum(rank * (i + o) for i, o in shapes)  # a rank-r LoRA's values

    # SoRA: one gate per component; the proximal L1 step leaves exact zeros (Adam alone would
    # not), so the effective rank is below r_max somewhere.
    sora = rows["sora"]["figures"]
    assert rows["sora"]["trainable_params"] == lora + rank * matrices
    assert sora["max_rank_total"] == rank * matrices and len(sora["effective_ranks"]) == matrices
    assert sum(sora["effective_ranks"].values()) == sora["effective_rank_total"]
    assert 0 < sora["effective_rank_total"] < sora["max_rank_total"]
    assert sora["gate_mean_abs_change"] > 0

    # DyLoRA: evaluated at r/4, r/2, r; the final row is at r_max. Trained at r_max alone (no
    # drawn ranks) the frozen-lower mode would leave components 1..r-1 untouched (B = 0 there),
    # so rank 1 would be the pretrained model.
    at = rows["dylora"]["figures"]["val_loss_at_rank"]
    assert list(at) == [str(max(1, rank // 4)), str(rank // 2), str(rank)]
    assert abs(at[str(rank)] - rows["dylora"]["val_loss_after"]) < 1e-6
    assert at["1"] < rows["dylora"]["val_loss_before"] - 0.02
    assert len(set(at.values())) == len(at)

    # AdaLoRA: 3r/2 triplets per matrix at first, pruned to the target budget r per matrix on
    # average, unevenly: ranks were moved between matrices.
    ada = rows["adalora"]["figures"]
    assert ada["rank_budget_initial"] == (3 * rank // 2) * matrices
    assert ada["rank_budget_final"] == ada["rank_budget_target"] == rank * matrices
    assert sum(ada["ranks"].values()) == ada["rank_budget_final"]
    assert len(set(ada["ranks"].values())) > 1

    # IncreLoRA: r/4 per matrix at first, grown to at least the target total r per matrix.
    inc = rows["increlora"]["figures"]
    assert inc["rank_total_initial"] == max(1, rank // 4) * matrices
    assert inc["rank_total_final"] >= inc["rank_total_target"] == rank * matrices
    assert sum(inc["ranks"].values()) == inc["rank_total_final"]
    assert len(set(inc["ranks"].values())) > 1  # grown where the importance was highest
    assert inc["trained_params_final"] > inc["rank_total_initial"] * (h + h + 1)

    # MoS: pools of r/2 vectors per layer (2 shards each), shared by the layers of a projection
    # type; every layer adapts at rank r, as a LoRA of twice the values would.
    mos = rows["mos"]["figures"]
    assert mos["per_layer_rank"] == rank and mos["equivalent_rank"] == rank // 2
    assert rows["mos"]["trainable_params"] == (rank // 2) * layers * sum(i + o for i, o in shapes)
    assert mos["lora_equivalent_params"] == lora == 2 * rows["mos"]["trainable_params"]


def test_finetune_experiment_runs_the_mixtures_of_lora_experts(tmp_path):
    """The routed rows (:data:`ROUTED`) train their gates through the wrapped model: MoLA with
    its schedule of experts per layer and its balance loss in the objective, SMoRA's bias moved
    by the balancing rule, MeteoRA's gate loss against the blocks' task ids falling, and X-LoRA's
    head (the only trained values) over task experts trained first."""
    import jax
    import numpy as np

    from experiments import finetune
    from lowrank_jax import reparam

    pre = tmp_path / "pre"
    saved = finetune.main(["--tiny", "--pretrained", str(pre), "--out",
                           str(tmp_path / "routed.json"), "--methods",
                           *finetune.ROUTED])  # fmt: skip
    rows = saved["methods"]
    assert list(rows) == list(finetune.ROUTED)
    size = finetune.SIZES["tiny"]
    cfg = get_config("llama_tiny")
    rank, layers, h, m = size["rank"], cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    shapes = [(h, h)] * 4 + [(h, m)] * 2 + [(m, h)]
    per_expert = sum(rank * (i + o) for i, o in shapes)  # one rank-r LoRA expert per matrix
    routers = sum(i for i, _ in shapes)  # a router column per expert per matrix
    for name, row in rows.items():
        assert row["lr"] == finetune.LEARNING_RATES["tiny"]["lora"], name
        assert row["val_loss_after"] < row["val_loss_before"] - 0.02, name
        assert row["figures"]["gate_mean_abs_change"] > 0, name  # the gates were trained
        assert len(row["aux_losses"]) == size["steps"]

    # MoLA: 2, 4, 6, 8 experts from the bottom layer up, as reparam.mola schedules them, each a
    # rank-r LoRA with a router; its balance loss (x MOLA_BALANCE, summed over the matrices) is
    # the aux term of the objective.
    mola = rows["mola"]["figures"]
    want = [r.num_experts for r in reparam.mola(finetune.MOLA_EXPERTS, num_layers=layers).routings]
    assert want == [2, 4, 6, 8][:layers]
    assert list(mola["experts_per_layer"].values()) == want
    assert [len(v) for v in mola["load_shares"].values()] == want
    assert rows["mola"]["trainable_params"] == sum(want) * (per_expert + routers)
    total = finetune.MOLA_BALANCE * mola["balance"] * layers * len(shapes)
    assert abs(mola["aux_loss"] - total) < 1e-4 * total
    assert min(rows["mola"]["aux_losses"]) > 0

    # The objective is cross-entropy plus the aux term, and the aux term reaches the routers.
    graphdef, params = finetune.restore_pretrained(str(pre))[1:3]
    blocks = np.zeros((2, size["seq_len"] + 2), np.int32)
    blocks[:, :-1] = np.arange(size["seq_len"] + 1) % 50
    trainable, rest, bias, mixture = finetune.routed_setup("mola", graphdef, params, size, 1e-2,
                                                           0, blocks)  # fmt: skip
    objective, (ce, aux, _) = mixture.loss(trainable, rest, bias, blocks)
    assert float(aux) > 0 and abs(float(objective) - float(ce) - float(aux)) < 1e-5
    balance = lambda t: mixture.aux(
        mixture.forward(mixture.train_graph, t, bias, rest, blocks)[1], None
    )
    grads = jax.grad(balance)(trainable)
    assert float(np.abs(grads["layers"][0]["attn"]["q_proj"]["router"]).max()) > 0

    # SMoRA: SMORA_RANKS * r rank-1 experts per matrix, the bias moved off zero in training.
    smora = rows["smora"]["figures"]
    assert set(smora["experts_per_layer"].values()) == {finetune.SMORA_RANKS * rank}
    assert smora["bias_range"] != [0.0, 0.0]
    assert "aux_loss" not in smora  # aux-loss-free balancing

    # MeteoRA: one expert per task; its gate loss falls as the routers learn the task ids.
    meteora = rows["meteora"]
    assert set(meteora["figures"]["experts_per_layer"].values()) == {finetune.TASKS}
    assert np.mean(meteora["aux_losses"][-5:]) < np.mean(meteora["aux_losses"][:5])

    # X-LoRA: only the scaling head trains (hidden -> one scaling per task expert).
    xlora = rows["xlora"]
    assert xlora["trainable_params"] == h * finetune.TASKS + finetune.TASKS
    assert xlora["figures"]["expert_steps"] == size["steps"] // finetune.TASKS
    assert xlora["figures"]["expert_params"] == finetune.TASKS * layers * per_expert
