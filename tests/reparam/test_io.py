"""Saving and loading adapters: round trips, atomic writes, mismatches."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import reparam as R
from lowrank_jax.reparam import io

from .conftest import METHODS, perturb, tree


@pytest.mark.parametrize("name", ["lora", "dora", "lora_xs", "vera"])
def test_round_trip_rebuilds_the_adapted_weights(name, params, key, tmp_path):
    base, adapters = METHODS[name][0]().init(key, params)
    adapters = perturb(adapters)
    R.save(str(tmp_path), adapters)
    loaded = R.load(str(tmp_path), base)
    assert loaded.sites == adapters.sites
    jax.tree.map(np.testing.assert_array_equal, loaded.trainable, adapters.trainable)
    jax.tree.map(np.testing.assert_array_equal, R.apply(base, loaded), R.apply(base, adapters))


def test_seeded_bases_are_not_stored(params, key, tmp_path):
    _, adapters = R.vera(6).init(key, params)
    R.save(str(tmp_path), adapters)
    size = os.path.getsize(tmp_path / io.TENSORS)
    # The vectors (12+6 and 3*(16+6) floats) and two 8-byte seeds, plus the header.
    assert size < (18 + 66) * 4 + 16 + 1024


def test_bfloat16_adapters_keep_their_dtype(params, key, tmp_path):
    _, adapters = R.lora(2, dtype=jnp.bfloat16).init(key, params)
    R.save(str(tmp_path), adapters)
    loaded = R.load(str(tmp_path))
    assert loaded.trainable["layers/attn/q_proj/kernel"]["A"].dtype == jnp.bfloat16


def test_loading_for_a_different_model_is_an_error(params, key, tmp_path):
    _, adapters = R.lora(2).init(key, params)
    R.save(str(tmp_path), adapters)
    other = tree(key)
    other["layers"]["attn"]["q_proj"]["kernel"] = jnp.ones((8, 20))
    with pytest.raises(ValueError, match="saved for a different model.*q_proj/kernel"):
        R.load(str(tmp_path), other)


def test_save_is_atomic(params, key, tmp_path, monkeypatch):
    _, first = R.lora(2).init(key, params)
    R.save(str(tmp_path), first)
    before = {f: (tmp_path / f).read_bytes() for f in (io.TENSORS, io.CONFIG)}

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        R.save(str(tmp_path), perturb(first))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(before)  # no temporary files left behind
    assert {f: (tmp_path / f).read_bytes() for f in before} == before


def test_a_tensor_file_from_another_save_is_detected(params, key, tmp_path):
    _, adapters = R.lora(2).init(key, params)
    R.save(str(tmp_path / "a"), adapters)
    R.save(str(tmp_path / "b"), perturb(adapters))
    os.replace(tmp_path / "b" / io.TENSORS, tmp_path / "a" / io.TENSORS)
    with pytest.raises(ValueError, match="does not match"):
        R.load(str(tmp_path / "a"))


def test_config_records_sites_and_methods(params, key, tmp_path):
    _, adapters = R.lora(2, 4.0, rank_pattern={"up": 3}).init(key, params)
    R.save(str(tmp_path), adapters)
    config = json.loads((tmp_path / io.CONFIG).read_text())
    sites = {s["path"]: s for s in config["sites"]}
    assert sites["layers/mlp/up/kernel"]["method"]["fields"]["rank"] == 3
    assert sites["layers/mlp/up/kernel"]["shape"] == [3, 8, 16]
    with pytest.raises(ValueError, match="no adapter"):
        R.load(str(tmp_path / "missing"))
