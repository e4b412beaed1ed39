"""High-level input pipeline: corpus -> common examples -> batches.

The common example dict (one utterance), produced for every corpus:
  'audio'      int16 [N]  16 kHz waveform
  'text'       str        normalized (conformer_fl.text.normalize_text)
  'speaker_id' str        (the federated client id)
  'domain'     str        'long' or 'short'
  'duration'   float      seconds
  'id'         str        utterance id
A transcript or speaker id that is not text (None) or whose bytes are not UTF-8
is passed on as it is (`batching.decode_text`): `batching.prepare_example`
skips such an example and counts it by reason, never raises.

Corpora (`load_split`):
  'librispeech'      TFDS LibriSpeech, mapped by `librispeech.py`.
  'synthetic_speech' the local TFDS corpus (conformer_fl.data.synthetic_speech),
                     builder config e.g. 'tiny' or 'demo'.
  any other name     a TFDS dataset with the synthetic corpus's features ('audio',
                     'text', 'speaker_id', 'domain' ClassLabel, 'duration', 'id').

Typical use by the training loop:
  data_config = config.data                      # fields: `default_data_config`
  tokenizer = get_tokenizer(data_config, workdir)
  train_iter = get_train_batches(data_config, tokenizer, seed=config.seed,
                                 start_step=step)
  for batch in get_eval_batches(data_config, tokenizer): ...
Batch layouts: `batching`. The federated clients and their rounds:
conformer_fl/data/federated.py (which reads a data config through
`buckets_from_config`, `prepare_options` and `check_engines` here).

Engines (synthetic corpus): every speaker id starts with its speech engine
('espeak/...', 'flite/...'); `train_engines`, `eval_engines` and
`client_engines` keep only those engines' speakers, and
`leave_one_engine_out(config, engine)` gives the data configs that train
without `engine` and evaluate on its held-out test speakers.
"""

from collections.abc import Iterable, Iterator, Sequence
import importlib
import itertools
from typing import Any

from absl import logging
import grain
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from conformer_fl.data import batching
from conformer_fl.data import data_config as data_config_lib
from conformer_fl.data import librispeech
from conformer_fl.data import record_source
from conformer_fl.data import tokenizer as tokenizer_lib
from conformer_fl.data import tts_engines

Example = batching.Example
Batch = batching.Batch
# The data fields read by this module, with their defaults (documented there).
default_data_config = data_config_lib.default_data_config


def load_split(
    dataset_name: str,
    split: str,
    data_dir: str | None = None,
    builder_config: str | None = None,
    *,
    domains: Sequence[str] = (),
    engines: Sequence[str] = (),
    shuffle_files: bool = False,
    seed: int = 0,
    librispeech_options: librispeech.LibriSpeechOptions | None = None,
) -> Iterator[Example]:
  """Common example dicts (module docstring) of one split of a corpus.

  Args:
    dataset_name: 'synthetic_speech', 'librispeech', or a TFDS dataset with the
      synthetic corpus's features.
    split: 'train', 'dev', 'test' (or a TFDS split string, e.g. 'train[:10%]').
    data_dir: TFDS data directory (None/'' = TFDS default).
    builder_config: builder config name (e.g. 'tiny'); ignored for LibriSpeech.
    domains: keep only examples of these domains; empty keeps all.
    engines: keep only examples whose speaker is voiced by one of these
      engines (`tts_engines.engine_of` of the speaker id: 'espeak', 'flite');
      empty keeps all.
    shuffle_files: read shards in a seeded random order.
    seed: the file-shuffle seed.
    librispeech_options: split map and domain rule for LibriSpeech.

  The local corpus ('synthetic_speech') is synthesized as array_record first
  when it is not prepared. A dataset prepared only in a format that tf.data
  cannot read (array_record, the format of the federated clients) is read
  through its random-access data source (`record_source.RecordSource.iterate`):
  in record order, or with `shuffle_files` in a seeded order of blocks of
  consecutive records.

  Yields:
    Common example dicts in the dataset's order (deterministic for a seed).
  """
  data_dir = data_dir or None
  if dataset_name == "synthetic_speech":
    _build_local_corpus(builder_config, data_dir)
  if _reads_by_record_only(dataset_name, data_dir, builder_config):
    examples = record_source.RecordSource(
        dataset_name, split, data_dir, builder_config,
        librispeech_options).iterate(shuffle_files, seed)
  elif dataset_name == "librispeech":
    examples = librispeech.load_librispeech(
        split, data_dir, librispeech_options, shuffle_files=shuffle_files,
        seed=seed)
  else:
    examples = _load_common_schema(dataset_name, split, data_dir, builder_config,
                                   shuffle_files, seed)
  if domains:
    wanted = set(domains)
    examples = (e for e in examples if e["domain"] in wanted)
  if engines:
    check_engines(engines)
    kept = set(engines)
    examples = (e for e in examples if isinstance(e["speaker_id"], str)
                and tts_engines.engine_of(e["speaker_id"]) in kept)
  return examples


