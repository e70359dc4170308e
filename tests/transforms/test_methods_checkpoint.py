"""Fira, APOLLO, 8-bit, LISA/OwLore and lazy-refresh states round-trip orbax and resume exactly."""

import jax
import optax
import pytest

from lowrank_jax.optimizers import (
    apollo_adamw,
    fira_adamw,
    galore_adamw,
    galore_adamw_8bit,
    lisa_adamw,
    owlore_adamw,
)
from lowrank_jax.transforms import AdaptiveRefresh
from tests.helpers import (
    assert_same_types,
    assert_trees_equal,
    grad_stream,
    grads_for,
    model,
    orbax_roundtrip,
)

METHODS = {
    "fira": lambda: fira_adamw(1e-2, rank=4, update_proj_gap=3, scale=0.25),
    "apollo": lambda: apollo_adamw(1e-2, rank=4, update_proj_gap=3),
    # 8-bit moments in the low-rank space and (embedding) at full shape
    "galore-8bit": lambda: galore_adamw_8bit(1e-2, rank=4, update_proj_gap=3, min_8bit_size=64),
    "galore-lazy": lambda: galore_adamw(
        1e-2, rank=4, update_proj_gap=1, adaptive_refresh=AdaptiveRefresh(queue_size=1)
    ),
    "lisa": lambda: lisa_adamw(1e-2, n_active=2, interval=2),
    "owlore": lambda: owlore_adamw(1e-2, probs=[1, 2, 3, 4], n_active=2, interval=2, rank=2),
}


def check_resume(tx, params, grads, split, directory):
    """Run straight through; run to ``split``, save, restore, finish: identical weights."""
    step = jax.jit(
        lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p))
    )

    def run(params, state, grads):
        for g in grads:
            params, state = step(params, state, g)
        return params, state

    straight, _ = run(params, tx.init(params), grads)
    mid_params, mid_state = run(params, tx.init(params), grads[:split])
    restored = orbax_roundtrip(mid_state, directory)
    assert_same_types(restored, mid_state)
    resumed, _ = run(mid_params, restored, grads[split:])
    assert_trees_equal(resumed, straight)


@pytest.mark.parametrize("name", [n for n in METHODS if n not in ("lisa", "owlore")])
def test_projected_and_quantized_states(key, tmp_path, name):
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "mlp": {"kernel": jax.random.normal(k1, (12, 40))},
        "stacked": {"kernel": jax.random.normal(k2, (2, 8, 12))},
        "embed": {"embedding": jax.random.normal(k3, (50, 16))},  # untargeted, full-size state
    }
    check_resume(METHODS[name](), params, grad_stream(params, 6), 4, tmp_path)


@pytest.mark.parametrize("name", ["lisa", "owlore"])
def test_layer_sampling_resumes_with_the_same_layers(key, tmp_path, name):
    params = model(key)
    check_resume(METHODS[name](), params, grads_for(params, 5), 3, tmp_path)
