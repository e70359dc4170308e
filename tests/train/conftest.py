"""Training tests compile the same tiny step several times (full, interrupted, resumed runs, and
subprocesses of the CLI): a persistent compilation cache, private to this directory's tests,
makes the repeats cache hits. It changes no numerics: a hit loads the same executable. One
finished tiny run (``full_run``) serves every test that resumes, corrupts or compares with it."""

import jax
import pytest

from lowrank_jax.train import RunConfig, train
from tests.train.runs import TINY


@pytest.fixture(scope="package", autouse=True)
def compilation_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("jax_cache"))
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield path
    for name, value in before.items():
        jax.config.update(name, value)


@pytest.fixture(scope="package")
def full_run(tmp_path_factory, compilation_cache):
    """``(out, summary, report lines)`` of ``TINY`` trained to the end (checkpoints 3 and 6).
    Tests copy ``out`` before changing anything in it."""
    out = str(tmp_path_factory.mktemp("full"))
    lines = []
    summary = train(RunConfig(out=out, **TINY), log=lines.append)
    return out, summary, lines
