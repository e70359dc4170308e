"""Models: a Flax NNX LLaMA-family decoder (LLaMA, Mistral, Qwen2/3, Gemma 3) with the GaLore
paper's configs, HF checkpoint and GGUF interop, and a KV cache for decoding."""

from lowrank_jax.models.hf import load_hf as load_hf
from lowrank_jax.models.hf import save_hf as save_hf
from lowrank_jax.models.llama import CONFIGS as CONFIGS
from lowrank_jax.models.llama import KVCache as KVCache
from lowrank_jax.models.llama import Llama as Llama
from lowrank_jax.models.llama import LlamaConfig as LlamaConfig
from lowrank_jax.models.llama import get_config as get_config
from lowrank_jax.models.llama import init_cache as init_cache
