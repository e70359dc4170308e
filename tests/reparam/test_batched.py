"""Batched heterogeneous adapters: one forward with an adapter per row equals running each
adapter separately; no retrace on switching; PEFT mixed-batch parity; errors; round trip."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from lowrank_jax import reparam as R

from .conftest import ZEROS, filled, normal


class Net(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.q_proj = nnx.Linear(16, 16, rngs=rngs, **ZEROS)
        self.v_proj = nnx.Linear(16, 32, use_bias=False, rngs=rngs, **ZEROS)

    def __call__(self, x):
        return self.v_proj(jnp.tanh(self.q_proj(x)))


def setup(ranks=(2, 4, 8)):
    model = filled(Net(), seed=1)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    adapters = {}
    for k, r in enumerate(ranks):
        _, ad = R.lora(rank=r, alpha=3 * r).init(jax.random.key(k), params)
        leaves, treedef = jax.tree.flatten(ad.trainable)
        moved = [x + normal(10 * k + i, x.shape, 0.3) for i, x in enumerate(leaves)]
        adapters[f"task{k}"] = ad.replace(trainable=jax.tree.unflatten(treedef, moved))
    return model, params, adapters


def run(params, x):
    model = filled(Net(), seed=1)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model(x)


@nnx.jit
def forward(model, x, ids):
    with R.use_adapters(ids):
        return model(x)


def test_one_forward_equals_each_adapter_separately():
    model, params, adapters = setup()
    bank = R.adapter_bank(adapters)
    assert bank.rank == 8 and bank.a["q_proj/kernel"].shape == (4, 16, 8)
    served = R.wrap_batched(model, bank)
    names = ["task2", "__base__", "task0", "task1", "task2", None]
    x = normal(5, (6, 7, 16))
    got = forward(served, x, bank.ids(names))
    for j, name in enumerate(names):
        p = params if name in (None, "__base__") else R.apply(params, adapters[name])
        np.testing.assert_allclose(got[j], run(p, x[j]), atol=2e-5)


def test_switching_adapters_does_not_retrace():
    model, _, adapters = setup()
    bank = R.adapter_bank(adapters)
    served = R.wrap_batched(model, bank)
    traces = []

    @nnx.jit
    def step(model, x, ids):
        traces.append(1)
        with R.use_adapters(ids):
            return model(x)

    x = normal(5, (3, 4, 16))
    a = step(served, x, bank.ids(["task0", "task1", "task2"]))
    b = step(served, x, bank.ids(["task2", "task2", "__base__"]))
    assert len(traces) == 1 and not np.allclose(a, b)


def test_the_kernel_path_in_interpret_mode():
    model, params, adapters = setup()
    served = R.wrap_batched(model, R.adapter_bank(adapters), mode="interpret")
    x = normal(6, (3, 2, 16))
    bank = R.adapter_bank(adapters)
    got = forward(served, x, bank.ids(["task1", "__base__", "task2"]))
    np.testing.assert_allclose(got[0], run(R.apply(params, adapters["task1"]), x[0]), atol=2e-5)
    np.testing.assert_allclose(got[1], run(params, x[1]), atol=2e-5)


def test_bank_round_trips_through_orbax(tmp_path):
    _, _, adapters = setup()
    bank = R.adapter_bank(adapters)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "bank", bank)
    with ocp.StandardCheckpointer() as ckpt:
        back = ckpt.restore(tmp_path / "bank", bank)
    assert isinstance(back, R.AdapterBank) and back.names == bank.names
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(bank)):
        np.testing.assert_array_equal(x, y)


def test_bad_inputs_name_the_problem():
    model, params, adapters = setup()
    bank = R.adapter_bank(adapters)
    served = R.wrap_batched(model, bank)
    x = normal(5, (2, 3, 16))
    with pytest.raises(ValueError, match="inside reparam.use_adapters"):
        served(x)
    with pytest.raises(ValueError, match="ids of shape \\(3,\\) for a batch of 2 rows"):
        with R.use_adapters(bank.ids(["task0"] * 3)):
            served(x)
    with pytest.raises(ValueError, match="no adapter named 'task9'"):
        bank.ids(["task9"])
    with pytest.raises(ValueError, match="rank=4 is below the largest adapter rank 8"):
        R.adapter_bank(adapters, rank=4)
    stacked = {"w": jnp.zeros((2, 8, 8))}
    with pytest.raises(ValueError, match="leaf 'w' has shape \\(2, 8, 8\\)"):
        R.adapter_bank([R.lora(rank=2).init(jax.random.key(0), stacked)[1]])
    other = {"q_proj": {"kernel": jnp.zeros((16, 16))}, "k_proj": {"kernel": jnp.zeros((16, 8))}}
    _, ad = R.lora(rank=2, targets="k_proj").init(jax.random.key(0), other)
    with pytest.raises(ValueError, match="no nnx.Linear at \\['k_proj/kernel'\\]"):
        R.wrap_batched(setup()[0], R.adapter_bank([ad]))


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "peft")),
    reason="PEFT parity needs torch and peft: pip install '.[compare]'",
)
def test_matches_peft_mixed_batch_inference():
    import torch
    from peft import LoraConfig, get_peft_model

    model, params, adapters = setup(ranks=(2, 4))

    class Torch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(16, 16)
            self.v_proj = torch.nn.Linear(16, 32, bias=False)

        def forward(self, x):
            return self.v_proj(torch.tanh(self.q_proj(x)))

    net = Torch()
    with torch.no_grad():
        net.q_proj.weight.copy_(torch.from_numpy(np.asarray(params["q_proj"]["kernel"]).T.copy()))
        net.q_proj.bias.copy_(torch.from_numpy(np.asarray(params["q_proj"]["bias"]).copy()))
        net.v_proj.weight.copy_(torch.from_numpy(np.asarray(params["v_proj"]["kernel"]).T.copy()))
    peft_model = None
    for name, ad in adapters.items():
        r = ad.sites[0].method.rank
        config = LoraConfig(r=r, lora_alpha=3 * r, target_modules=["q_proj", "v_proj"])
        if peft_model is None:
            peft_model = get_peft_model(net, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        with torch.no_grad():
            for module in ("q_proj", "v_proj"):
                layer = getattr(peft_model.base_model.model, module)
                t = ad.trainable[f"{module}/kernel"]
                layer.lora_A[name].weight.copy_(torch.from_numpy(np.asarray(t["A"]).T.copy()))
                layer.lora_B[name].weight.copy_(torch.from_numpy(np.asarray(t["B"]).T.copy()))
    peft_model.eval()
    names = ["task1", "__base__", "task0", "task1"]
    x = normal(8, (4, 3, 16))
    with torch.no_grad():
        want = peft_model(torch.from_numpy(np.asarray(x).copy()), adapter_names=names).numpy()
    bank = R.adapter_bank(adapters)
    got = forward(R.wrap_batched(model, bank), x, bank.ids(names))
    np.testing.assert_allclose(got, want, atol=1e-5)
