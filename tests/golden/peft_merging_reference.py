"""PEFT's ``add_weighted_adapter`` on fixed LoRA factors: the reference of the merging tests.

``inputs()`` are the source adapters (PEFT layout: ``lora_A`` ``(r, in)``, ``lora_B``
``(out, r)``) on two linear modules; ``run_peft(case, mask_for)`` loads them into a PEFT model,
merges them with the case's settings and returns the merged factors and scaling per module.
DARE draws Bernoulli masks with torch's generator; ``mask_for(module, role, index, shape)``
supplies them instead (the same masks our implementation draws), so DARE is compared exactly.
Used live by ``tests/reparam/test_merging.py`` when torch and peft are installed, and by
``make_golden_merging.py`` to record ``peft_merging.npz`` for CI without them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MODULES = {"q_proj": (6, 5), "v_proj": (6, 7)}  # name -> (in, out)
ADAPTERS = {"s1": (4, 8.0), "s2": (4, 16.0), "s3": (4, 4.0), "s4": (2, 6.0)}  # name -> (r, alpha)

# name -> (adapters, weights, combination_type, options)
CASES = {
    "cat": (("s1", "s2", "s4"), (0.7, -0.4, 1.3), "cat", {}),
    "linear": (("s1", "s2", "s3"), (0.7, -0.4, 1.3), "linear", {}),
    "svd": (("s1", "s2", "s4"), (0.7, -0.4, 1.3), "svd", {}),
    "svd_rank3": (("s1", "s2"), (1.0, 0.5), "svd", {"svd_rank": 3}),
    "svd_clamp": (("s1", "s2"), (1.0, 0.5), "svd", {"svd_clamp": 0.9}),
    "ties": (("s1", "s2", "s3"), (0.7, -0.4, 1.3), "ties", {"density": 0.5}),
    "ties_frequency": (
        ("s1", "s2", "s3"), (0.7, 0.4, 1.3), "ties",
        {"density": 0.7, "majority_sign_method": "frequency"},
    ),
    "ties_svd": (("s1", "s2", "s3"), (0.7, -0.4, 1.3), "ties_svd", {"density": 0.4}),
    "magnitude_prune": (("s1", "s2"), (0.7, 0.6), "magnitude_prune", {"density": 0.3}),
    "magnitude_prune_svd": (("s1", "s2", "s4"), (0.7, 0.6, 1.0), "magnitude_prune_svd",
                            {"density": 0.6}),
    "dare_linear": (("s1", "s2"), (0.7, 0.6), "dare_linear", {"density": 0.5}),
    "dare_ties": (("s1", "s2", "s3"), (0.7, -0.6, 1.0), "dare_ties", {"density": 0.6}),
    "dare_linear_svd": (("s1", "s2"), (0.7, 0.6), "dare_linear_svd", {"density": 0.5}),
    "dare_ties_svd": (("s1", "s3"), (0.7, -0.6), "dare_ties_svd", {"density": 0.6}),
    "single": (("s2",), (0.5,), "svd", {}),
}  # fmt: skip


def inputs() -> dict[str, np.ndarray]:
    """``{"<adapter>/<module>/lora_A": (r, in), ".../lora_B": (out, r)}``, float32."""
    rng = np.random.default_rng(20240901)
    out = {}
    for name, (r, _) in ADAPTERS.items():
        for module, (n_in, n_out) in MODULES.items():
            out[f"{name}/{module}/lora_A"] = rng.standard_normal((r, n_in)).astype(np.float32)
            out[f"{name}/{module}/lora_B"] = rng.standard_normal((n_out, r)).astype(np.float32)
    return out


def roles(combination_type: str) -> tuple[str, ...]:
    """The tensors PEFT prunes per module, in its call order."""
    return ("delta",) if combination_type.endswith("svd") else ("A", "B")


def run_peft(case: str, mask_for: Callable | None = None) -> dict[str, np.ndarray]:
    """``{"<module>/lora_A", "<module>/lora_B", "<module>/scaling"}`` of PEFT's merged adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    names, weights, combination, options = CASES[case]
    arrays = inputs()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for module, (n_in, n_out) in MODULES.items():
                setattr(self, module, torch.nn.Linear(n_in, n_out, bias=False))

        def forward(self, x):
            return torch.cat([getattr(self, m)(x) for m in MODULES], -1)

    model = None
    for name, (r, alpha) in ADAPTERS.items():
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(MODULES), lora_dropout=0.0)
        if model is None:
            model = get_peft_model(Net(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    with torch.no_grad():
        for name in ADAPTERS:
            for module in MODULES:
                layer = getattr(model.base_model.model, module)
                layer.lora_A[name].weight.copy_(torch.from_numpy(arrays[f"{name}/{module}/lora_A"]))
                layer.lora_B[name].weight.copy_(torch.from_numpy(arrays[f"{name}/{module}/lora_B"]))

    queue = []
    if combination.startswith("dare"):
        for module in MODULES:  # named_modules order
            for role in roles(combination):
                for index in range(len(names)):
                    queue.append((module, role, index))
    original = torch.bernoulli

    def bernoulli(p, *args, **kwargs):
        module, role, index = queue.pop(0)
        mask = np.asarray(mask_for(module, role, index, tuple(p.shape)), np.float32)
        assert mask.shape == tuple(p.shape), (module, role, index, mask.shape, p.shape)
        return torch.from_numpy(mask)

    torch.bernoulli = bernoulli
    try:
        model.add_weighted_adapter(list(names), list(weights), "merged", combination, **options)
    finally:
        torch.bernoulli = original
    assert not queue, f"PEFT drew {len(queue)} fewer masks than expected"
    out = {}
    for module in MODULES:
        layer = getattr(model.base_model.model, module)
        out[f"{module}/lora_A"] = layer.lora_A["merged"].weight.detach().numpy().copy()
        out[f"{module}/lora_B"] = layer.lora_B["merged"].weight.detach().numpy().copy()
        out[f"{module}/scaling"] = np.float32(layer.scaling["merged"])
    return out
