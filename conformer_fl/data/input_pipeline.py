"""High-level input pipeline: corpus -> common examples -> batches / client rounds.

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
  clients = get_client_datasets(data_config, tokenizer)
  sampler = clients_lib.ClientSampler(clients.client_ids, C, seed)
  ids, round_data = make_round(clients, sampler, round_index, seed,
                               local_steps=K, batch_size=B)
Batch layouts: `batching` (central batches) and `clients` (round arrays).

Engines (synthetic corpus): every speaker id starts with its speech engine
('espeak/...', 'flite/...'); `train_engines`, `eval_engines` and
`client_engines` keep only those engines' speakers, and
`leave_one_engine_out(config, engine)` gives the data configs that train
without `engine` and evaluate on its held-out test speakers.

The federated clients are read from disk by record index: the dataset must be
prepared in the array_record format (`record_source`), and their speaker index
is built once beside the data. Nothing of a client is held in memory but its
record indices and their buckets; a round reads its sampled clients' records
(those of this process's block of clients only).
"""

from collections.abc import Iterable, Iterator, Sequence
import dataclasses
import importlib
import itertools
import queue
import threading
from typing import Any

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from conformer_fl.data import batching
from conformer_fl.data import clients as clients_lib
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
    _check_engines(engines)
    kept = set(engines)
    examples = (e for e in examples if isinstance(e["speaker_id"], str)
                and tts_engines.engine_of(e["speaker_id"]) in kept)
  return examples


def _check_engines(engines: Sequence[str]) -> None:
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
  _check_engines((engine,))
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


class IndexStale(ValueError):
  """A record read from disk disagrees with the speaker index's entry."""


@dataclasses.dataclass
class StreamedClient:
  """One client's examples, read from disk by record index when asked for.

  A `clients.ClientExamples`: `buckets` comes from the speaker index (no audio
  read); `read` reads the records and prepares them (`batching.prepare_example`).

  Attributes:
    client_id: the speaker id.
    records: int64 [n], the client's record indices in the split, increasing.
    buckets: int64 [n], the bucket of each (the index's transcript and length).
    datasets: the `ClientDatasets` it belongs to (source, tokenizer, shapes).
  """

  client_id: str
  records: np.ndarray
  buckets: np.ndarray
  datasets: "ClientDatasets"

  def read(self, positions: Sequence[int]) -> list[Example]:
    """Prepared examples of the client's examples at `positions`.

    Raises:
      IndexStale: a record is no longer valid or has another bucket than the
        index gave it (the data changed after the index was built).
    """
    d = self.datasets
    positions = [int(p) for p in positions]
    raws = d.source.read(self.records[positions])
    skips = batching.SkipCounter(f"client:{self.client_id}")
    prepared = []
    for p, raw in zip(positions, raws):
      example = batching.prepare_example(raw, d.tokenizer, d.buckets, skips,
                                         **d.prepare_options,
                                         require_speaker_id=True)
      if example is None or example["bucket"] != self.buckets[p]:
        raise IndexStale(
            f"Record {int(self.records[p])} ({raw.get('id')!r}) of"
            f" {d.source.dataset}:{d.source.split} disagrees with the speaker"
            f" index {record_source.index_path(d.source)} (skipped:"
            f" {dict(skips.counts)}); delete the index to rebuild it.")
      prepared.append(example)
    return prepared


@dataclasses.dataclass
class ClientDatasets:
  """The federated clients of a split, in client-id order, read from disk.

  Holds per client only its record indices and their buckets (a few bytes per
  utterance); `client(client_id)` reads examples by record index.

  Attributes:
    source: the split, by record index.
    records: client id -> int64 [n_c] record indices of its valid examples.
    record_buckets: client id -> int64 [n_c] their buckets.
    buckets: the static shapes.
    tokenizer: the run's tokenizer.
    prepare_options: the `batching.prepare_example` checks of the config.
  """

  source: record_source.RecordSource
  records: dict[str, np.ndarray]
  record_buckets: dict[str, np.ndarray]
  buckets: batching.Buckets
  tokenizer: tokenizer_lib.Tokenizer
  prepare_options: dict[str, Any]

  @property
  def client_ids(self) -> list[str]:
    return list(self.records)

  def sizes(self) -> dict[str, int]:
    return {c: int(r.size) for c, r in self.records.items()}

  def client(self, client_id: str) -> StreamedClient:
    return StreamedClient(client_id, self.records[client_id],
                          self.record_buckets[client_id], self)

  def read_client(self, client_id: str) -> list[Example]:
    """All prepared examples of one client, in record order (reads them)."""
    client = self.client(client_id)
    return client.read(range(client.records.size))


def open_record_source(config: ml_collections.ConfigDict,
                       split: str) -> record_source.RecordSource:
  """`record_source.RecordSource` of a split with the data config's fields."""
  return record_source.RecordSource(
      config.dataset, split, config.data_dir, config.builder_config,
      librispeech_options_from_config(config))


