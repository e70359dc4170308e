"""state_bytes (eval_shape) equals the analytic counts of Fira, APOLLO, 8-bit and LISA/OwLore."""

import jax
import jax.numpy as jnp
import pytest

from lowrank_jax import memory
from lowrank_jax.optimizers import (
    adamw_8bit,
    apollo_adamw,
    apollo_mini,
    fira_adamw,
    galore_adamw_8bit,
    owlore_adamw,
)
from tests.helpers import PARAMS, llama_1b

SDS = jax.ShapeDtypeStruct
FLAT = {
    "w": SDS((96, 256), jnp.float32),
    "v": SDS((256, 64), jnp.bfloat16),
    "b": SDS((64,), jnp.float32),
}


@pytest.mark.filterwarnings("ignore:fira. rank 100 exceeds")
@pytest.mark.parametrize("params", [PARAMS, FLAT], ids=["stacked", "flat"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
@pytest.mark.parametrize("rank", [8, 100])
def test_fira_is_galore_plus_one_norm_per_matrix(params, proj_type, rank):
    tx = fira_adamw(1e-3, rank=rank, proj_type=proj_type)
    expected = memory.fira_bytes(params, rank=rank, proj_type=proj_type)
    assert memory.state_bytes(tx, params, scalars=False) == expected
    matrices = 12 if params is PARAMS else 2  # 4 layers x 3 stacked; w and v
    assert expected - memory.galore_bytes(params, rank=rank, proj_type=proj_type) == 4 * matrices


@pytest.mark.parametrize("proj", ["random", "svd"])
def test_apollo_stores_the_projection_only_for_svd(proj):
    tx = apollo_adamw(1e-3, rank=16, proj=proj)
    measured = memory.state_bytes(tx, PARAMS, scalars=False)
    assert measured == memory.apollo_bytes(PARAMS, rank=16, proj=proj)
    if proj == "random":
        stored = memory.apollo_bytes(PARAMS, rank=16, proj="svd")
        assert stored - measured == 4 * 16 * (64 + 64 + 64) * 4  # P: 4 layers x 3 matrices


def test_apollo_mini_is_sgd_like():
    measured = memory.state_bytes(apollo_mini(1e-3), PARAMS, scalars=False)
    assert measured == memory.apollo_bytes(PARAMS, rank=1)
    untargeted = {k: v for k, v in PARAMS.items() if k != "layers"}
    untargeted["norm"] = PARAMS["layers"]["norm"]
    matrices = 4 * (2 * 64 + 2 * 172 + 2 * 172) * 4 + 12 * 4  # 2·max(m, n) + a norm each
    assert measured == memory.adamw_bytes(untargeted) + matrices


def test_eight_bit_aliases():
    assert memory.state_bytes(adamw_8bit(1e-3), PARAMS, scalars=False) == memory.adam8bit_bytes(
        PARAMS
    )
    tx = galore_adamw_8bit(1e-3, rank=16)
    assert memory.state_bytes(tx, PARAMS, scalars=False) == memory.galore8bit_bytes(
        PARAMS, rank=16
    )


def test_owlore_holds_galore_state_for_the_active_layers_only():
    params = llama_1b()
    tx = owlore_adamw(1e-3, probs=[1.0] * 24, n_active=5, rank=256)
    measured = memory.state_bytes(tx, params, scalars=False)
    assert measured == memory.lisa_bytes(
        params,
        n_active=5,
        layer_bytes=lambda t: memory.galore_bytes(t, rank=256),
        always_bytes=memory.adamw_bytes,
    )
    assert measured < memory.galore_bytes(params, rank=256)
