"""The compiled train step's memory (``plan_memory``, ``lowrank-jax memory``): what the
methods save must show up in XLA's analysis of the whole step, not only in the state."""

import optax
import pytest

from lowrank_jax.train.cli import main
from lowrank_jax.train.memory_plan import format_plan, plan_memory

TINY = dict(batch_size=2, seq_len=64, dtype="float32", vocab_size=259, num_layers=4)


@pytest.fixture(scope="module")
def plans():
    sgd = optax.sgd(1e-3)
    return {
        ("sgd", False): plan_memory("llama_tiny", sgd, **TINY),
        ("sgd", True): plan_memory("llama_tiny", sgd, layerwise=True, **TINY),
        ("adamw", False): plan_memory("llama_tiny", "adamw", **TINY),
        ("galore", False): plan_memory("llama_tiny", "galore", **TINY),
        ("galore", True): plan_memory("llama_tiny", "galore", layerwise=True, **TINY),
    }


@pytest.mark.parametrize("method", ["sgd", "galore"])
def test_layerwise_temporaries_drop_by_the_gradients_not_held(plans, method):
    ordinary, layerwise = plans[method, False], plans[method, True]
    saved_gradients = ordinary.gradient_bytes - layerwise.gradient_bytes
    assert saved_gradients > 0
    saved_temp = ordinary.compiled.temp_bytes - layerwise.compiled.temp_bytes
    # most of it: at this size the backward loop's carries and the per-layer residual slices
    # take back a little (GaLore keeps 89% of the saving, SGD all of it)
    assert saved_temp >= 0.8 * saved_gradients, (saved_temp, saved_gradients)
    # the state and the parameters are the same arrays either way
    assert ordinary.state_bytes == layerwise.state_bytes
    assert ordinary.param_bytes == layerwise.param_bytes


def test_galores_state_saving_reaches_the_compiled_peak(plans):
    adamw, galore = plans["adamw", False], plans["galore", False]
    saved_state = adamw.state_bytes - galore.state_bytes
    assert saved_state > 0
    saved_peak = adamw.compiled.peak_bytes - galore.compiled.peak_bytes
    assert saved_peak >= 0.9 * saved_state, (saved_peak, saved_state)
    # GaLore's refresh (one matrix at a time) adds no workspace beyond AdamW's temporaries
    assert galore.compiled.temp_bytes <= 1.01 * adamw.compiled.temp_bytes


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_galores_temporaries_are_sgds_with_or_without_the_guard(plans, skip_nonfinite):
    """GaLore needs no temporaries beyond SGD's (its refresh included). With the non-finite
    guard too: the projected core applies it (transforms/_guard), so the projected-back
    updates reuse the gradients' buffers; a cond around the whole update kept them alive."""
    if skip_nonfinite:
        galore = plans["galore", False]
    else:
        galore = plan_memory("llama_tiny", "galore", skip_nonfinite=False, **TINY)
    assert galore.compiled.temp_bytes <= 1.01 * plans["sgd", False].compiled.temp_bytes


def test_the_report_names_every_part_and_the_verdict(plans):
    plan = plans["galore", True]._replace(device_memory=1 << 30)
    text = format_plan(plan)
    assert text.splitlines()[0].startswith("llama_tiny (")
    assert "galore layer-wise, batch 2 x 64, float32, cpu, mesh 1x1" in text
    for part in ("parameters", "optimizer state", "gradients", "activations", "compiled peak"):
        assert part in text
    assert "fits in 1.07 GB per device" in text
    assert "does NOT fit" in format_plan(plan._replace(device_memory=1024))


def test_cli_memory_prints_the_plan(capsys, monkeypatch):
    code = main(["memory", "--model", "llama_tiny", "--optimizer", "adamw", "--dtype", "float32",
                 "--vocab-size", "259", "--seq-len", "16"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "adamw, batch 1 x 16, float32, cpu" in out and "compiled peak" in out
    seen = {}
    monkeypatch.setattr(
        "lowrank_jax.train.memory_plan.plan_memory", lambda *a, **kw: seen.update(kw) or 1 / 0
    )
    with pytest.raises(ZeroDivisionError):  # the flags reach the planner
        main(["memory", "--no-skip-nonfinite", "--layerwise", "--mesh", "4x2"])
    assert seen["skip_nonfinite"] is False and seen["layerwise"] and seen["mesh"] == (4, 2)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "llama_3b"], "unknown model 'llama_3b'"),
        (["--optimizer", "lamb"], "unknown optimizer 'lamb'"),
        (["--mesh", "3"], "--mesh must be FSDPxTP"),
        (["--target", "tpu-v9"], "--target must be one of"),
        (["--dtype", "float16"], "--dtype must be float32 or bfloat16"),
        (["--optimizer", "lisa", "--layerwise", "--model", "llama_tiny"],
         "cannot be applied per layer"),
    ],
)  # fmt: skip
def test_cli_memory_errors_are_one_line(capsys, flags, message):
    code = main(["memory", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("lowrank-jax: error: ") and message in err
    assert "\n" not in err
