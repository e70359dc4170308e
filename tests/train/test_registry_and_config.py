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


def test_each_setting_is_declared_once():
    """The flags, their help, the docstring and the checkpoint fingerprint all come from the
    fields: a new field cannot miss one of them."""
    import dataclasses

    from lowrank_jax.train.cli import build_parser
    from lowrank_jax.train.resume import fingerprint, fresh_plan

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    dests = {a.dest: a for a in train_parser._actions if a.dest not in ("help", "config")}
    assert set(dests) == set(RunConfig.field_names())
    for field in dataclasses.fields(RunConfig):
        assert field.metadata["help"] and field.metadata["help"] in RunConfig.__doc__.replace(
            "\n        ", " "
        )
        assert field.metadata["help"].replace("%", "%%") in dests[field.name].help
    assert "--no-progress" in dests["progress"].option_strings
    assert dests["optimizer_options"].option_strings == ["--opt"]
    identity = set(RunConfig.identity_names())
    assert identity == {
        "model", "optimizer", "rank", "update_proj_gap", "galore_scale", "lr", "min_lr_ratio",
        "warmup", "weight_decay", "grad_clip", "steps", "batch_size", "seq_len", "seed", "data",
        "tokenizer", "bpe_vocab_size", "val_fraction", "scan_layers", "remat", "dtype",
        "param_dtype", "optimizer_options", "clip_per_layer",
    }  # fmt: skip
    cfg = RunConfig()
    saved = fingerprint(cfg, 259, fresh_plan(cfg, 1e-2))
    assert set(saved) == identity | {"vocab_size", "schedule"}
    assert saved["schedule"] == [[0, cfg.steps]]


def test_field_types_are_enforced_and_file_values_converted(tmp_path):
    with pytest.raises(ConfigError, match=r"--lr must be a number or null, got '1e-3' \(str\)"):
        RunConfig(lr="1e-3")
    with pytest.raises(ConfigError, match="--steps must be an integer, got 2.5"):
        RunConfig(steps=2.5)
    with pytest.raises(ConfigError, match="--resume must be true or false, got 1"):
        RunConfig(resume=1)
    assert RunConfig(lr=1).lr == 1.0 and isinstance(RunConfig(lr=1).lr, float)
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nsteps: '12'\nscan_layers: 'yes'\nrank: null\nwarmup: None\n")
    assert load_config_file(str(path)) == {
        "lr": 1e-3, "steps": 12, "scan_layers": True, "rank": None, "warmup": None
    }
    path.write_text("steps: twelve\n")
    with pytest.raises(ConfigError, match=f"--config {path}: steps must be an integer"):
        load_config_file(str(path))


def test_extended_schedule_continues_without_a_jump():
    """The issue's numbers: 40 of 60 steps, then --steps 200: the re-planned cosine jumped
    from 0.00102 to 0.00628; extended, it continues from where it was."""
    from lowrank_jax.train.step import extended_schedule

    old = warmup_cosine(0.01, 60, 6, 0.1)
    new = extended_schedule(0.01, [(0, 60), (40, 200)], 6, 0.1)
    lrs = np.array([float(new(s)) for s in range(0, 201)])
    np.testing.assert_array_equal(lrs[:40], [float(old(s)) for s in range(40)])
    np.testing.assert_allclose(lrs[40], float(old(40)), rtol=1e-6)  # no jump
    assert np.all(np.diff(lrs[40:]) <= 0) and lrs[-1] == pytest.approx(1e-3, rel=1e-5)
    finished = extended_schedule(0.01, [(0, 60), (60, 100)], 6, 0.1)
    np.testing.assert_allclose([float(finished(s)) for s in (60, 80, 99)], 1e-3, rtol=1e-5)
    in_warmup = extended_schedule(0.01, [(0, 60), (3, 100)], 6, 0.1)
    np.testing.assert_allclose(float(in_warmup(50)), float(warmup_cosine(0.01, 100, 6)(50)))
    twice = extended_schedule(0.01, [(0, 60), (40, 100), (70, 150)], 6, 0.1)
    once = extended_schedule(0.01, [(0, 60), (40, 100)], 6, 0.1)
    np.testing.assert_array_equal([float(twice(s)) for s in range(70)],
                                  [float(once(s)) for s in range(70)])  # fmt: skip
