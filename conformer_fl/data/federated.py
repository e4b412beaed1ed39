"""Federated client data: client datasets, the client sampler, round building.

Clients are speakers: the train split is partitioned by 'speaker_id' and a client
id is the speaker id string. No client's examples are held in memory: a client is
a `ClientExamples`, which knows the bucket of each of its examples (from the
split's speaker index, `record_source.load_speaker_index`, without reading audio)
and reads the examples a round needs from disk by record index
(`StreamedClient`, of the split's `ClientDatasets`: `get_client_datasets`;
the dataset must be prepared in the array_record format, and its speaker
index is built once beside the data). A
round reads only its sampled clients' records, and with `client_range` only
those of this process's block of the `clients` mesh axis; within a round each
record is read once, however often the client's plan repeats it. So host memory
does not grow with the corpus (960 h of LibriSpeech, ~110 GB of int16 audio,
stays on disk). `make_round_data` also takes plain lists of prepared examples
(`HeldExamples`), for tests.

A round's data is a `round_data.RoundData` of dense numpy arrays with static
shapes, leading axes [C, K] = clients of the round, local steps (its fields and
their shapes: conformer_fl/federated/round_data.py). `build_round` makes round
r of a run's config: the clients `ClientSampler` samples, read and batched by
`make_round_data`.
Shapes: every client of a round shares one bucket, so that the clients can be
vmapped together: S and U are those of the largest bucket that any example chosen
this round needs (at most the largest bucket), or of the largest bucket always
(`fixed_shape=True`, one compilation for the whole run at the price of padding).
With a per-round S the round function is compiled once per distinct bucket.

Local work (`local_epochs`):
  None: K local steps of B examples; a client's examples are visited in a fresh
        seeded permutation per pass and repeated as needed to fill K full batches.
  E:    E passes over the client's examples (a fresh permutation per pass),
        batched by B across pass boundaries, capped at K steps; the tail of the
        last batch and any steps past the data are padded and masked.
A client with no examples contributes only masked steps and num_examples 0.
Shuffling is a deterministic function of (seed, round, client id), and the client
sample of `ClientSampler` of (seed, round), so a resumed run sees the same data.

Typical use by the training loop:
  datasets = get_client_datasets(config.data, tokenizer)
  sampler = ClientSampler(datasets.client_ids, C, config.seed)
  data = build_round(config, datasets, sampler, round_index, mesh)
"""

import collections
from collections.abc import Iterable, Sequence
import dataclasses
from typing import Any, Protocol, runtime_checkable
import zlib

from absl import logging
import jax
import ml_collections
import numpy as np

from conformer_fl.data import batching
from conformer_fl.data import input_pipeline
from conformer_fl.data import record_source
from conformer_fl.data import tokenizer as tokenizer_lib
from conformer_fl.data import tts_engines
from conformer_fl.federated import mesh as mesh_lib
from conformer_fl.federated import round_data as round_data_lib

Example = batching.Example
RoundData = round_data_lib.RoundData


@runtime_checkable
class ClientExamples(Protocol):
  """One client's examples by position 0..n-1, read on demand.

  Attributes:
    buckets: int [n], the bucket of each example (`batching.prepare_example`).
  """

  buckets: np.ndarray

  def read(self, positions: Sequence[int]) -> list[Example]:
    """The prepared examples at `positions` (each in [0, n)), in that order."""


@dataclasses.dataclass(frozen=True)
class HeldExamples:
  """A `ClientExamples` over prepared examples already in memory (tests)."""

  examples: Sequence[Example]

  @property
  def buckets(self) -> np.ndarray:
    return np.array([e["bucket"] for e in self.examples], np.int64)

  def read(self, positions: Sequence[int]) -> list[Example]:
    return [self.examples[p] for p in positions]


def partition_by_speaker(examples: Iterable[Example]) -> dict[str, list[Example]]:
  """Client id (speaker id string) -> that speaker's examples in input order.

  The dict is ordered by client id, so the client list is deterministic.
  """
  clients: dict[str, list[Example]] = collections.defaultdict(list)
  for example in examples:
    speaker = example["speaker_id"]
    if not speaker:
      raise ValueError(f"Example {example.get('id')!r} has no speaker_id.")
    clients[speaker].append(example)
  return {client_id: clients[client_id] for client_id in sorted(clients)}


