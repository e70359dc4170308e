"""Refuse a train step that cannot fit in memory, before anything is allocated.

XLA's buffer assignment of the compiled step (``Compiled.memory_analysis()``: arguments,
outputs and temporaries, per device) is compared with what the devices have: the allocator's
``bytes_limit`` on a GPU/TPU, the host's physical memory (or its cgroup limit) on the CPU,
where all the local devices share it. A ``--seq-len 100000`` run then stops with one line
naming the settings, instead of a ``RESOURCE_EXHAUSTED`` traceback asking for terabytes.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from lowrank_jax import memory
from lowrank_jax.train.config import ConfigError, RunConfig

__all__ = ["available_bytes", "check_step_memory", "step_bytes"]


def step_bytes(compiled: Any) -> int | None:
    """Bytes one device needs to run ``compiled`` (arguments + outputs - aliased + temps), or
    ``None`` when the backend does not say."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- not every backend implements it
        return None
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )


def available_bytes(device: jax.Device) -> tuple[int | None, bool]:
    """``(bytes, shared)``: ``device``'s memory and whether the local devices share it (the
    CPU's host memory); ``(None, False)`` when unknown."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), False
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None, False
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            host = min(host, int(limit))
    return host, True


def check_step_memory(compiled: Any, cfg: RunConfig, mesh: jax.sharding.Mesh | None) -> None:
    """Raises when the compiled train step needs more memory than the devices have.

    Raises:
      ConfigError: one line with the estimate, the memory and the settings to lower.
    """
    need = step_bytes(compiled)
    device = jax.local_devices()[0]
    have, shared = available_bytes(device)
    if need is None or have is None:
        return
    devices = len(mesh.local_devices) if (mesh is not None and shared) else 1
    total = need * devices
    if total <= have:
        return
    where = f"{devices} {device.platform} devices sharing" if devices > 1 else "the"
    memory_kind = "host memory" if shared else f"{device.platform} memory"
    raise ConfigError(
        f"--batch-size {cfg.batch_size} x --seq-len {cfg.seq_len} with {cfg.model} needs about "
        f"{memory.human(total)} for one train step (XLA's estimate), more than {where} "
        f"{memory.human(have)} of {memory_kind}; lower --seq-len or --batch-size, or pass --remat"
    )
