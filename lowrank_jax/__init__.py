"""lowrank_jax: memory-efficient training of LLMs with low-rank methods in JAX.

Gradient transformations (optax) -- the model keeps full-rank weights, the optimizer works in a
low-rank space -- and parameter reparameterizations (LoRA family). See README.md.
"""

from lowrank_jax import memory as memory
from lowrank_jax import projection as projection
from lowrank_jax import targets as targets
from lowrank_jax.optimizers import adamw_hf as adamw_hf
from lowrank_jax.optimizers import galore_adafactor as galore_adafactor
from lowrank_jax.optimizers import galore_adamw as galore_adamw
from lowrank_jax.projection import Projector as Projector
from lowrank_jax.targets import MatrixDims as MatrixDims
from lowrank_jax.transforms.galore import GaLoreState as GaLoreState
from lowrank_jax.transforms.galore import galore as galore
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
