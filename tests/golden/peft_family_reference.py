"""PEFT runs of AdaLoRA, RandLoRA and MiSS on a two-layer toy, for the wave-2 parity tests.

Each ``run_*`` function builds the toy (``q_proj: Linear(6, 5)`` with a bias, ``v_proj:
Linear(6, 7)`` without), wraps it with PEFT, moves the adapter weights away from their init where
the method starts as a no-op, and returns plain NumPy arrays in PyTorch layout: the base weights,
every adapter tensor PEFT holds, the inputs and the outputs (and, for AdaLoRA, the whole training
trajectory). Requires torch and peft (the ``compare`` extra); ``make_golden_peft_family`` writes
them to ``peft_family.npz`` for CI without torch.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

SHAPES = {"q_proj": (6, 5), "v_proj": (6, 7)}  # (in, out)
BLOCK_SHAPES = {"q_proj": (6, 4), "v_proj": (6, 8)}  # for MiSS mini and bat (r | in, out)
X = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
Y = np.random.default_rng(1).standard_normal((4, 12)).astype(np.float32)

# AdaLoRA: init_r 4 -> target_r 2 over 12 steps; masking every 2 steps; 3 final steps.
ADALORA = dict(
    init_r=4,
    target_r=2,
    lora_alpha=8,
    tinit=2,
    tfinal=3,
    deltaT=2,
    total_step=12,
    beta1=0.85,
    beta2=0.85,
    orth_reg_weight=0.5,
)
ADALORA_LR = 0.5


def _toy(shapes: dict = SHAPES):
    import torch

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q_proj = torch.nn.Linear(*shapes["q_proj"])
            self.v_proj = torch.nn.Linear(*shapes["v_proj"], bias=False)

        def forward(self, x, y=None):
            out = torch.cat([self.q_proj(x), self.v_proj(x)], -1)
            if y is None:
                return out
            # An object with .loss: AdaLoraModel.forward adds its orthogonality term to it.
            return SimpleNamespace(loss=((out - y) ** 2).mean(), logits=out)

    return Toy()


def _base(model) -> dict:
    out = {}
    for name in SHAPES:
        layer = getattr(model, name)
        layer = getattr(layer, "base_layer", layer)
        out[f"{name}/weight"] = layer.weight.detach().numpy().copy()
        if layer.bias is not None:
            out[f"{name}/bias"] = layer.bias.detach().numpy().copy()
    return out


def _adapter(model, prefix: str) -> dict:
    out = {}
    for key, value in model.state_dict().items():
        module = next((n for n in SHAPES if f".{n}." in key), None)
        if prefix in key and module is not None:
            field = key.split(f".{module}.")[1].replace(".default", "")
            out[f"{module}/{field}"] = value.detach().float().numpy().copy()
    return out


def run_adalora() -> dict:
    """AdaLoRA trained with SGD for ``total_step + 1`` steps (PEFT's documented call order:
    backward, optimizer step, ``update_and_allocate(step)``, zero_grad); the loss includes the
    orthogonality regulariser. Returns the initial tensors and the tensors after every step."""
    import peft
    import torch

    base = _toy()
    out = {f"base/{k}": v for k, v in _base(base).items()}
    config = peft.AdaLoraConfig(target_modules=list(SHAPES), **ADALORA)
    model = peft.get_peft_model(base, config)
    out.update({f"init/{k}": v for k, v in _adapter(model, "lora_").items()})
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=ADALORA_LR)
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    allocator = model.base_model.rankallocator
    for step in range(ADALORA["total_step"] + 1):
        budget, mask = allocator.budget_schedule(step)
        out[f"budget/{step}"] = np.array([budget, int(mask)], np.int32)
        loss = model.base_model(x, y).loss
        loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
        out[f"loss/{step}"] = np.float32(loss.item())
        out.update({f"step{step}/{k}": v for k, v in _adapter(model, "lora_").items()})
    _perturb(model, "lora_")
    out.update({f"moved/{k}": v for k, v in _adapter(model, "lora_").items()})
    with torch.no_grad():
        out["moved/output"] = model.base_model(x).numpy().copy()
    return out


def _perturb(model, prefix: str, scale: float = 0.3) -> None:
    """Moves every trainable adapter tensor by ``scale·N(0, 1)`` (seeded, in name order)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if prefix in name and p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


RANDLORA = dict(r=2, randlora_alpha=5.0)  # N = ceil(min(in, out) / r) = 3 for both layers


def run_randlora() -> dict:
    """RandLoRA with moved ``λ``, ``γ``: PEFT's bases (as sliced per layer), scalings, output."""
    import peft
    import torch

    base = _toy()
    out = {f"base/{k}": v for k, v in _base(base).items()}
    config = peft.RandLoraConfig(target_modules=list(SHAPES), **RANDLORA)
    model = peft.get_peft_model(base, config)
    _perturb(model, "randlora_")
    out.update({f"moved/{k}": v for k, v in _adapter(model, "randlora_").items()})
    with torch.no_grad():
        out["moved/output"] = model(torch.from_numpy(X)).numpy().copy()
    return out


# MiSS: balance with a ragged tail (6 % 4), mini (mini_r 2 | out), bat (2 | in, out).
MISS = {
    "balance": (SHAPES, dict(r=4)),
    "mini": (BLOCK_SHAPES, dict(r=4, init_weights="mini", mini_r=2)),
    "bat": (BLOCK_SHAPES, dict(r=2, init_weights="bat")),
}


def run_miss() -> dict:
    """Each MiSS mode with a moved ``miss_block``: the output, and the merged weights."""
    import peft
    import torch

    out = {}
    for case, (shapes, options) in MISS.items():
        base = _toy(shapes)
        out.update({f"{case}/base/{k}": v for k, v in _base(base).items()})
        model = peft.get_peft_model(base, peft.MissConfig(target_modules=list(SHAPES), **options))
        _perturb(model, "miss_", scale=0.1)
        out.update({f"{case}/moved/{k}": v for k, v in _adapter(model, "miss_").items()})
        with torch.no_grad():
            out[f"{case}/moved/output"] = model(torch.from_numpy(X)).numpy().copy()
            model.merge_adapter()
            out.update({f"{case}/merged/{k}": v for k, v in _base(model.base_model.model).items()})
    return out
