"""Federated client data: per-speaker partition, client sampling, round arrays.

Clients are speakers: the train split is partitioned by 'speaker_id' and a client
id is the speaker id string. No client's examples are held in memory: a client is
a `ClientExamples`, which knows the bucket of each of its examples (from the
split's speaker index, `record_source.load_speaker_index`, without reading audio)
and reads the examples a round needs from disk by record index
(`input_pipeline.StreamedClient`). A round reads only its sampled clients'
records, and with `client_range` only those of this process's block of the
`clients` mesh axis; within a round each record is read once, however often the
client's plan repeats it. So host memory does not grow with the corpus (960 h of
LibriSpeech, ~110 GB of int16 audio, stays on disk). `make_round_data` also
takes plain lists of prepared examples (`HeldExamples`), for tests.

A round's data is a dict of dense numpy arrays with static shapes, leading axes
[C, K] = clients of the round, local steps:
  'audio'          float32 [C, K, B, S]
  'audio_paddings' float32 [C, K, B, S]   1.0 = padded
  'labels'         int32   [C, K, B, U]   0 = pad
  'label_paddings' float32 [C, K, B, U]   1.0 = padded
  'example_mask'   float32 [C, K, B]      1.0 = real example
  'step_mask'      float32 [C, K]         1.0 = the step has a real example
  'num_examples'   float32 [C]            sum of example_mask over [K, B]: the
                                          examples the client trained on this
                                          round, repeats counted
  'client_size'    float32 [C]            the client's own examples, each
                                          counted once
(`conformer_fl/federated/round_data.py` turns the last two into aggregation
weights, by config.federated.aggregation_weight.)
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
"""

import collections
from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import io
import os
from typing import Protocol, runtime_checkable
import zlib

from etils import epath
import numpy as np

from conformer_fl.data import batching

Example = batching.Example
RoundData = dict[str, np.ndarray]


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
    The round data dict, leading axes [C, K] (C = last - first with a range).
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
  data = {
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
          {key: array[row, k] for key, array in data.items()})
  data["step_mask"] = (data["example_mask"].max(axis=-1) > 0).astype(np.float32)
  data["num_examples"] = data["example_mask"].sum(axis=(1, 2))
  data["client_size"] = np.array(
      [len(client_buckets[c]) for c in range(first, last)], np.float32)
  return data


def client_size_report(
    client_sizes: Mapping[str, int] | Sequence[int],
    out_dir: str | os.PathLike[str],
) -> tuple[str, str]:
  """Markdown table and histogram PNG of the number of examples per client.

  Args:
    client_sizes: examples per client (a client id -> count mapping or counts).
    out_dir: where `client_sizes.png` is written (created if needed); local or
      remote (`gs://...`), written through `etils.epath`.

  Returns:
    (markdown table with clients, examples, min, median, mean, max; PNG path).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  sizes = np.asarray(list(client_sizes.values()) if isinstance(client_sizes, Mapping)
                     else list(client_sizes), dtype=np.int64)
  if sizes.size == 0:
    raise ValueError("client_size_report needs at least one client.")
  table = "\n".join([
      "| clients | examples | min | median | mean | max |",
      "|---:|---:|---:|---:|---:|---:|",
      f"| {sizes.size} | {int(sizes.sum())} | {int(sizes.min())} |"
      f" {float(np.median(sizes)):.1f} | {float(sizes.mean()):.1f} |"
      f" {int(sizes.max())} |",
  ])
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  png_path = out_dir / "client_sizes.png"
  fig, ax = plt.subplots(figsize=(5, 3.2))
  bins = np.arange(sizes.min(), sizes.max() + 2) - 0.5
  if bins.size > 41:
    bins = 40
  ax.hist(sizes, bins=bins, color="tab:blue", edgecolor="white")
  ax.set_xlabel("examples per client")
  ax.set_ylabel("clients")
  ax.set_title(f"{sizes.size} clients, {int(sizes.sum())} examples")
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  png_path.write_bytes(png.getvalue())
  return table, os.fspath(png_path)
