"""GaLore behaviour: shapes, refresh schedule, batch axes, modes, composition, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lr
from lowrank_jax import projection
from tests.helpers import grad_stream, make_params
from tests.helpers import run_steps as run


def test_state_is_lowrank_on_the_reference_side(key):
    params = make_params(key)
    state = lr.galore(optax.scale_by_adam(), rank=4).init(params)
    proj, mu = state.projectors["layers"], state.lowrank_state.mu["layers"]
    # square (in=16,out=16): std compresses the in axis, like galore-torch's m == n case.
    assert proj["q_proj"]["kernel"].in_basis.shape == (16, 4)
    assert proj["q_proj"]["kernel"].out_basis is None
    assert mu["q_proj"]["kernel"].shape == (4, 16)
    # (in=16, out=40): the in axis is smaller -> compressed.
    assert mu["up_proj"]["kernel"].shape == (4, 40)
    # (in=40, out=16): the out axis is smaller -> compressed.
    assert proj["down_proj"]["kernel"].out_basis.shape == (16, 4)
    assert mu["down_proj"]["kernel"].shape == (40, 4)
    # embeddings and norms are not targeted by default: full-size state, no projector.
    assert isinstance(state.projectors["embed"]["embedding"], optax.MaskedNode)
    assert state.fullrank_state.mu["embed"]["embedding"].shape == (50, 16)
    assert isinstance(state.lowrank_state.mu["final_norm"]["scale"], optax.MaskedNode)


@pytest.mark.parametrize(
    "proj_type,shape,expected",
    [
        ("std", (16, 40), "in"),
        ("std", (40, 16), "out"),
        ("std", (16, 16), "in"),
        ("reverse_std", (16, 40), "out"),
        ("reverse_std", (16, 16), "out"),
        ("right", (40, 16), "in"),
        ("left", (16, 40), "out"),
        ("full", (16, 40), "both"),
    ],
)
def test_choose_side_follows_galore_torch(proj_type, shape, expected):
    assert projection.choose_side(proj_type, *shape) == expected


def test_refresh_happens_at_multiples_of_the_gap(key):
    params = {"w": jax.random.normal(key, (12, 20))}
    tx = lr.galore(optax.scale_by_adam(), rank=3, update_proj_gap=3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    bases = []
    for g in grad_stream(params, 7):
        _, state = update(g, state)
        bases.append(np.asarray(state.projectors["w"].in_basis))
    changed = [not np.allclose(bases[i], bases[i - 1]) for i in range(1, 7)]
    # steps 0..6: refresh at 0, 3, 6 -> the basis changes going into steps 3 and 6 only.
    assert changed == [False, False, True, False, False, True]


def test_basis_is_the_top_singular_subspace(key):
    g = jax.random.normal(key, (30, 12))
    tx = lr.galore(optax.identity(), rank=5, proj_type="right")
    _, state = tx.update({"w": g}, tx.init({"w": g}))
    basis = state.projectors["w"].in_basis
    u = np.linalg.svd(np.asarray(g), full_matrices=False)[0][:, :5]
    np.testing.assert_allclose(np.abs(basis.T @ u), np.eye(5), atol=1e-5)


def test_stacked_leaves_equal_per_matrix_results(key):
    stacked = {"w": jax.random.normal(key, (3, 12, 20))}
    grads = grad_stream(stacked, 6)
    tx = lr.galore_adamw(1e-2, rank=4, update_proj_gap=4, weight_decay=0.1)
    out_stacked, _ = run(tx, stacked, grads)
    for i in range(3):
        single = {"w": stacked["w"][i]}
        out, _ = run(tx, single, [{"w": g["w"][i]} for g in grads])
        np.testing.assert_allclose(out_stacked["w"][i], out["w"], rtol=1e-5, atol=1e-6)


def test_torch_layout_dims_equal_flax_layout(key):
    """MatrixDims(in_axis=-1, out_axis=-2) on (out, in) weights = the transposed Flax run."""
    flax_params = {"w": jax.random.normal(key, (12, 20))}
    grads = grad_stream(flax_params, 4)
    tx = lambda dims: lr.galore_adamw(1e-2, rank=3, update_proj_gap=2, dims=dims)
    out_flax, _ = run(tx(None), flax_params, grads)
    out_torch, _ = run(
        tx(lr.MatrixDims(in_axis=-1, out_axis=-2)),
        {"w": flax_params["w"].T},
        [{"w": g["w"].T} for g in grads],
    )
    np.testing.assert_allclose(out_torch["w"].T, out_flax["w"], rtol=1e-5, atol=1e-6)


def test_single_compile_across_refreshes(key):
    params = make_params(key)
    tx = lr.galore_adamw(1e-2, rank=4, update_proj_gap=2)
    traces = []

    @jax.jit
    def step(params, state, g):
        traces.append(1)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for g in grad_stream(params, 5):
        params, state = step(params, state, g)
    assert len(traces) == 1


def test_nonfinite_gradient_keeps_the_previous_basis(key):
    params = {"w": jax.random.normal(key, (12, 20))}
    tx = lr.galore(optax.scale_by_adam(), rank=3, update_proj_gap=1)
    state = tx.init(params)
    _, state = tx.update(grad_stream(params, 1)[0], state)
    before = state.projectors["w"].in_basis
    bad = {"w": params["w"].at[0, 0].set(jnp.nan)}
    _, state = tx.update(bad, state)
    np.testing.assert_array_equal(state.projectors["w"].in_basis, before)
    # the very first refresh on a non-finite gradient keeps a valid orthonormal basis.
    _, fresh = tx.update(bad, tx.init(params))
    basis = fresh.projectors["w"].in_basis
    assert np.all(np.isfinite(basis))
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-6)


def test_on_refresh_reset_restarts_the_moments(key):
    params = {"w": jax.random.normal(key, (12, 20))}
    grads = grad_stream(params, 3)
    tx = lr.galore(optax.scale_by_adam(), rank=3, update_proj_gap=2, on_refresh="reset")
    state = tx.init(params)
    for g in grads[:2]:
        _, state = tx.update(g, state)
    assert int(state.lowrank_state.count) == 2
    _, state = tx.update(grads[2], state)  # step 2 refreshes: moments restart from zero
    assert int(state.lowrank_state.count) == 1
    g_low = projection.project(grads[2]["w"], state.projectors["w"])
    np.testing.assert_allclose(state.lowrank_state.mu["w"], 0.1 * g_low, rtol=1e-5, atol=1e-6)


def test_on_refresh_reproject_preserves_moments_in_an_unchanged_subspace(key):
    """Rotating the basis inside the same subspace leaves P·M (the full-space moment) intact."""
    k1, k2 = jax.random.split(key)
    a = jax.random.normal(k1, (20, 3))
    # two gradients with the same 3-dim column space but different singular vectors
    g1 = a @ jax.random.normal(k2, (3, 12))
    g2 = a @ jnp.diag(jnp.array([1.0, 5.0, 0.2])) @ jax.random.normal(k1, (3, 12))
    # g: (in=20, out=12); the shared subspace lies along the in axis, compressed by "right".
    tx = lr.galore(optax.scale_by_adam(), rank=3, update_proj_gap=1, on_refresh="reproject",
                   proj_type="right")
    state = tx.init({"w": g1})
    _, state = tx.update({"w": g1}, state)
    full_mu = lambda s: s.projectors["w"].in_basis @ s.lowrank_state.mu["w"]
    before = full_mu(state)
    # step 1 refreshes to g2's basis; reprojection happens before the new moment update.
    tx_keep = lr.galore(optax.scale_by_adam(b1=1.0 - 1e-7), rank=3, update_proj_gap=1,
                        on_refresh="reproject", proj_type="right")
    _, after = tx_keep.update({"w": g2}, state)
    np.testing.assert_allclose(full_mu(after), before, atol=1e-4)
    assert not np.allclose(after.projectors["w"].in_basis, state.projectors["w"].in_basis)
    # with "keep" the old coordinates are reused in the new basis: the moment is scrambled.
    tx_plain = lr.galore(optax.scale_by_adam(b1=1.0 - 1e-7), rank=3, update_proj_gap=1,
                         proj_type="right")
    _, kept = tx_plain.update({"w": g2}, state)
    assert not np.allclose(full_mu(kept), before, atol=1e-2)


def test_reproject_differs_from_keep(key):
    params = make_params(key)
    grads = grad_stream(params, 4)
    run_mode = lambda mode: run(
        lr.galore_adamw(1e-2, rank=4, update_proj_gap=2, on_refresh=mode), params, grads
    )[0]
    keep, reproject, reset = run_mode("keep"), run_mode("reproject"), run_mode("reset")
    w = lambda p: np.asarray(p["layers"]["up_proj"]["kernel"])
    assert not np.allclose(w(keep), w(reproject))
    assert not np.allclose(w(keep), w(reset))


@pytest.mark.parametrize("basis", ["randomized", "random"])
def test_other_bases_are_orthonormal_and_seeded(key, basis):
    params = make_params(key)
    g = grad_stream(params, 1)[0]
    tx = lr.galore(optax.scale_by_adam(), rank=4, basis=basis, seed=3)
    _, s1 = tx.update(g, tx.init(params))
    _, s2 = tx.update(g, tx.init(params))
    b = s1.projectors["layers"]["up_proj"]["kernel"].in_basis
    np.testing.assert_allclose(b.T @ b, np.eye(4), atol=1e-5)
    np.testing.assert_array_equal(b, s2.projectors["layers"]["up_proj"]["kernel"].in_basis)


def test_bfloat16_params(key):
    params = make_params(key, jnp.bfloat16)
    tx = lr.galore_adamw(1e-2, rank=4)
    out, state = run(tx, params, grad_stream(params, 2))
    assert out["layers"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    assert state[0].projectors["layers"]["up_proj"]["kernel"].in_basis.dtype == jnp.bfloat16
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(out))


def test_converges_on_a_least_squares_problem(key):
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (64, 16))
    w_true = jax.random.normal(k2, (16, 8))
    y = x @ w_true
    loss = lambda p: jnp.mean((x @ p["w"] - y) ** 2)
    params = {"w": jnp.zeros((16, 8))}
    tx = lr.galore_adamw(0.1, rank=4, update_proj_gap=10, scale=1.0)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        g = jax.grad(loss)(params)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    start = loss(params)
    for _ in range(300):
        params, state = step(params, state)
    assert loss(params) < 0.01 * start


# ---------------------------------------------------------------- composition
def test_composes_with_chain_multisteps_apply_if_finite(key):
    params = make_params(key)
    grads = grad_stream(params, 4)
    base = lambda: lr.galore_adamw(1e-2, rank=4, update_proj_gap=2)
    reference, _ = run(base(), params, grads[::2])

    # MultiSteps(k=2) on repeated gradients == one step per pair
    multi = optax.MultiSteps(base(), every_k_schedule=2)
    doubled = [g for g in grads[::2] for _ in range(2)]
    out, _ = run(multi, params, doubled)
    np.testing.assert_allclose(
        out["layers"]["up_proj"]["kernel"], reference["layers"]["up_proj"]["kernel"], atol=1e-6
    )

    # apply_if_finite skips a NaN step without corrupting the state
    safe = optax.apply_if_finite(base(), max_consecutive_errors=3)
    nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads[0])
    out, state = run(safe, params, [grads[0], nan, grads[2]])
    np.testing.assert_allclose(
        out["layers"]["up_proj"]["kernel"], reference["layers"]["up_proj"]["kernel"], atol=1e-6
    )
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 1

    # chain with clipping
    chained = optax.chain(optax.clip_by_global_norm(1.0), base())
    out, _ = run(chained, params, grads)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(out))


def test_inject_hyperparams(key):
    params = make_params(key)
    grads = grad_stream(params, 3)
    tx = optax.inject_hyperparams(lr.galore_adamw, static_args=("rank",))(
        learning_rate=1e-2, rank=4, update_proj_gap=2, scale=0.25
    )
    out, state = run(tx, params, grads)
    expected, _ = run(lr.galore_adamw(1e-2, rank=4, update_proj_gap=2), params, grads)
    np.testing.assert_allclose(
        out["layers"]["up_proj"]["kernel"], expected["layers"]["up_proj"]["kernel"], atol=1e-6
    )
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    again, _ = run(tx, out, grads[:1], state)
    np.testing.assert_array_equal(
        again["layers"]["up_proj"]["kernel"], out["layers"]["up_proj"]["kernel"]
    )


def test_inject_hyperparams_without_static_rank_says_how_to_fix(key):
    tx = optax.inject_hyperparams(lr.galore_adamw)(learning_rate=1e-2, rank=4)
    with pytest.raises(TypeError, match="static_args"):
        jax.jit(tx.init)(make_params(key))


def test_extra_args_reach_the_inner_transformation(key):
    params = {"w": jax.random.normal(key, (12, 20))}
    seen = {}

    def inner_update(updates, state, params=None, *, loss=None):
        seen["loss"] = loss
        return updates, state

    inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), inner_update)
    tx = optax.chain(lr.galore(inner, rank=3), optax.scale(-1.0))
    tx.update(params, tx.init(params), params, loss=1.5)
    assert seen["loss"] == 1.5


def test_nnx_state_paths_are_targeted():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.up_proj = nnx.Linear(8, 24, use_bias=True, rngs=rngs)
            self.norm = nnx.RMSNorm(8, rngs=rngs)

    model = Block(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tx = lr.galore_adamw(1e-2, rank=4)
    state = tx.init(params)
    mask = lr.targets.resolve(None, params)
    assert mask["up_proj"]["kernel"].get_value() is True
    assert mask["up_proj"]["bias"].get_value() is False
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert updates["up_proj"]["kernel"].shape == (8, 24)


# ---------------------------------------------------------------- errors
def test_rank_larger_than_matrix_is_clipped_with_a_warning_naming_the_leaf(key):
    params = {"small": {"kernel": jax.random.normal(key, (6, 20))}}
    with pytest.warns(UserWarning, match="small/kernel"):
        state = lr.galore(optax.scale_by_adam(), rank=8).init(params)
    assert state.lowrank_state.mu["small"]["kernel"].shape == (6, 20)


def test_integer_leaf_is_an_error(key):
    params = {"w": jnp.ones((8, 8), jnp.int32)}
    with pytest.raises(ValueError, match="'w'.*int32"):
        lr.galore(optax.scale_by_adam(), rank=2, targets="w").init(params)


def test_unmatched_target_lists_paths(key):
    params = make_params(key)
    with pytest.raises(ValueError, match=r"matches no parameter(.|\n)*layers/up_proj/kernel"):
        lr.galore(optax.scale_by_adam(), rank=2, targets="attn/q").init(params)


def test_targeting_a_vector_is_an_error(key):
    params = make_params(key)
    with pytest.raises(ValueError, match="final_norm/scale"):
        lr.galore(optax.scale_by_adam(), rank=2, targets="norm").init(params)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "rank must be positive"),
        ({"rank": 2.5}, "rank"),
        ({"rank": 2, "proj_type": "diagonal"}, "proj_type"),
        ({"rank": 2, "basis": "qr"}, "basis"),
        ({"rank": 2, "on_refresh": "rotate"}, "on_refresh"),
        ({"rank": 2, "update_proj_gap": 0}, "update_proj_gap"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lr.galore(optax.scale_by_adam(), **kwargs)


def test_tree_mismatch_between_init_and_update(key):
    params = make_params(key)
    tx = lr.galore(optax.scale_by_adam(), rank=2)
    state = tx.init(params)
    with pytest.raises(ValueError, match="structure of the parameters"):
        tx.update({"other": jnp.ones((4, 4))}, state)


@pytest.mark.parametrize("basis", ["randomized", "random"])
def test_stacked_leaves_with_other_bases(key, basis):
    stacked = {"w": jax.random.normal(key, (3, 40, 24))}
    tx = lr.galore(optax.scale_by_adam(), rank=4, basis=basis)
    _, state = tx.update(grad_stream(stacked, 1)[0], tx.init(stacked))
    b = state.projectors["w"].out_basis
    assert b.shape == (3, 24, 4)
    np.testing.assert_allclose(jnp.swapaxes(b, -1, -2) @ b, np.broadcast_to(np.eye(4), (3, 4, 4)),
                               atol=1e-5)
