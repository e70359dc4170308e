"""Fira, LISA, OwLore, APOLLO(-Mini) and the 8-bit optimizers are in the trainer's registry."""

import numpy as np
import pytest

from lowrank_jax.train import registry

NAMES = [
    "fira",
    "apollo",
    "apollo_mini",
    "adamw_8bit",
    "galore_adamw_8bit",
    "lisa",
    "owlore",
    "galore2",
    "golore",
    "flora",
    "badam",
    "q_galore",
    "gradnorm_lorp",
]
PARAMS = {
    "layers": {str(i): {"w": np.full((8, 6), 0.1 * (i + 1), np.float32)} for i in range(4)},
    "embed": {"embedding": np.ones((10, 6), np.float32)},
}


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_buildable(name):
    entry = registry.get_optimizer(name)
    assert entry.help.startswith("lowrank_jax.")
    extra = {"probs": [1.0, 2.0, 3.0, 4.0], "n_active": 2} if name == "owlore" else {}
    if name == "q_galore":  # a 6 x 2 projector is not a whole number of 256-groups
        extra = {"proj_group_size": 4}
    tx = registry.build_optimizer(name, registry.OptimizerArgs(1e-3, rank=2, extra=extra))
    updates, _ = tx.update(PARAMS, tx.init(PARAMS), PARAMS)
    assert updates["layers"]["0"]["w"].shape == (8, 6)


def test_owlore_asks_for_its_probabilities():
    with pytest.raises(ValueError, match="probs"):
        registry.build_optimizer("owlore", registry.OptimizerArgs(1e-3))


def test_apollo_does_not_take_galores_scale():
    """--scale is GaLore's alpha (default 0.25); APOLLO's scale multiplies by sqrt(scale)."""
    args = registry.OptimizerArgs(1e-3, rank=2, scale=0.25)
    default = registry.build_optimizer("apollo", args)
    explicit = registry.build_optimizer("apollo", registry.OptimizerArgs(1e-3, rank=2, scale=9.0))
    grads = {k: v for k, v in PARAMS.items()}
    a, _ = default.update(grads, default.init(PARAMS), PARAMS)
    b, _ = explicit.update(grads, explicit.init(PARAMS), PARAMS)
    np.testing.assert_array_equal(a["layers"]["1"]["w"], b["layers"]["1"]["w"])
