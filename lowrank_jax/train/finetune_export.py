"""Where a fine-tuned model goes and how it comes back: PEFT module names of our LLaMA, the
outputs of a ``lowrank-jax finetune`` run (PEFT adapter, merged or full HF checkpoint), loading a
checkpoint with an adapter applied, and ``lowrank-jax generate``.

Example:
  >>> from lowrank_jax.train.finetune_export import generate_text
  >>> generate_text("runs/sums/merged", "What is 45 + 38?")  # doctest: +SKIP
  '83'
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from flax import nnx

from lowrank_jax import reparam
from lowrank_jax.models.hf import hf_name_map, save_hf
from lowrank_jax.targets import path_str
from lowrank_jax.train.config import ConfigError

__all__ = [
    "PEFT_METHODS",
    "generate_text",
    "load_with_adapter",
    "peft_module_names",
    "save_outputs",
]

# Adapter methods exported as PEFT LoRA / DoRA (the residual inits through to_base_lora).
PEFT_METHODS = ("lora", "dora", "pissa", "olora", "ffa_lora")


def peft_module_names(config: Any) -> Callable[[str, tuple], str]:
    """``(leaf path, batch index) -> HF module name`` of an unscanned model of ``config``
    (``layers/0/attn/q_proj/kernel`` -> ``model.layers.0.self_attn.q_proj``): the names PEFT
    gives the modules of the transformers model the checkpoint loads as."""
    names = {
        path_str(ours): hf.removesuffix(".weight")
        for ours, _, hf, _ in hf_name_map(config)
        if hf.endswith(".weight")
    }

    def module_name(path: str, index: tuple = ()) -> str:
        if index or path not in names:
            raise ValueError(f"leaf '{path}' has no module of its own in the HF layout")
        return names[path]

    return module_name


def save_outputs(cfg: Any, model: Any, initial: Any, tokenizer: Any) -> dict:
    """Writes what a run leaves under ``cfg.out``: ``model/`` (HF checkpoint and tokenizer) for an
    optimizer method; for an adapter method ``adapter/`` (PEFT for :data:`PEFT_METHODS`, else
    :func:`lowrank_jax.reparam.save`'s format) and, with ``cfg.merge``, ``merged/``.

    Args:
      cfg: the run's :class:`~lowrank_jax.train.finetune.FinetuneConfig`.
      model: the trained model (wrapped for adapter methods).
      initial: the adapters at init (residual inits export against the original base).
      tokenizer: saved next to HF checkpoints.

    Returns:
      ``{kind: path}`` of what was written.
    """
    saved = {}
    if not cfg.adapter:
        saved["model"] = os.path.join(cfg.out, "model")
        save_hf(model, saved["model"])
        tokenizer.save_pretrained(saved["model"])
        return saved
    adapters = reparam.adapters_of(model)
    folder = os.path.join(cfg.out, "adapter")
    if cfg.method in PEFT_METHODS:
        if cfg.method in ("pissa", "olora"):  # residual inits: PEFT wants the original base
            adapters = reparam.to_base_lora(adapters, initial)
        reparam.to_peft(
            folder,
            adapters,
            module_name=peft_module_names(model.config),
            base_model_name_or_path=cfg.model,
        )
        saved["peft_adapter"] = folder
    else:
        reparam.save(folder, adapters)
        saved["adapter"] = folder
    if cfg.merge:
        saved["merged"] = os.path.join(cfg.out, "merged")
        # unwrap writes the merged kernels into the base layers: merge a copy, keep the model.
        save_hf(reparam.unwrap(nnx.clone(model), merge=True), saved["merged"])
        tokenizer.save_pretrained(saved["merged"])
    return saved


def load_with_adapter(model_spec: str, adapter: str | None = None, **overrides: Any) -> tuple:
    """``(model, tokenizer)`` of a checkpoint, with an adapter directory applied when given:
    a PEFT directory (``adapter_config.json``) or one written by :func:`lowrank_jax.reparam.save`.

    Raises:
      UnsupportedCheckpointError, DataError: the checkpoint or its tokenizer.
      ConfigError: ``adapter`` is not an adapter directory, or does not fit the model.
    """
    from lowrank_jax.models.pretrained import load_pretrained

    model, tokenizer = load_pretrained(model_spec, scan_layers=False, **overrides)
    if adapter is None:
        return model, tokenizer
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    config = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(config):
        raise ConfigError(f"--adapter {adapter}: no adapter_config.json there")
    try:
        with open(config, encoding="utf-8") as f:
            peft_format = "peft_type" in json.load(f)
        if peft_format:
            names = peft_module_names(model.config)
            adapters = reparam.from_peft(adapter, params, module_name=names)
        else:  # reparam.save's format (same file names, its own config keys)
            adapters = reparam.load(adapter, params)
    except (ValueError, OSError) as err:
        raise ConfigError(f"--adapter {adapter}: {str(err).splitlines()[0]}") from None
    model = reparam.wrap(model, adapters, rngs=nnx.Rngs(0))  # rngs: a saved dropout rate
    model.eval()
    return model, tokenizer


def generate_text(
    model_spec: str,
    prompt: str,
    *,
    adapter: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """The reply of ``model_spec`` (plus ``adapter``) to ``prompt`` (chat template applied when
    the tokenizer has one): :func:`lowrank_jax.generate.generate`.

    Raises:
      ConfigError: a bad sampling setting; and as :func:`load_with_adapter`.
    """
    from lowrank_jax.generate import generate

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(
            f"need --temperature >= 0 and 0 < --top-p <= 1, got {temperature}, {top_p}"
        )
    model, tokenizer = load_with_adapter(model_spec, adapter)
    return generate(
        model,
        tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
