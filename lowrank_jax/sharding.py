"""Meshes, parameter partition specs, and optimizer-state shardings derived per method.

A low-rank optimizer state cannot inherit its parameter's sharding blindly: GaLore's moment of
an ``(in, out)`` kernel is ``(r, out)``, its projector ``(in, r)``, an 8-bit state holds uint8
codes plus per-block scales, LISA keeps ``[n_active, ...]`` slots. :func:`state_specs` derives
a spec for every state leaf from the parameter it belongs to:

* a leaf with the parameter's shape gets the parameter's spec;
* a leaf with the parameter's number of dimensions keeps the parameter's mesh axis on every
  dimension whose size is unchanged and is replicated along the others (the rank axis of a
  low-rank moment, the slot axis of LISA);
* a :class:`~lowrank_jax.projection.Projector` basis ``(..., dim, r)`` is sharded along
  ``dim`` like the parameter's in (or out) axis;
* everything else (counters, keys, block scales) is replicated.

Every spec is then fitted to the mesh: a dimension that a mesh axis does not divide is
replicated (or, with ``strict=True``, a ``ValueError`` names the leaf, the dimension and the
fix) -- never an ``IndivisibleError`` from deep inside XLA.

Transformations run on explicitly sharded meshes through :func:`auto_sharded`, which hands
their internals to the compiler's sharding propagation (``jax.sharding.auto_axes``) while
keeping the input shardings of the updates and the state: decompositions that need a whole
matrix (``jnp.linalg.svd``) gather it, the randomized basis only gathers its ``in x k``
sketch.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lowrank_jax.projection import Projector
from lowrank_jax.targets import path_str

__all__ = [
    "auto_sharded",
    "fit_spec",
    "make_mesh",
    "named",
    "param_specs",
    "state_specs",
]


def make_mesh(
    fsdp: int | None = None,
    tensor: int = 1,
    *,
    explicit: bool = True,
    devices: Any = None,
) -> jax.sharding.Mesh:
    """A ``(fsdp, tensor)`` mesh over the devices (``fsdp``: all the devices ``tensor`` leaves).

    Args:
      fsdp: size of the data/FSDP axis (default ``n_devices // tensor``).
      tensor: size of the tensor-parallel axis.
      explicit: ``AxisType.Explicit`` axes (sharding in types) or ``Auto`` (GSPMD propagation).
      devices: the devices to use (default ``jax.devices()``).
    """
    devices = jax.devices() if devices is None else list(devices)
    fsdp = len(devices) // tensor if fsdp is None else fsdp
    if fsdp * tensor != len(devices):
        raise ValueError(
            f"make_mesh: fsdp={fsdp} x tensor={tensor} != {len(devices)} devices; choose sizes "
            "whose product is the device count."
        )
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(
        (fsdp, tensor), ("fsdp", "tensor"), axis_types=(kind, kind), devices=devices
    )


def param_specs(params: Any) -> Any:
    """Partition specs of a Flax NNX model's parameters, from their sharding metadata.

    ``params`` is ``nnx.state(model, nnx.Param)`` of any NNX model (or an ``nnx.eval_shape`` of
    one) whose Variables carry ``out_sharding`` metadata (``nnx.with_partitioning``; our LLaMA
    sets it from ``LlamaConfig.fsdp_axis/tensor_axis``). Variables without metadata are
    replicated. Returns a pure dict of ``PartitionSpec`` with the structure of
    ``nnx.to_pure_dict(params)``.
    """
    from flax import nnx

    return nnx.to_pure_dict(nnx.get_partition_spec(params))


def _axis_size(mesh: Any, axes: Any) -> int:
    if axes is None:
        return 1
    names = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[name] for name in names)


def fit_spec(
    shape: tuple[int, ...], spec: Any, mesh: Any, *, path: str = "", strict: bool = False
) -> P:
    """``spec`` padded to ``len(shape)`` with every indivisible dimension replicated.

    Raises:
      ValueError: with ``strict=True``, a dimension the mesh axis does not divide.
    """
    entries = list(spec or ())[: len(shape)]
    entries += [None] * (len(shape) - len(entries))
    for dim, (size, axes) in enumerate(zip(shape, entries)):
        n = _axis_size(mesh, axes)
        if size % n:
            if strict:
                raise ValueError(
                    f"{path or 'leaf'}: dimension {dim} of shape {tuple(shape)} is not divisible "
                    f"by mesh axis {axes!r} of size {n}; change the rank / sizes or shard that "
                    "dimension differently (strict=False replicates it)."
                )
            entries[dim] = None
    return P(*entries)


def _leaf_spec(leaf: Any, param: Any, spec: P, mesh: Any, resized: bool = True) -> P:
    """A state leaf of its parameter's rank is sharded like the parameter, dimension by
    dimension. A dimension the state resized (a projected moment ``(r, out)`` of an
    ``(in, out)`` kernel: the rank replaces ``in``) keeps the parameter's mesh axis where it
    divides the new size (``resized``), so FSDP divides GaLore's low-rank moments as it divides
    AdamW's moments (``llama_1b``, bf16, 1 x 256 on a v5e 2x2 mesh: GaLore's per-chip
    arguments 1.23 GB and peak 3.59 GB, against 2.06 and 4.29 GB with them replicated; AdamW
    peaks at 4.36 GB); else it is replicated. Other leaves are replicated."""
    shape, pshape = tuple(np.shape(leaf)), tuple(np.shape(param))
    entries = list(spec) + [None] * (len(pshape) - len(spec))
    if shape == pshape:
        return P(*entries)
    if len(shape) == len(pshape):
        keep = lambda s, ps, e: s == ps or (
            resized and e is not None and s % _axis_size(mesh, e) == 0
        )
        return P(*(e if keep(s, ps, e) else None for s, ps, e in zip(shape, pshape, entries)))
    return P()


def _projector_spec(basis: Any, param: Any, spec: P, side: str) -> P:
    """A basis ``(..., dim, r)``: batch axes and ``dim`` sharded like the parameter."""
    pshape = tuple(np.shape(param))
    entries = list(spec) + [None] * (len(pshape) - len(spec))
    *batch, dim, _ = np.shape(basis)
    # canonical layout (..., in, out): the basis dim is the parameter's second-last (in) or
    # last (out) axis when the parameter uses the Flax default MatrixDims(-2, -1).
    axis = -2 if side == "in" else -1
    dim_spec = entries[axis] if pshape[axis] == dim else None
    batch_spec = entries[: len(batch)] if tuple(pshape[: len(batch)]) == tuple(batch) else []
    batch_spec += [None] * (len(batch) - len(batch_spec))
    return P(*batch_spec, dim_spec, None)


def state_specs(
    tx: optax.GradientTransformation,
    params: Any,
    param_specs: Any,
    mesh: Any,
    *,
    strict: bool = False,
) -> Any:
    """A ``PartitionSpec`` for every leaf of ``tx.init(params)`` (computed with eval_shape).

    Args:
      tx: any optax transformation (lowrank_jax's or optax's).
      params: parameters (arrays or ``ShapeDtypeStruct``).
      param_specs: a ``PartitionSpec`` per parameter (same structure as ``params``).
      mesh: the mesh the specs must fit.
      strict: raise instead of replicating a dimension the mesh does not divide.

    Returns:
      A pytree with the structure of the state and a ``PartitionSpec`` per array leaf.
    """
    abstract = jax.eval_shape(tx.init, params)
    treedef = jax.tree.structure(params)
    p_leaves = treedef.flatten_up_to(params)
    s_leaves = treedef.flatten_up_to(param_specs)
    paths = [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    is_spec = lambda x: isinstance(x, P)

    def fitted(leaf: Any, spec: P, path: str) -> P:
        return fit_spec(np.shape(leaf), spec, mesh, path=path, strict=strict)

    def per_param(node: Any, resized: bool = True) -> Any:
        items = treedef.flatten_up_to(node)
        out = []
        for item, param, spec, path in zip(items, p_leaves, s_leaves, paths):
            spec = spec if is_spec(spec) else P()
            if isinstance(item, Projector):
                out.append(
                    Projector(
                        *(
                            None if b is None else fitted(b, _projector_spec(b, param, spec, s),
                                                          path)
                            for b, s in ((item.in_basis, "in"), (item.out_basis, "out"))
                        )
                    )
                )
            else:
                out.append(
                    jax.tree.map(
                        lambda x, p=param, s=spec, q=path: fitted(
                            x, _leaf_spec(x, p, s, mesh, resized), q
                        ),
                        item,
                    )
                )
        return treedef.unflatten(out)

    def visit(node: Any, resized: bool = True) -> Any:
        if node is None or isinstance(node, optax.MaskedNode):
            return node
        if hasattr(node, "shape") and hasattr(node, "dtype"):
            return P()
        try:
            return per_param(node, resized)
        except (ValueError, TypeError):
            pass
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            # A projected core whose basis is regenerated every step, not stored (APOLLO's
            # random projection; ``projectors`` is None): the generated basis carries no
            # sharding, and with the moments' rank dimension sharded XLA gathered the full
            # gradients to project them (APOLLO at llama_1b on a v5e 2x2 mesh: 6.12 GB peak
            # against 4.29 GB), so its resized dimensions stay replicated.
            fields = dict(zip(node._fields, node))
            regenerated = "lowrank_state" in fields and fields.get("projectors", 0) is None
            return type(node)(*(
                visit(c, resized and not (regenerated and f == "lowrank_state"))
                for f, c in zip(node._fields, node)
            ))  # fmt: skip
        if isinstance(node, (tuple, list)):
            return type(node)(visit(c, resized) for c in node)
        if isinstance(node, dict):
            return {k: visit(v, resized) for k, v in node.items()}
        return jax.tree.map(lambda _: P(), node)  # an unknown container: replicate

    return visit(abstract)


def named(specs: Any, mesh: Any) -> Any:
    """``NamedSharding(mesh, spec)`` for every ``PartitionSpec`` leaf of ``specs``."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )


def _explicit_mesh() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and AxisType.Explicit in mesh.axis_types


def auto_sharded(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` made safe on ``AxisType.Explicit`` meshes.

    Explicit ("sharding in types") meshes reject ``jnp.linalg.svd`` on sharded matrices and
    matmuls whose contracting dimension is sharded unless every output sharding is spelled
    out. Under an explicit mesh the update runs inside ``jax.sharding.auto_axes``: the compiler
    propagates shardings through the method's internals, and the new updates and state keep the
    shardings they came in with. On Auto meshes or a single device it is ``tx`` unchanged.
    """
    tx = optax.with_extra_args_support(tx)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any):
        if not _explicit_mesh():
            return tx.update(updates, state, params, **extra_args)
        out = jax.tree.map(lambda x: jax.typeof(x).sharding.spec, (updates, state))

        def body(updates: Any, state: Any, params: Any) -> Any:
            return tx.update(updates, state, params, **extra_args)

        return jax.sharding.auto_axes(body, out_sharding=out)(updates, state, params)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)
