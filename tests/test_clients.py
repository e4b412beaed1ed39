"""Tests of conformer_fl.data.federated (partition, sampler, round data) and
conformer_fl.data.client_sizes."""

import collections
import os

import jax
import ml_collections
import numpy as np
import pytest

from conformer_fl.data import batching
from conformer_fl.data import client_sizes
from conformer_fl.data import federated
from conformer_fl.data import input_pipeline
from conformer_fl.data import tokenizer as tokenizer_lib

import stand_ins  # tests/stand_ins.py

_CHAR = tokenizer_lib.CharTokenizer()
_BUCKETS = batching.make_buckets([0.25, 0.5, 1.0], labels_per_second=24)


def _prepared(index, num_samples, speaker):
  """A prepared example whose first sample and first label encode `index`."""
  audio = np.full((num_samples,), 3, np.int16)
  audio[0] = index + 1
  labels = np.array([index % 27 + 1, 5], np.int32)
  return {"audio": audio, "labels": labels,
          "bucket": _BUCKETS.find(num_samples, labels.size),
          "id": f"u{index}", "speaker_id": speaker, "domain": "short",
          "duration": num_samples / 16000}


def _index_of(audio_row):
  return int(round(audio_row[0] * batching.INT16_SCALE)) - 1


def test_partition_by_speaker_groups_in_order():
  examples = [_prepared(i, 1000, s) for i, s in enumerate("bcabca")]
  parts = federated.partition_by_speaker(examples)
  assert list(parts) == ["a", "b", "c"]
  assert [[e["id"] for e in parts[c]] for c in parts] == [
      ["u2", "u5"], ["u0", "u3"], ["u1", "u4"]]
  with pytest.raises(ValueError, match="no speaker_id"):
    federated.partition_by_speaker([_prepared(0, 10, "")])


def test_sampler_is_reproducible_without_repeats_and_varies_by_round():
  ids = [f"spk{i}" for i in range(20)]
  sampler = federated.ClientSampler(ids, 5, seed=7)
  rounds = [sampler.sample(r) for r in range(30)]
  # A fresh sampler, asked in another order, gives the same clients per round.
  other = federated.ClientSampler(ids, 5, seed=7)
  assert [other.sample(r) for r in reversed(range(30))][::-1] == rounds
  for chosen in rounds:
    assert len(chosen) == len(set(chosen)) == 5
    assert set(chosen) <= set(ids)
  assert len({tuple(sorted(c)) for c in rounds}) > 25
  assert federated.ClientSampler(ids, 5, seed=8).sample(0) != rounds[0]
  # Over many rounds every client is chosen, roughly uniformly (150 picks / 20).
  counts = collections.Counter(c for chosen in rounds for c in chosen)
  assert len(counts) == 20 and max(counts.values()) <= 16
  with pytest.raises(ValueError, match="clients_per_round=21"):
    federated.ClientSampler(ids, 21, seed=0)


def test_step_plan_fixed_steps_repeats_data_in_fresh_passes():
  rng = np.random.default_rng(0)
  plan = federated.client_step_plan(5, rng, local_steps=3, batch_size=4)
  assert [len(s) for s in plan] == [4, 4, 4]
  flat = [i for s in plan for i in s]
  assert sorted(flat[:5]) == sorted(flat[5:10]) == list(range(5))
  assert federated.client_step_plan(0, rng, 3, 4) == []


@pytest.mark.parametrize("epochs, sizes", [(1, [4, 1]), (2, [4, 4, 2]),
                                           (3, [4, 4, 4])])
def test_step_plan_epochs_capped_at_k_steps(epochs, sizes):
  plan = federated.client_step_plan(5, np.random.default_rng(0), local_steps=3,
                                    batch_size=4, local_epochs=epochs)
  assert [len(s) for s in plan] == sizes
  flat = [i for s in plan for i in s]
  for e in range(epochs):
    epoch = flat[5 * e:5 * e + 5]
    assert len(epoch) == len(set(epoch))


@pytest.fixture(scope="module")
def three_clients():
  # Client sizes 6, 1 and 0 examples; the lone example of "b" needs bucket 1.
  a = [_prepared(i, 1000 + 100 * i, "a") for i in range(6)]
  b = [_prepared(10, 6000, "b")]
  return [a, b, []], ["a", "b", "z"]


