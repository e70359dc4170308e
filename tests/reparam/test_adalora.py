"""AdaLoRA: the SVD-form adapter, the orthogonality regulariser and the rank allocator, against
PEFT (live with the ``compare`` extra, else the golden file)."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lowrank_jax import reparam as R
from tests.golden import peft_family_reference as ref

from . import family
from .conftest import normal, perturb
from .peft_golden import forward, jax_params, reference, sources

CFG = ref.ADALORA
SCHEDULE = R.AdaLoRASchedule(
    total_step=CFG["total_step"],
    target_r=CFG["target_r"],
    tinit=CFG["tinit"],
    tfinal=CFG["tfinal"],
    delta_t=CFG["deltaT"],
    beta1=CFG["beta1"],
    beta2=CFG["beta2"],
    orth_reg_weight=CFG["orth_reg_weight"],
)


def from_peft(r, prefix, params):
    """Our adapters holding PEFT's tensors ``<prefix>/<module>/lora_{A,E,B}``."""
    _, adapters = R.adalora(CFG["init_r"], CFG["lora_alpha"]).init(jax.random.key(0), params)
    trainable = {
        f"{m}/kernel": {
            "A": jnp.asarray(r[f"{prefix}/{m}/lora_A"].T),
            "E": jnp.asarray(r[f"{prefix}/{m}/lora_E"][:, 0]),
            "B": jnp.asarray(r[f"{prefix}/{m}/lora_B"].T),
        }
        for m in ref.SHAPES
    }
    return adapters.replace(trainable=trainable)


@pytest.mark.parametrize("source", sources("adalora"))
def test_forward_matches_peft(source):
    r = reference(source, "adalora")
    params = jax_params(r)
    adapters = from_peft(r, "moved", params)
    got = forward(R.apply(params, adapters), ref.X)
    np.testing.assert_allclose(got, r["moved/output"], atol=1e-5)
    assert np.abs(got - forward(params, ref.X)).max() > 1e-2


@pytest.mark.parametrize("source", sources("adalora"))
def test_budget_schedule_matches_peft(source):
    r = reference(source, "adalora")
    params = jax_params(r)
    adapters = from_peft(r, "init", params)
    assert SCHEDULE.budgets(adapters) == (8, 4)  # 2 modules x init_r 4 -> 2 x target_r 2
    for step in range(CFG["total_step"] + 1):
        budget, mask = SCHEDULE.budget_schedule(step, adapters)
        assert (budget, int(mask)) == tuple(r[f"budget/{step}"]), step


@pytest.mark.parametrize("source", sources("adalora"))
def test_training_trajectory_and_masks_match_peft(source):
    """SGD + the regulariser + update_and_allocate, step by step: every tensor within 1e-5 and
    the same triplets masked (the budget phase, the frozen pattern, the final steps)."""
    r = reference(source, "adalora")
    params = jax_params(r)
    adapters = from_peft(r, "init", params)

    @jax.jit
    def step(t, trainable, state):
        def loss(tr):
            a = adapters.replace(trainable=tr)
            mse = jnp.mean((forward(R.apply(params, a), ref.X) - ref.Y) ** 2)
            return mse + SCHEDULE.regularizer(a)

        value, grads = jax.value_and_grad(loss)(trainable)
        trainable = jax.tree.map(lambda p, g: p - ref.ADALORA_LR * g, trainable, grads)
        moved, state = SCHEDULE.update(t, adapters.replace(trainable=trainable), grads, state)
        return value, moved.trainable, state

    trainable, state = adapters.trainable, SCHEDULE.init(adapters)
    masked_steps = 0
    for t in range(CFG["total_step"] + 1):
        value, trainable, state = step(t, trainable, state)
        np.testing.assert_allclose(value, r[f"loss/{t}"], rtol=1e-6)
        for m in ref.SHAPES:
            mine = trainable[f"{m}/kernel"]
            e = r[f"step{t}/{m}/lora_E"][:, 0]
            np.testing.assert_array_equal(np.asarray(mine["E"]) == 0, e == 0)
            np.testing.assert_allclose(mine["E"], e, atol=1e-5)
            np.testing.assert_allclose(mine["A"], r[f"step{t}/{m}/lora_A"].T, atol=1e-5)
            np.testing.assert_allclose(mine["B"], r[f"step{t}/{m}/lora_B"].T, atol=1e-5)
            masked_steps += int(np.any(e == 0))
    assert masked_steps > 8  # the allocator did mask triplets
    assert step._cache_size() == 1  # one compile for every phase of the schedule
    final = {p: int(np.count_nonzero(trainable[p]["E"])) for p in trainable}
    assert sum(final.values()) == 4  # the target budget b_T, reallocated across the layers


