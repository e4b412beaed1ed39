"""Data: corpora (TFDS), tokenizers, padded batches and federated client data.

The modules a training loop uses:
  input_pipeline  load_split, get_tokenizer, get_train_batches, get_eval_batches,
                  default_data_config
  tokenizer       Tokenizer, CharTokenizer, SentencePieceTokenizer, build_tokenizer,
                  load_tokenizer
  batching        Buckets, make_buckets, SkipCounter, prepare_example, pad_batch,
                  bucket_by_length, eval_batches
  federated       ClientDatasets, get_client_datasets, ClientSampler,
                  build_round, make_round_data, partition_by_speaker, RoundData
  client_sizes    client_size_report
  record_source   RecordSource (a split by record index), load_speaker_index
  librispeech     LibriSpeech -> common example dicts
The TFDS builder of the local corpus is `synthetic_speech` (imported on demand by
`input_pipeline.load_split`). The names below are imported on first use, so that
importing the package, or one of its light modules (`tokenizer`, `batching`,
`client_sizes`, `data_config`, `paths`), does not load TensorFlow.
"""

import importlib
from typing import Any

# {name: the module of this package that defines it}.
_EXPORTS = {
    "bucket_by_length": "batching",
    "Buckets": "batching",
    "eval_batches": "batching",
    "make_buckets": "batching",
    "pad_batch": "batching",
    "prepare_example": "batching",
    "SkipCounter": "batching",
    "client_size_report": "client_sizes",
    "build_round": "federated",
    "ClientDatasets": "federated",
    "ClientSampler": "federated",
    "get_client_datasets": "federated",
    "make_round_data": "federated",
    "partition_by_speaker": "federated",
    "RoundData": "federated",
    "default_data_config": "input_pipeline",
    "get_eval_batches": "input_pipeline",
    "get_tokenizer": "input_pipeline",
    "get_train_batches": "input_pipeline",
    "load_split": "input_pipeline",
    "build_tokenizer": "tokenizer",
    "CharTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "SentencePieceTokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  """Imports `name` from its module on first use (PEP 562)."""
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value
