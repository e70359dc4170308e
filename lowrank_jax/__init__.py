"""lowrank_jax: memory-efficient training of LLMs with low-rank methods in JAX.

Gradient transformations (optax) -- the model keeps full-rank weights, the optimizer works in a
low-rank space -- and parameter reparameterizations (LoRA family). See README.md.
"""

from lowrank_jax import memory as memory
from lowrank_jax import projection as projection
from lowrank_jax import quantization as quantization
from lowrank_jax import sharding as sharding
from lowrank_jax import targets as targets
from lowrank_jax.optimizers import adamw_8bit as adamw_8bit
from lowrank_jax.optimizers import adamw_hf as adamw_hf
from lowrank_jax.optimizers import allora_adamw as allora_adamw
from lowrank_jax.optimizers import apollo_adamw as apollo_adamw
from lowrank_jax.optimizers import apollo_mini as apollo_mini
from lowrank_jax.optimizers import badam_adamw as badam_adamw
from lowrank_jax.optimizers import fira_adamw as fira_adamw
from lowrank_jax.optimizers import flora_adafactor as flora_adafactor
from lowrank_jax.optimizers import galore2_adamw as galore2_adamw
from lowrank_jax.optimizers import galore_adafactor as galore_adafactor
from lowrank_jax.optimizers import galore_adamw as galore_adamw
from lowrank_jax.optimizers import galore_adamw_8bit as galore_adamw_8bit
from lowrank_jax.optimizers import golore_adamw as golore_adamw
from lowrank_jax.optimizers import lisa_adamw as lisa_adamw
from lowrank_jax.optimizers import lorafa_adamw as lorafa_adamw
from lowrank_jax.optimizers import loraplus_adamw as loraplus_adamw
from lowrank_jax.optimizers import owlore_adamw as owlore_adamw
from lowrank_jax.optimizers import q_galore_adamw_8bit as q_galore_adamw_8bit
from lowrank_jax.projection import Projector as Projector
from lowrank_jax.targets import MatrixDims as MatrixDims
from lowrank_jax.transforms import AdaptiveRefresh as AdaptiveRefresh
from lowrank_jax.transforms import ApolloState as ApolloState
from lowrank_jax.transforms import FiraState as FiraState
from lowrank_jax.transforms import GaLoreState as GaLoreState
from lowrank_jax.transforms import LisaState as LisaState
from lowrank_jax.transforms import apollo as apollo
from lowrank_jax.transforms import badam as badam
from lowrank_jax.transforms import decoupled_weight_decay as decoupled_weight_decay
from lowrank_jax.transforms import fira as fira
from lowrank_jax.transforms import galore as galore
from lowrank_jax.transforms import golore as golore
from lowrank_jax.transforms import gradnorm_lorp_adamw as gradnorm_lorp_adamw
from lowrank_jax.transforms import lisa as lisa
from lowrank_jax.transforms import outlier_scores as outlier_scores
from lowrank_jax.transforms import owl_probabilities as owl_probabilities
from lowrank_jax.transforms import scale_by_adafactor_hf as scale_by_adafactor_hf
from lowrank_jax.transforms import scale_by_adam_8bit as scale_by_adam_8bit
from lowrank_jax.transforms import scale_by_adam_hf as scale_by_adam_hf
from lowrank_jax.transforms import sst_adamw as sst_adamw

__version__ = "0.1.0"


def __getattr__(name: str):
    # lowrank_jax.reparam (Flax NNX wrappers) loads on first use: `import lowrank_jax` and the
    # trainer's optimizer registry stay free of Flax.
    if name == "reparam":
        import importlib

        return importlib.import_module("lowrank_jax.reparam")
    raise AttributeError(f"module 'lowrank_jax' has no attribute {name!r}")