def _check_round(data, client_examples, k, b):
  c = len(client_examples)
  batches = data.batches
  s = batches["audio"].shape[-1]
  u = batches["labels"].shape[-1]
  assert (batches["audio"].shape == batches["audio_paddings"].shape
          == (c, k, b, s))
  assert (batches["labels"].shape == batches["label_paddings"].shape
          == (c, k, b, u))
  assert batches["example_mask"].shape == (c, k, b)
  assert data.step_mask.shape == (c, k)
  assert data.num_examples.shape == (c,)
  np.testing.assert_array_equal(data.num_examples,
                                batches["example_mask"].sum(axis=(1, 2)))
  np.testing.assert_array_equal(data.step_mask,
                                batches["example_mask"].max(axis=2))
  # Masked rows are pure padding; real rows hold their example.
  for ci in range(c):
    by_index = {int(e["id"][1:]): e for e in client_examples[ci]}
    for ki in range(k):
      for bi in range(b):
        audio = batches["audio"][ci, ki, bi]
        if not batches["example_mask"][ci, ki, bi]:
          assert not audio.any() and batches["audio_paddings"][ci, ki, bi].all()
          assert not batches["labels"][ci, ki, bi].any()
          assert batches["label_paddings"][ci, ki, bi].all()
          continue
        example = by_index[_index_of(audio)]
        n = example["audio"].size
        assert batches["audio_paddings"][ci, ki, bi].sum() == s - n
        assert not batches["audio_paddings"][ci, ki, bi, :n].any()
        np.testing.assert_array_equal(
            batches["labels"][ci, ki, bi, :2], example["labels"])
        assert (batches["label_paddings"][ci, ki, bi].tolist()
                == [0, 0] + [1] * (u - 2))


