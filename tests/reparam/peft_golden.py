"""The PEFT reference runs for the wave-2 parity tests: live when torch and peft import, else the
golden file written by ``python -m tests.golden.make_golden_peft_family``."""

import functools
import importlib.metadata
import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np

from tests.golden import peft_family_reference as ref

GOLDEN = pathlib.Path(ref.__file__).with_name("peft_family.npz")
# The first PEFT release with each tuner (RandLoRA 0.16, MiSS 0.17); older ones use the file.
MIN_PEFT = {"adalora": (0, 3), "randlora": (0, 16), "miss": (0, 17)}


def _peft_version() -> tuple:
    if not all(importlib.util.find_spec(m) for m in ("torch", "peft")):
        return ()
    return tuple(int(p) for p in importlib.metadata.version("peft").split(".")[:2])


def sources(method: str) -> list[str]:
    """``["golden"]``, plus ``"live"`` when torch and a recent enough peft are installed."""
    version = _peft_version()
    return ["golden"] + (["live"] if version and version >= MIN_PEFT[method] else [])


@functools.cache
def reference(source: str, method: str) -> dict:
    """``{name: array}`` of :func:`tests.golden.peft_family_reference.run_<method>`."""
    if source == "live":
        return getattr(ref, f"run_{method}")()
    data = np.load(GOLDEN)
    prefix = f"{method}/"
    return {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}


def jax_params(r: dict) -> dict:
    """The toy's base weights as Flax ``(in, out)`` kernels."""
    return {
        "q_proj": {
            "kernel": jnp.asarray(r["base/q_proj/weight"].T),
            "bias": jnp.asarray(r["base/q_proj/bias"]),
        },
        "v_proj": {"kernel": jnp.asarray(r["base/v_proj/weight"].T)},
    }


def forward(params: dict, x) -> jnp.ndarray:
    q, v = params["q_proj"], params["v_proj"]
    return jnp.concatenate([x @ q["kernel"] + q["bias"], x @ v["kernel"]], -1)
