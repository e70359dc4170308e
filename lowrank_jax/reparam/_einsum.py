"""How a layer's input meets the factors of an adapter, without materialising ``ΔW``.

A layer computes ``y = einsum(spec, x, kernel)`` (``nnx.Linear`` is ``"...i,io->...o"``). With
the kernel's in axis ``i``, out axis ``o`` and batch axes ``B`` (every other kernel axis, each
one present in the output), the *canonical output layout* is ``(lead..., B..., o)``: ``lead`` are
the input's own axes. A method's factored product is a chain of three primitives:

* ``into(x, M)``: contract the input's ``i`` with ``M: (B..., in, k)`` -> ``(lead..., B..., k)``;
* ``then(t, M)``: ``(lead..., B..., k) @ (B..., k, l)`` -> ``(lead..., B..., l)``;
* ``blocks(x, D)``: block-diagonal ``D: (B..., N, in/N, out/N)`` -> ``(lead..., B..., out)``;

and ``out(y)`` puts the canonical result into the layer's output layout. Per-output scales
``(B..., out)`` broadcast against the canonical layout directly.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Contraction:
    """The canonical-layout plan of one ``einsum(spec, x, kernel)``; see the module docstring."""

    x_spec: str
    lead: str
    batch: str
    out_letter: str
    in_letter: str
    out_spec: str
    spare: str
    precision: Any = None

    @classmethod
    def from_einsum(cls, spec: str, in_axis: int, out_axis: int, path: str = "") -> Contraction:
        """Plans ``spec`` for a kernel whose matrix axes are ``in_axis`` and ``out_axis``."""
        spec = spec.replace(" ", "")
        lhs, out_spec = spec.split("->")
        x_spec, k_spec = lhs.split(",")
        i, o = k_spec[in_axis], k_spec[out_axis]
        batch = "".join(c for n, c in enumerate(k_spec) if n not in (in_axis % len(k_spec),
                                                                     out_axis % len(k_spec)))
        x_letters = x_spec.replace("...", "")
        out_letters = out_spec.replace("...", "")
        lead = "".join(c for c in x_letters if c != i and c not in batch)
        prefix = "..." if x_spec.startswith("...") else ""
        problems = []
        if "..." in x_spec[3:] or ("..." in out_spec and not out_spec.startswith("...")):
            problems.append("'...' must lead both the input and the output spec")
        if i not in x_letters or i in out_letters:
            problems.append(f"the in axis {i!r} must be contracted with the input")
        if o in x_letters or o not in out_letters:
            problems.append(f"the out axis {o!r} must appear in the output only")
        if any(c not in out_letters for c in batch + lead):
            problems.append("every other kernel and input axis must reach the output")
        if problems:
            raise ValueError(
                f"leaf '{path}': cannot adapt einsum {spec!r} with MatrixDims(in_axis={in_axis}, "
                f"out_axis={out_axis}) without materialising ΔW: {'; '.join(problems)}. Give "
                f"`dims` naming the contracted axis as in_axis, or use reparam.apply instead."
            )
        used = set(spec)
        spare = "".join(c for c in string.ascii_letters if c not in used)[:4]
        return cls(x_spec, prefix + lead, batch, o, i, out_spec, spare)

    def with_precision(self, precision: Any) -> Contraction:
        return dataclasses.replace(self, precision=precision)

    def _einsum(self, spec: str, *operands: jax.Array) -> jax.Array:
        return jnp.einsum(spec, *operands, precision=self.precision)

    def into(self, x: jax.Array, m: jax.Array) -> jax.Array:
        k = self.spare[0]
        b = self.batch
        return self._einsum(f"{self.x_spec},{b}{self.in_letter}{k}->{self.lead}{b}{k}", x, m)

    def then(self, t: jax.Array, m: jax.Array) -> jax.Array:
        k, m_letter = self.spare[0], self.spare[1]
        lhs = f"{self.lead}{self.batch}{k}"
        return self._einsum(
            f"{lhs},{self.batch}{k}{m_letter}->{self.lead}{self.batch}{m_letter}", t, m
        )

    def blocks(self, x: jax.Array, d: jax.Array) -> jax.Array:
        n, p, q = self.spare[0], self.spare[1], self.spare[2]
        letters = self.x_spec.replace("...", "")
        axis = x.ndim - len(letters) + letters.index(self.in_letter)
        num = d.shape[-3]
        x = x.reshape(x.shape[:axis] + (num, x.shape[axis] // num) + x.shape[axis + 1 :])
        x_spec = self.x_spec.replace(self.in_letter, n + p)
        b = self.batch
        y = self._einsum(f"{x_spec},{b}{n}{p}{q}->{self.lead}{b}{n}{q}", x, d)
        return y.reshape(y.shape[:-2] + (y.shape[-2] * y.shape[-1],))

    def out(self, y: jax.Array) -> jax.Array:
        canonical = f"{self.lead}{self.batch}{self.out_letter}"
        if canonical == self.out_spec:
            return y
        return jnp.einsum(f"{canonical}->{self.out_spec}", y)
