"""The kernels lower to Triton (CUDA) and Mosaic TPU: exported on the CPU, not compiled or run.

``jax.export`` runs Pallas's lowering rules for another platform, so an operation that Triton
or Mosaic cannot express fails here. It does not compile the kernels (PTX / the TPU
compiler): that, and the numbers, need the device (see the probe in ``_dispatch.py``).
"""

import jax
import jax.numpy as jnp
import pytest
from jax.export import DisabledSafetyCheck

import lowrank_jax.kernels as K
from lowrank_jax.quantization import QuantizedArray

PLATFORMS = {"triton": ("cuda", "__gpu$xla.gpu.triton"), "tpu": ("tpu", "tpu_custom_call")}


@pytest.fixture
def pretend_tpu_v5e(monkeypatch):
    """Mosaic reads the chip generation from the local device; name one for the lowering."""
    tpu_info = pytest.importorskip(
        "jax._src.pallas.mosaic.tpu_info", reason="private Mosaic TPU hook moved in this jax"
    )
    if not hasattr(tpu_info, "get_device_kind"):
        pytest.skip("private Mosaic TPU hook moved in this jax")
    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)


def kernels(target):
    q = QuantizedArray(jnp.zeros((64, 256), jnp.uint8), jnp.zeros((64,), jnp.float32))
    c = jnp.float32(0.1)
    return {
        "adam_hf": lambda g: K.adam_hf_update_pallas(
            g, g, g.astype(jnp.float32), b1=0.9, b2=0.999, eps=1e-6, factor=c, target=target
        ),
        "quantize": lambda g: K.quantize_blockwise_pallas(g, 256, signed=True, target=target),
        "quantize_linear": lambda g: K.quantize_blockwise_pallas(
            g, 256, signed=False, quantization="linear", target=target
        ),
        "dequantize": lambda g: K.dequantize_blockwise_pallas(q, 256, signed=True, target=target),
        "adam_8bit": lambda g: K.adam_8bit_update_pallas(
            g,
            q,
            q,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            correction1=c,
            correction2=c,
            block_size=256,
            target=target,
        ),
    }


@pytest.mark.parametrize("target", ["triton", "tpu"])
def test_every_kernel_lowers_for_the_device(target, request):
    if target == "tpu":
        request.getfixturevalue("pretend_tpu_v5e")
    platform, custom_call = PLATFORMS[target]
    g = jnp.zeros((64, 256), jnp.bfloat16)
    for name, fn in kernels(target).items():
        exported = jax.export.export(
            jax.jit(fn),
            platforms=[platform],
            disabled_checks=[DisabledSafetyCheck.custom_call(custom_call)],
        )(g)
        assert custom_call in exported.mlir_module(), name
