"""lowrank_jax: memory-efficient training of LLMs with low-rank methods in JAX.

Gradient transformations (optax) -- the model keeps full-rank weights, the optimizer works in a
low-rank space -- and parameter reparameterizations (LoRA family). See README.md.
"""

from lowrank_jax import memory as memory
from lowrank_jax import projection as projection
from lowrank_jax import sharding as sharding
from lowrank_jax import targets as targets
from lowrank_jax.optimizers import adamw_8bit as adamw_8bit
from lowrank_jax.optimizers import adamw_hf as adamw_hf
from lowrank_jax.optimizers import apollo_adamw as apollo_adamw
from lowrank_jax.optimizers import apollo_mini as apollo_mini
from lowrank_jax.optimizers import fira_adamw as fira_adamw
from lowrank_jax.optimizers import galore_adafactor as galore_adafactor
from lowrank_jax.optimizers import galore_adamw as galore_adamw
from lowrank_jax.optimizers import galore_adamw_8bit as galore_adamw_8bit
from lowrank_jax.optimizers import lisa_adamw as lisa_adamw
from lowrank_jax.optimizers import owlore_adamw as owlore_adamw
from lowrank_jax.projection import Projector as Projector
from lowrank_jax.targets import MatrixDims as MatrixDims
from lowrank_jax.transforms._adaptive import AdaptiveRefresh as AdaptiveRefresh
from lowrank_jax.transforms.apollo import ApolloState as ApolloState
from lowrank_jax.transforms.apollo import apollo as apollo
from lowrank_jax.transforms.fira import FiraState as FiraState
from lowrank_jax.transforms.fira import fira as fira
from lowrank_jax.transforms.galore import GaLoreState as GaLoreState
from lowrank_jax.transforms.galore import galore as galore
from lowrank_jax.transforms.lisa import LisaState as LisaState
from lowrank_jax.transforms.lisa import lisa as lisa
from lowrank_jax.transforms.owlore import outlier_scores as outlier_scores
from lowrank_jax.transforms.owlore import owl_probabilities as owl_probabilities
from lowrank_jax.transforms.quantized import scale_by_adam_8bit as scale_by_adam_8bit
from lowrank_jax.transforms.torch_style import decoupled_weight_decay as decoupled_weight_decay
from lowrank_jax.transforms.torch_style import scale_by_adafactor_hf as scale_by_adafactor_hf
from lowrank_jax.transforms.torch_style import scale_by_adam_hf as scale_by_adam_hf

__version__ = "0.1.0"


def __getattr__(name: str):
    # lowrank_jax.reparam (Flax NNX wrappers) loads on first use: `import lowrank_jax` and the
    # trainer's optimizer registry stay free of Flax.
    if name == "reparam":
        import importlib

        return importlib.import_module("lowrank_jax.reparam")
    raise AttributeError(f"module 'lowrank_jax' has no attribute {name!r}")
