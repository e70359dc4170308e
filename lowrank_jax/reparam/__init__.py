"""Parameter reparameterizations: the LoRA family as functional transforms over parameter trees.

One interface for every method (:class:`Method`: ``init``/``delta``/``affine``/``product`` on a
canonical ``(..., in, out)`` matrix) and one wrapper (:class:`Reparam`) around it for targeting,
``init``/``apply``/``merge``/``unmerge``, the trainable mask and save/load. The NNX fast path
(:func:`wrap`) computes ``x@W + s·(x@A)@B`` without building ``ΔW``. Methods: :func:`lora`
(rsLoRA, dropout, rank/alpha patterns), :func:`dora`, the inits :func:`pissa`, :func:`olora`,
:func:`loraga`, :func:`eva` (data-driven through :class:`Calibration`), :func:`lora_xs`,
:func:`lora_sb`, :func:`vera`, :func:`nola`, :func:`diablo`, :func:`ffa_lora`, and
:class:`ReLoRA` for the train loop. Several adapters: :class:`AdapterSet`; PEFT files:
:func:`to_peft` / :func:`from_peft`. QLoRA (a block-quantized NF4/int8 frozen base, LoftQ):
``wrap(..., quantize_base="nf4")``, :func:`quantize_base`, :func:`loftq`. Formulas:
``shared/reference/reparam.md``.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from lowrank_jax import reparam
  >>> params = {"attn": {"q_proj": {"kernel": jnp.ones((16, 16))}}}
  >>> rp = reparam.lora(rank=4, alpha=8, targets=r"q_proj")
  >>> params, adapters = rp.init(jax.random.key(0), params)
  >>> def loss(trainable):  # differentiate the trainable adapters only
  ...     p = rp.apply(params, adapters.replace(trainable=trainable))
  ...     return jnp.sum(p["attn"]["q_proj"]["kernel"] ** 2)
  >>> tx = optax.adamw(1e-3)
  >>> trainable = adapters.trainable
  >>> opt_state = tx.init(trainable)
  >>> updates, opt_state = tx.update(jax.grad(loss)(trainable), opt_state, trainable)
  >>> adapters = adapters.replace(trainable=optax.apply_updates(trainable, updates))
"""

from lowrank_jax.reparam.calibration import ActivationStats, Calibration
from lowrank_jax.reparam.core import (
    Adapters,
    MergeRecord,
    Site,
    apply,
    merge,
    num_trainable,
    trainable_mask,
    unmerge,
)
from lowrank_jax.reparam.diablo import DiaBlo, diablo
from lowrank_jax.reparam.dora import DoRA, dora
from lowrank_jax.reparam.io import load, save
from lowrank_jax.reparam.lora import LoRA, eva, ffa_lora, lora, loraga, olora, pissa, to_base_lora
from lowrank_jax.reparam.method import Method, register
from lowrank_jax.reparam.multi import AdapterSet
from lowrank_jax.reparam.nnx import (
    Adapted,
    FrozenAdapter,
    adapters_of,
    collect_inputs,
    unwrap,
    wrap,
)
from lowrank_jax.reparam.nola import NOLA, nola
from lowrank_jax.reparam.peft import from_peft, to_peft
from lowrank_jax.reparam.qlora import (  # QLoRA: quantized frozen base
    dequantize_base,
    load_base,
    loftq,
    quantize_base,
    save_base,
)
from lowrank_jax.reparam.quant import QuantizedTensor
from lowrank_jax.reparam.quantized_base import QuantConfig, QuantizedKernel
from lowrank_jax.reparam.relora import ReLoRA, jagged_cosine_schedule, prune_optimizer_state
from lowrank_jax.reparam.vera import VeRA, vera
from lowrank_jax.reparam.wrapper import Reparam
from lowrank_jax.reparam.xs import LoRASB, LoRAXS, lora_sb, lora_xs

# isort: split
# Adapter algebra, mixtures of experts, batched serving (issue 14, items 8-10).
from lowrank_jax.reparam.batched import (
    AdapterBank,
    BatchedLoRA,
    adapter_bank,
    use_adapters,
    wrap_batched,
)
from lowrank_jax.reparam.experts import (
    PerLayer,
    meteora,
    mola,
    routed_layers,
    smora,
    wrap_experts,
    xlora,
)
from lowrank_jax.reparam.federated import (
    aggregation_gap,
    dp_fedavg,
    fed_sb_aggregate,
    fedavg,
    fedavg_bias,
    ffa_aggregate,
    flora_stack,
    lora_fair,
)
from lowrank_jax.reparam.merging import combine_adapters, lora_lego
from lowrank_jax.reparam.routing import (
    RoutedLoRA,
    RouterBias,
    Routing,
    RoutingRecord,
    collect_routing,
    gate_loss,
)
from lowrank_jax.reparam.xlora_head import XLoRA

