"""Data: corpora (TFDS), tokenizers, padded batches and federated client data.

The modules a training loop uses:
  input_pipeline  load_split, get_tokenizer, get_train_batches, get_eval_batches,
                  get_client_datasets, make_round, default_data_config
  tokenizer       Tokenizer, CharTokenizer, SentencePieceTokenizer, build_tokenizer,
                  load_tokenizer
  batching        Buckets, make_buckets, SkipCounter, prepare_example, pad_batch,
                  bucket_by_length, eval_batches
  clients         ClientSampler, partition_by_speaker, make_round_data,
                  client_size_report
  record_source   RecordSource (a split by record index), load_speaker_index
  librispeech     LibriSpeech -> common example dicts
The TFDS builder of the local corpus is `synthetic_speech` (imported on demand by
`input_pipeline.load_split`, so that importing this package stays light).
"""

from conformer_fl.data.batching import bucket_by_length
from conformer_fl.data.batching import Buckets
from conformer_fl.data.batching import eval_batches
from conformer_fl.data.batching import make_buckets
from conformer_fl.data.batching import pad_batch
from conformer_fl.data.batching import prepare_example
from conformer_fl.data.batching import SkipCounter
from conformer_fl.data.clients import client_size_report
from conformer_fl.data.clients import ClientSampler
from conformer_fl.data.clients import make_round_data
from conformer_fl.data.clients import partition_by_speaker
from conformer_fl.data.input_pipeline import ClientDatasets
from conformer_fl.data.input_pipeline import default_data_config
from conformer_fl.data.input_pipeline import get_client_datasets
from conformer_fl.data.input_pipeline import get_eval_batches
from conformer_fl.data.input_pipeline import get_tokenizer
from conformer_fl.data.input_pipeline import get_train_batches
from conformer_fl.data.input_pipeline import load_split
from conformer_fl.data.input_pipeline import make_round
from conformer_fl.data.tokenizer import build_tokenizer
from conformer_fl.data.tokenizer import CharTokenizer
from conformer_fl.data.tokenizer import load_tokenizer
from conformer_fl.data.tokenizer import SentencePieceTokenizer
from conformer_fl.data.tokenizer import Tokenizer
