"""The docstring examples of lowrank_jax.reparam run and print what they claim."""

import doctest
import importlib
import pkgutil

import pytest

import lowrank_jax.reparam as package

MODULES = [package.__name__] + [
    f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