def check_engines(engines: Sequence[str]) -> None:
  unknown = set(engines) - set(tts_engines.ENGINES)
  if unknown:
    raise ValueError(f"Unknown speech engines {sorted(unknown)} in a data config's"
                     f" *_engines; expected names from {tts_engines.ENGINES}.")


def leave_one_engine_out(
    config: ml_collections.ConfigDict, engine: str
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """Data configs of a leave-one-engine-out evaluation of the synthetic corpus.

  Args:
    config: a data config of the synthetic corpus.
    engine: the held-out engine ('flite' or 'espeak').

  Returns:
    (train, held_out): copies of `config`. `train` trains (and evaluates on
    dev, and samples clients) without `engine`; `held_out` evaluates
    (eval_split 'test') on the test speakers of `engine` only. The test
    speakers are held out by timbre (no train speaker shares their voice),
    so `held_out` measures a model on an engine it has never heard.
  """
  check_engines((engine,))
  others = tuple(e for e in tts_engines.ENGINES if e != engine)
  train = ml_collections.ConfigDict(config.to_dict())
  train.train_engines = train.eval_engines = train.client_engines = others
  held_out = ml_collections.ConfigDict(config.to_dict())
  held_out.eval_split = "test"
  held_out.eval_engines = (engine,)
  return train, held_out


def load_split_from_config(
    config: ml_collections.ConfigDict, split: str, *,
    domains: Sequence[str] = (), engines: Sequence[str] = (),
    shuffle_files: bool = False, seed: int = 0
) -> Iterator[Example]:
  """`load_split` with the dataset fields of a data config."""
  return load_split(
      config.dataset, split, config.data_dir, config.builder_config,
      domains=domains, engines=engines, shuffle_files=shuffle_files, seed=seed,
      librispeech_options=librispeech_options_from_config(config))


def librispeech_options_from_config(
    config: ml_collections.ConfigDict) -> librispeech.LibriSpeechOptions:
  split_map = dict(librispeech.DEFAULT_SPLIT_MAP)
  split_map["train"] = config.librispeech_train_split
  return librispeech.LibriSpeechOptions(
      split_map=split_map, domain_mode=config.librispeech_domain_mode,
      short_max_seconds=config.short_max_seconds)


def prepare_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `batching.prepare_example` checks a data config asks for.

  A config saved before a field existed (an older workdir's config.json) gets
  that field's check off.
  """
  return dict(max_label_rate=config.get("max_label_rate", 0.0),
              skip_ctc_unalignable=config.get("skip_ctc_unalignable", False))


def buckets_from_config(config: ml_collections.ConfigDict) -> batching.Buckets:
  return batching.make_buckets(
      config.bucket_seconds, tuple(config.label_lengths) or None,
      config.labels_per_second)


def max_labels_per_second(
    examples: Iterable[Example], tokenizer: tokenizer_lib.Tokenizer,
    min_seconds: float = 0.5
) -> float:
  """The largest tokens per second of speech over `examples` (common dicts).

  A guide for config.labels_per_second (take a margin above it). Utterances
  shorter than `min_seconds` are ignored: trimmed one-word clips give rates
  that no bucket label length needs. For CTC after 4x subsampling of 10 ms
  frames the model sees 25 frames per second, which bounds the usable rate.
  """
  rate = 0.0
  for example in examples:
    duration = example["audio"].shape[0] / batching.SAMPLE_RATE
    if (duration >= min_seconds and isinstance(example["text"], str)
        and example["text"]):
      rate = max(rate, len(tokenizer.encode(example["text"])) / duration)
  return rate


def get_tokenizer(config: ml_collections.ConfigDict,
                  save_dir: str | None) -> tokenizer_lib.Tokenizer:
  """The config's tokenizer: loaded from `save_dir/tokenizer.model` if saved,
  else trained on the transcripts of the whole train split (all domains: text
  only, so the short domain has no unknown words) and saved there."""
  # Transcripts that are None or not UTF-8 are left out (batching skips them).
  transcripts = (e["text"] for e in load_split_from_config(config,
                                                           config.train_split)
                 if isinstance(e["text"], str))
  return tokenizer_lib.build_tokenizer(config.tokenizer, transcripts, save_dir)


def get_eval_batches(
    config: ml_collections.ConfigDict,
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    split: str | None = None,
    domains: Sequence[str] | None = None,
    skips: batching.SkipCounter | None = None,
) -> Iterator[Batch]:
  """One pass over an eval split: every valid example exactly once.

  Batches are `batching.eval_batches` dicts ([B, S] audio etc. plus
  'example_mask' [B]); the last batch of each bucket is completed with masked
  rows. Examples that cannot be used (bad audio, too long, ...) are skipped and
  counted in `skips`.

  Args:
    config: data config (`default_data_config`).
    tokenizer: the run's tokenizer.
    split: defaults to config.eval_split.
    domains: defaults to config.eval_domains (empty = all).
    skips: receives the skipped examples; a fresh counter if None.

  Only speakers of config.eval_engines are read (empty = all).
  """
  split = split or config.eval_split
  domains = config.eval_domains if domains is None else domains
  skips = skips or batching.SkipCounter(f"eval:{split}")
  buckets = buckets_from_config(config)
  examples = load_split_from_config(config, split, domains=domains,
                                    engines=config.get("eval_engines", ()))
  prepared = batching.prepare_examples(examples, tokenizer, buckets, skips,
                                       **prepare_options(config))
  yield from batching.eval_batches(prepared, buckets, config.eval_batch_size)
  skips.log_summary()


def get_train_batches(
    config: ml_collections.ConfigDict,
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    seed: int,
    start_step: int = 0,
    domains: Sequence[str] | None = None,
    skips: batching.SkipCounter | None = None,
) -> Iterator[Batch]:
  """Infinite training batches, reshuffled every epoch, deterministic for a seed.

  Epoch e visits the train split in an order seeded by (seed, e) and groups it
  into same-bucket batches of config.batch_size (`batching.bucket_by_length`,
  last partial batch of each bucket dropped), of the speakers of
  config.train_engines (empty = all). `start_step` skips that many
  batches (without padding them), so a resumed run continues the same sequence.

  With config.cache_train_in_memory the prepared split is held in memory and
  permuted per epoch; otherwise each epoch streams the split again with seeded
  file shuffling and a per-bucket shuffle buffer of config.shuffle_buffer (then
  skipping to start_step reads the skipped data once).

  Yields:
    Batch dicts ([B, S] audio, [B, U] labels, paddings, 'example_mask' [B] all 1).

  Raises:
    ValueError: an epoch yields no batch (fewer valid examples than a batch in
      every bucket).
  """
  domains = config.train_domains if domains is None else domains
  engines = config.get("train_engines", ())
  skips = skips or batching.SkipCounter(f"train:{config.train_split}")
  buckets = buckets_from_config(config)

  if config.cache_train_in_memory:
    cached = list(batching.prepare_examples(
        load_split_from_config(config, config.train_split, domains=domains,
                               engines=engines),
        tokenizer, buckets, skips, **prepare_options(config)))
    skips.log_summary()
    logging.info("Cached %d training examples in memory.", len(cached))

    def epoch_examples(epoch: int) -> Iterable[Example]:
      # numpy's permutation, not grain's `MapDataset.shuffle`: grain's order
      # differs (and takes no (seed, epoch) sequence), so every reported run
      # would train on other batches.
      order = np.random.default_rng([seed, epoch, 0]).permutation(len(cached))
      return (cached[i] for i in order)
  else:
    def epoch_examples(epoch: int) -> Iterable[Example]:
      examples = load_split_from_config(
          config, config.train_split, domains=domains, engines=engines,
          shuffle_files=True, seed=seed * 100003 + epoch)
      return batching.prepare_examples(examples, tokenizer, buckets, skips,
                                       **prepare_options(config))

  def groups() -> Iterator[tuple[int, list[Example]]]:
    for epoch in itertools.count():
      num_groups = 0
      for group in batching.bucket_by_length(
          epoch_examples(epoch), len(buckets), config.batch_size,
          seed=[seed, epoch, 1], shuffle_buffer=config.shuffle_buffer,
          drop_remainder=True):
        num_groups += 1
        yield group
      if num_groups == 0:
        raise ValueError(
            f"Training split {config.train_split!r} (domains {tuple(domains)})"
            f" gives no full batch of {config.batch_size}: too few valid examples"
            f" per bucket (skipped: {dict(skips.counts)}).")

  batches = batching.pad_groups(
      itertools.islice(groups(), start_step, None), buckets, config.batch_size)
  return prefetch_in_thread(batches, config.prefetch_batches)


def prefetch_in_thread(iterator: Iterator[Any], buffer_size: int) -> Iterator[Any]:
  """Runs `iterator` in a background thread, `buffer_size` items ahead.

  Host batching then overlaps the device step: the thread (grain's
  `grain.experimental.ThreadPrefetchDatasetIterator`) starts filling its
  buffer here, before the first item is asked for. The items come in
  `iterator`'s order; an `Exception` of `iterator` is re-raised in the
  consumer.

  Args:
    iterator: the items, e.g. padded batches.
    buffer_size: items produced ahead; 0 returns `iterator` itself.

  Returns:
    An iterator over the same items.
  """
  if buffer_size <= 0:
    return iterator
  prefetched = grain.experimental.ThreadPrefetchDatasetIterator(
      _StatelessIterator(iterator), buffer_size)
  prefetched.start_prefetch()
  return prefetched


class _StatelessIterator(Iterator[Any]):
  """A Python iterator with the get_state/set_state of a grain iterator.

  Its state is empty: a resumed run rebuilds its batches from the step
  (`get_train_batches(start_step=...)`), never from a saved iterator state.
  """

  def __init__(self, iterator: Iterator[Any]):
    self._iterator = iterator

  def __next__(self) -> Any:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    """{}: nothing to save."""
    return {}

  def set_state(self, state: dict[str, Any]) -> None:
    """Refuses: restoring an iterator state is not how a run resumes."""
    raise NotImplementedError(
        "The training batches resume from a step (start_step), not from an"
        " iterator state.")


def _build_local_corpus(builder_config: str | None,
                        data_dir: str | None) -> None:
  """Synthesizes the local corpus as ArrayRecord unless it is prepared.

  `tfds.load` would prepare it as tfrecord files, which the federated clients
  cannot read; every reader builds it the same way (conformer_fl/data/corpus.py
  does it for the entry point, on process 0 only).
  """
  synthetic_speech = importlib.import_module("conformer_fl.data.synthetic_speech")
  if not synthetic_speech.SyntheticSpeech(config=builder_config,
                                          data_dir=data_dir).is_prepared():
    synthetic_speech.build(builder_config, data_dir)


def _reads_by_record_only(dataset_name: str, data_dir: str | None,
                          builder_config: str | None) -> bool:
  """Whether the prepared dataset has no tf.data format (array_record only).

  False for a dataset that is not prepared: `tfds.load` then raises its own
  error (LibriSpeech: `librispeech.LibriSpeechNotPrepared`).
  """
  if dataset_name == "librispeech":
    builder = tfds.builder("librispeech", data_dir=data_dir)
  else:
    builder = record_source.builder_for(dataset_name, data_dir, builder_config)
  if not builder.is_prepared():
    return False
  return builder.info.file_format not in tfds.core.FileFormat.with_tf_data()


def _load_common_schema(
    dataset_name: str, split: str, data_dir: str | None,
    builder_config: str | None, shuffle_files: bool, seed: int
) -> Iterator[Example]:
  """Examples of a TFDS dataset with the synthetic corpus's features."""
  if dataset_name == "synthetic_speech":
    # Registers the builder with TFDS.
    importlib.import_module("conformer_fl.data.synthetic_speech")
  name = f"{dataset_name}/{builder_config}" if builder_config else dataset_name
  ds, info = tfds.load(
      name, split=split, data_dir=data_dir, shuffle_files=shuffle_files,
      read_config=tfds.ReadConfig(shuffle_seed=seed), with_info=True)
  domain_names = info.features["domain"].names
  ds = ds.prefetch(tf.data.AUTOTUNE)
  for raw in tfds.as_numpy(ds):
    yield record_source.common_example(raw, domain_names)
