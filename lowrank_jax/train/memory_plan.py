"""Will it fit? The compiled train step's memory, before renting the hardware.

:func:`plan_memory` builds the real train step of a LLaMA config with a registered optimizer
(the ordinary step or the layer-wise one), lowers it with abstract arguments and asks XLA for
its memory analysis: nothing is allocated, so ``llama_7b`` plans on a laptop. The target is
the local CPU or GPU, or a TPU topology (``tpu-v5e``, ``tpu-v4``, ``tpu-v5p``, ``tpu-v6e``;
compiled by libtpu on this host with the ``tpu`` extra, no TPU needed). ``lowrank-jax memory``
prints the same report.

The CPU backend overstates bfloat16 runs: it upcasts bfloat16 dots and keeps float32 copies
of the stacked weights (compare in float32 there, or compile for a TPU target).

Example:
  >>> from lowrank_jax.train.memory_plan import plan_memory
  >>> plan = plan_memory("llama_tiny", "galore", batch_size=1, seq_len=32, dtype="float32",
  ...                    vocab_size=259)  # doctest: +SKIP
  >>> plan.compiled.peak_bytes > plan.param_bytes  # doctest: +SKIP
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lowrank_jax import memory, sharding
from lowrank_jax.kernels import _dispatch
from lowrank_jax.models import Llama, get_config
from lowrank_jax.train.registry import OptimizerArgs, get_optimizer
from lowrank_jax.train.step import TrainState, make_train_step

__all__ = ["TARGETS", "DoesNotFit", "MemoryPlan", "format_plan", "plan_memory"]

# target -> (topology family, HBM per device in bytes); "cpu" / "gpu" compile locally.
TARGETS = {
    "cpu": (None, None),
    "gpu": (None, None),
    "tpu-v5e": ("v5e", 16 * 2**30),
    "tpu-v4": ("v4", 32 * 2**30),  # megacore: one device per chip, both TensorCores
    "tpu-v5p": ("v5p", 95 * 2**30),
    "tpu-v6e": ("v6e", 32 * 2**30),
}
# the smallest topology of each family with at least n devices
_TOPOLOGIES = {
    "v5e": ((4, "v5e:2x2"), (8, "v5e:2x4"), (16, "v5e:4x4")),
    "v4": ((4, "v4:2x2x1"), (8, "v4:2x2x2")),
    "v5p": ((4, "v5p:2x2x1"), (8, "v5p:2x2x2")),
    "v6e": ((4, "v6e:2x2"), (8, "v6e:2x4"), (16, "v6e:4x4")),
}


class DoesNotFit(ValueError):
    """The target's compiler refused the step: it needs more memory than one device has (the
    TPU compiler checks HBM while compiling). The message has the compiler's figures.

    Attributes:
      required_bytes: what the compiler says the program needs, or ``None`` when its message
        has no figure. libtpu's message calls this "the total memory required for HLO
        temporaries", but it is the whole program's: arguments (parameters, optimizer state)
        included. A bare 17 GB bfloat16 argument summed on a 15.75 GiB v5e is refused with
        "HLO temporaries (15.83G)" and no temporaries at all (tests/tpu).
      available_bytes: the device's memory as the compiler counts it, or ``None``.
    """

    def __init__(self, message: str, required_bytes: int | None = None,
                 available_bytes: int | None = None):  # fmt: skip
        super().__init__(message)
        self.required_bytes = required_bytes
        self.available_bytes = available_bytes


_HBM = re.compile(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def _refusal(description: str, err: Exception) -> DoesNotFit:
    """The :class:`DoesNotFit` for the compiler's out-of-memory ``err``."""
    detail = str(err).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
    found = _HBM.search(detail)
    if found is None:
        return DoesNotFit(f"{description}: does NOT fit ({detail})")
    required, available = (int(float(x) * 2**30) for x in found.groups())
    return DoesNotFit(
        f"{description}: does NOT fit: the compiler needs {memory.human(required)} in all "
        f"(parameters, optimizer state and temporaries; its message calls the total 'HLO "
        f"temporaries') and the device has {memory.human(available)} ({detail})",
        required,
        available,
    )


