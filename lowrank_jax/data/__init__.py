"""The offline text pipeline: sources, tokenizers, packing, a deterministic split, batches.

Example:
  >>> from lowrank_jax import data
  >>> name, documents = data.resolve_source(None)   # the embedded King James Bible
  >>> ds = data.build_dataset(name, documents, data.ByteTokenizer(), seq_len=128)
  >>> batch = next(data.BatchIterator(ds.train, batch_size=4, seed=0))
  >>> batch.shape
  (4, 129)
"""

from lowrank_jax.data.packing import BatchIterator as BatchIterator
from lowrank_jax.data.packing import Dataset as Dataset
from lowrank_jax.data.packing import IteratorState as IteratorState
from lowrank_jax.data.packing import build_dataset as build_dataset
from lowrank_jax.data.packing import pack as pack
from lowrank_jax.data.sources import DataError as DataError
from lowrank_jax.data.sources import embedded_corpus as embedded_corpus
from lowrank_jax.data.sources import file_documents as file_documents
from lowrank_jax.data.sources import resolve_source as resolve_source
from lowrank_jax.data.sources import tfds_documents as tfds_documents
from lowrank_jax.data.tokenizer import BPETokenizer as BPETokenizer
from lowrank_jax.data.tokenizer import ByteTokenizer as ByteTokenizer
from lowrank_jax.data.tokenizer import make_tokenizer as make_tokenizer
