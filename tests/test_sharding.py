"""Every method on FSDP, TP and FSDP x TP meshes (Explicit and Auto axes) equals one device.

Runs on the 8 simulated CPU devices that tests/conftest.py sets up.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lowrank_jax as lr
from lowrank_jax import sharding

pytestmark = pytest.mark.usefixtures("eight_devices")

SPECS = {
    "embed": {"embedding": P("tensor", "fsdp")},
    "layers": {
        str(i): {
            "attn": {"q_proj": {"kernel": P("fsdp", "tensor")}},
            "mlp": {"up_proj": {"kernel": P("fsdp", "tensor")},
                    "down_proj": {"kernel": P("tensor", "fsdp")}},
            "norm": {"scale": P("tensor")},
        }
        for i in range(2)
    },
    "stacked": {"kernel": P(None, "fsdp", "tensor")},
}


def make_params(key, spectrum=None):
    """Gaussian leaves; with ``spectrum``, matrices get a clear low-rank structure (well-separated
    singular values, plus a little noise) so every basis is well determined and round-off in
    sharded reductions cannot rotate it."""
    shapes = {
        "embed": {"embedding": (40, 32)},
        "layers": {
            str(i): {
                "attn": {"q_proj": {"kernel": (32, 32)}},
                "mlp": {"up_proj": {"kernel": (32, 64)}, "down_proj": {"kernel": (64, 32)}},
                "norm": {"scale": (32,)},
            }
            for i in range(2)
        },
        "stacked": {"kernel": (2, 32, 48)},
    }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))

    def leaf(k, shape):
        k1, k2, k3 = jax.random.split(k, 3)
        noise = jax.random.normal(k1, shape)
        if spectrum is None or len(shape) < 2:
            return noise
        s = jnp.asarray(spectrum, jnp.float32)
        u = jax.random.normal(k2, (*shape[:-1], len(spectrum))) / np.sqrt(shape[-2])
        v = jax.random.normal(k3, (*shape[:-2], len(spectrum), shape[-1])) / np.sqrt(shape[-1])
        return (u * s) @ v + 0.01 * noise

    return treedef.unflatten([leaf(k, s) for k, s in zip(keys, leaves)])


METHODS = {
    "galore": lambda: lr.galore_adamw(1e-2, rank=4, update_proj_gap=2),
    "galore_randomized": lambda: lr.galore_adamw(1e-2, rank=4, update_proj_gap=2,
                                                 basis="randomized"),
    "galore_adafactor": lambda: lr.galore_adafactor(1e-2, rank=4, update_proj_gap=2, beta1=0.9),
    "fira": lambda: lr.fira_adamw(1e-2, rank=4, update_proj_gap=2),
    "apollo": lambda: lr.apollo_adamw(1e-2, rank=4, update_proj_gap=2),
    "apollo_mini": lambda: lr.apollo_mini(1e-2, update_proj_gap=2),
    "lisa": lambda: lr.lisa_adamw(1e-2, n_active=2, interval=2),
    "galore_8bit": lambda: lr.galore_adamw_8bit(1e-2, rank=4, update_proj_gap=2, block_size=64,
                                                min_8bit_size=256),
}


def run(tx, params, grads):
    """``len(grads)`` steps of ``tx`` in one ``lax.scan`` (one compiled step body)."""

    def step(carry, g):
        params, state = carry
        updates, state = tx.update(g, state, params)
        return (optax.apply_updates(params, updates), state), None

    stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), stacked)
    return params


def sharded_run(make_tx, params, grads, mesh):
    tx = make_tx()
    with jax.set_mesh(mesh):
        put = lambda tree: jax.tree.map(
            lambda x, s: jax.device_put(x, sharding.fit_spec(x.shape, s, mesh)), tree, SPECS
        )
        out = jax.jit(lambda p, g: run(tx, p, g))(put(params), [put(g) for g in grads])
    return out


@pytest.fixture(scope="module")
def problem():
    params = make_params(jax.random.key(0))
    grads = [make_params(jax.random.key(i), spectrum=(10, 8, 6, 4, 1, 0.5)) for i in (1, 2, 3)]
    return params, grads


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "auto"])
@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp_x_tp_equals_one_device(problem, method, explicit):
    params, grads = problem
    expected = jax.jit(lambda p, g: run(METHODS[method](), p, g))(params, grads)
    mesh = sharding.make_mesh(4, 2, explicit=explicit)
    out = sharded_run(METHODS[method], params, grads, mesh)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    leaf = out["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    assert leaf.sharding.spec == P("fsdp", "tensor")


@pytest.mark.parametrize("shape", [(8, 1), (1, 8)], ids=["fsdp", "tp"])
@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "auto"])
def test_galore_on_fsdp_and_tp_meshes(problem, shape, explicit):
    params, grads = problem
    expected = jax.jit(lambda p, g: run(METHODS["galore"](), p, g))(params, grads)
    out = sharded_run(METHODS["galore"], params, grads, sharding.make_mesh(*shape,
                                                                           explicit=explicit))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


def _all_gathers(hlo):
    """Element counts of the results of every all-gather in compiled HLO text."""
    sizes = []
    for shape in re.findall(r"= f32\[([\d,]*)\][^\n]*? all-gather\(", hlo):
        sizes.append(int(np.prod([int(d) for d in shape.split(",") if d])))
    return sizes


def test_randomized_refresh_never_gathers_a_full_gradient():
    """basis="randomized" on an FSDP mesh: only in x k sketches move, never an in x out matrix."""
    mesh = sharding.make_mesh(8, 1)
    n_in, n_out, rank = 256, 512, 8
    params = {"w": jax.random.normal(jax.random.key(0), (n_in, n_out))}

    def compiled(basis):
        tx = lr.galore_adamw(1e-2, rank=rank, basis=basis)
        with jax.set_mesh(mesh):
            p = jax.device_put(params, P("fsdp", None))
            step = jax.jit(lambda p, s, g: tx.update(g, s, p))
            return step.lower(p, tx.init(p), p).compile().as_text()

    randomized = _all_gathers(compiled("randomized"))
    assert max(randomized, default=0) < n_in * n_out // 8
    # the exact SVD does gather the whole gradient (documented; measured in the README)
    assert max(_all_gathers(compiled("svd"))) >= n_in * n_out


def test_state_specs_fit_low_rank_shapes():
    params = make_params(jax.random.key(0))
    mesh = sharding.make_mesh(4, 2)
    specs = sharding.state_specs(lr.galore_adamw(1e-2, rank=6), params, SPECS, mesh)
    galore = specs[0]
    up = galore.lowrank_state.mu["layers"]["0"]["mlp"]["up_proj"]["kernel"]  # (6, 64)
    assert up == P(None, "tensor")
    proj = galore.projectors["layers"]["0"]["mlp"]["up_proj"]["kernel"]  # in_basis (32, 6)
    assert proj.in_basis == P("fsdp", None) and proj.out_basis is None
    assert galore.fullrank_state.mu["embed"]["embedding"] == P("tensor", "fsdp")
    assert galore.count == P()
    # 8-bit states: codes like the parameter, block scales replicated
    q = sharding.state_specs(lr.adamw_8bit(1e-2, block_size=64, min_8bit_size=256), params,
                             SPECS, mesh)
    mu = jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, P))
    assert P("fsdp", "tensor") in mu and P() in mu


def test_fsdp_divides_projected_moments_where_the_rank_allows():
    """A moment the projection resized (rank 8 replaces the kernel's fsdp-sharded ``in``)
    keeps the fsdp axis on the rank dimension when it divides (rank 6 above: replicated, and
    not an error even with strict=True); APOLLO, whose random basis is regenerated and carries
    no sharding, keeps its moments' rank dimension replicated (README: the v5e 2x2 figures)."""
    params = make_params(jax.random.key(0))
    mesh = sharding.make_mesh(4, 2)
    up = lambda state: state.lowrank_state.mu["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    galore = sharding.state_specs(lr.galore_adamw(1e-2, rank=8), params, SPECS, mesh)[0]
    assert up(galore) == P("fsdp", "tensor")  # (8, 64) of a (32, 64) kernel
    apollo = sharding.state_specs(lr.apollo_adamw(1e-2, rank=8), params, SPECS, mesh)[0]
    assert up(apollo) == P(None, "tensor")
    strict = sharding.state_specs(lr.galore_adamw(1e-2, rank=6), params, SPECS, mesh,
                                  strict=True)[0]  # fmt: skip
    assert up(strict) == P(None, "tensor")


def test_indivisible_dimensions_replicate_or_raise():
    mesh = sharding.make_mesh(4, 2)
    assert sharding.fit_spec((6, 32), P("fsdp", "tensor"), mesh) == P(None, "tensor")
    with pytest.raises(ValueError, match="w: dimension 0 of shape \\(6, 32\\).*fsdp"):
        sharding.fit_spec((6, 32), P("fsdp", "tensor"), mesh, path="w", strict=True)
    params = {"w": jnp.ones((6, 32))}
    specs = sharding.state_specs(optax.adam(1e-3), params, {"w": P("fsdp", "tensor")}, mesh)
    assert specs[0].mu["w"] == P(None, "tensor")


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="fsdp=3 x tensor=2"):
        sharding.make_mesh(3, 2)
