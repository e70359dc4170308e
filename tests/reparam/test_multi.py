"""Several named adapters on one base: switch, weighted merge, unmerge, delete."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import reparam as R

from .conftest import perturb


@pytest.fixture
def bank(params, key):
    k1, k2, k3 = jax.random.split(key, 3)
    _, a = R.dora(4).init(k1, params)
    _, b = R.dora(2, init="gaussian").init(k2, params)
    _, c = R.lora(4, 8).init(k3, params)
    bank = R.AdapterSet(params)
    for seed, (name, ad) in enumerate((("a", a), ("b", b), ("c", c))):
        bank = bank.add(name, perturb(ad, seed=10 * seed))
    return bank


def close(x, y, atol=1e-6):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=atol), x, y)


def test_switching_changes_the_forward_weights(bank, params):
    close(bank.forward_params(), params)  # nothing active: the base
    q = lambda p: np.asarray(p["layers"]["attn"]["q_proj"]["kernel"])
    only_a, only_b = (bank.activate(n).forward_params() for n in ("a", "b"))
    close(only_a, R.apply(params, bank.adapters["a"]))
    close(only_b, R.apply(params, bank.adapters["b"]))
    assert np.abs(q(only_a) - q(only_b)).max() > 1e-2
    both = bank.activate("a", "b").forward_params()  # each relative to the base, as PEFT
    want = q(only_a) + q(only_b) - q(params)
    np.testing.assert_allclose(q(both), want, atol=1e-5)


def test_weighted_merge_equals_the_unmerged_forward_and_unmerges_exactly(bank, params):
    active = bank.activate("a", "b", "c", weights=(0.5, 1.0, -0.25))
    want = active.forward_params()
    merged = active.merge()
    assert merged.merged == ("a", "b", "c")
    close(merged.params, want)  # two DoRA adapters + LoRA: merged == unmerged (peft#3608)
    close(merged.merge().params, merged.params, atol=0)  # merging twice is a no-op
    close(merged.unmerge().params, params)
    close(merged.base(), params)


def test_deleting_a_merged_adapter_unmerges_it_first(bank, params):
    merged = bank.activate("a", "c").merge()
    gone = merged.delete("a")
    assert "a" not in gone.adapters and gone.active == ("c",) and gone.merged == ()
    close(gone.params, params)  # peft#3498: no stale delta left in the base
    close(gone.forward_params(), R.apply(params, bank.adapters["c"]))


def test_switching_away_from_a_merged_group_unmerges(bank, params):
    merged = bank.activate("a").merge()
    switched = merged.activate("b")
    assert switched.merged == ()
    close(switched.params, params)
    close(switched.forward_params(), R.apply(params, bank.adapters["b"]))


def test_errors(bank, params, key):
    with pytest.raises(ValueError, match="exists"):
        bank.add("a", bank.adapters["a"])
    with pytest.raises(ValueError, match="no adapter named"):
        bank.activate("zz")
    with pytest.raises(ValueError, match="weights"):
        bank.activate("a", weights=(1.0, 2.0))
    _, small = R.lora(2).init(key, {"w": jnp.ones((3, 3))})
    with pytest.raises(ValueError, match="no such leaf"):
        bank.add("w", small)


def test_save_each_adapter(bank, params, tmp_path):
    bank.save(str(tmp_path))
    loaded = R.load(str(tmp_path / "b"), params)
    close(R.apply(params, loaded), R.apply(params, bank.adapters["b"]), atol=0)
