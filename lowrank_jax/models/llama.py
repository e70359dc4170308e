"""A Flax NNX LLaMA: RMSNorm, rotary embeddings, SwiGLU MLP, causal grouped-query attention.

The architecture is HuggingFace's ``LlamaForCausalLM`` (so checkpoints convert one-to-one, see
:mod:`lowrank_jax.models.hf`), with Flax ``(in, out)`` kernels named so that GaLore's default
targeting picks exactly the attention and MLP projections::

    embed/embedding                  (vocab, hidden)
    layers/3/input_norm/scale        (hidden,)
    layers/3/attn/q_proj/kernel      (hidden, heads * head_dim)   k_proj, v_proj, o_proj alike
    layers/3/post_attn_norm/scale    (hidden,)
    layers/3/mlp/gate_proj/kernel    (hidden, intermediate)       up_proj, down_proj alike
    final_norm/scale                 (hidden,)
    lm_head/kernel                   (hidden, vocab)              absent with tied embeddings

Other families add leaves where their config says so (:class:`LlamaConfig`): ``attn/q_proj/bias``
(Qwen2), ``attn/q_norm/scale`` and ``attn/k_norm/scale`` (Qwen3, Gemma 3), ``pre_mlp_norm/scale``
and ``post_mlp_norm/scale`` (Gemma 3's sandwich norms; there ``post_attn_norm`` normalises the
attention output instead of the MLP input, as HF's ``post_attention_layernorm`` does).

With ``scan_layers=True`` the layers are one module whose weights are stacked ``[L, ...]``
(``layers/attn/q_proj/kernel`` is ``[L, hidden, heads * head_dim]``) and run by ``lax.scan``:
one compiled layer, and GaLore treats ``L`` as a batch axis.

Kernels carry ``nnx.with_partitioning`` metadata over two mesh axes, ``fsdp`` (data / fully
sharded) and ``tensor`` (Megatron-style: q/k/v/gate/up split their output, o/down their input).
Under ``jax.set_mesh`` the parameters are created sharded; without a mesh the names are only
metadata (``nnx.get_partition_spec``).

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from lowrank_jax.models import Llama, get_config
  >>> model = Llama(get_config("llama_tiny", vocab_size=259), rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 16), jnp.int32)).shape
  (2, 16, 259)

Packed documents pass ``segment_ids`` (a token attends only within its document) and
``positions`` (restarting at 0 per document); decoding passes a :class:`KVCache`
(:func:`init_cache`) and gets the updated cache back.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.models.config import CONFIGS, LlamaConfig, get_config, rope_frequencies
from lowrank_jax.models.layers import DecoderLayer, RMSNorm, _linear, _softcap, _spec
from lowrank_jax.models.layers import attention_mask as attention_mask

__all__ = [
    "CONFIGS",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "get_config",
    "init_cache",
    "rope_frequencies",
]


class KVCache(NamedTuple):
    """Keys and values of the tokens seen so far, for decoding one token at a time.

    Attributes:
      keys, values: ``[num_layers, batch, length, kv_heads, head_dim]`` (rotated keys).
      segment_ids: ``int32[batch, length]``: each slot's document id (``0`` for empty slots
        and left padding, which real tokens, of id ``1`` by default, never attend to).
      index: ``int32[]``: the next free slot.
    """

    keys: jax.Array
    values: jax.Array
    segment_ids: jax.Array
    index: jax.Array


def init_cache(config: LlamaConfig, batch: int, length: int, dtype: Any = None) -> KVCache:
    """An empty :class:`KVCache` of ``length`` slots (``dtype``: default ``config.dtype``)."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(dtype or config.dtype))
    empty = jnp.zeros((batch, length), jnp.int32)
    return KVCache(zeros, zeros, empty, jnp.zeros((), jnp.int32))


def _mesh_is_set() -> bool:
    return not jax.sharding.get_abstract_mesh().empty


