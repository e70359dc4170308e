"""The train step's non-finite guard applied inside the projected core (transforms/_guard).

For every registered optimizer: a finite step through the guard is the unguarded step, and a
non-finite one (a NaN gradient, or a NaN loss with finite gradients) leaves the parameters
and the whole optimizer state exactly as they were, refreshes and counters included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lr
from lowrank_jax.train import registry
from lowrank_jax.transforms import _guard

PARAMS = {
    "layers": {"w": 0.1 * np.arange(2 * 8 * 6, dtype=np.float32).reshape(2, 8, 6) / 96},
    "mlp": {"kernel": np.linspace(-1, 1, 12 * 8, dtype=np.float32).reshape(12, 8)},
    "embed": {"embedding": np.ones((10, 6), np.float32)},
    "norm": {"scale": np.ones((6,), np.float32)},
}
EXTRA = {
    "owlore": {"probs": [1.0, 2.0], "n_active": 1},
    "q_galore": {"proj_group_size": 4},
}
# The methods built on the projected core claim the guard; the rest go into the step's cond.
CORE = {"galore", "fira", "apollo", "apollo_mini", "galore_adamw_8bit", "galore2", "golore",
        "q_galore", "gradnorm_lorp", "owlore"}  # fmt: skip


def _grads(seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), PARAMS)


def _build(name):
    if name == "galore_decay_schedule":  # state outside the core: a schedule's count
        return lr.galore_adamw(optax.linear_schedule(1e-2, 1e-3, 10), rank=2,
                               update_proj_gap=2, weight_decay=0.1)  # fmt: skip
    if name == "galore_lazy":
        return lr.galore_adamw(1e-2, rank=2, update_proj_gap=2,
                               adaptive_refresh=lr.transforms.AdaptiveRefresh())  # fmt: skip
    args = registry.OptimizerArgs(1e-2, rank=2, update_proj_gap=2, extra=EXTRA.get(name, {}))
    return registry.build_optimizer(name, args)


NAMES = [*sorted(registry.available_optimizers()), "galore_decay_schedule", "galore_lazy"]


def _unguarded(tx, grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("name", NAMES)
def test_guarded_steps_equal_unguarded_ones_and_skips_change_nothing(name):
    tx = _build(name)
    guarded = jax.jit(lambda g, s, p, f: _guard.guarded_apply(tx, g, s, p, f))
    plain = jax.jit(lambda g, s, p: _unguarded(tx, g, s, p))
    params = jax.tree.map(jnp.asarray, PARAMS)
    ours = theirs = (params, tx.init(params))
    for step in range(5):  # refreshes at steps 0, 2 and 4 (update_proj_gap=2)
        if step in (1, 3):  # skipped: a NaN gradient, then a NaN loss with finite gradients
            bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _grads(step))
            grads, finite = (bad, False) if step == 1 else (_grads(step), False)
            before = jax.tree.map(np.asarray, ours)
            ours = guarded(grads, ours[1], ours[0], jnp.bool_(finite))
            _same(ours, before)
            continue
        grads = _grads(step)
        ours = guarded(grads, ours[1], ours[0], jnp.bool_(True))
        theirs = plain(grads, theirs[1], theirs[0])
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                       rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("name", ["galore", "galore_adamw_8bit", "fira"])
def test_the_tpus_select_guard_equals_the_cond(name, monkeypatch):
    """On a TPU the untargeted leaves are guarded by a select (kept in place better there):
    the same steps and skips through that branch, taken here on the CPU."""
    monkeypatch.setattr(_guard, "SELECT_PLATFORMS", ("cpu",))
    test_guarded_steps_equal_unguarded_ones_and_skips_change_nothing(name)


@pytest.mark.parametrize("name", NAMES)
def test_the_projected_methods_claim_the_guard(name):
    tx = _build(name)
    params = jax.tree.map(jnp.asarray, PARAMS)
    with _guard.nonfinite_guard(jnp.bool_(True)) as guard:
        jax.eval_shape(lambda: tx.update(_grads(0), tx.init(params), params))
    expected = name in CORE or name.startswith("galore_")
    assert guard.used is expected
    assert _guard.current() is None  # closed after the block


def test_a_nonfinite_step_of_a_stacked_projected_leaf_keeps_its_projector():
    """The refresh is due at step 0; skipped, the identity projectors of init stay."""
    tx = lr.galore_adamw(1e-2, rank=2, update_proj_gap=1)
    params = jax.tree.map(jnp.asarray, PARAMS)
    state = tx.init(params)
    bad = jax.tree.map(lambda g: g * jnp.nan, _grads(0))
    _, after = jax.jit(lambda s: _guard.guarded_apply(tx, bad, s, params, jnp.bool_(False)))(state)
    _same(after, state)


@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_apollo_keeps_the_whole_update_cond_when_lowered_for_a_tpu(name, monkeypatch):
    """APOLLO's full-size update is elementwise: for a TPU the step keeps its cond around the
    whole update (the TPU compiler keeps that in place better); same steps and skips."""
    from lowrank_jax.kernels import _dispatch

    finished = []
    finish = _guard._finish
    monkeypatch.setattr(_guard, "_finish", lambda *a: finished.append(1) or finish(*a))
    tx = _build(name)
    params = jax.tree.map(jnp.asarray, PARAMS)
    trace = lambda: jax.make_jaxpr(
        lambda s: _guard.guarded_apply(tx, _grads(0), s, params, jnp.bool_(True))
    )(tx.init(params))
    trace()
    assert finished  # the core's own guard on the CPU
    finished.clear()
    with _dispatch.compile_for("tpu"):
        trace()
        assert not finished  # the whole-update cond for a TPU
        test_guarded_steps_equal_unguarded_ones_and_skips_change_nothing(name)


@pytest.mark.parametrize("mode", ["interpret", "reference"])
def test_an_update_running_an_in_place_kernel_is_guarded_by_a_cond(mode):
    """The fused 8-bit Adam kernel writes the moments into their own buffers: under a select
    XLA would copy the old moments first, so ``_guard.elementwise`` takes the cond whenever
    the update dispatches a Pallas kernel (the v5e figures are in its docstring); with the
    jnp reference it keeps the platform's choice (a select on TPUs, a cond elsewhere)."""
    import lowrank_jax.kernels as K
    from lowrank_jax.transforms import scale_by_adam_8bit

    params = {"w": jnp.ones((64, 512))}
    tx = scale_by_adam_8bit(min_8bit_size=1)
    state = tx.init(params)

    def guarded(finite):
        guard = _guard.Guard(finite)
        step = lambda: tx.update(params, state, params)
        updates, kept, _ = _guard.elementwise(guard, step, state, then=params)
        return updates, kept

    with K.kernel_mode(mode):
        jaxpr = str(jax.make_jaxpr(guarded)(jnp.bool_(True)))
    assert ("pallas_call" in jaxpr) == (mode == "interpret")
    assert ("platform_index" in jaxpr) == (mode == "reference"), jaxpr[:400]
    assert "cond" in jaxpr
    # the projected leaves' gradients wait for the update, except after a kernel (docstring)
    assert ("optimization_barrier" in jaxpr) == (mode == "reference")
    with K.kernel_mode(mode):  # and a skipped step keeps the state
        updates, kept = jax.jit(guarded)(jnp.bool_(False))
    jax.tree.map(np.testing.assert_array_equal, kept, state)
    assert not np.any(np.asarray(updates["w"]))
