"""The fields of a run's data config, `config.data`, and their defaults.

`conformer_fl.data.input_pipeline` reads them; this module only builds the
ConfigDict, so that a config (configs/*.py) loads without TensorFlow.
"""

import ml_collections

# LibriSpeech's 960 h of training speech, as one TFDS split string.
LIBRISPEECH_FULL_TRAIN_SPLIT = "train_clean100+train_clean360+train_other500"


def default_data_config() -> ml_collections.ConfigDict:
  """The data fields of a run (`config.data`), with their defaults (documented)."""
  c = ml_collections.ConfigDict()
  c.dataset = "synthetic_speech"   # 'synthetic_speech' | 'librispeech' | TFDS name
  c.builder_config = "tiny"         # synthetic_speech config; '' for none
  c.data_dir = ""                   # TFDS data_dir; '' = TFDS default
  c.train_split = "train"
  c.eval_split = "dev"
  c.train_domains = ()              # () = all; e.g. ('long',) for central training
  c.eval_domains = ()
  c.client_domains = ("short",)     # federated clients' domain (paper: short)
  # Speech engines kept (synthetic corpus; `tts_engines.engine_of` the speaker
  # id): () = all, e.g. ('espeak',) trains without Flite
  # (`leave_one_engine_out`).
  c.train_engines = ()
  c.eval_engines = ()
  c.client_engines = ()
  # Static shapes (batching.make_buckets).
  c.bucket_seconds = (2.0, 4.0, 8.0, 16.0)
  c.label_lengths = ()              # per bucket; () = derive from labels_per_second
  # Label length of a bucket = ceil(seconds * labels_per_second), rounded up to 8.
  # Set it above the corpus's fastest tokens per second (`max_labels_per_second`):
  # ~16-24 for characters, far fewer for large SentencePiece vocabularies (RNN-T
  # memory grows with U; CTC after 4x subsampling has 25 frames per second).
  c.labels_per_second = 24.0
  # Skip utterances with more labels per second of audio than this (0 = off).
  c.max_label_rate = 0.0
  # Skip utterances that CTC cannot align: more labels (plus one per repeated
  # label) than encoder frames (25 per second; batching.encoder_frames). Off
  # here (the stand-in corpora of the tests are far shorter than speech); the
  # run configs turn it on for CTC models (config_lib._run_config).
  c.skip_ctc_unalignable = False
  # Central training.
  c.batch_size = 8
  c.eval_batch_size = 8
  c.shuffle_buffer = 0              # per-bucket buffer when streaming (0 = batch)
  # Small corpora: prepare the train split once and permute it per epoch. Set
  # False for LibriSpeech (stream each epoch; use a shuffle_buffer of hundreds).
  c.cache_train_in_memory = True
  c.prefetch_batches = 2            # background-thread prefetch (0 = none)
  # LibriSpeech only.
  c.librispeech_train_split = LIBRISPEECH_FULL_TRAIN_SPLIT
  c.librispeech_domain_mode = "long"  # 'long' | 'by_duration'
  c.short_max_seconds = 4.0
  # Tokenizer (tokenizer.build_tokenizer).
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "sentencepiece"  # 'sentencepiece' | 'char'
  c.tokenizer.vocab_size = 128
  c.tokenizer.model_type = "unigram"  # 'unigram' | 'bpe'
  return c
