"""PEFT parity and interop (torch, CPU): the same weights give the same outputs, both ways.

Needs the ``compare`` extra (torch, peft); skipped without it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from lowrank_jax import reparam as R

from .conftest import ZEROS, normal, perturb

torch = pytest.importorskip("torch", reason="PEFT parity needs torch: pip install '.[compare]'")
peft = pytest.importorskip("peft", reason="PEFT parity needs peft: pip install '.[compare]'")


class Torch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = torch.nn.Linear(6, 5)
        self.v_proj = torch.nn.Linear(6, 7, bias=False)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.v_proj(x)], -1)


class Flax(nnx.Module):
    def __init__(self, params):
        rngs = nnx.Rngs(0)
        self.q_proj = nnx.Linear(6, 5, rngs=rngs, **ZEROS)
        self.v_proj = nnx.Linear(6, 7, use_bias=False, rngs=rngs, **ZEROS)
        state = nnx.state(self, nnx.Param)
        nnx.replace_by_pure_dict(state, params)
        nnx.update(self, state)

    def __call__(self, x):
        return jnp.concatenate([self.q_proj(x), self.v_proj(x)], -1)


def jax_params(model):
    q, v = model.q_proj, model.v_proj
    return {
        "q_proj": {
            "kernel": jnp.asarray(q.weight.detach().numpy().T),
            "bias": jnp.asarray(q.bias.detach().numpy()),
        },
        "v_proj": {"kernel": jnp.asarray(v.weight.detach().numpy().T)},
    }


def forward(params, x):
    return jnp.concatenate(
        [x @ params["q_proj"]["kernel"] + params["q_proj"]["bias"], x @ params["v_proj"]["kernel"]],
        -1,
    )


X = np.array(normal(1, (4, 6)))
CONFIGS = {
    "lora": dict(r=2, lora_alpha=5, rank_pattern={"v_proj": 3}, alpha_pattern={"q_proj": 3}),
    "rslora": dict(r=3, lora_alpha=4, use_rslora=True),
    "dora": dict(r=2, lora_alpha=4, use_dora=True, rank_pattern={"v_proj": 3}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_adapter_loads_and_matches(name, tmp_path):
    base = Torch()
    params = jax_params(base)
    base_out = base(torch.from_numpy(X)).detach().numpy()
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], **CONFIGS[name])
    model = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:  # move B (and the magnitude) away from their init
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.eval()
    want = model(torch.from_numpy(X)).detach().numpy()
    model.save_pretrained(tmp_path)
    adapters = R.from_peft(str(tmp_path), params)
    assert {s.path for s in adapters.sites} == {"q_proj/kernel", "v_proj/kernel"}
    np.testing.assert_allclose(forward(R.apply(params, adapters), X), want, atol=1e-5)
    np.testing.assert_allclose(R.wrap(Flax(params), adapters)(X), want, atol=1e-5)
    assert np.abs(want - base_out).max() > 1e-2  # the adapter does something
    # And back to PEFT: the same tensors under the same keys.
    R.to_peft(str(tmp_path / "again"), adapters)
    original = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    again = safetensors.numpy.load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert again.keys() == original.keys()
    for k in original:
        np.testing.assert_allclose(again[k], original[k], atol=1e-7)


@pytest.mark.parametrize(
    "make", [lambda: R.lora(2, 5, rank_pattern={"v_proj": 3}), lambda: R.dora(2, 3, rslora=True)]
)
def test_jax_adapter_loads_in_peft_and_matches(make, tmp_path, key):
    base = Torch()
    params = jax_params(base)
    _, adapters = make().init(key, params)
    adapters = perturb(adapters)
    R.to_peft(str(tmp_path), adapters)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path))
    model.eval()
    got = model(torch.from_numpy(X)).detach().numpy()
    np.testing.assert_allclose(got, forward(R.apply(params, adapters), X), atol=1e-5)
    again = R.from_peft(str(tmp_path), params)  # and back: the same adapter
    assert again.sites == adapters.sites
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
        again.trainable,
        adapters.trainable,
    )


def test_residual_inits_export_through_to_base_lora(tmp_path, key):
    base = Torch()
    params = jax_params(base)
    res_params, initial = R.pissa(2).init(key, params)
    trained = perturb(initial)
    with pytest.raises(ValueError, match="to_base_lora"):
        R.to_peft(str(tmp_path), trained)
    plain = R.to_base_lora(trained, initial)
    assert plain.trainable["q_proj/kernel"]["A"].shape == (6, 4)  # rank 2r on the original base
    R.to_peft(str(tmp_path), plain)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    got = model(torch.from_numpy(X)).detach().numpy()
    np.testing.assert_allclose(got, forward(R.apply(res_params, trained), X), atol=1e-5)


def test_a_peft_adapter_for_another_model_is_rejected(tmp_path):
    model = peft.get_peft_model(Torch(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    other = {"k_proj": {"kernel": jnp.ones((6, 5))}}
    with pytest.raises(ValueError, match="'q_proj' matches no leaf"):
        R.from_peft(str(tmp_path), other)


def test_scan_stacked_kernels_export_one_module_per_layer(tmp_path, key):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(6, 5, bias=False)

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            return self.blocks[0].q(x) + 2 * self.blocks[1].q(x)

    base = Stack()
    kernel = np.stack([b.q.weight.detach().numpy().T for b in base.blocks])  # [L, in, out]
    params = {"layers": {"q": {"kernel": jnp.asarray(kernel)}}}
    _, adapters = R.dora(2, 4).init(key, params)
    adapters = perturb(adapters)
    name = lambda path, index: f"blocks.{index[0]}.q"
    R.to_peft(str(tmp_path), adapters, module_name=name)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    eff = np.asarray(R.apply(params, adapters)["layers"]["q"]["kernel"])
    np.testing.assert_allclose(
        model(torch.from_numpy(X)).detach().numpy(), X @ eff[0] + 2 * X @ eff[1], atol=1e-5
    )
    again = R.from_peft(str(tmp_path), params, module_name=name)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
        again.trainable,
        adapters.trainable,
    )
    with pytest.raises(ValueError, match="batch axes; pass module_name"):
        R.to_peft(str(tmp_path / "default"), adapters)
