"""Every docstring example in the package runs and prints what it claims."""

import doctest
import importlib
import pkgutil

import pytest

import lowrank_jax

MODULES = ["lowrank_jax"] + [
    m.name for m in pkgutil.walk_packages(lowrank_jax.__path__, prefix="lowrank_jax.")
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:  # a module behind an optional extra
        pytest.skip(f"{name} needs the optional package {err.name!r}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
