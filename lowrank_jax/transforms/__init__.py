"""Gradient transformations: one private module per method, the names re-exported here.

Every method is an optax ``GradientTransformation`` that wraps an inner transformation (the
low-rank space gets whatever optimizer is chained). The shared projected core is
``_lowrank.py``; GaLore, Fira and APOLLO are thin files on top of it.
"""

from lowrank_jax.quantization import QuantizedArray as QuantizedArray
from lowrank_jax.transforms._adam_8bit import ScaleByAdam8bitState as ScaleByAdam8bitState
from lowrank_jax.transforms._adam_8bit import scale_by_adam_8bit as scale_by_adam_8bit
from lowrank_jax.transforms._adaptive import AdaptiveRefresh as AdaptiveRefresh
from lowrank_jax.transforms._adaptive import RefreshState as RefreshState
from lowrank_jax.transforms._adaptive import svd_count as svd_count
from lowrank_jax.transforms._apollo import ApolloState as ApolloState
from lowrank_jax.transforms._apollo import apollo as apollo
from lowrank_jax.transforms._apollo import gaussian_projection as gaussian_projection
from lowrank_jax.transforms._badam import badam as badam
from lowrank_jax.transforms._badam import badam_block as badam_block
from lowrank_jax.transforms._fira import FiraState as FiraState
from lowrank_jax.transforms._fira import fira as fira
from lowrank_jax.transforms._flora import FloraAccumulationState as FloraAccumulationState
from lowrank_jax.transforms._flora import ScaleByFloraState as ScaleByFloraState
from lowrank_jax.transforms._flora import flora_accumulation as flora_accumulation
from lowrank_jax.transforms._flora import flora_projection as flora_projection
from lowrank_jax.transforms._flora import scale_by_flora as scale_by_flora
from lowrank_jax.transforms._galore import GaLoreState as GaLoreState
from lowrank_jax.transforms._galore import galore as galore
from lowrank_jax.transforms._ggpo import GGPOState as GGPOState
from lowrank_jax.transforms._ggpo import ggpo_perturb as ggpo_perturb
from lowrank_jax.transforms._ggpo import lora_ggpo as lora_ggpo
from lowrank_jax.transforms._golore import golore as golore
from lowrank_jax.transforms._gradnorm_lorp import GradNormLoRPState as GradNormLoRPState
from lowrank_jax.transforms._gradnorm_lorp import WeightNormLeaf as WeightNormLeaf
from lowrank_jax.transforms._gradnorm_lorp import gradnorm_lorp_adamw as gradnorm_lorp_adamw
from lowrank_jax.transforms._gradnorm_lorp import weight_norm as weight_norm
from lowrank_jax.transforms._int8_weights import StochasticWeightState as StochasticWeightState
from lowrank_jax.transforms._int8_weights import dequantize_weights as dequantize_weights
from lowrank_jax.transforms._int8_weights import quantize_weights as quantize_weights
from lowrank_jax.transforms._int8_weights import (
    stochastic_weight_update as stochastic_weight_update,
)
from lowrank_jax.transforms._lisa import LisaState as LisaState
from lowrank_jax.transforms._lisa import lisa as lisa
from lowrank_jax.transforms._lorafa import LoraFAState as LoraFAState
from lowrank_jax.transforms._lorafa import lorafa as lorafa
from lowrank_jax.transforms._lorafa import lorafa_precondition as lorafa_precondition
from lowrank_jax.transforms._loraplus import allora_coefficients as allora_coefficients
from lowrank_jax.transforms._loraplus import loraplus_groups as loraplus_groups
from lowrank_jax.transforms._loraplus import scale_by_allora as scale_by_allora
from lowrank_jax.transforms._loraplus import scale_by_loraplus as scale_by_loraplus
from lowrank_jax.transforms._norm_scaling import (
    ScaleByBiasCorrectionState as ScaleByBiasCorrectionState,
)
from lowrank_jax.transforms._norm_scaling import (
    scale_by_adam_bias_correction as scale_by_adam_bias_correction,
)
from lowrank_jax.transforms._owlore import feature_norms as feature_norms
from lowrank_jax.transforms._owlore import outlier_scores as outlier_scores
from lowrank_jax.transforms._owlore import owl_probabilities as owl_probabilities
from lowrank_jax.transforms._qgalore import QGaLoreState as QGaLoreState
from lowrank_jax.transforms._qgalore import QuantizedGroups as QuantizedGroups
from lowrank_jax.transforms._qgalore import dequantize_groups as dequantize_groups
from lowrank_jax.transforms._qgalore import q_galore as q_galore
from lowrank_jax.transforms._qgalore import quantize_groups as quantize_groups
from lowrank_jax.transforms._sst import SSTFactors as SSTFactors
from lowrank_jax.transforms._sst import SSTState as SSTState
from lowrank_jax.transforms._sst import sst_adamw as sst_adamw
from lowrank_jax.transforms._sst import sst_init as sst_init
from lowrank_jax.transforms._sst import sst_merge as sst_merge
from lowrank_jax.transforms._sst import sst_probabilities as sst_probabilities
from lowrank_jax.transforms._torch_style import decoupled_weight_decay as decoupled_weight_decay
from lowrank_jax.transforms._torch_style import scale_by_adafactor_hf as scale_by_adafactor_hf
from lowrank_jax.transforms._torch_style import scale_by_adam_hf as scale_by_adam_hf
