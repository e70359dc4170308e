"""One entry point for a pretrained model and its tokenizer: a local HF checkpoint directory, a
``.gguf`` file, or a hub id (fetched with ``huggingface_hub`` when it is installed and online).

Example:
  >>> from lowrank_jax.models.pretrained import load_pretrained
  >>> model, tokenizer = load_pretrained("path/to/checkpoint")          # doctest: +SKIP
  >>> model, tokenizer = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf", scan_layers=True)
  ... # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from lowrank_jax.models.hf import load_hf
from lowrank_jax.models.hf_config import UnsupportedCheckpointError
from lowrank_jax.models.llama import Llama

__all__ = ["load_pretrained", "resolve_checkpoint"]

# What a fine-tuning run needs from a hub repository (no PyTorch .bin, no other formats).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def resolve_checkpoint(spec: str) -> str:
    """A local path for ``spec``: itself when it exists, else a hub snapshot of it.

    Raises:
      UnsupportedCheckpointError: not a local path, and no ``huggingface_hub`` or the
        download failed (the message says which, and why).
    """
    if os.path.exists(spec):
        return spec
    try:
        import huggingface_hub
    except ImportError:
        raise UnsupportedCheckpointError(
            f"{spec!r} is not a local checkpoint directory or .gguf file (and huggingface_hub, "
            "needed to fetch hub ids, is not installed)"
        ) from None
    try:
        return huggingface_hub.snapshot_download(spec, allow_patterns=HUB_PATTERNS)
    except Exception as err:  # offline, unknown repo, invalid id: all one message to the user
        raise UnsupportedCheckpointError(
            f"{spec!r} is not a local checkpoint directory or .gguf file, and fetching it from "
            f"the hub failed: {type(err).__name__}: {err}"
        ) from None


def load_pretrained(
    spec: str, *, tokenizer_path: str | None = None, **overrides: Any
) -> tuple[Llama, Any]:
    """``(model, tokenizer)`` of a checkpoint directory, a ``.gguf`` file or a hub id.

    Args:
      spec: the checkpoint (see :func:`resolve_checkpoint`).
      tokenizer_path: a directory with ``tokenizer.json`` to use instead of the checkpoint's
        own (e.g. for a GGUF whose unigram or WordPiece vocabulary is not read).
      **overrides: :class:`~lowrank_jax.models.LlamaConfig` fields of ours (``scan_layers``,
        ``remat``, ``dtype``, ``param_dtype``, ...).

    Returns:
      The :class:`~lowrank_jax.models.Llama` and an
      :class:`~lowrank_jax.data.hf_tokenizer.HFTokenizer`.

    Raises:
      UnsupportedCheckpointError: unsupported architecture or file.
      DataError: no usable tokenizer (the message says how to give one).
    """
    from lowrank_jax.data.hf_tokenizer import HFTokenizer

    path = resolve_checkpoint(spec)
    if path.endswith(".gguf"):
        from lowrank_jax.models.gguf import gguf_tokenizer, load_gguf, open_gguf

        reader = open_gguf(path)
        model = load_gguf(reader, **overrides)
        tokenizer = None if tokenizer_path else gguf_tokenizer(reader)
    elif os.path.isdir(path):
        model = load_hf(path, **overrides)
        tokenizer = None if tokenizer_path else HFTokenizer.from_pretrained(path)
    else:
        raise UnsupportedCheckpointError(
            f"{path}: expected a checkpoint directory (config.json, safetensors) or a .gguf file"
        )
    if tokenizer_path:
        tokenizer = HFTokenizer.from_pretrained(tokenizer_path)
    return model, tokenizer