__all__ = [
    "ActivationStats",
    "Adapted",
    "AdapterSet",
    "Adapters",
    "Calibration",
    "DiaBlo",
    "DoRA",
    "FrozenAdapter",
    "LoRA",
    "LoRASB",
    "LoRAXS",
    "MergeRecord",
    "Method",
    "NOLA",
    "QuantConfig",
    "QuantizedKernel",
    "QuantizedTensor",
    "ReLoRA",
    "Reparam",
    "Site",
    "VeRA",
    "adapters_of",
    "apply",
    "collect_inputs",
    "dequantize_base",
    "diablo",
    "dora",
    "eva",
    "ffa_lora",
    "from_peft",
    "jagged_cosine_schedule",
    "load",
    "load_base",
    "loftq",
    "lora",
    "lora_sb",
    "lora_xs",
    "loraga",
    "merge",
    "nola",
    "num_trainable",
    "olora",
    "pissa",
    "prune_optimizer_state",
    "quantize_base",
    "register",
    "save",
    "save_base",
    "to_base_lora",
    "to_peft",
    "trainable_mask",
    "unmerge",
    "unwrap",
    "vera",
    "wrap",
    # adapter algebra, mixtures of experts, batched serving
    "AdapterBank",
    "BatchedLoRA",
    "PerLayer",
    "RoutedLoRA",
    "RouterBias",
    "Routing",
    "RoutingRecord",
    "XLoRA",
    "collect_routing",
    "gate_loss",
    "meteora",
    "mola",
    "routed_layers",
    "smora",
    "use_adapters",
    "wrap_batched",
    "wrap_experts",
    "xlora",
    "adapter_bank",
    "aggregation_gap",
    "combine_adapters",
    "dp_fedavg",
    "fed_sb_aggregate",
    "fedavg",
    "fedavg_bias",
    "ffa_aggregate",
    "flora_stack",
    "lora_fair",
    "lora_lego",
]

# The LoRA family, wave 2 (issue 14, items 1-7): one import per method module.
from lowrank_jax.reparam.adalora import (  # noqa: E402
    AdaLoRA,
    AdaLoRASchedule,
    AllocatorState,
    adalora,
    adalora_prune,
    orthogonality_penalty,
)
from lowrank_jax.reparam.dylora import (  # noqa: E402
    DyLoRA,
    dylora,
    dylora_sample_rank,
    dylora_set_rank,
    dylora_truncate,
)
from lowrank_jax.reparam.hydra import Hydra, hydra, hydra_bias  # noqa: E402
from lowrank_jax.reparam.increlora import (  # noqa: E402
    IncreLoRA,
    IncreLoRASchedule,
    IncreState,
    increlora,
    increlora_num_trainable,
    increlora_ranks,
    increlora_value_and_grad,
)
from lowrank_jax.reparam.lamda import LaMDA, lamda, lamda_freeze_b  # noqa: E402
from lowrank_jax.reparam.loldu import LoLDU, loldu  # noqa: E402
from lowrank_jax.reparam.miss import MiSS, bone, miss  # noqa: E402
from lowrank_jax.reparam.mos import MoS, mos, mos_to_lora  # noqa: E402
from lowrank_jax.reparam.randlora import RandLoRA, randlora  # noqa: E402
from lowrank_jax.reparam.sora import (  # noqa: E402
    SoRA,
    prox_l1,
    sora,
    sora_l1,
    sora_optimizer,
    sora_prune,
    sora_rank,
)
from lowrank_jax.reparam.wegeft import WeGeFT, wegeft  # noqa: E402

__all__ += [
    "Hydra",
    "MoS",
    "hydra",
    "hydra_bias",
    "mos",
    "mos_to_lora",
    "MiSS",
    "RandLoRA",
    "bone",
    "miss",
    "randlora",
    "LaMDA",
    "LoLDU",
    "lamda",
    "lamda_freeze_b",
    "loldu",
    "IncreLoRA",
    "IncreLoRASchedule",
    "IncreState",
    "increlora",
    "increlora_num_trainable",
    "increlora_ranks",
    "increlora_value_and_grad",
    "AdaLoRA",
    "AdaLoRASchedule",
    "AllocatorState",
    "adalora",
    "adalora_prune",
    "orthogonality_penalty",
    "DyLoRA",
    "dylora",
    "dylora_sample_rank",
    "dylora_set_rank",
    "dylora_truncate",
    "SoRA",
    "WeGeFT",
    "prox_l1",
    "sora",
    "sora_l1",
    "sora_optimizer",
    "sora_prune",
    "sora_rank",
    "wegeft",
]