def get_client_datasets(
    config: ml_collections.ConfigDict,
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    split: str | None = None,
    domains: Sequence[str] | None = None,
    skips: batching.SkipCounter | None = None,
) -> ClientDatasets:
  """The federated clients of a split, streamed from disk (see `clients`).

  Reads the split's speaker index (built and saved beside the data on first
  use: `record_source.load_speaker_index`), and keeps, per speaker, the
  records that `batching.prepare_example` accepts (checked on the index's
  transcripts and lengths: no audio is read) with their buckets. The
  clients and their examples, in order, are those of partitioning the
  prepared split by speaker (`clients.partition_by_speaker`); skips are
  counted by the same reasons.

  Args:
    config: data config; the dataset must be prepared in a random-access
      format (array_record).
    tokenizer: the run's tokenizer.
    split: defaults to config.train_split.
    domains: defaults to config.client_domains (empty = all).
    skips: receives the skipped examples.

  Only speakers of config.client_engines are clients (empty = all).

  Raises:
    record_source.NotRandomAccess: the dataset is stored as tfrecord only.
    ValueError: no client has a valid example.
  """
  split = split or config.train_split
  domains = config.client_domains if domains is None else domains
  skips = skips or batching.SkipCounter(f"clients:{split}")
  buckets = buckets_from_config(config)
  options = prepare_options(config)
  source = open_record_source(config, split)
  index = record_source.load_speaker_index(source)
  wanted = set(domains)
  engines = set(config.get("client_engines", ()))
  _check_engines(tuple(engines))
  records: dict[str, list[int]] = {}
  record_buckets: dict[str, list[int]] = {}
  for i in range(index["num_records"]):
    meta, num_samples, problem = record_source.index_example(index, i)
    if wanted and source.domain_of(meta["domain"], num_samples) not in wanted:
      continue
    if problem is not None:
      skips.skip(problem[0], meta["id"], problem[1])
      continue
    prepared = batching.prepare_metadata(meta, num_samples, tokenizer, buckets,
                                         skips, **options,
                                         require_speaker_id=True)
    if prepared is None:
      continue
    if engines and tts_engines.engine_of(prepared["speaker_id"]) not in engines:
      continue
    records.setdefault(prepared["speaker_id"], []).append(i)
    record_buckets.setdefault(prepared["speaker_id"], []).append(
        prepared["bucket"])
  del index
  skips.log_summary()
  if not records:
    raise ValueError(f"No client has a valid example in split {split!r}, domains"
                     f" {tuple(domains)} (skipped: {dict(skips.counts)}).")
  client_ids = sorted(records)
  logging.info("%d clients, %d examples.", len(client_ids),
               sum(len(r) for r in records.values()))
  return ClientDatasets(
      source,
      {c: np.array(records[c], np.int64) for c in client_ids},
      {c: np.array(record_buckets[c], np.int64) for c in client_ids},
      buckets, tokenizer, options)


def make_round(
    client_datasets: ClientDatasets,
    sampler: clients_lib.ClientSampler,
    round_index: int,
    seed: int,
    *,
    local_steps: int,
    batch_size: int,
    local_epochs: int | None = None,
    fixed_shape: bool = False,
    client_range: tuple[int, int] | None = None,
) -> tuple[list[str], clients_lib.RoundData]:
  """Chosen client ids and the round's arrays ([C, K, B, ...], see `clients`).

  Reads from disk only the records of the chosen clients in `client_range`.
  The federated fields (K, B, E, fixed shape) belong to the federated config;
  they are passed explicitly. Arguments as in `clients.make_round_data`.
  """
  client_ids = sampler.sample(round_index)
  data = clients_lib.make_round_data(
      [client_datasets.client(c) for c in client_ids], client_ids, round_index,
      seed, local_steps=local_steps, batch_size=batch_size,
      buckets=client_datasets.buckets, local_epochs=local_epochs,
      fixed_shape=fixed_shape, client_range=client_range)
  return client_ids, data


def prefetch_in_thread(iterator: Iterator[Any], buffer_size: int) -> Iterator[Any]:
  """Runs `iterator` in a background thread, `buffer_size` items ahead.

  Host batching then overlaps the device step. Exceptions of the producer are
  re-raised in the consumer. buffer_size 0 returns `iterator` itself.
  """
  if buffer_size <= 0:
    return iterator
  items: queue.Queue[Any] = queue.Queue(maxsize=buffer_size)
  done = object()

  def produce():
    try:
      for item in iterator:
        items.put((True, item))
      items.put((True, done))
    except BaseException as e:  # pylint: disable=broad-except
      items.put((False, e))

  threading.Thread(target=produce, daemon=True).start()

  def consume() -> Iterator[Any]:
    while True:
      ok, item = items.get()
      if not ok:
        raise item
      if item is done:
        return
      yield item

  return consume()


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
