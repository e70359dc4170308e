"""LoRA+, LoRA-FA and ALLoRA over adapter trees: PEFT parity, the rules, frozen A, plumbing."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lr
from lowrank_jax import memory, reparam
from lowrank_jax.transforms import (
    allora_coefficients,
    lorafa,
    lorafa_precondition,
    loraplus_groups,
    scale_by_allora,
    scale_by_loraplus,
)
from tests.helpers import assert_same_types, orbax_roundtrip, run_steps

HAVE_PEFT = all(importlib.util.find_spec(m) for m in ("torch", "peft", "transformers"))
D_IN, D_OUT, R = 8, 6, 2


def adapter(key, a_name="A", b_name="B"):
    k = jax.random.split(key, 4)
    return {
        "q": {
            a_name: jax.random.normal(k[0], (D_IN, R)),
            b_name: jax.random.normal(k[1], (R, D_OUT)),
        },
        "norm": {"scale": jnp.ones(D_OUT), "bias": jnp.zeros(D_OUT)},
        "head": {"kernel": jax.random.normal(k[3], (D_OUT, 3))},
    }


def grads_for(tree, n, seed=1):
    keys = jax.random.split(jax.random.key(seed), n)
    return [jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape), tree) for k in keys]


def peft_model(r=R, alpha=4):
    import torch
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(D_IN, D_OUT)
            self.v = torch.nn.Linear(D_IN, D_OUT)
            self.norm = torch.nn.LayerNorm(D_OUT)

        def forward(self, x):
            return self.norm(self.q(x) + self.v(x))

    torch.manual_seed(0)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q", "v"], modules_to_save=["norm"],
                        init_lora_weights="gaussian")
    return get_peft_model(Net(), config)


def ours_of(name):
    """PEFT parameter name -> path in our tree (and whether it is transposed)."""
    parts = name.split(".")
    if "lora_A" in parts or "lora_B" in parts:
        layer = parts[parts.index("lora_A" if "lora_A" in parts else "lora_B") - 1]
        return (layer, "lora_A" if "lora_A" in parts else "lora_B"), True
    return ("norm", "scale" if parts[-1] == "weight" else "bias"), False


def run_torch(model, opt, grads):
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or "lora_A" in n]
    for g in grads:
        for n, p in named:
            (a, b), t = ours_of(n)
            value = np.asarray(g[a][b])
            p.grad = torch.tensor(value.T.copy() if t else value) if p.requires_grad else None
        opt.step()
    return {n: p.detach().numpy() for n, p in named}


def tree_of(model):
    tree = {}
    for n, p in model.named_parameters():
        if p.requires_grad or "lora_A" in n:
            (a, b), t = ours_of(n)
            value = p.detach().numpy()
            tree.setdefault(a, {})[b] = jnp.asarray(value.T.copy() if t else value)
    return tree


@pytest.mark.skipif(not HAVE_PEFT, reason="needs the `compare` extra (torch, peft)")
def test_loraplus_parity_with_peft():
    import torch
    from peft.optimizers import create_loraplus_optimizer

    model = peft_model()
    params = tree_of(model)
    grads = grads_for(params, 4)
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=4.0,
                                    loraplus_weight_decay=0.1)
    reference = run_torch(model, opt, grads)
    ours, _ = run_steps(lr.loraplus_adamw(1e-2, ratio=4.0, weight_decay=0.1), params, grads)
    for name, value in reference.items():
        (a, b), t = ours_of(name)
        mine = np.asarray(ours[a][b])
        np.testing.assert_allclose(mine.T if t else mine, value, atol=1e-5)


@pytest.mark.skipif(not HAVE_PEFT, reason="needs the `compare` extra (torch, peft)")
def test_lorafa_parity_with_peft(monkeypatch):
    import peft.optimizers.lorafa as peft_lorafa
    from peft.optimizers import create_lorafa_optimizer

    # PEFT projects under bf16 autocast whenever bf16 exists (CPUs included): compare in fp32
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    model = peft_model(alpha=4)
    opt = create_lorafa_optimizer(model, r=R, lora_alpha=4, lr=1e-2, weight_decay=0.1)
    params = tree_of(model)
    grads = grads_for(params, 4)
    reference = run_torch(model, opt, grads)
    ours, _ = run_steps(lr.lorafa_adamw(1e-2, scaling=4 / R, weight_decay=0.1), params, grads)
    for name, value in reference.items():
        (a, b), t = ours_of(name)
        mine = np.asarray(ours[a][b])
        np.testing.assert_allclose(mine.T if t else mine, value, atol=1e-5)
    np.testing.assert_array_equal(ours["q"]["lora_A"], params["q"]["lora_A"])  # A frozen


def test_loraplus_rule(key):
    params = adapter(key)
    groups = loraplus_groups(params)
    assert groups["q"] == {"A": "a", "B": "b"} and groups["norm"] == {"scale": "b", "bias": "b"}
    assert groups["head"]["kernel"] == "a"
    g = grads_for(params, 1)[0]
    sgd = optax.chain(scale_by_loraplus(4.0), optax.scale(-0.1))
    u, _ = sgd.update(g, sgd.init(g))
    np.testing.assert_allclose(u["q"]["B"], -0.4 * g["q"]["B"], rtol=1e-6)
    np.testing.assert_allclose(u["q"]["A"], -0.1 * g["q"]["A"], rtol=1e-6)
    same = {"q": {"A": jnp.ones((D_IN, R)), "B": jnp.ones((R, D_OUT))}}
    tx = lr.loraplus_adamw(0.1, ratio=4.0)
    u, _ = tx.update(same, tx.init(same), same)  # first Adam step: ±1 per element
    np.testing.assert_allclose(jnp.abs(u["q"]["B"]), 0.4, rtol=1e-5)
    np.testing.assert_allclose(jnp.abs(u["q"]["A"]), 0.1, rtol=1e-5)
    emb = loraplus_groups({"embed": {"B": jnp.ones((2, 3))}}, embedding_pattern="embed")
    assert emb["embed"]["B"] == "embedding"


def test_lorafa_is_the_least_squares_projection(key):
    k1, k2 = jax.random.split(key)
    a, g_full, s = jax.random.normal(k1, (D_IN, R)), jax.random.normal(k2, (D_IN, D_OUT)), 2.0
    g_b = s * a.T @ g_full  # ∂L/∂B for W' = W + s A B
    induced = s * a @ lorafa_precondition(g_b, a, s)
    np.testing.assert_allclose(induced, a @ np.linalg.pinv(a) @ g_full, atol=1e-4)
    # orthonormal A columns and s = 1: LoRA-FA is AdamW on B
    q = jnp.linalg.qr(a)[0]
    params = {"q": {"A": q, "B": jnp.zeros((R, D_OUT))}}
    grads = grads_for(params, 3)
    ours, _ = run_steps(lr.lorafa_adamw(1e-2), params, grads)
    plain, _ = run_steps(lr.adamw_hf(1e-2), params["q"]["B"], [g["q"]["B"] for g in grads])
    np.testing.assert_allclose(ours["q"]["B"], plain, atol=1e-5)


def test_lorafa_reads_a_frozen_a_from_adapters(key, tmp_path):
    base = {"layers": {"q_proj": {"kernel": jax.random.normal(key, (2, D_IN, D_OUT))}}}
    _, adapters = reparam.lora(rank=R, alpha=4, train_a=False).init(key, base)
    scaling = {site.path: site.method.scale for site in adapters.sites}
    tx = lr.lorafa_adamw(1e-2, scaling=scaling)
    state = tx.init(adapters.trainable)
    grads = grads_for(adapters.trainable, 2)
    step = jax.jit(lambda g, s, p, f: tx.update(g, s, p, frozen=f))
    for g in grads:
        updates, state = step(g, state, adapters.trainable, adapters.frozen)
    assert updates["layers/q_proj/kernel"]["B"].shape == (2, R, D_OUT)
    restored = orbax_roundtrip(state, tmp_path)
    assert_same_types(restored, state)
    with pytest.raises(ValueError, match="layers/q_proj/kernel/A"):
        tx.update(grads[0], state, adapters.trainable)  # frozen= missing
    with pytest.raises(ValueError, match="no scaling"):
        lr.lorafa_adamw(1e-2, scaling={"other": 1.0}).update(
            grads[0], state, adapters.trainable, frozen=adapters.frozen
        )


def test_allora_multiplies_rows_by_their_coefficient(key):
    p = jnp.stack([jnp.zeros(4), jnp.full(4, 0.5), jnp.arange(4.0)], axis=-1)  # (in=4, r=3)
    norms = np.linalg.norm(np.asarray(p), axis=0)
    c = np.asarray(allora_coefficients(p, 2.0))[0]
    np.testing.assert_allclose(c, 1 / np.sqrt(norms + 0.25), rtol=1e-6)
    assert c[0] == pytest.approx(2.0)  # zero row: c = η
    tiny = allora_coefficients(jnp.full((4, 1), 1e-9), 3.0)
    assert float(tiny[0, 0]) == pytest.approx(3.0, rel=1e-4)
    params = {"lora_a": p, "other": jnp.ones(3)}
    u, _ = scale_by_allora(2.0).update({"lora_a": jnp.ones((4, 3)), "other": jnp.ones(3)},
                                       optax.EmptyState(), params)
    np.testing.assert_allclose(u["lora_a"], np.broadcast_to(c, (4, 3)), rtol=1e-6)
    np.testing.assert_array_equal(u["other"], 1.0)


def test_memory_jit_and_roundtrip(key, tmp_path):
    params = adapter(key)
    for tx, expected in [
        (lr.loraplus_adamw(1e-2), memory.adamw_bytes(params)),
        (lr.allora_adamw(1e-2), memory.adamw_bytes(params)),
        (lr.lorafa_adamw(1e-2), memory.lorafa_bytes(params)),
    ]:
        assert memory.state_bytes(tx, params, scalars=False) == expected
        _, state = run_steps(tx, params, grads_for(params, 2))
        assert_same_types(orbax_roundtrip(state, tmp_path / str(id(tx))), state)
    # LoRA-FA: no moments for A
    assert memory.lorafa_bytes(params) == memory.adamw_bytes(params) - 2 * 4 * D_IN * R


def test_bad_inputs(key):
    with pytest.raises(ValueError, match="ratio"):
        scale_by_loraplus(0.0)
    with pytest.raises(ValueError, match="eta"):
        scale_by_allora(-1.0)
    with pytest.raises(ValueError, match="no LoRA factor"):
        scale_by_allora().update({"w": jnp.ones(3)}, optax.EmptyState(), {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="no B factor"):
        lorafa(optax.sgd(1.0)).init({"w": jnp.ones((3, 3))})
    with pytest.raises(ValueError, match="delta"):
        lorafa(optax.sgd(1.0), delta=-1.0)
