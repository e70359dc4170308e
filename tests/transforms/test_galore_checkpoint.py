"""GaLore states save with orbax and resume identically."""

import jax
import optax
import pytest

import lowrank_jax as lr
from tests.helpers import (
    assert_same_types,
    assert_trees_equal,
    grad_stream,
    make_params,
    orbax_roundtrip,
    run_steps,
)


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: lr.galore_adamw(1e-2, rank=4, update_proj_gap=3),
        lambda: lr.galore_adamw(1e-2, rank=4, update_proj_gap=3, basis="randomized",
                                on_refresh="reproject"),
        lambda: lr.galore_adafactor(1e-2, rank=4, update_proj_gap=3, beta1=0.9),
        lambda: lr.galore(optax.adam(1e-2), rank=4, update_proj_gap=3, proj_type="full"),
    ],
    ids=["adamw", "randomized-reproject", "adafactor", "full-optax-adam"],
)
def test_orbax_roundtrip_mid_run_continues_identically(key, tmp_path, make_tx):
    tx = make_tx()
    params = {**make_params(key), "stacked": {"kernel": jax.random.normal(key, (2, 8, 12))}}
    grads = grad_stream(params, 7)
    straight, _ = run_steps(tx, params, grads)

    mid_params, mid_state = run_steps(tx, params, grads[:4])
    restored = orbax_roundtrip(mid_state, tmp_path)
    assert_same_types(restored, mid_state)
    resumed, _ = run_steps(tx, mid_params, grads[4:], state=restored)
    assert_trees_equal(resumed, straight)
