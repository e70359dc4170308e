"""Smoke run of ``experiments/federated.py`` at a tiny size: the JSON it writes, exact
aggregators at round-off, the biased ones not, and the upload accounting."""

import json


def test_federated_experiment_tiny(tmp_path):
    from experiments import federated

    out = tmp_path / "federated.json"
    result = federated.main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    rows = saved["methods"]
    assert list(rows) == list(federated.METHODS)
    size = federated.SIZES["tiny"]
    assert len(saved["clients"]) == size["clients"]
    assert abs(sum(c["weight"] for c in saved["clients"]) - 1) < 1e-9
    books = [b for c in saved["clients"] for b in c["books"]]
    assert books[0] == "Mat" and books[-1] == "Rev" and len(books) == len(set(books)) == 27
    for name, row in rows.items():
        assert len(row["val_loss"]) == size["rounds"], name
        assert len(row["client_val_loss"]) == size["clients"]
        assert all(0 < x < 10 for x in row["val_loss"])
    for name in ("flora", "ffa", "fed_sb"):  # exact aggregation
        assert max(rows[name]["gap"]) < 1e-5, name
    assert min(rows["fedavg"]["gap"]) > 1e-3  # FedAvg of A and B is biased
    fair = rows["lora_fair"]  # on the same clients, LoRA-FAIR's refined B beats FedAvg's
    assert all(g < f for g, f in zip(fair["gap"], fair["gap_fedavg"], strict=True))
    # upload per client per round: r(in + out) for LoRA on q and v, r·out for FFA-LoRA, (2r)² for
    # Fed-SB -- per layer (the layers are scanned: L matrices per leaf)
    model = saved["model"]
    h, layers, r = model["hidden_size"], model["num_layers"], size["rank"]
    q, kv = (model[k] * model["head_dim"] for k in ("num_heads", "num_kv_heads"))
    assert rows["fedavg"]["upload"] == [layers * r * (h + q + h + kv)] * size["clients"]
    assert rows["ffa"]["upload"] == [layers * r * (q + kv)] * size["clients"]
    assert rows["fed_sb"]["upload"] == [layers * 2 * (2 * r) ** 2] * size["clients"]
    assert sorted(set(rows["flora"]["upload"])) == sorted(
        {layers * k * (h + q + h + kv) for k in saved["flora_ranks"]}
    )
