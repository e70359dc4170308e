"""The jitted train and eval steps, and the paper's warmup + cosine learning-rate schedule.

The model is trained functionally: ``graphdef, state = nnx.split(model)``, the parameters are a
plain pytree (``nnx.to_pure_dict``), and one ``jax.jit`` step with donated buffers takes any
optax transformation. So optimizer states stay ordinary optax pytrees that orbax saves and
restores with their types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lowrank_jax.train import layerwise
from lowrank_jax.transforms import _guard

__all__ = [
    "TrainState",
    "cross_entropy",
    "extended_schedule",
    "make_eval_step",
    "make_train_step",
    "warmup_cosine",
]


class TrainState(NamedTuple):
    """What a train step carries: the step count, the parameters, the optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


def warmup_cosine(
    peak_lr: float, total_steps: int, warmup_steps: int, min_ratio: float = 0.1
) -> optax.Schedule:
    r"""The GaLore paper's schedule (``get_cyclical_cosine_schedule_with_min_lr``, one cycle).

    .. math::
        \eta_s = \eta \cdot \begin{cases} s / w & s < w \\
        m + (1-m)\,\tfrac12\bigl(1 + \cos(\pi\,\tfrac{s - w}{N - w})\bigr) & s \ge w \end{cases}

    with ``s`` the 0-based update count, so with warmup the first update has learning rate 0, as
    in the reference (its scheduler steps after the optimizer). Held at ``m·η`` after ``N``.

    Args:
      peak_lr: ``η``.
      total_steps: ``N``.
      warmup_steps: ``w`` (0: start at the peak).
      min_ratio: ``m``.

    Returns:
      An optax schedule ``count -> lr``.
    """

    def schedule(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count, jnp.float32)
        warm = count / max(warmup_steps, 1)
        progress = jnp.clip((count - warmup_steps) / max(total_steps - warmup_steps, 1), 0, 1)
        cosine = min_ratio + (1 - min_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return peak_lr * jnp.where(count < warmup_steps, warm, cosine)

    return schedule


def extended_schedule(
    peak_lr: float,
    segments: Sequence[tuple[int, int]],
    warmup_steps: int,
    min_ratio: float = 0.1,
) -> optax.Schedule:
    r""":func:`warmup_cosine` planned for ``segments[0] = (0, N_0)``, then extended.

    Each later segment ``(k, N)`` (a run resumed at update ``k`` with ``--extend`` to ``N``
    steps) keeps the schedule before ``k`` and, from ``k`` on, continues the cosine from the
    learning rate it had reached down to the minimum at ``N``:

    .. math::
        \eta_s = m\eta + (\eta_k - m\eta)\,\tfrac12\bigl(1 + \cos(\pi\,
        \tfrac{s - k}{N - k})\bigr), \qquad s \ge k,

    so the learning rate never jumps; a finished run (``\eta_k = m\eta``) holds the minimum.
    An extension during the warmup (``k <= w``) keeps the warmup and re-plans the cosine
    for ``N`` steps (identical to the old schedule before ``k``).

    Args:
      peak_lr: ``η``.
      segments: ``[(0, N_0), (k_1, N_1), ...]`` with ``k_i < N_i``.
      warmup_steps: ``w`` (of the first plan).
      min_ratio: ``m``.

    Returns:
      An optax schedule ``count -> lr``; with one segment, :func:`warmup_cosine`.

    Example:
      >>> s = extended_schedule(1.0, [(0, 100), (100, 200)], warmup_steps=10)
      >>> float(s(150)) == float(s(100)) == float(warmup_cosine(1.0, 100, 10)(100))
      True
    """
    (_, total), *extensions = segments
    schedule = warmup_cosine(peak_lr, total, warmup_steps, min_ratio)
    floor = peak_lr * min_ratio
    for start, total in extensions:
        if start <= warmup_steps:
            schedule = warmup_cosine(peak_lr, total, warmup_steps, min_ratio)
            continue
        reached = float(schedule(start))

        def schedule(count, before=schedule, start=start, total=total, reached=reached):
            count = jnp.asarray(count, jnp.float32)
            progress = jnp.clip((count - start) / max(total - start, 1), 0, 1)
            cosine = floor + (reached - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
            return jnp.where(count < start, before(count), cosine)

    return schedule


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy, computed in float32."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.mean(losses)


def _loss_fn(graphdef: nnx.GraphDef) -> Callable[[Any, jax.Array], jax.Array]:
    def loss(params: Any, batch: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        return cross_entropy(model(batch[:, :-1]), batch[:, 1:])

    return loss


def microbatches(batch: jax.Array, k: int) -> jax.Array:
    """``batch`` (``[rows, ...]``) as ``k`` microbatches ``[k, rows / k, ...]``: microbatch
    ``m`` takes rows ``m, m + k, m + 2k, ...``, so that each device's block of a batch sharded
    by rows holds a share of every microbatch.

    Raises:
      ValueError: ``k`` does not divide the number of rows.
    """
    rows = batch.shape[0]
    if rows % k:
        raise ValueError(
            f"accum_steps={k} must divide the batch size {rows} (--batch-size is the whole "
            "batch; each microbatch has batch_size / accum_steps rows)"
        )
    return batch.reshape(rows // k, k, *batch.shape[1:]).swapaxes(0, 1)


def _finite(*scalars: jax.Array) -> jax.Array:
    """``True`` when every scalar is finite. Applied to norms: a norm is finite exactly when
    every element it sums is (short of float overflow), and costs one reduction."""
    return jnp.all(jnp.isfinite(jnp.stack([jnp.asarray(x, jnp.float32) for x in scalars])))


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    grad_clip: float = 0.0,
    schedule: optax.Schedule | None = None,
    state_sharding: Any = None,
    batch_sharding: jax.sharding.NamedSharding | None = None,
    layerwise: bool = False,
    clip_per_layer: bool = False,
    skip_nonfinite: bool = True,
    accum_steps: int = 1,
    loss_fn: Callable[..., tuple[jax.Array, jax.Array]] | None = None,
    layerwise_loss: Callable[[Any], tuple[tuple, Callable[[jax.Array], Any]]]
    | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """One jitted step ``(state, batch) -> (state, metrics)``; ``state`` is donated.

    The gradient's global norm is clipped to ``grad_clip`` (as ``torch.nn.utils.
    clip_grad_norm_``: scaled by ``min(1, c / (‖g‖ + 1e-6))``) before ``tx``, so ``tx``'s state
    is exactly its own. A step whose loss or gradients are not all finite is skipped
    (``skip_nonfinite``): the parameters and the optimizer state stay as they were, as with
    ``optax.apply_if_finite``, so one bad batch cannot poison Adam's moments; only the step
    count advances, and ``metrics["skipped"]`` says so. The skip costs no second copy of the
    parameters or the state: the update runs inside a ``lax.cond``, or, for projected-gradient
    methods (GaLore, Fira, APOLLO, ...), their core applies the guard itself, so it costs no
    temporaries either (:mod:`lowrank_jax.transforms._guard`).

    With ``layerwise=True`` (a model with ``scan_layers=True``) each layer's matrices are
    updated by ``tx`` as soon as their gradient exists in the backward pass, so at most one
    layer's gradient is alive (:mod:`lowrank_jax.train.layerwise`); the same ``TrainState``
    and the same results as the ordinary step, for any ``tx`` whose state is kept per
    parameter. Global-norm clipping needs every gradient before the first update, so
    ``grad_clip`` then requires ``clip_per_layer=True``: each layer's gradient, and the other
    leaves' gradient, are clipped to ``grad_clip`` separately. ``grad_norm`` in the metrics is
    the true global norm either way. A non-finite gradient skips only the layer it is in (and
    the other leaves when theirs is): the layers updated before it in the backward walk keep
    their update.

    With ``accum_steps=k`` the batch is split into ``k`` microbatches (rows ``m, m + k, ...``
    form microbatch ``m``, so a batch sharded over devices stays balanced) whose gradients are
    summed one after another before the one update (gradient accumulation): the activations
    are one microbatch's, the loss and the gradient are the whole batch's mean. The layer-wise
    step accumulates too, exactly and one layer at a time for every method
    (:func:`~lowrank_jax.train.layerwise.layerwise_accumulate_step`: the microbatches pass
    through each layer in turn, and each layer's gradient is their sum before its update).

    With ``loss_fn`` the step trains any loss, not the LLaMA next-token one (``lowrank-jax
    finetune`` trains adapters or every weight of a pretrained model this way, on the response
    tokens only): ``loss_fn(params, batch, *extra)`` returns ``(total, count)``, the summed
    loss over ``batch`` and the number of terms it sums (e.g. the response tokens); the
    step's loss is ``total / count`` over the whole batch, also with ``accum_steps`` (then the
    microbatches' totals and counts are summed before dividing, so a microbatch with more
    response tokens weighs more, as in the whole batch). ``batch`` may be any pytree of
    arrays with the rows first; the step is ``(state, batch, *extra) -> (state, metrics)`` and
    ``extra`` (e.g. the frozen base, a dropout key) is passed to every ``loss_fn`` call, not
    donated. ``params`` are then whatever ``state.params`` holds (the trained arrays only);
    ``graphdef`` is not used and may be ``None``. The layer-wise step runs the model's pieces
    itself, so it takes a custom loss as ``layerwise_loss(batch) -> (inputs, loss_of_logits)``
    instead: the arguments of the model's ``embed_inputs`` (e.g. tokens, positions, segment
    ids) and the batch's loss as a function of the logits, either its mean or, like
    ``loss_fn``, ``(total, count)`` (the step's loss is ``total / count``). With
    ``accum_steps`` it is called on each microbatch (``batch`` any pytree with the rows
    first, split as above): ``(total, count)`` gives the whole batch's ``sum(total) /
    sum(count)``, however the counts fall in the microbatches (``lowrank-jax finetune
    --layerwise --accum-steps``: the mean over all the batch's response tokens); a mean is
    averaged over the microbatches, with equal weights.

    Args:
      graphdef: the model's ``nnx.GraphDef`` (params are ``nnx.to_pure_dict`` of its state).
      tx: any optax transformation.
      grad_clip: the norm to clip to; 0 disables.
      schedule: reported as ``lr`` in the metrics (the one ``tx`` uses).
      state_sharding: a ``TrainState`` of shardings (from a mesh); the step keeps the state in
        them, so it compiles once.
      batch_sharding: the batch's sharding (with ``state_sharding``); metrics come back
        replicated on its mesh.
      layerwise: apply ``tx`` layer by layer inside the backward pass.
      clip_per_layer: with ``layerwise``, clip per layer (see above).
      skip_nonfinite: skip non-finite steps (``False``: apply them, NaNs and all).
      accum_steps: microbatches per step; must divide the batch size.
      loss_fn: ``(params, batch, *extra) -> (total, count)``; ``None``: the LLaMA loss of
        ``graphdef``.
      layerwise_loss: with ``layerwise``, ``batch -> (inputs, loss_of_logits)``, with
        ``loss_of_logits(logits)`` the mean or ``(total, count)``; ``None``: the next-token
        loss of ``int[batch, seq_len + 1]`` tokens.

    Returns:
      The step. ``batch`` is ``int[batch, seq_len + 1]``; metrics: ``loss``, ``grad_norm``,
      ``lr`` (float32 scalars) and ``skipped`` (a bool scalar).

    Example:
      >>> from lowrank_jax.models import Llama, get_config
      >>> model = Llama(get_config("llama_tiny", vocab_size=40, num_layers=1), rngs=nnx.Rngs(0))
      >>> params, tx = nnx.to_pure_dict(nnx.state(model, nnx.Param)), optax.adamw(1e-3)
      >>> step = make_train_step(nnx.graphdef(model), tx, grad_clip=1.0)
      >>> state = TrainState(jnp.int32(0), params, tx.init(params))
      >>> state, metrics = step(state, jnp.ones((2, 9), jnp.int32))
      >>> int(state.step), bool(metrics["skipped"])
      (1, False)
    """
    if not isinstance(accum_steps, int) or isinstance(accum_steps, bool) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive integer, got {accum_steps!r}")
    if layerwise:
        if loss_fn is not None:
            raise ValueError(
                "layerwise=True runs the model's embedding, layers and head itself: give a "
                "custom loss as layerwise_loss(batch) -> (inputs, loss_of_logits), not loss_fn"
            )
        step = _layerwise_step(
            graphdef, tx, grad_clip, clip_per_layer, schedule, skip_nonfinite, accum_steps,
            layerwise_loss,
        )  # fmt: skip
        return _jit(step, state_sharding, batch_sharding)
    if layerwise_loss is not None:
        raise ValueError("layerwise_loss goes with layerwise=True (else pass loss_fn)")
    if clip_per_layer:
        raise ValueError("clip_per_layer=True goes with layerwise=True")
    if loss_fn is None:
        loss_and_grads = _mean_loss_and_grads(_loss_fn(graphdef), accum_steps)
    else:
        loss_and_grads = _weighted_loss_and_grads(loss_fn, accum_steps)

    def step(state: TrainState, batch: Any, *extra: Any) -> tuple[TrainState, dict]:
        loss, grads = loss_and_grads(state.params, batch, *extra)
        grad_norm = optax.tree.norm(grads)
        if grad_clip > 0:
            factor = jnp.minimum(1.0, grad_clip / (grad_norm + 1e-6))
            grads = jax.tree.map(lambda g: (g * factor).astype(g.dtype), grads)

        finite = _finite(loss, grad_norm)
        if skip_nonfinite:
            # Not a select (it keeps the old and the new parameters and state alive together):
            # a cond around the whole update, or, for projected-gradient methods, the guard
            # their core applies itself, so that the projected-back updates reuse the
            # gradients' buffers (transforms/_guard; the cond costs GaLore +3.2 GB at llama_1b).
            params, opt_state = _guard.guarded_apply(
                tx, grads, state.opt_state, state.params, finite
            )
        else:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        lr = schedule(state.step) if schedule is not None else jnp.float32(jnp.nan)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(lr, jnp.float32),
            "skipped": jnp.logical_and(skip_nonfinite, jnp.logical_not(finite)),
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    return _jit(step, state_sharding, batch_sharding)


def _mean_loss_and_grads(loss_fn: Callable, accum_steps: int) -> Callable:
    """``(params, batch) -> (loss, grads)`` of a mean loss, over ``accum_steps`` microbatches
    of equal weight."""

    def loss_and_grads(params: Any, batch: jax.Array) -> tuple[jax.Array, Any]:
        if accum_steps == 1:
            return jax.value_and_grad(loss_fn)(params, batch)
        part = jax.value_and_grad(lambda p, mb: loss_fn(p, mb) / accum_steps)

        def microbatch(sums: tuple, mb: jax.Array) -> tuple[tuple, None]:
            return jax.tree.map(jnp.add, sums, part(params, mb)), None

        zeros = (jnp.zeros([], jnp.float32), jax.tree.map(jnp.zeros_like, params))
        return jax.lax.scan(microbatch, zeros, microbatches(batch, accum_steps))[0]

    return loss_and_grads


def _weighted_loss_and_grads(loss_fn: Callable, accum_steps: int) -> Callable:
    """``(params, batch, *extra) -> (loss, grads)`` of ``total / count`` where ``loss_fn``
    returns ``(total, count)``; with ``accum_steps`` the microbatches' totals and counts are
    summed first (the whole batch's mean, however the counts fall)."""

    def mean(params: Any, batch: Any, *extra: Any) -> tuple[jax.Array, jax.Array]:
        total, count = loss_fn(params, batch, *extra)
        count = jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
        return total / count, count

    def loss_and_grads(params: Any, batch: Any, *extra: Any) -> tuple[jax.Array, Any]:
        if accum_steps == 1:
            return jax.value_and_grad(lambda p: mean(p, batch, *extra)[0])(params)
        part = jax.value_and_grad(lambda p, mb: loss_fn(p, mb, *extra), has_aux=True)

        def microbatch(sums: tuple, mb: Any) -> tuple[tuple, None]:
            (total, count), grads = part(params, mb)
            count = jnp.asarray(count, jnp.float32)
            return jax.tree.map(jnp.add, sums, (total, count, grads)), None

        zero = jnp.zeros([], jnp.float32)
        split = jax.tree.map(lambda x: microbatches(x, accum_steps), batch)
        total, count, grads = jax.lax.scan(
            microbatch, (zero, zero, jax.tree.map(jnp.zeros_like, params)), split
        )[0]
        count = jnp.maximum(count, 1.0)
        return total / count, jax.tree.map(lambda g: (g / count).astype(g.dtype), grads)

    return loss_and_grads


def _layerwise_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    grad_clip: float,
    clip_per_layer: bool,
    schedule: optax.Schedule | None,
    skip_nonfinite: bool,
    accum_steps: int,
    layerwise_loss: Callable | None = None,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
    if layerwise_loss is None:
        layerwise_loss = lambda batch: (
            (batch[:, :-1],),
            lambda logits: cross_entropy(logits, batch[:, 1:]),
        )
    if grad_clip > 0 and not clip_per_layer:
        raise ValueError(
            "grad_clip with layerwise=True: global-norm clipping needs every gradient before "
            "the first update. Pass clip_per_layer=True (each layer's gradient, and the other "
            "leaves', clipped to grad_clip separately; --clip-per-layer) or grad_clip=0."
        )

    def step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict]:
        pieces = layerwise.model_pieces(graphdef, state.params)
        split = layerwise.split_state(tx, state.params, method=_describe(tx))
        if accum_steps > 1:
            # the microbatches (rows m, m + k, ... of every leaf) on a leading axis, and each
            # one's model inputs; its loss is layerwise_loss's of the same microbatch
            micro = jax.tree.map(lambda x: microbatches(x, accum_steps), batch)
            inputs = jax.lax.map(lambda mb: tuple(layerwise_loss(mb)[0]), micro)
            params, opt_state, loss, grad_norm = layerwise.layerwise_accumulate_step(
                pieces,
                tx,
                split,
                state.params,
                state.opt_state,
                inputs,
                micro,
                lambda logits, mb: layerwise_loss(mb)[1](logits),
                grad_clip=grad_clip,
                skip_nonfinite=skip_nonfinite,
            )
        else:
            inputs, loss_of_logits = layerwise_loss(batch)
            params, opt_state, loss, grad_norm = layerwise.layerwise_step(
                pieces,
                tx,
                split,
                state.params,
                state.opt_state,
                inputs,
                lambda logits: _mean(loss_of_logits(logits)),
                grad_clip=grad_clip,
                recompute=bool(getattr(nnx.merge(graphdef, state.params).config, "remat", False)),
                skip_nonfinite=skip_nonfinite,
            )
        lr = schedule(state.step) if schedule is not None else jnp.float32(jnp.nan)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(lr, jnp.float32),
            # some layer (or the other leaves) kept its old values
            "skipped": jnp.logical_and(skip_nonfinite, jnp.logical_not(_finite(grad_norm))),
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def _mean(loss: Any) -> jax.Array:
    """A ``layerwise_loss``'s value as the mean: itself, or ``total / count``."""
    if not isinstance(loss, tuple):
        return loss
    total, count = loss
    return total / jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)


def _describe(tx: Any) -> str:
    return getattr(tx, "__name__", None) or "this optimizer"


def _jit(step: Callable, state_sharding: Any, batch_sharding: Any) -> Callable:
    if state_sharding is None:
        return jax.jit(step, donate_argnums=(0,))
    return _ShardedStep(step, state_sharding, batch_sharding)


class _ShardedStep:
    """``step`` jitted with the state's and the batch's shardings (the state donated, the
    metrics replicated). Its ``extra`` arguments (``loss_fn``'s frozen base, a dropout key)
    keep the shardings they come with: one ``jax.jit`` per number of them, as ``jax.jit``
    needs one ``in_shardings`` entry per argument. ``lower`` as a ``jax.jit``'s."""

    def __init__(self, step: Callable, state_sharding: Any, batch_sharding: Any):
        self._step, self._state, self._batch = step, state_sharding, batch_sharding
        self._jitted: dict[int, Callable] = {}

    def _for(self, n_extra: int) -> Any:
        if n_extra not in self._jitted:
            replicated = jax.sharding.NamedSharding(
                self._batch.mesh, jax.sharding.PartitionSpec()
            )
            self._jitted[n_extra] = jax.jit(
                self._step,
                donate_argnums=(0,),
                in_shardings=(self._state, self._batch, *(None,) * n_extra),  # None: its own
                out_shardings=(self._state, replicated),
            )
        return self._jitted[n_extra]

    def __call__(self, state: TrainState, batch: Any, *extra: Any) -> tuple[TrainState, dict]:
        return self._for(len(extra))(state, batch, *extra)

    def lower(self, state: Any, batch: Any, *extra: Any) -> Any:
        return self._for(len(extra)).lower(state, batch, *extra)


def make_eval_step(
    graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None
) -> Callable[[Any, jax.Array], jax.Array]:
    """Jitted ``(params, batch) -> mean loss`` over ``batch`` (``int[batch, seq_len + 1]``);
    with ``mesh``, the loss comes back replicated on it."""
    if mesh is None:
        return jax.jit(_loss_fn(graphdef))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(_loss_fn(graphdef), out_shardings=replicated)
