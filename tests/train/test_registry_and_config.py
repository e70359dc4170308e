"""Optimizers by name, the run config (files, flags, validation), the schedule."""

import subprocess
import sys

import numpy as np
import optax
import pytest

from lowrank_jax.train import registry
from lowrank_jax.train.config import ConfigError, RunConfig, load_config_file
from lowrank_jax.train.step import warmup_cosine


def test_registry_module_is_light():
    code = (
        "import sys, lowrank_jax.train.registry as r; "
        "heavy = [m for m in ('flax', 'orbax', 'orbax.checkpoint', 'lowrank_jax.train.loop') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_builtin_optimizers_build_optax_transformations():
    names = registry.available_optimizers()
    assert {"adamw", "galore"} <= set(names)
    assert names["galore"].default_lr == 1e-2 and names["adamw"].default_lr == 1e-3
    params = {"w": np.ones((8, 6), np.float32), "embed": np.ones((5, 4), np.float32)}
    for name in ("adamw", "galore"):
        tx = registry.build_optimizer(name, registry.OptimizerArgs(learning_rate=1e-3, rank=2))
        updates, _ = tx.update(params, tx.init(params), params)
        assert updates["w"].shape == (8, 6)
    galore_state = registry.build_optimizer("galore", registry.OptimizerArgs(1e-3, rank=2)).init(
        params
    )
    assert type(galore_state[0]).__name__ == "GaLoreState"


def test_register_a_new_optimizer():
    entry = registry.register_optimizer(
        "test_sgd", lambda args: optax.sgd(args.learning_rate), help="plain SGD", default_lr=0.1
    )
    try:
        assert registry.get_optimizer("test_sgd") is entry
        with pytest.raises(ValueError, match="already registered"):
            registry.register_optimizer("test_sgd", lambda args: optax.sgd(1.0))
        registry.register_optimizer("test_sgd", lambda a: optax.sgd(1.0), overwrite=True)
    finally:
        registry._REGISTRY.pop("test_sgd")


def test_unknown_optimizer_lists_choices():
    with pytest.raises(
        ValueError, match=r"unknown optimizer 'lamb'; choose one of: .*adamw.*galore"
    ):
        registry.get_optimizer("lamb")


def test_defaults_are_the_main_job():
    cfg = RunConfig()
    assert (cfg.model, cfg.optimizer, cfg.data, cfg.tokenizer) == (
        "llama_20m",
        "galore",
        None,
        "byte",
    )
    assert cfg.validate() is cfg and cfg.warmup_steps == cfg.steps // 10


@pytest.mark.parametrize("ext", ["toml", "yaml"])
def test_config_files(tmp_path, ext):
    text = {
        "toml": 'model = "llama_tiny"\nupdate-proj-gap = 7\nlr = 0.003\nscan_layers = true\n',
        "yaml": "model: llama_tiny\nupdate-proj-gap: 7\nlr: 0.003\nscan_layers: true\n",
    }[ext]
    path = tmp_path / f"run.{ext}"
    path.write_text(text)
    cfg = RunConfig().replace(**load_config_file(str(path)))
    assert (cfg.model, cfg.update_proj_gap, cfg.lr, cfg.scan_layers) == (
        "llama_tiny",
        7,
        3e-3,
        True,
    )


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('modle = "llama_tiny"\n')
    with pytest.raises(ConfigError, match=r"unknown keys \['modle'\]"):
        load_config_file(str(bad))
    bad.write_text("model = = 3\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config_file(str(bad))
    with pytest.raises(ConfigError, match="no such file"):
        load_config_file(str(tmp_path / "none.toml"))
    with pytest.raises(ConfigError, match="--steps must be a positive integer"):
        RunConfig(steps=0).validate()
    with pytest.raises(ConfigError, match="--dtype must be float32 or bfloat16"):
        RunConfig(dtype="float16").validate()


def test_schedule_is_the_papers():
    schedule = warmup_cosine(0.01, total_steps=100, warmup_steps=10, min_ratio=0.1)
    lrs = np.array([float(schedule(s)) for s in range(120)])
    assert lrs[0] == 0.0  # the reference's first update has lr factor 0
    np.testing.assert_allclose(lrs[5], 0.005, rtol=1e-6)
    np.testing.assert_allclose(lrs[10], 0.01, rtol=1e-6)
    np.testing.assert_allclose(lrs[55], 0.01 * (0.1 + 0.9 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(lrs[100:], 0.001, rtol=1e-5)
    assert np.all(np.diff(lrs[10:100]) < 0)
    no_warmup = warmup_cosine(1.0, 10, 0)
    assert float(no_warmup(0)) == 1.0
