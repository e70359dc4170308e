"""Bad constructor arguments and damaged adapter files: one clear line, at the first chance.

Issue 12's rows: ``reparam.lora(rank=0)`` was accepted at construction and ``rank=4.0`` failed
only at ``init`` with a shape ``TypeError``; a truncated ``adapter_config.json`` gave a bare
``JSONDecodeError`` without the file's path.
"""

import os

import jax
import jax.numpy as jnp
import pytest

from lowrank_jax import reparam as R


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: R.lora(rank=0), ValueError, "lora: rank must be an integer >= 1, got 0"),
        (lambda: R.lora(rank=4.0), TypeError, "lora: rank must be an integer >= 1, got 4.0"),
        (lambda: R.lora(rank=True), TypeError, "lora: rank must be an integer"),
        (lambda: R.pissa(rank=-2), ValueError, "pissa: rank must be an integer >= 1"),
        (lambda: R.dora(rank=0), ValueError, "dora: rank must be an integer >= 1"),
        (lambda: R.lora(rank=4, dropout=1.0), ValueError, "lora: dropout must be a number in"),
        (lambda: R.lora(rank=4, alpha="8"), TypeError, "lora: alpha must be a number"),
        (
            lambda: R.lora(rank=4, rank_pattern={"q_proj": 0}),
            ValueError,
            "lora: rank_pattern['q_proj'] must be an integer >= 1",
        ),
        (lambda: R.vera(rank=0), ValueError, "vera: rank must be an integer >= 1"),
        (lambda: R.nola(num_b=0), ValueError, "nola: num_b must be an integer >= 1"),
        (lambda: R.diablo(blocks=2.0), TypeError, "diablo: blocks must be an integer >= 1"),
        (lambda: R.lora_xs(rank=0), ValueError, "lora_xs: rank must be an integer >= 1"),
        (lambda: R.lora_sb(rank=1.5), TypeError, "lora_sb: rank must be an integer >= 1"),
        (lambda: R.LoRA(rank=4.0), TypeError, "LoRA: rank must be int, got 4.0"),
    ],
)
def test_bad_arguments_fail_at_construction(make, error, message):
    with pytest.raises(error) as err:
        make()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_good_arguments_still_construct():
    assert R.lora(rank=4, alpha=8, dropout=0.1, rank_pattern={"q": 2}).method.rank == 4
    assert R.nola(rank=2, num_a=3, num_b=3).method.num_a == 3
    assert R.LoRA(rank=4, alpha=8).alpha == 8  # an int is a fine float


def _saved(tmp_path, key):
    params = {"attn": {"q_proj": {"kernel": jnp.ones((8, 8))}}}
    _, adapters = R.lora(rank=2, targets="q_proj").init(key, params)
    return params, adapters


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_truncated_adapter_config_names_the_file(tmp_path, key):
    params, adapters = _saved(tmp_path, key)
    ours, peft = str(tmp_path / "ours"), str(tmp_path / "peft")
    R.save(ours, adapters)
    R.to_peft(peft, adapters)
    for directory, load, fix in [
        (ours, lambda: R.load(ours, params), "save the adapter again"),
        (peft, lambda: R.from_peft(peft, params), "export the adapter again"),
    ]:
        config = os.path.join(directory, "adapter_config.json")
        _truncate(config)
        with pytest.raises(ValueError) as err:
            load()
        text = str(err.value)
        assert f"'{config}' is not valid JSON (line " in text and fix in text
        assert "\n" not in text


def test_missing_peft_config_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json' does not exist"):
        R.from_peft(str(tmp_path), {"w": jax.numpy.ones((2, 2))})
