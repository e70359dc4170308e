"""Which implementation the kernel functions pick, per backend, size, mode and probe."""

import warnings

import jax
import jax.numpy as jnp
import pytest

import lowrank_jax.kernels as K
from lowrank_jax.kernels import _dispatch, adam, adam_8bit, quantize

BIG = _dispatch.MIN_PALLAS_SIZE


@pytest.fixture
def device(monkeypatch):
    """Pretend to be on an accelerator: ``device(backend, capability, devices=1)``."""

    def pretend(backend, capability=None, devices=1, probe=True):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        monkeypatch.setattr(_dispatch, "_cuda_capability", lambda: capability)
        monkeypatch.setattr(jax, "device_count", lambda: devices)
        return lambda target: probe

    return pretend


def choose(probe, mode=None, supported=None, free_layout=True, size=BIG):
    return _dispatch.choose(
        "k",
        mode,
        supported=supported,
        free_layout=lambda target: free_layout,
        size=size,
        probe=probe,
    )


@pytest.mark.parametrize(
    "backend, capability, expected",
    [
        ("cpu", None, None),
        ("tpu", None, ("tpu", False)),
        ("gpu", (8, 6), ("triton", False)),  # Ampere: Triton
        ("gpu", (9, 0), ("triton", False)),  # Hopper: Triton too (not Mosaic GPU)
        ("gpu", (7, 5), None),  # Turing: no Triton in Pallas
        ("gpu", None, None),  # ROCm or unknown
    ],
)
def test_auto_picks_pallas_only_on_supported_accelerators(device, backend, capability, expected):
    assert choose(device(backend, capability)) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(size=BIG - 1),  # too small to pay
        dict(free_layout=False),  # would need a padding copy
        dict(supported="block_size must be ..."),
    ],
)
def test_auto_keeps_the_reference_when_the_kernel_would_not_pay(device, kwargs):
    assert choose(device("tpu"), **kwargs) is None


def test_auto_keeps_the_reference_on_several_devices_or_a_failed_probe(device):
    assert choose(device("tpu", devices=8)) is None
    assert choose(device("gpu", (8, 0), probe=False)) is None


def test_forced_modes(device):
    probe = device("cpu")
    assert choose(probe, mode="reference") is None
    assert choose(probe, mode="interpret") == ("triton", True)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        choose(probe, mode="pallas")
    with pytest.raises(ValueError, match="cannot run here: odd block"):
        choose(probe, mode="interpret", supported="odd block")
    probe = device("tpu")
    assert choose(probe, mode="pallas", size=1, free_layout=False) == ("tpu", False)
    assert choose(probe, mode="interpret") == ("tpu", True)
    assert choose(probe, mode="reference") is None


@pytest.mark.parametrize(
    "size, target, tile, expected",
    [
        (1536 * 128, "triton", 8, (1536, 1536, 32)),
        (100 * 128, "triton", 8, (100, 100, 4)),  # the largest power of 2 dividing the rows
        (3 * 128 + 5, "triton", 8, (4, 4, 4)),  # the element tail pads the last row only
        (100 * 128, "tpu", 8, (100, 100, 100)),  # one step holds all rows
        (1000 * 128, "tpu", 8, (1000, 1000, 8)),
        (1000 * 128, "tpu", 32, (1000, 1024, 512)),  # 8 rows would split uint8 tiles: pad
    ],
)
def test_row_layout(size, target, tile, expected):
    assert _dispatch.row_layout(size, 128, target, 512 if target == "tpu" else 32, tile) == (
        expected
    )


def test_row_layout_never_leaves_a_partial_block():
    """Triton does not mask blocks past the end of an array: every step must be whole."""
    for rows in range(1, 700):
        for target, preferred in (("triton", 32), ("tpu", 256)):
            n, padded, step = _dispatch.row_layout(rows * 256, 256, target, preferred, 32)
            assert n == rows and padded % step == 0 and padded >= rows
            if target == "triton":
                assert padded == rows and step & (step - 1) == 0 and step <= preferred
            else:
                assert step == padded or (step % 32 == 0 and step <= preferred)
    assert _dispatch.row_layout(9 * 128, 128, "triton", 32, 8, block_rows=4) == (9, 12, 4)


def test_kernel_mode_context_and_environment(monkeypatch, device):
    probe = device("tpu")
    monkeypatch.setenv(K.ENV_VAR, "reference")
    assert K.current_mode() == "reference" and choose(probe) is None
    with K.kernel_mode("auto"):
        assert choose(probe) == ("tpu", False)
        with K.kernel_mode("interpret"):
            assert K.current_mode() == "interpret"
        assert K.current_mode() == "auto"
    monkeypatch.setenv(K.ENV_VAR, "always")
    with pytest.raises(ValueError, match="LOWRANK_JAX_KERNELS"):
        K.current_mode()
    with pytest.raises(ValueError, match="kernel mode must be one of"):
        with K.kernel_mode("fast"):
            pass