class ClientSampler:
  """Seeded per-round choice of clients, without repeats inside a round.

  `sample(round_index)` depends only on (seed, round_index): resuming at a round
  gives the clients that round had in the interrupted run.
  """

  def __init__(self, client_ids: Sequence[str], clients_per_round: int, seed: int):
    if len(set(client_ids)) != len(client_ids):
      raise ValueError("Client ids must be unique.")
    if not 0 < clients_per_round <= len(client_ids):
      raise ValueError(
          f"clients_per_round={clients_per_round} must be in [1, {len(client_ids)}]"
          " (the number of clients).")
    self.client_ids = list(client_ids)
    self.clients_per_round = clients_per_round
    self.seed = seed

  def sample(self, round_index: int) -> list[str]:
    """The client ids of round `round_index` (clients_per_round distinct ids)."""
    rng = np.random.default_rng([self.seed, round_index])
    chosen = rng.choice(len(self.client_ids), self.clients_per_round, replace=False)
    return [self.client_ids[i] for i in chosen]


def client_rng(seed: int, round_index: int, client_id: str) -> np.random.Generator:
  """The generator that shuffles `client_id`'s examples in round `round_index`."""
  return np.random.default_rng(
      [seed, round_index, zlib.crc32(client_id.encode("utf-8"))])


