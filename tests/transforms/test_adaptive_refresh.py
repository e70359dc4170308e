"""Q-GaLore's lazy refresh as a galore option: per-matrix gaps that double, fewer SVDs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax.optimizers import galore_adamw
from lowrank_jax.projection import Projector
from lowrank_jax.transforms import AdaptiveRefresh, galore, svd_count
from lowrank_jax.transforms._adaptive import init_state, refresh_leaf
from tests.helpers import run_steps

STABLE = AdaptiveRefresh(threshold=0.4, queue_size=2)


def test_a_stable_subspace_doubles_the_gap_and_changes_nothing_else(key):
    params = {"w": jax.random.normal(key, (12, 20))}
    grads = [params] * 20  # the same gradient: every refresh finds the same basis
    plain = galore_adamw(1e-2, rank=3, update_proj_gap=1)
    lazy = galore_adamw(1e-2, rank=3, update_proj_gap=1, adaptive_refresh=STABLE)
    traces = []

    @jax.jit
    def step(params, state, g):
        traces.append(1)
        updates, state = lazy.update(g, state, params)
        return optax.apply_updates(params, updates), state

    out, state = params, lazy.init(params)
    for g in grads:
        out, state = step(out, state, g)
    assert len(traces) == 1
    # refreshes at 0, 1, 2 (FIFO full: gap 2), 4 (gap 4), 8 (gap 8), 16 (gap 16)
    assert svd_count(state) == 6
    assert int(state[0].refresh_state["w"].gap) == 16
    expected, plain_state = run_steps(plain, params, grads)
    np.testing.assert_allclose(out["w"], expected["w"], rtol=1e-5, atol=1e-6)
    assert plain_state[0].refresh_state is None  # the default keeps no such state


def test_gaps_are_per_matrix(key):
    params = {"w": jax.random.normal(key, (2, 64, 96))}
    noise = jax.random.split(jax.random.key(1), 8)
    # matrix 0 sees a fixed gradient, matrix 1 fresh noise every step
    grads = [{"w": params["w"].at[1].set(jax.random.normal(k, (64, 96)))} for k in noise]
    tx = galore(optax.scale_by_adam(), rank=3, update_proj_gap=1, adaptive_refresh=STABLE)
    _, state = run_steps(tx, params, grads)
    counts = np.asarray(state.refresh_state["w"].svd_count)
    gaps = np.asarray(state.refresh_state["w"].gap)
    assert counts[1] == 8 and gaps[1] == 1  # unrelated bases: cos ~ 0 < 0.4
    assert counts[0] == 4 and gaps[0] == 4  # refreshes at 0, 1, 2 (gap 2), 4 (gap 4)
    assert svd_count(state) == 12


@pytest.mark.parametrize("sign_invariant", [False, True])
def test_signed_cosine_blocks_doubling_on_a_sign_flip(sign_invariant):
    basis = jnp.eye(6, 2)
    config = AdaptiveRefresh(threshold=0.4, queue_size=2, sign_invariant=sign_invariant)
    state = init_state((), 1, config)
    proj = Projector(basis, None)
    for t in range(3):
        flipped = lambda g, old, key, t=t: Projector((-1.0) ** t * basis, None)
        key_of = lambda m: jax.random.key(0)
        proj, state, due = refresh_leaf(
            (), jnp.ones((6, 5)), proj, state, jnp.int32(t), key_of, flipped, config
        )
        assert bool(due)
    # sims -1, -1 (Q-GaLore's signed cosine) or 1, 1 (|cos|): doubling only in the second case
    assert int(state.gap) == (2 if sign_invariant else 1)
    np.testing.assert_allclose(state.similarities, [1.0, 1.0] if sign_invariant else [-1.0, -1.0])
    assert int(state.svd_count) == 3


def test_bad_configurations():
    with pytest.raises(ValueError, match="on_refresh='keep'"):
        galore(optax.scale_by_adam(), rank=2, on_refresh="reset", adaptive_refresh=STABLE)
    with pytest.raises(ValueError, match="queue_size"):
        galore(optax.scale_by_adam(), rank=2, adaptive_refresh=AdaptiveRefresh(queue_size=0))
    with pytest.raises(TypeError, match="AdaptiveRefresh"):
        galore(optax.scale_by_adam(), rank=2, adaptive_refresh={"threshold": 0.4})