def test_public_functions_route_to_the_kernel_on_a_tpu(device, monkeypatch):
    """On a (pretend) TPU the dispatchers call the ``*_pallas`` functions with target tpu,
    except HF-Adam's: compiled for a v5e chip its kernel needed more memory than XLA's fusion,
    so "auto" keeps the reference there (``mode="pallas"`` still runs it)."""
    device("tpu")
    monkeypatch.setattr(_dispatch, "probe_once", lambda name, check: True)
    calls = []

    def record(name):
        return lambda *args, **kwargs: calls.append((name, kwargs["target"], kwargs["interpret"]))

    monkeypatch.setattr(adam, "adam_hf_update_pallas", record("adam"))
    monkeypatch.setattr(quantize, "quantize_blockwise_pallas", record("quantize"))
    monkeypatch.setattr(adam_8bit, "adam_8bit_update_pallas", record("adam_8bit"))
    x = jnp.zeros((BIG // 128, 128))
    q = (jnp.zeros(x.shape, jnp.uint8), jnp.zeros(BIG // 256))

    def everything():  # traced only: the stubs return None, the references stay abstract
        K.adam_hf_update(x, x, x, b1=0.9, b2=0.999, eps=1e-6, factor=1.0)
        K.quantize_blockwise(x, 256, signed=True)
        K.adam_8bit_update(
            x, q, q, b1=0.9, b2=0.999, eps=1e-8, correction1=0.1, correction2=0.1, block_size=256
        )
        # a block size the kernel cannot take, or a small array: the reference, no call
        K.quantize_blockwise(x, 64, signed=True)
        K.adam_hf_update(x[:2], x[:2], x[:2], b1=0.9, b2=0.999, eps=1e-6, factor=1.0)

    jax.make_jaxpr(everything)()
    assert calls == [("quantize", "tpu", False), ("adam_8bit", "tpu", False)]
    jax.make_jaxpr(
        lambda: K.adam_hf_update(x, x, x, b1=0.9, b2=0.999, eps=1e-6, factor=1.0, mode="pallas")
    )()
    assert calls[-1] == ("adam", "tpu", False)


def test_probe_runs_once_eagerly_inside_a_trace_and_a_failure_warns(monkeypatch):
    monkeypatch.setattr(_dispatch, "_PROBES", {})
    runs = []

    def good():
        runs.append(float(jnp.ones(3).sum()))  # concrete even while tracing

    def bad():
        runs.append("bad")
        raise RuntimeError("no lowering for this device\nmore")

    @jax.jit
    def traced(x):
        assert _dispatch.probe_once("good", good)
        return x

    traced(1.0)
    assert _dispatch.probe_once("good", good) and runs == [3.0]
    with pytest.warns(RuntimeWarning, match="bad failed its probe.*no lowering for this device"):
        assert not _dispatch.probe_once("bad", bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _dispatch.probe_once("bad", bad)  # cached: no second run, no warning
    assert runs == [3.0, "bad"]


def test_probe_of_a_kernel_fails_on_the_cpu_and_falls_back(monkeypatch, device):
    """The real probe compiles the kernel for the device; on the CPU that fails: reference."""
    monkeypatch.setattr(_dispatch, "_PROBES", {})
    device("gpu", (8, 0))
    x = jnp.ones((BIG // 128, 128))
    with pytest.warns(RuntimeWarning, match="failed its probe"):
        jaxpr = jax.make_jaxpr(lambda x: K.quantize_blockwise(x, 256, signed=True))(x)
    assert "pallas_call" not in str(jaxpr)


def test_auto_keeps_xlas_adam_on_a_gpu_where_it_measured_faster(device, monkeypatch):
    """On an H200 the fused HF-Adam kernel lost to XLA's fusion of the reference, so "auto"
    keeps the reference on GPUs; the 8-bit step (which won) still routes to its kernel."""
    device("gpu", (9, 0))
    monkeypatch.setattr(_dispatch, "probe_once", lambda name, check: True)
    calls = []

    def record(name):
        return lambda *args, **kwargs: calls.append((name, kwargs["target"]))

    monkeypatch.setattr(adam, "adam_hf_update_pallas", record("adam"))
    monkeypatch.setattr(adam_8bit, "adam_8bit_update_pallas", record("adam_8bit"))
    x = jnp.zeros((BIG // 128, 128))
    q = (jnp.zeros(x.shape, jnp.uint8), jnp.zeros(BIG // 256))

    def everything():
        K.adam_hf_update(x, x, x, b1=0.9, b2=0.999, eps=1e-6, factor=1.0)
        K.adam_8bit_update(
            x, q, q, b1=0.9, b2=0.999, eps=1e-8, correction1=0.1, correction2=0.1, block_size=256
        )
        K.adam_hf_update(x, x, x, b1=0.9, b2=0.999, eps=1e-6, factor=1.0, mode="pallas")

    jax.make_jaxpr(everything)()
    assert calls == [("adam_8bit", "triton"), ("adam", "triton")]


def test_compile_for_dispatches_as_on_the_named_device_without_probing():
    """plan_memory's TPU targets compile on this CPU host: inside compile_for("tpu") "auto"
    picks what it would pick on one TPU chip; the probe (which would run the kernel) is not
    called, and several devices keep the reference, as on a real multi-chip host."""
    never = lambda target: pytest.fail("the probe ran")
    assert choose(never) is None  # on the CPU
    with _dispatch.compile_for("tpu"):
        assert choose(never) == ("tpu", False)
        assert choose(never, size=BIG - 1) is None
        assert choose(never, mode="reference") is None
    with _dispatch.compile_for("tpu", devices=4):
        assert choose(never) is None
    assert choose(never) is None  # closed
    with pytest.raises(ValueError, match="target must be one of"):
        with _dispatch.compile_for("cuda"):
            pass
