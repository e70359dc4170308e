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
from lowrank_jax.models.recording import input_feature_norms as input_feature_norms
from lowrank_jax.models.recording import owlore_probabilities as owlore_probabilities
from lowrank_jax.models.recording import record_input_norms as record_input_norms
