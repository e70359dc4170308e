"""Models: a Flax NNX LLaMA with the GaLore paper's configs, and HF checkpoint interop."""

from lowrank_jax.models.hf import load_hf as load_hf
from lowrank_jax.models.hf import save_hf as save_hf
from lowrank_jax.models.llama import CONFIGS as CONFIGS
from lowrank_jax.models.llama import Llama as Llama
from lowrank_jax.models.llama import LlamaConfig as LlamaConfig
from lowrank_jax.models.llama import get_config as get_config
