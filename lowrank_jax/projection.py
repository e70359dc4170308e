"""Subspace math for gradient projection: bases, sides, project and project back.

Pure functions, no optax and no state. Every function takes matrices in the canonical layout
``(..., in, out)`` (a Flax kernel); leading axes are batch axes and every matrix in the batch
gets its own basis (``jnp.linalg`` and ``@`` broadcast over them, so no ``vmap`` is needed).

A basis for the *in* axis is ``B_in: (..., in, r)`` with orthonormal columns, and likewise
``B_out: (..., out, r)``. With ``G`` the canonical gradient:

==========  ========================  ======================
side        project(G)                project_back(N)
==========  ========================  ======================
``"in"``    ``B_inᵀ G``   (r, out)    ``B_in N``
``"out"``   ``G B_out``   (in, r)     ``N B_outᵀ``
``"both"``  ``B_inᵀ G B_out`` (r, r)  ``B_in N B_outᵀ``
==========  ========================  ======================

For a PyTorch weight ``W: (out, in)`` (GaLore's ``m x n``), compressing the *in* axis is
galore-torch's ``right`` projector (``Q = Vh[:r]``) and compressing the *out* axis is its
``left`` projector (``P = U[:, :r]``), so results match galore-torch on the transposed weight.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", 2024.
  Halko, Martinsson, Tropp, "Finding structure with randomness", SIAM Review 2011.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "BASIS_KINDS",
    "PROJ_TYPES",
    "Projector",
    "canonical_signs",
    "choose_side",
    "compute_projector",
    "identity_projector",
    "lowrank_shape",
    "project",
    "project_back",
    "random_basis",
    "randomized_svd",
    "svd_basis",
]

Side = Literal["in", "out", "both"]
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
BASIS_KINDS = ("svd", "randomized", "random")


class Projector(NamedTuple):
    """Orthonormal bases of one (batched) matrix; ``None`` for an axis that is not compressed."""

    in_basis: jax.Array | None  # (..., in, r)
    out_basis: jax.Array | None  # (..., out, r)


def choose_side(proj_type: str, n_in: int, n_out: int) -> Side:
    """Which axis galore-torch's ``proj_type`` compresses, stated on the in/out axes.

    ``std`` compresses the smaller axis (the *in* axis of a square matrix, as galore-torch does
    for ``m == n``); ``reverse_std`` the larger (the *out* axis of a square matrix); ``right``
    always the in axis; ``left`` always the out axis; ``full`` both.
    """
    if proj_type == "std":
        return "in" if n_out >= n_in else "out"
    if proj_type == "reverse_std":
        return "out" if n_out >= n_in else "in"
    if proj_type == "right":
        return "in"
    if proj_type == "left":
        return "out"
    if proj_type == "full":
        return "both"
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}.")


def lowrank_shape(shape: tuple[int, ...], side: Side, rank: int) -> tuple[int, ...]:
    """The shape of ``project(G)`` for a canonical ``(..., in, out)`` shape."""
    *batch, n_in, n_out = shape
    return {
        "in": (*batch, rank, n_out),
        "out": (*batch, n_in, rank),
        "both": (*batch, rank, rank),
    }[side]


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def project(g: jax.Array, proj: Projector) -> jax.Array:
    """Projects a canonical ``(..., in, out)`` matrix into the low-rank space."""
    if proj.in_basis is not None:
        g = _t(proj.in_basis).astype(g.dtype) @ g
    if proj.out_basis is not None:
        g = g @ proj.out_basis.astype(g.dtype)
    return g


def project_back(n: jax.Array, proj: Projector) -> jax.Array:
    """Maps a low-rank matrix back to the full ``(..., in, out)`` space (no scale)."""
    if proj.in_basis is not None:
        n = proj.in_basis.astype(n.dtype) @ n
    if proj.out_basis is not None:
        n = n @ _t(proj.out_basis).astype(n.dtype)
    return n


def _per_matrix(fn, *xs: jax.Array, broadcasts: bool = True):
    """``fn`` (a LAPACK-backed ``jnp.linalg`` call) over the leading batch axes of ``xs``.

    Normally ``fn`` broadcasts itself. On a CPU process with several (simulated) devices, a
    batched LAPACK call fans its matrices out to the thread pool that all the devices share and
    blocks on them; with 8 devices on a 2-core machine every pool thread ends up waiting and
    the step deadlocks (jaxlib's ``ParallelBatchMap``; seen with batched ``gesdd``). There we
    loop over the matrices with ``lax.map`` instead: the same per-matrix LAPACK calls, so the
    results are identical, just not fanned out. ``broadcasts=False`` for an ``fn`` that takes
    one matrix (it is ``vmap``-ed over the batch axes).
    """
    batch = xs[0].shape[:-2]
    if not batch or jax.default_backend() != "cpu" or jax.local_device_count() == 1:
        batched = fn
        for _ in range(0 if broadcasts else len(batch)):
            batched = jax.vmap(batched)
        return batched(*xs)
    flat = [x.reshape(-1, *x.shape[-2:]) for x in xs]
    out = jax.lax.map(lambda args: fn(*args), flat)
    return jax.tree.map(lambda y: y.reshape(*batch, *y.shape[1:]), out)


def _eigh(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(eigenvalues ascending, eigenvectors)`` of symmetric matrices.

    LAPACK on CPUs and cuSOLVER on GPUs; on TPUs the Jacobi eigensolver, whose compiled program
    stays small (XLA's default QDWH divide-and-conquer unrolls into tens of MB of code and
    minutes of compilation per matrix size).
    """

    def jacobi(m: jax.Array) -> tuple[jax.Array, jax.Array]:
        vectors, values = jax.lax.linalg.eigh(
            m, implementation=jax.lax.linalg.EighImplementation.JACOBI
        )
        return values, vectors

    def default(m: jax.Array) -> tuple[jax.Array, jax.Array]:
        values, vectors = _per_matrix(jnp.linalg.eigh, m)
        return values, vectors

    return jax.lax.platform_dependent(x, tpu=jacobi, default=default)


def _gram_svd(g: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Top-``rank`` singular vectors from the eigenvectors of the smaller Gram matrix.

    For ``in <= out``: ``G Gᵀ = U Σ² Uᵀ`` gives ``U``, and ``V = Gᵀ U Σ⁻¹`` (normalised, so a
    zero singular value leaves a zero column, never a NaN); the other way round otherwise.
    Matmuls and one symmetric eigendecomposition of ``min(in, out)`` square: what a TPU
    compiles in bounded time, unlike its SVD. Squaring costs accuracy only in the singular
    vectors of tiny singular values, which a rank-``r`` projector of a gradient does not keep.
    """
    flip = g.shape[-2] > g.shape[-1]
    a = _t(g) if flip else g
    _, vectors = _eigh(a @ _t(a))
    u = vectors[..., ::-1][..., :rank]
    v = _t(a) @ u
    v = v / jnp.maximum(jnp.linalg.norm(v, axis=-2, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return (v, u) if flip else (u, v)


def svd_basis(g: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Top-``rank`` left and right singular vectors of ``g``, in float32.

    Returns ``(U[..., :, :rank], V[..., :, :rank])``: ``U`` spans the in axis, ``V`` the out axis.
    An exact SVD (LAPACK ``gesdd`` on CPUs, cuSOLVER on GPUs); on TPUs the eigenvectors of the
    smaller Gram matrix (:func:`_gram_svd`), because XLA's TPU SVD takes minutes to compile per
    matrix shape.
    """

    def lapack(m: jax.Array) -> tuple[jax.Array, jax.Array]:
        u, _, vh = _per_matrix(lambda x: jnp.linalg.svd(x, full_matrices=False), m)
        return u[..., :rank], _t(vh[..., :rank, :])

    return jax.lax.platform_dependent(
        g.astype(jnp.float32), tpu=lambda m: _gram_svd(m, rank), default=lapack
    )


def _lu_normalize(y: jax.Array) -> jax.Array:
    """The permuted unit-lower factor of ``y``: a cheap, well-conditioned basis of its range.

    It always has full column rank (a unit-diagonal block), even when ``y`` does not.
    """
    # jax.scipy.linalg.lu takes one matrix
    return _per_matrix(lambda m: jax.scipy.linalg.lu(m, permute_l=True)[0], y, broadcasts=False)


def _orthonormalize(y: jax.Array) -> jax.Array:
    """Orthonormal columns spanning a well-conditioned ``y``, by CholeskyQR2.

    Two rounds of ``Q = Y L⁻ᵀ`` with ``L Lᵀ = Yᵀ Y``: a ``k x k`` Cholesky and a triangular
    solve instead of a Householder QR, which XLA runs far slower on the CPU. Exact to float32
    round-off for condition numbers up to ~1e3 (Yamamoto et al. 2015); callers pass LU factors
    or Gaussian blocks, which stay well below that.
    """
    for _ in range(2):
        chol = _per_matrix(jnp.linalg.cholesky, _t(y) @ y)
        y = _t(_per_matrix(lambda c, b: jax.scipy.linalg.solve_triangular(c, b, lower=True),
                           chol, _t(y)))
    return y


def randomized_svd(
    g: jax.Array,
    rank: int,
    key: jax.Array,
    *,
    oversample: int = 8,
    power_iters: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """Top-``rank`` singular vectors by a randomized range finder (Halko et al., Alg. 4.4).

    ``Y = G Ω`` with ``k = rank + oversample`` Gaussian columns; ``power_iters`` rounds of
    ``Y = G (Gᵀ Y)``, each operand renormalised by its LU factor (cheaper than QR and enough to
    keep the columns apart, as scikit-learn does); CholeskyQR2 of the final ``in x k`` block;
    then a Rayleigh-Ritz step: the eigenvectors of the small ``k x k`` matrix ``B Bᵀ`` with
    ``B = Qᵀ G`` rotate ``Q`` onto the singular vectors. Every operation on a full-size operand
    is a matmul, so a sharded gradient is never gathered whole. When ``k >= min(in, out)`` the
    sketch would be as large as the matrix, and the exact SVD is used instead.
    """
    g = g.astype(jnp.float32)
    *batch, n_in, n_out = g.shape
    k = rank + oversample
    if k >= min(n_in, n_out):
        return svd_basis(g, rank)
    y = g @ jax.random.normal(key, (*batch, n_out, k), jnp.float32)
    for _ in range(power_iters):
        y = g @ _lu_normalize(_t(g) @ _lu_normalize(y))
    q = _orthonormalize(_lu_normalize(y))
    b = _t(q) @ g  # (k, out)
    _, eigvecs = _eigh(b @ _t(b))  # ascending
    top = eigvecs[..., ::-1][..., :rank]
    u = q @ top
    # right vectors: Bᵀ w_i / σ_i, normalised (a zero σ leaves a zero column, never a NaN)
    v = _t(b) @ top
    v = v / jnp.maximum(jnp.linalg.norm(v, axis=-2, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return u, v


def random_basis(shape: tuple[int, ...], rank: int, key: jax.Array) -> jax.Array:
    """A seeded random ``(..., dim, rank)`` basis with orthonormal columns (no SVD)."""
    return _orthonormalize(jax.random.normal(key, (*shape[:-1], shape[-1], rank), jnp.float32))


def compute_projector(
    g: jax.Array,
    side: Side,
    rank: int,
    basis: str,
    key: jax.Array | None = None,
    dtype: jnp.dtype | None = None,
) -> Projector:
    """A new projector for canonical gradient ``g: (..., in, out)``, computed in float32.

    Args:
      g: the gradient (any float dtype; upcast to float32 for the decomposition).
      side: ``"in"``, ``"out"`` or ``"both"`` (see :func:`choose_side`).
      rank: number of basis vectors kept (``<= min(in, out)``).
      basis: ``"svd"`` (exact), ``"randomized"`` (range finder) or ``"random"`` (Gaussian, QR).
      key: PRNG key for ``"randomized"`` and ``"random"``.
      dtype: dtype of the stored bases (default: ``g.dtype``, as galore-torch does).

    Matrix products run at full float32 precision on every backend (a TPU's default would
    round their operands to bfloat16).
    """
    dtype = g.dtype if dtype is None else dtype
    with jax.default_matmul_precision("float32"):
        u, v = _bases(g, side, rank, basis, key)
    return Projector(
        in_basis=canonical_signs(u).astype(dtype) if side != "out" else None,
        out_basis=canonical_signs(v).astype(dtype) if side != "in" else None,
    )


def _bases(
    g: jax.Array, side: Side, rank: int, basis: str, key: jax.Array | None
) -> tuple[jax.Array | None, jax.Array | None]:
    if basis == "svd":
        u, v = svd_basis(g, rank)
    elif basis == "randomized":
        # run the range finder along the compressed axis (the more accurate factor)
        if side == "out":
            v, u = randomized_svd(_t(g), rank, key)
        else:
            u, v = randomized_svd(g, rank, key)
    elif basis == "random":
        key_in, key_out = jax.random.split(key)
        *batch, n_in, n_out = g.shape
        u = random_basis((*batch, n_in), rank, key_in) if side != "out" else None
        v = random_basis((*batch, n_out), rank, key_out) if side != "in" else None
    else:
        raise ValueError(f"basis must be one of {BASIS_KINDS}, got {basis!r}.")
    return u, v


def canonical_signs(basis: jax.Array) -> jax.Array:
    """Flips each column so that its largest-magnitude entry is positive.

    Singular vectors are defined up to sign, and LAPACK, cuSOLVER, XLA's sharded programs and
    the randomized range finder each pick their own. Within one refresh period GaLore's update
    does not depend on the signs, but moments carried across a refresh do; fixing the signs
    makes a run independent of the backend and of how the gradient is sharded.
    """
    pivot = jnp.take_along_axis(basis, jnp.argmax(jnp.abs(basis), axis=-2)[..., None, :], -2)
    return basis * jnp.where(pivot < 0, -1.0, 1.0).astype(basis.dtype)


def identity_projector(
    shape: tuple[int, ...], side: Side, rank: int, dtype: jnp.dtype
) -> Projector:
    """The first ``rank`` coordinate axes: a valid orthonormal projector before any gradient."""
    *batch, n_in, n_out = shape

    def eye(dim: int) -> jax.Array:
        return jnp.broadcast_to(jnp.eye(dim, rank, dtype=dtype), (*batch, dim, rank))

    return Projector(
        in_basis=eye(n_in) if side != "out" else None,
        out_basis=eye(n_out) if side != "in" else None,
    )
