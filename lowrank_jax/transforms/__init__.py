"""Gradient transformations: one file per method."""

from lowrank_jax.transforms.galore import GaLoreState as GaLoreState
from lowrank_jax.transforms.galore import galore as galore
from lowrank_jax.transforms.torch_style import decoupled_weight_decay as decoupled_weight_decay
from lowrank_jax.transforms.torch_style import scale_by_adafactor_hf as scale_by_adafactor_hf
from lowrank_jax.transforms.torch_style import scale_by_adam_hf as scale_by_adam_hf
