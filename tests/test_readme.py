"""The README's Python examples run as written, and its Quickstart is what CI runs."""

import pathlib
import re

import jax
import numpy as np

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_python_examples_run():
    blocks = _python_blocks()
    assert len(blocks) >= 3
    for block in blocks:
        if "param_specs" in block:  # the sharding sketch needs a model's specs: run it on one
            block = block.replace("fsdp=4, tensor=2", "fsdp=len(jax.devices()), tensor=1")
            namespace = {"jax": jax, "tx": _tx(), "params": _params(), "param_specs": _specs()}
        else:
            namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102


def _params():
    return {"mlp": {"kernel": np.ones((16, 32), np.float32)}}


def _specs():
    from jax.sharding import PartitionSpec as P

    return {"mlp": {"kernel": P("fsdp", None)}}


def _tx():
    import lowrank_jax as lr

    return lr.galore_adamw(1e-2, rank=4)


def test_quickstart_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && pytest'
    assert command in README and command in ci
    assert "pip install -e . && lowrank-jax train" in README