def test_orthogonality_penalty_is_zero_for_orthonormal_factors(key):
    q, _ = np.linalg.qr(np.asarray(normal(0, (8, 3))))
    params = {"w": jnp.ones((8, 6))}
    _, adapters = R.adalora(3).init(key, params)
    b = np.linalg.qr(np.asarray(normal(1, (6, 3))))[0].T
    a = adapters.replace(trainable={"w": {"A": jnp.asarray(q), "E": jnp.ones(3), "B": b}})
    assert float(R.orthogonality_penalty(a)) < 1e-6
    moved = perturb(a)
    t = moved.trainable["w"]
    want = 0.5 * (
        np.linalg.norm(np.asarray(t["A"]).T @ t["A"] - np.eye(3))
        + np.linalg.norm(np.asarray(t["B"]) @ np.asarray(t["B"]).T - np.eye(3))
    )
    np.testing.assert_allclose(R.orthogonality_penalty(moved), want, rtol=1e-5)


def test_init_count_merge_io_jit(key, tmp_path):
    count = lambda b, i, o: b * 4 * (i + o + 1)
    _, base, adapters = family.noop_and_count(R.adalora(4), key, count)
    t = adapters.sites[0].method
    assert t.scale == pytest.approx(8.0 / (4 + 1e-5))
    family.merge_unmerge(base, adapters)
    family.round_trips(base, adapters, tmp_path)
    family.jitted(base, adapters)


def test_prune_keeps_ranknum_and_the_weights(key, tmp_path):
    params = family.tree()
    _, adapters = R.adalora(4).init(key, params)
    adapters = perturb(adapters)
    trainable = dict(adapters.trainable)
    q = "layers/attn/q_proj/kernel"
    trainable[q] = {**trainable[q], "E": trainable[q]["E"].at[jnp.array([0, 2])].set(0.0)}
    masked = adapters.replace(trainable=trainable)
    pruned = R.adalora_prune(masked)
    method = {s.path: s.method for s in pruned.sites}[q]
    assert method.rank == 2 and method.ranknum == 4.0
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        R.apply(params, pruned),
        R.apply(params, masked),
    )
    R.save(str(tmp_path), pruned)
    assert {s.path: s.method for s in R.load(str(tmp_path)).sites}[q].ranknum == 4.0


def test_allocator_state_round_trips_through_orbax(key, tmp_path):
    params = family.tree()
    _, adapters = R.adalora(4).init(key, params)
    schedule = R.AdaLoRASchedule(total_step=10, target_r=2)
    state = schedule.init(adapters)
    grads = jax.tree.map(lambda x: jnp.ones_like(x), adapters.trainable)
    _, state = schedule.update(3, perturb(adapters), grads, state)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
        ckpt.wait_until_finished()
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = ckpt.restore(tmp_path / "state", target)
    jax.tree.map(np.testing.assert_array_equal, tuple(restored), tuple(state))


def test_nnx_fast_path(key):
    family.nnx_matches_apply(R.adalora(2), key)
    family.never_builds_delta_w(R.adalora(2), key)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: R.adalora(0), "rank must be a positive int"),
        (lambda: R.AdaLoRASchedule(total_step=0), "total_step must be a positive int"),
        (lambda: R.AdaLoRASchedule(total_step=10, tinit=5, tfinal=5), "leaves no budget"),
        (lambda: R.AdaLoRASchedule(total_step=10, beta1=1.0), r"beta1 must be in \(0, 1\)"),
        (lambda: R.adalora(9).init(jax.random.key(0), {"w": jnp.ones((8, 12))}), "rank=9 .*'w'"),
        (
            lambda: R.AdaLoRASchedule(total_step=5).init(
                R.lora(2).init(jax.random.key(0), {"w": jnp.ones((4, 4))})[1]
            ),
            "no AdaLoRA site",
        ),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _donate(state):
    """Runs a jitted update that donates ``state`` (fails if two leaves share a buffer)."""
    step = jax.jit(
        lambda s: jax.tree.map(lambda x: x if x.dtype == bool else x + 1, s), donate_argnums=0
    )
    return jax.block_until_ready(step(state))


def test_allocator_states_can_be_donated(key):
    params = family.tree()
    _, adapters = R.adalora(4).init(key, params)
    schedule = R.AdaLoRASchedule(total_step=10, target_r=2, tfinal=2)
    grads = jax.tree.map(jnp.ones_like, adapters.trainable)
    _donate(schedule.init(adapters))
    # step 8 = total_step - tfinal: the final masking, which resets the EMAs. Run eagerly (the
    # branch executes in Python, as in a debugging session) and jitted.
    with jax.disable_jit():
        _, final = schedule.update(8, perturb(adapters), grads, schedule.init(adapters))
    ids = [id(x) for x in jax.tree.leaves(final)]
    assert len(ids) == len(set(ids))
    after = _donate(final)
    np.testing.assert_array_equal(after.sensitivity[next(iter(after.sensitivity))]["E"], 1.0)
    _, final = jax.jit(schedule.update)(8, perturb(adapters), grads, schedule.init(adapters))
    _donate(final)