def client_step_plan(
    num_examples: int,
    rng: np.random.Generator,
    local_steps: int,
    batch_size: int,
    local_epochs: int | None = None,
) -> list[list[int]]:
  """Example indices of each local step of one client (module docstring).

  Returns:
    At most `local_steps` lists of at most `batch_size` indices into the client's
    examples; with local_epochs None every list is full (or there are none when
    the client has no examples).
  """
  if local_steps <= 0 or batch_size <= 0:
    raise ValueError("local_steps and batch_size must be positive.")
  if num_examples == 0:
    return []
  if local_epochs is None:
    needed = local_steps * batch_size
    passes = -(-needed // num_examples)
  else:
    if local_epochs <= 0:
      raise ValueError(f"local_epochs must be positive, got {local_epochs}.")
    passes = local_epochs
    needed = min(local_steps * batch_size, passes * num_examples)
  # numpy's permutations, not grain's `MapDataset.shuffle().repeat()`: grain's
  # order differs, so every reported federated run would change.
  order = np.concatenate([rng.permutation(num_examples) for _ in range(passes)])
  order = order[:needed].tolist()
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def make_round_data(
    client_examples: Sequence[ClientExamples | Sequence[Example]],
    client_ids: Sequence[str],
    round_index: int,
    seed: int,
    *,
    local_steps: int,
    batch_size: int,
    buckets: batching.Buckets,
    local_epochs: int | None = None,
    fixed_shape: bool = False,
    client_range: tuple[int, int] | None = None,
) -> RoundData:
  """Dense arrays of one round for the chosen clients (module docstring).

  Every client's step plan is drawn (it needs only the client's number of
  examples) and the bucket is chosen over all C clients from their examples'
  buckets; then only the clients of `client_range` are read, each example
  once (`ClientExamples.read` of the positions its plan uses).

  Args:
    client_examples: each chosen client's examples, [C]: `ClientExamples`, or
      lists of prepared examples.
    client_ids: the C client ids (seed the per-client shuffles).
    round_index: the round (seeds the shuffles).
    seed: run seed.
    local_steps: K.
    batch_size: B.
    buckets: the static shapes; every example must fit its last bucket.
    local_epochs: None for K full steps, or E epochs capped at K steps.
    fixed_shape: always use the largest bucket (one shape for every round).
    client_range: (first, last): build only clients first..last-1 of the round
      (this process's block when several hosts share a round); the others are
      not read. The bucket is still chosen over all C clients, so every process
      gets the same S and U.

  Returns:
    The RoundData, leading axes [C, K] (C = last - first with a range); its
    batches are 'audio', 'audio_paddings', 'labels', 'label_paddings' and
    'example_mask'.
  """
  if len(client_examples) != len(client_ids):
    raise ValueError(f"{len(client_examples)} example lists for"
                     f" {len(client_ids)} client ids.")
  clients = [c if isinstance(c, ClientExamples) else HeldExamples(c)
             for c in client_examples]
  client_buckets = [np.asarray(c.buckets) for c in clients]
  plans = [
      client_step_plan(len(example_buckets),
                       client_rng(seed, round_index, client_id),
                       local_steps, batch_size, local_epochs)
      for example_buckets, client_id in zip(client_buckets, client_ids)]
  if fixed_shape:
    bucket = len(buckets) - 1
  else:
    bucket = max((int(client_buckets[c][i])
                  for c, plan in enumerate(plans) for step in plan for i in step),
                 default=0)
  audio_length = buckets.audio_lengths[bucket]
  label_length = buckets.label_lengths[bucket]
  first, last = client_range or (0, len(client_ids))
  if not 0 <= first <= last <= len(client_ids):
    raise ValueError(f"client_range {client_range} is outside the round's"
                     f" {len(client_ids)} clients.")
  shape = (last - first, local_steps, batch_size)
  batches = {
      "audio": np.zeros(shape + (audio_length,), np.float32),
      "audio_paddings": np.ones(shape + (audio_length,), np.float32),
      "labels": np.zeros(shape + (label_length,), np.int32),
      "label_paddings": np.ones(shape + (label_length,), np.float32),
      "example_mask": np.zeros(shape, np.float32),
  }
  for row, c in enumerate(range(first, last)):
    positions = sorted({i for step in plans[c] for i in step})
    examples = dict(zip(positions, clients[c].read(positions)))
    for k, step in enumerate(plans[c]):
      batching.fill_padded_rows(
          [examples[i] for i in step],
          {key: array[row, k] for key, array in batches.items()})
  example_mask = batches["example_mask"]
  return RoundData(
      batches=batches,
      step_mask=(example_mask.max(axis=-1) > 0).astype(np.float32),
      num_examples=example_mask.sum(axis=(1, 2)),
      client_size=np.array([len(client_buckets[c]) for c in range(first, last)],
                           np.float32))


class IndexStale(ValueError):
  """A record read from disk disagrees with the speaker index's entry."""


@dataclasses.dataclass
class StreamedClient:
  """One client's examples, read from disk by record index when asked for.

  A `ClientExamples`: `buckets` comes from the speaker index (no audio
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
      input_pipeline.librispeech_options_from_config(config))


def get_client_datasets(
    config: ml_collections.ConfigDict,
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    split: str | None = None,
    domains: Sequence[str] | None = None,
    skips: batching.SkipCounter | None = None,
) -> ClientDatasets:
  """The federated clients of a split, streamed from disk (module docstring).

  Reads the split's speaker index (built and saved beside the data on first
  use: `record_source.load_speaker_index`), and keeps, per speaker, the
  records that `batching.prepare_example` accepts (checked on the index's
  transcripts and lengths: no audio is read) with their buckets. The
  clients and their examples, in order, are those of partitioning the
  prepared split by speaker (`partition_by_speaker`); skips are
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
  buckets = input_pipeline.buckets_from_config(config)
  options = input_pipeline.prepare_options(config)
  source = open_record_source(config, split)
  index = record_source.load_speaker_index(source)
  wanted = set(domains)
  engines = set(config.get("client_engines", ()))
  input_pipeline.check_engines(tuple(engines))
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


def build_round(config: ml_collections.ConfigDict,
                client_datasets: ClientDatasets, sampler: ClientSampler,
                round_index: int, mesh: jax.sharding.Mesh | None = None
                ) -> RoundData:
  """Round `round_index`'s RoundData [C, K, B, ...] of a federated run's config.

  The clients `sampler` samples for the round, batched by `make_round_data`
  with the config's federated fields (K, B, E, fixed shape) and seed. With a
  mesh, only this process's block of clients [C / P, K, B, ...], whose
  records alone are read from disk.
  """
  f = config.federated
  client_ids = sampler.sample(round_index)
  client_range = (None if mesh is None else mesh_lib.process_client_range(
      sampler.clients_per_round, mesh))
  return make_round_data(
      [client_datasets.client(c) for c in client_ids], client_ids, round_index,
      config.seed, local_steps=f.local_steps, batch_size=f.client_batch_size,
      buckets=client_datasets.buckets, local_epochs=f.local_epochs or None,
      fixed_shape=f.fixed_round_shape, client_range=client_range)