class MemoryPlan(NamedTuple):
    """What :func:`plan_memory` found. Bytes are per device.

    Attributes:
      description: model, optimizer, layer-wise or not, batch, dtype, target, mesh.
      param_bytes: the parameters (sharded: this device's share, from the compiled arguments'
        layout is not separable, so: total / devices).
      state_bytes: the optimizer state (likewise).
      gradient_bytes: the gradients the step holds at once (all of them, or with layer-wise
        updates the largest layer's matrices plus the other leaves).
      compiled: XLA's analysis of the compiled step.
      compile_seconds: how long compiling took.
      device_memory: the device's memory (given or the target's), or ``None``.
    """

    description: str
    param_bytes: int
    state_bytes: int
    gradient_bytes: int
    compiled: memory.CompiledMemory
    compile_seconds: float
    device_memory: int | None

    @property
    def activation_bytes(self) -> int:
        """The compiled temporaries beyond the gradients: activations and workspaces."""
        return max(self.compiled.temp_bytes - self.gradient_bytes, 0)

    @property
    def fits(self) -> bool | None:
        if self.device_memory is None:
            return None
        return self.compiled.peak_bytes <= self.device_memory


def _devices(target: str, n: int) -> list:
    family, _ = TARGETS[target]
    if family is None:
        platform = "cpu" if target == "cpu" else "gpu"
        try:
            devices = jax.devices(platform)
        except RuntimeError:
            raise ValueError(f"--target {target}: this machine has no {platform} devices") from None
        if len(devices) < n:
            raise ValueError(f"--target {target}: the mesh needs {n} devices, {len(devices)} here")
        return devices[:n]
    try:
        from jax.experimental import topologies
    except ImportError as err:  # pragma: no cover -- part of jax
        raise ValueError(f"--target {target}: {err}") from None
    names = [name for size, name in _TOPOLOGIES[family] if size >= n]
    if not names:
        raise ValueError(f"--target {target}: no topology of {n} devices is known")
    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=names[0])
    except Exception as err:  # noqa: BLE001 -- libtpu missing or refusing
        raise ValueError(
            f"--target {target} compiles with libtpu: pip install 'lowrank_jax[tpu]' "
            f"({str(err).splitlines()[0][:120]})"
        ) from None
    # megacore chips (v4, v5p) list both TensorCores; a mesh takes one device per chip
    devices = [d for d in topology.devices if getattr(d, "core_on_chip", 0) == 0]
    return devices[:n]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _tree_bytes(tree: Any) -> int:
    return memory.tree_bytes(tree)


def _gradient_bytes(params: Any, layerwise: bool) -> int:
    if not layerwise:
        return _tree_bytes(params)
    from lowrank_jax.train.layerwise import partition_params

    layers, rest = partition_params(params)
    per_layer = sum(
        math.prod(x.shape[1:]) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(layers)
    )
    return per_layer + _tree_bytes(rest)


