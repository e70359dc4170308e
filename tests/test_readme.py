"""The README's Python examples run as written, and its Quickstart is what CI runs."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
DEVICES = "xla_force_host_platform_device_count"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_python_examples_run_as_written():
    """Every block, verbatim. A block that needs several devices says so and sets them itself
    before JAX starts: it runs in a fresh interpreter without this session's device flags."""
    blocks = _python_blocks()
    assert len(blocks) >= 3
    for block in blocks:
        if DEVICES in block:
            assert "Needs 8 devices" in block
            env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
            done = subprocess.run(
                [sys.executable, "-c", block], env=env, capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            exec(compile(block, "README.md", "exec"), {})  # noqa: S102


def test_quickstart_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && pytest'
    assert command in README and command in ci
    assert "pip install -e . && lowrank-jax train" in README
