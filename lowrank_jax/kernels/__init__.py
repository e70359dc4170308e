"""Pallas kernels for optimizer steps, each next to the plain-jnp reference it must equal.

- :func:`adam_hf_update`: HF-style Adam (``scale_by_adam_hf``) fused in one pass.
- :func:`quantize_blockwise` / :func:`dequantize_blockwise`: the block-wise 8-bit format of
  ``scale_by_adam_8bit``.
- :func:`adam_8bit_update`: dequantize, Adam and requantize in one kernel.

Each public function dispatches: Pallas (Triton on CUDA GPUs with compute capability >= 8.0,
Mosaic on TPUs) when the mode is ``"auto"`` and the kernel is expected to pay, the reference
otherwise and always on the CPU; ``mode=`` or :func:`kernel_mode` forces a choice
(``"interpret"`` runs the kernel on the CPU, for tests). See ``_dispatch.py`` for the rules.
The ``*_pallas`` and ``*_reference`` functions are the two implementations themselves.

The kernels have not run on a GPU or TPU: they are tested against the references in
interpret mode on the CPU, and their lowering to Triton and Mosaic TPU is exported on the CPU.
"""

from lowrank_jax.kernels._dispatch import ENV_VAR as ENV_VAR
from lowrank_jax.kernels._dispatch import MIN_PALLAS_SIZE as MIN_PALLAS_SIZE
from lowrank_jax.kernels._dispatch import MODES as MODES
from lowrank_jax.kernels._dispatch import accelerator_target as accelerator_target
from lowrank_jax.kernels._dispatch import current_mode as current_mode
from lowrank_jax.kernels._dispatch import kernel_mode as kernel_mode
from lowrank_jax.kernels.adam import AdamUpdate as AdamUpdate
from lowrank_jax.kernels.adam import adam_hf_update as adam_hf_update
from lowrank_jax.kernels.adam import adam_hf_update_pallas as adam_hf_update_pallas
from lowrank_jax.kernels.adam import adam_hf_update_reference as adam_hf_update_reference
from lowrank_jax.kernels.adam_8bit import adam_8bit_update as adam_8bit_update
from lowrank_jax.kernels.adam_8bit import adam_8bit_update_pallas as adam_8bit_update_pallas
from lowrank_jax.kernels.adam_8bit import (
    adam_8bit_update_reference as adam_8bit_update_reference,
)
from lowrank_jax.kernels.lora_batched import lora_batched as lora_batched
from lowrank_jax.kernels.lora_batched import lora_batched_pallas as lora_batched_pallas
from lowrank_jax.kernels.lora_batched import lora_batched_reference as lora_batched_reference
from lowrank_jax.kernels.quantize import dequantize_blockwise as dequantize_blockwise
from lowrank_jax.kernels.quantize import dequantize_blockwise_pallas as dequantize_blockwise_pallas
from lowrank_jax.kernels.quantize import (
    dequantize_blockwise_reference as dequantize_blockwise_reference,
)
from lowrank_jax.kernels.quantize import quantize_blockwise as quantize_blockwise
from lowrank_jax.kernels.quantize import quantize_blockwise_pallas as quantize_blockwise_pallas
from lowrank_jax.kernels.quantize import (
    quantize_blockwise_reference as quantize_blockwise_reference,
)