def plan_memory(
    model: str = "llama_1b",
    optimizer: Any = "galore",
    *,
    layerwise: bool = False,
    batch_size: int = 1,
    seq_len: int = 256,
    dtype: str = "bfloat16",
    rank: int | None = None,
    options: dict | None = None,
    target: str = "cpu",
    mesh: tuple[int, int] = (1, 1),
    device_memory: int | None = None,
    remat: bool = False,
    vocab_size: int | None = None,
    num_layers: int | None = None,
    skip_nonfinite: bool = True,
    accum_steps: int = 1,
) -> MemoryPlan:
    """Compiles the train step abstractly and measures it (see the module docstring).

    Args:
      model: a LLaMA config name (``llama_60m`` ... ``llama_7b``).
      optimizer: a registered optimizer name (``lowrank-jax optimizers``) or an optax
        transformation (``rank`` and ``options`` then unused).
      layerwise: the layer-wise step (the model is built with ``scan_layers=True`` always).
      batch_size, seq_len: the token batch.
      dtype: ``"float32"`` or ``"bfloat16"``, for the parameters and the computation.
      rank: projection rank (``None``: the model's ``hidden_size // 4``).
      options: extra keyword arguments of the optimizer (``--opt``).
      target: a key of :data:`TARGETS`.
      mesh: ``(fsdp, tensor)`` devices; parameters, state and batch sharded as in training.
      device_memory: bytes available per device (default: the TPU target's HBM, else none).
      remat: rematerialise layer activations.
      vocab_size: override the config's vocabulary.
      num_layers: override the config's depth.
      skip_nonfinite: the train step's non-finite guard (see
        :func:`~lowrank_jax.train.step.make_train_step`; it costs GaLore's ordinary step its
        projected-back updates).
      accum_steps: microbatches per step (gradient accumulation; must divide ``batch_size``).

    Returns:
      A :class:`MemoryPlan`.

    Raises:
      DoesNotFit: the target's compiler found that the step needs more than a device has.
      ValueError: unknown target, model, optimizer, or a method that cannot run layer-wise.
    """
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    overrides = dict(scan_layers=True, remat=remat, dtype=dtype, param_dtype=dtype)
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    if num_layers is not None:
        overrides["num_layers"] = num_layers
    config = get_config(model, **overrides)
    config = dataclasses.replace(
        config, max_position_embeddings=max(seq_len, config.max_position_embeddings)
    )
    if isinstance(optimizer, str):
        args = OptimizerArgs(
            learning_rate=1e-3,
            rank=rank or max(1, config.hidden_size // 4),
            extra=dict(options or {}),
        )
        tx = get_optimizer(optimizer).factory(args)
    else:  # an optax transformation
        tx, optimizer = optimizer, getattr(optimizer, "__name__", "a transformation")
    abstract_model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract_model)
    params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
    opt_state = jax.eval_shape(tx.init, params)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state)
    batch = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32)
    fsdp, tensor = mesh
    n_devices = fsdp * tensor
    devices = _devices(target, n_devices)
    state_sharding = batch_sharding = device_mesh = None
    if target != "cpu" or n_devices > 1:
        device_mesh = sharding.make_mesh(fsdp, tensor, explicit=False, devices=devices)
        specs = sharding.param_specs(nnx.state(abstract_model, nnx.Param))
        specs = jax.tree.map(
            lambda leaf, spec: sharding.fit_spec(leaf.shape, spec, device_mesh), params, specs,
            is_leaf=lambda x: isinstance(x, P),
        )
        state_specs = TrainState(
            P(), specs, sharding.state_specs(tx, params, specs, device_mesh)
        )
        state_sharding = sharding.named(state_specs, device_mesh)
        state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_sharding
        )
        spec = P("fsdp") if batch_size % fsdp == 0 else P()
        batch_sharding = NamedSharding(device_mesh, spec)
        batch = jax.ShapeDtypeStruct(batch.shape, batch.dtype, sharding=batch_sharding)
    step = make_train_step(
        graphdef,
        tx,
        grad_clip=0.0,
        layerwise=layerwise,
        skip_nonfinite=skip_nonfinite,
        accum_steps=accum_steps,
        state_sharding=state_sharding,
        batch_sharding=batch_sharding,
    )
    where = target if target in ("cpu", "gpu") else f"{target} ({devices[0].device_kind})"
    description = (
        f"{model} ({_count(config.num_params())} params), {optimizer}"
        f"{' layer-wise' if layerwise else ''}, batch {batch_size} x {seq_len}"
        f"{f' in {accum_steps} microbatches' if accum_steps > 1 else ''}, {dtype}, "
        f"{where}, mesh {fsdp}x{tensor}"
    )
    began = time.perf_counter()
    try:
        # on a TPU target the kernels are dispatched as on that TPU (Pallas where "auto" would
        # pick it there), so the figure is that of the program the chip would run
        kernels_as = (
            _dispatch.compile_for("tpu", n_devices)
            if TARGETS[target][0] is not None
            else contextlib.nullcontext()
        )
        with (
            jax.set_mesh(device_mesh) if device_mesh is not None else contextlib.nullcontext(),
            kernels_as,
        ):
            compiled = memory.compiled_memory(step, state, batch)
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        raise _refusal(description, err) from None
    seconds = time.perf_counter() - began
    if device_memory is None:
        device_memory = TARGETS[target][1]
    return MemoryPlan(
        description,
        _tree_bytes(params) // n_devices,
        _tree_bytes(opt_state) // n_devices,
        _gradient_bytes(params, layerwise) // n_devices,
        compiled,
        seconds,
        device_memory,
    )


def format_plan(plan: MemoryPlan) -> str:
    """The report ``lowrank-jax memory`` prints."""
    h = memory.human
    c = plan.compiled
    lines = [
        plan.description,
        f"  parameters        {h(plan.param_bytes):>10}",
        f"  optimizer state   {h(plan.state_bytes):>10}",
        f"  gradients         {h(plan.gradient_bytes):>10}  (held at once)",
        f"  activations etc.  {h(plan.activation_bytes):>10}  (compiled temporaries - gradients)",
        f"  compiled temp     {h(c.temp_bytes):>10}",
        f"  compiled peak     {h(c.peak_bytes):>10}  (arguments + outputs - aliased + temp)",
        f"  compile time      {plan.compile_seconds:>9.1f}s",
    ]
    if plan.fits is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  {verdict} in {h(plan.device_memory)} per device")
    return "\n".join(lines)
