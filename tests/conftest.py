"""Test setup: 8 simulated CPU devices (for the sharding tests) before JAX starts."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (tests/tpu) only compiles here, no TPU is opened: every xdist worker may load it
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def eight_devices():
    """The mesh tests need 8 devices; fewer is a setup error, never a silent skip."""
    n = len(jax.devices())
    assert n >= 8, (
        f"{n} devices; the sharding tests need 8: unset XLA_FLAGS' "
        "--xla_force_host_platform_device_count (this conftest sets 8) or set it to 8"
    )
