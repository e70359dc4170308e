"""The one target resolver: regex, list, callable, bool tree, default rule, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.targets import MatrixDims, default_target, leaf_paths, resolve, resolve_dims

PARAMS = {
    "embed": {"embedding": jnp.zeros((10, 4))},
    "layers": [
        {"attn": {"q_proj": {"kernel": jnp.zeros((4, 4))}, "o_proj": {"kernel": jnp.zeros((4, 4))}},
         "input_norm": {"scale": jnp.zeros(4)},
         "mlp": {"up_proj": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}},
    ],
    "lm_head": {"kernel": jnp.zeros((4, 10))},
    "ln_f": {"scale": jnp.zeros((4, 4))},
    "ids": jnp.zeros((4, 4), jnp.int32),
}


def selected(mask):
    return {p for p, m in zip(leaf_paths(PARAMS), jax.tree.leaves(mask)) if m}


def test_paths():
    assert "layers/0/attn/q_proj/kernel" in leaf_paths(PARAMS)


def test_default_excludes_embeddings_heads_norms_biases_and_ints():
    assert selected(resolve(None, PARAMS)) == {
        "layers/0/attn/q_proj/kernel",
        "layers/0/attn/o_proj/kernel",
        "layers/0/mlp/up_proj/kernel",
    }


def test_regex_list_callable_and_bool_tree():
    assert selected(resolve(r"attn/q", PARAMS)) == {"layers/0/attn/q_proj/kernel"}
    assert selected(resolve([r"q_proj", r"up_proj/kernel"], PARAMS)) == {
        "layers/0/attn/q_proj/kernel",
        "layers/0/mlp/up_proj/kernel",
    }
    assert selected(resolve(lambda path, leaf: leaf.shape == (4, 10), PARAMS)) == {
        "lm_head/kernel"
    }
    tree = jax.tree.map(lambda _: False, PARAMS)
    tree["lm_head"] = True  # a prefix: the whole subtree
    assert selected(resolve(tree, PARAMS)) == {"lm_head/kernel"}


def test_nothing_matched_lists_the_paths():
    with pytest.raises(ValueError, match=r"'nope' matches no parameter(.|\n)*lm_head/kernel"):
        resolve("nope", PARAMS, method="galore")


def test_bool_tree_of_the_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="bool pytree matching the parameters"):
        resolve({"a": True}, PARAMS)


def test_default_target_on_shape_dtype_structs():
    leaf = jax.ShapeDtypeStruct((3, 4), jnp.bfloat16)
    assert default_target("layers/mlp/kernel", leaf)
    assert not default_target("layers/mlp/bias", leaf)
    assert not default_target("w", jax.ShapeDtypeStruct((3,), jnp.float32))


def test_dims_resolution_and_validation():
    dims = resolve_dims(lambda path, leaf: MatrixDims(-1, -2) if "lm_head" in path else None,
                        PARAMS)
    assert dims["lm_head"]["kernel"] == MatrixDims(-1, -2)
    assert MatrixDims().normalize(3) == MatrixDims(1, 2)
    with pytest.raises(ValueError, match="w: MatrixDims.in_axis=3 is out of range"):
        MatrixDims(3, 1).normalize(2, "w")
    with pytest.raises(ValueError, match="must differ"):
        MatrixDims(0, -2).normalize(2)
    np.testing.assert_equal(len(jax.tree.leaves(resolve_dims(None, PARAMS))), 2 * 9)