def test_round_data_epochs_masks_and_counts(three_clients):
  examples, ids = three_clients
  data = federated.make_round_data(examples, ids, round_index=3, seed=0,
                                   local_steps=3, batch_size=4,
                                   buckets=_BUCKETS, local_epochs=1)
  _check_round(data, examples, 3, 4)
  # One epoch: a -> steps of 4 and 2 examples; b -> 1 example; z -> nothing.
  np.testing.assert_array_equal(data.num_examples, [6, 1, 0])
  np.testing.assert_array_equal(data.step_mask,
                                [[1, 1, 0], [1, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(data.batches["example_mask"][0],
                                [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
  # The round's bucket is the largest one needed (b's 6000 samples -> bucket 1).
  assert data.batches["audio"].shape[-1] == 8000
  assert data.batches["labels"].shape[-1] == _BUCKETS.label_lengths[1]
  # Client a's epoch visits each of its examples exactly once.
  seen = sorted(_index_of(row) for row, m in zip(
      data.batches["audio"][0].reshape(-1, 8000),
      data.batches["example_mask"][0].reshape(-1)) if m)
  assert seen == list(range(6))


def test_round_data_fixed_steps_and_fixed_shape(three_clients):
  examples, ids = three_clients
  data = federated.make_round_data(examples, ids, round_index=0, seed=0,
                                   local_steps=2, batch_size=4,
                                   buckets=_BUCKETS, fixed_shape=True)
  _check_round(data, examples, 2, 4)
  # K full steps, data repeated: 8 example slots for a and b; z stays empty.
  np.testing.assert_array_equal(data.num_examples, [8, 8, 0])
  np.testing.assert_array_equal(data.step_mask, [[1, 1], [1, 1], [0, 0]])
  assert data.batches["audio"].shape[-1] == _BUCKETS.audio_lengths[-1]


def test_round_data_is_deterministic_and_reshuffled_per_round(three_clients):
  examples, ids = three_clients
  kwargs = dict(local_steps=3, batch_size=2, buckets=_BUCKETS, local_epochs=1)
  r5 = federated.make_round_data(examples, ids, 5, 0, **kwargs)
  again = federated.make_round_data(examples, ids, 5, 0, **kwargs)
  jax.tree.map(np.testing.assert_array_equal, r5, again)

  def order(data):
    return [_index_of(r) for r in data.batches["audio"][0].reshape(-1, 8000)]

  orders = {tuple(order(federated.make_round_data(examples, ids, r, 0,
                                                 **kwargs)))
            for r in range(6)}
  assert len(orders) > 1
  # Shuffling depends on the client id, not its position in the round.
  swapped = federated.make_round_data(examples[::-1], ids[::-1], 5, 0, **kwargs)
  np.testing.assert_array_equal(swapped.batches["audio"][2],
                                r5.batches["audio"][0])


def test_round_data_client_range_is_a_block_of_the_full_round(three_clients):
  examples, ids = three_clients
  kwargs = dict(local_steps=3, batch_size=2, buckets=_BUCKETS, local_epochs=1)
  full = federated.make_round_data(examples, ids, 2, 0, **kwargs)
  # Client "a" alone only needs bucket 0, but the block keeps the round's bucket.
  block = federated.make_round_data(examples, ids, 2, 0, client_range=(0, 1),
                                    **kwargs)
  assert block.batches["audio"].shape == (1, 3, 2, 8000)
  jax.tree.map(lambda b, f: np.testing.assert_array_equal(b, f[:1]), block,
               full)
  tail = federated.make_round_data(examples, ids, 2, 0, client_range=(1, 3),
                                   **kwargs)
  np.testing.assert_array_equal(tail.num_examples, [1, 0])
  with pytest.raises(ValueError, match="outside"):
    federated.make_round_data(examples, ids, 2, 0, client_range=(2, 4),
                              **kwargs)


def test_client_size_report(tmp_path):
  table, png = client_sizes.client_size_report(
      {"a": 1, "b": 4, "c": 4, "d": 11}, str(tmp_path / "report"))
  rows = table.splitlines()
  assert rows[0] == "| clients | examples | min | median | mean | max |"
  assert rows[2] == "| 4 | 20 | 1 | 4.0 | 5.0 | 11 |"
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(png) > 1000
  with pytest.raises(ValueError, match="at least one client"):
    client_sizes.client_size_report([], str(tmp_path))


# The whole path from TFDS: a tiny dataset with the synthetic corpus's features.
_SPEAKERS = ["s1", "s2", "s2", "s3", "s3", "s3", "s1", "s2", "s4"]
_DOMAINS = [1, 1, 1, 1, 1, 1, 0, 0, 1]  # 0 long, 1 short


def _clients_examples():
  for i, (speaker, domain) in enumerate(zip(_SPEAKERS, _DOMAINS)):
    audio = np.full((2000 + 500 * i,), 3, np.int16)
    audio[0] = i + 1
    yield f"u{i}", {"audio": audio, "text": "Hi there", "speaker_id": speaker,
                    "domain": domain, "duration": audio.size / 16000,
                    "id": f"u{i}"}


CflClientsStandIn = stand_ins.builder_class(
    "CflClientsStandIn",
    "Train split of 9 utterances by 4 speakers, 7 short and 2 long.",
    {"train": _clients_examples})


def test_client_datasets_from_tfds_and_round(tmp_path):
  # Clients are read by record index: the array_record format.
  CflClientsStandIn(data_dir=str(tmp_path)).download_and_prepare(
      file_format="array_record")
  config = input_pipeline.default_data_config()
  config.dataset = "cfl_clients_stand_in"
  config.builder_config = ""
  config.data_dir = str(tmp_path)
  config.bucket_seconds = (0.25, 0.5)
  config.tokenizer.kind = "char"
  datasets = federated.get_client_datasets(config, _CHAR)  # 'short' only
  assert datasets.client_ids == ["s1", "s2", "s3", "s4"]
  assert datasets.sizes() == {"s1": 1, "s2": 2, "s3": 3, "s4": 1}
  assert sorted(e["id"] for e in datasets.read_client("s3")) == [
      "u3", "u4", "u5"]
  assert _CHAR.decode(datasets.read_client("s1")[0]["labels"]) == "hi there"
  sampler = federated.ClientSampler(datasets.client_ids, 2, seed=1)
  run_config = ml_collections.ConfigDict(dict(seed=1, federated=dict(
      local_steps=2, client_batch_size=2, local_epochs=1,
      fixed_round_shape=False)))
  data = federated.build_round(run_config, datasets, sampler, 4)
  ids = sampler.sample(4)
  expected = [min(datasets.sizes()[c], 4) for c in ids]
  np.testing.assert_array_equal(data.num_examples, expected)
  assert data.batches["audio"].shape[:3] == (2, 2, 2)
  everything = federated.get_client_datasets(config, _CHAR, domains=())
  assert everything.sizes() == {"s1": 2, "s2": 3, "s3": 3, "s4": 1}


def test_round_data_client_size_counts_own_examples_once(three_clients):
  # K*B = 8 example slots: a (6 examples) and b (1) repeat theirs to fill
  # them, so both train 8; client_size counts each example once.
  examples, ids = three_clients
  data = federated.make_round_data(examples, ids, round_index=0, seed=0,
                                   local_steps=2, batch_size=4,
                                   buckets=_BUCKETS)
  np.testing.assert_array_equal(data.num_examples, [8, 8, 0])
  np.testing.assert_array_equal(data.client_size, [6, 1, 0])
  assert data.client_size.dtype == np.float32
  first = federated.make_round_data(examples, ids, round_index=0, seed=0,
                                    local_steps=2, batch_size=4,
                                    buckets=_BUCKETS, client_range=(1, 3))
  np.testing.assert_array_equal(first.client_size, [1, 0])
