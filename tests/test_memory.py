"""state_bytes (eval_shape, no allocation) equals each method's analytic count exactly."""

import jax
import jax.numpy as jnp
import optax
import pytest

import lowrank_jax as lr
from lowrank_jax import memory
from tests.helpers import PARAMS

SDS = jax.ShapeDtypeStruct


def test_adamw_state_is_two_moments():
    assert memory.state_bytes(optax.adamw(1e-3), PARAMS, scalars=False) == memory.adamw_bytes(
        PARAMS
    )


@pytest.mark.filterwarnings("ignore:galore. rank 100 exceeds")
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
@pytest.mark.parametrize("rank", [8, 100])
def test_galore_state_equals_the_paper_count(proj_type, rank):
    tx = lr.galore_adamw(1e-3, rank=rank, proj_type=proj_type)
    measured = memory.state_bytes(tx, PARAMS, scalars=False)
    assert measured == memory.galore_bytes(PARAMS, rank=rank, proj_type=proj_type)
    # scalars: step counters and one PRNG key, nothing full-size
    assert memory.state_bytes(tx, PARAMS) - measured < 64


def test_galore_saves_memory_on_the_targeted_matrices():
    galore = memory.state_bytes(lr.galore_adamw(1e-3, rank=8), PARAMS)
    assert galore < memory.state_bytes(optax.adamw(1e-3), PARAMS)


def test_state_bytes_allocates_nothing():
    huge = {"w": SDS((200_000, 100_000), jnp.float32)}  # 80 GB of parameters
    n = memory.state_bytes(lr.galore_adamw(1e-3, rank=16), huge, scalars=False)
    assert n == memory.galore_bytes(huge, rank=16)


def test_human():
    assert memory.human(999) == "999 B"
    assert memory.human(1_234_567) == "1.23 MB"
    assert memory.human(7.8e9) == "7.80 GB"