class Llama(nnx.Module):
    """LLaMA-family decoder-only language model (HF ``LlamaForCausalLM`` and relatives).

    Args:
      config: the architecture (:func:`get_config`, or :func:`~lowrank_jax.models.hf.load_hf`).
      rngs: ``nnx.Rngs`` for the initialisation (keyword-only).

    Call with ``tokens: int[batch, length]``, optional ``positions`` (rotary positions, default
    ``0..length-1``) and ``segment_ids`` (``int[batch, length]`` document ids of packed
    sequences; attention stays within a document); returns logits ``[batch, length, vocab]``
    in ``config.dtype``. With ``cache=`` a :class:`KVCache`, the tokens are written at
    ``cache.index`` and attend to everything cached before them, and the call returns
    ``(logits, cache)``.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        with nnx.use_eager_sharding(_mesh_is_set()):
            embed_init = nnx.with_partitioning(
                nnx.initializers.normal(config.init_std), _spec(config, "tensor", "fsdp")
            )
            self.embed = nnx.Embed(
                config.vocab_size,
                config.hidden_size,
                dtype=jnp.dtype(config.dtype),
                param_dtype=jnp.dtype(config.param_dtype),
                embedding_init=embed_init,
                rngs=rngs,
            )
            if config.scan_layers:
                self.layers = _stacked_layers(config, rngs)
            else:
                self.layers = nnx.List(
                    [DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)]
                )
            self.final_norm = RMSNorm(config)
            if not config.tie_embeddings:
                self.lm_head = _linear(
                    config, config.hidden_size, config.vocab_size, ("fsdp", "tensor"), rngs
                )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        cfg = self.config
        length = tokens.shape[1]
        start = 0 if cache is None else cache.index
        if positions is None:
            slots = jnp.arange(length) if cache is None else jnp.arange(length) + start
            positions = jnp.broadcast_to(slots, tokens.shape)
        sliding = cfg.sliding_layers()
        ropes = {False: self._rope(positions, local=False)}
        if any(sliding):
            local = cfg.local_rope_theta is not None
            ropes[True] = self._rope(positions, local=True) if local else ropes[False]
        masks, cache = self._masks(length, segment_ids, cache, set(sliding))
        x = self.embed(tokens)
        if cfg.scale_embeddings:
            # HF rounds the scale to the embedding's dtype (Gemma: sqrt(3072) -> 55.5 in bf16).
            scale = jnp.asarray(cfg.hidden_size**0.5, jnp.dtype(cfg.param_dtype))
            x = x * scale.astype(x.dtype)
        x, new_kv = self._layers(x, sliding, ropes, masks, cache)
        logits = self.output_logits(x)
        if cache is None:
            return logits
        keys, values = (
            jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (0, 0, start, 0, 0))
            for c, n in zip((cache.keys, cache.values), new_kv)
        )
        return logits, cache._replace(keys=keys, values=values, index=start + length)

    # The three pieces the layer-wise train step runs separately
    # (lowrank_jax.train.layerwise); __call__ is their composition.
    def embed_inputs(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[dict, dict]]:
        """The embedded tokens and what every layer needs: the rotary tables and the attention
        masks of each layer kind (full / sliding)."""
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        sliding = cfg.sliding_layers()
        ropes = {False: self._rope(positions, local=False)}
        if any(sliding):
            local = cfg.local_rope_theta is not None
            ropes[True] = self._rope(positions, local=True) if local else ropes[False]
        masks, _ = self._masks(tokens.shape[1], segment_ids, None, set(sliding))
        x = self.embed(tokens)
        if cfg.scale_embeddings:
            scale = jnp.asarray(cfg.hidden_size**0.5, jnp.dtype(cfg.param_dtype))
            x = x * scale.astype(x.dtype)
        return x, (ropes, masks)

    def run_layer(
        self, layer: DecoderLayer, x: jax.Array, context: tuple[dict, dict], index: Any
    ) -> jax.Array:
        """Decoder layer ``index`` (an int or a traced int) on ``x``, given
        :meth:`embed_inputs`' context. Uses only the config of ``self``."""
        ropes, masks = context
        sliding = self.config.sliding_layers()
        if len(set(sliding)) == 1 or isinstance(index, int):
            kind = sliding[0] if len(set(sliding)) == 1 else sliding[index]
            (cos, sin), mask = ropes[kind], masks[kind]
        else:  # layers of both kinds: select by the layer's flag
            flag = jnp.asarray(sliding)[index]
            cos, sin = (jnp.where(flag, a, b) for a, b in zip(ropes[True], ropes[False]))
            mask = jnp.where(flag, masks[True], masks[False])
        return layer(x, cos, sin, mask)

    def output_logits(self, x: jax.Array) -> jax.Array:
        """The final norm and the LM head (or the tied embedding), soft-capped if configured."""
        # on the tokens as one matrix (the head's gradient is the largest GEMM): the Linear head
        # flattens them itself, so a module wrapping it (X-LoRA's hidden-state tap) sees the
        # [batch, seq, hidden] input
        x = self.final_norm(x)
        if self.config.tie_embeddings:
            logits = self.embed.attend(x.reshape(-1, x.shape[-1]))
            logits = logits.reshape(*x.shape[:-1], logits.shape[-1])
        else:
            logits = self.lm_head(x)
        return _softcap(logits, self.config.final_softcap)

    def _rope(self, positions: jax.Array, local: bool) -> tuple[jax.Array, jax.Array]:
        angles = positions[..., None].astype(jnp.float32) * rope_frequencies(
            self.config, local=local
        )
        angles = jnp.concatenate([angles, angles], axis=-1)
        dtype = jnp.dtype(self.config.dtype)
        return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)

    def _masks(
        self, length: int, segment_ids: jax.Array | None, cache: KVCache | None, kinds: set
    ) -> tuple[dict, KVCache | None]:
        """The attention mask of each layer kind (full / sliding), and the cache's segments."""
        window = self.config.sliding_window
        if cache is None:
            if segment_ids is None and window is None:
                return {False: jnp.tril(jnp.ones((length, length), dtype=bool))}, None
            slots = jnp.arange(length)
            masks = {
                s: attention_mask(slots, slots, segment_ids, segment_ids, window if s else None)
                for s in kinds
            }
            return masks, None
        if segment_ids is None:
            segment_ids = jnp.ones((cache.segment_ids.shape[0], length), jnp.int32)
        k_segments = jax.lax.dynamic_update_slice(
            cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index)
        )
        q_slots = cache.index + jnp.arange(length)
        k_slots = jnp.arange(k_segments.shape[1])
        masks = {
            s: attention_mask(q_slots, k_slots, segment_ids, k_segments, window if s else None)
            for s in kinds
        }
        return masks, cache._replace(segment_ids=k_segments)

    def _layers(
        self, x: jax.Array, sliding: tuple, ropes: dict, masks: dict, cache: KVCache | None
    ) -> tuple[jax.Array, tuple | None]:
        """Runs the decoder layers; returns ``x`` and, with a cache, the stacked new keys/values."""
        cfg = self.config

        def run_layer(layer: DecoderLayer, x: jax.Array, cos, sin, mask, kv=None) -> Any:
            return layer(x, cos, sin, mask, kv)

        if cfg.remat and cache is None:
            run_layer = nnx.remat(run_layer)
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)
            kinds = jnp.asarray(sliding) if len(set(sliding)) > 1 else None

            def body(x: jax.Array, xs: Any) -> tuple[jax.Array, Any]:
                layer_state, kind, kv = xs
                if kind is None:
                    (cos, sin), mask = ropes[sliding[0]], masks[sliding[0]]
                else:  # layers of both kinds in one scan: select by the layer's flag
                    cos, sin = (jnp.where(kind, a, b) for a, b in zip(ropes[True], ropes[False]))
                    mask = jnp.where(kind, masks[True], masks[False])
                layer = nnx.merge(graphdef, layer_state)
                if kv is None:
                    return run_layer(layer, x, cos, sin, mask), None
                return run_layer(layer, x, cos, sin, mask, (*kv, cache.index))

            kvs = None if cache is None else (cache.keys, cache.values)
            return jax.lax.scan(body, x, (stacked, kinds, kvs))
        new_kv = []
        for i, layer in enumerate(self.layers):
            (cos, sin), mask = ropes[sliding[i]], masks[sliding[i]]
            if cache is None:
                x = run_layer(layer, x, cos, sin, mask)
            else:
                kv = (cache.keys[i], cache.values[i], cache.index)
                x, new = run_layer(layer, x, cos, sin, mask, kv)
                new_kv.append(new)
        if cache is None:
            return x, None
        return x, tuple(jnp.stack(parts) for parts in zip(*new_kv))


def _stacked_layers(config: LlamaConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """One :class:`DecoderLayer` whose parameters are stacked ``[num_layers, ...]``."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make(rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(config, rngs=rngs)

    return make(rngs)
