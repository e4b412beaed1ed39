"""Federated clients streamed from disk: record source, speaker index, rounds.

The clients of a split are read by record index from ArrayRecord files
(conformer_fl/data/record_source.py). Checked here:
  * the rounds are bit-identical to the reference of holding every client's
    prepared examples in memory (the tiny corpus read through tf.data from a
    tfrecord copy, partitioned by speaker);
  * the speaker index's content, by hand, on a small fake;
  * each process's block of the `clients` mesh axis reads exactly its own
    clients' records, each once;
  * configs/federated.py:corpus=librispeech on a stand-in with LibriSpeech's
    TFDS schema.
"""

import json
import pathlib
import types

import jax
import numpy as np
import pytest

from conformer_fl import experiment
from conformer_fl.data import batching
from conformer_fl.data import federated
from conformer_fl.data import input_pipeline
from conformer_fl.data import librispeech_stand_in
from conformer_fl.data import record_source
from conformer_fl.data import synthetic_speech
from conformer_fl.data import tokenizer as tokenizer_lib
from conformer_fl.federated import mesh as mesh_lib
from conformer_fl.tools import sweep

import entry_point  # tests/entry_point.py
import stand_ins  # tests/stand_ins.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
_CHAR = tokenizer_lib.CharTokenizer()
_BATCH_KEYS = ("audio", "audio_paddings", "labels", "label_paddings",
               "example_mask")


def _assert_bitwise_equal(got, expected):
  """Equal RoundData: same arrays, dtypes, shapes and bytes."""
  assert sorted(got.batches) == sorted(_BATCH_KEYS)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _sampled_round(datasets, sampler, round_index, seed, **kwargs):
  """(client ids, RoundData) of a round of `sampler`'s clients."""
  ids = sampler.sample(round_index)
  return ids, federated.make_round_data(
      [datasets.client(c) for c in ids], ids, round_index, seed,
      buckets=datasets.buckets, **kwargs)


def _tiny_config(data_dir: str):
  config = input_pipeline.default_data_config()
  config.data_dir = data_dir
  config.tokenizer.kind = "char"
  config.skip_ctc_unalignable = True
  return config


@pytest.fixture(scope="module")
def tiny_tfrecord_dir(tmp_path_factory) -> str:
  """The tiny corpus once more, as tfrecord files (the reference's format)."""
  data_dir = str(tmp_path_factory.mktemp("tiny_tfrecord"))
  synthetic_speech.build("tiny", data_dir, file_format="tfrecord")
  return data_dir


def _in_memory_clients(config, domains):
  """The reference: every client's prepared examples held in memory, read in
  order through tf.data and partitioned by speaker."""
  skips = batching.SkipCounter("reference")
  prepared = batching.prepare_examples(
      input_pipeline.load_split_from_config(config, "train", domains=domains),
      _CHAR, input_pipeline.buckets_from_config(config), skips,
      **input_pipeline.prepare_options(config), require_speaker_id=True)
  return federated.partition_by_speaker(prepared), dict(skips.counts)


@pytest.mark.parametrize("domains", [("short",), ()])
def test_streamed_rounds_are_bit_identical_to_in_memory(
    tiny_corpus_dir, tiny_tfrecord_dir, domains):
  reference, reference_skips = _in_memory_clients(
      _tiny_config(tiny_tfrecord_dir), domains)
  skips = batching.SkipCounter("streamed")
  streamed = federated.get_client_datasets(
      _tiny_config(tiny_corpus_dir), _CHAR, domains=domains, skips=skips)
  assert dict(skips.counts) == reference_skips
  assert streamed.client_ids == list(reference)
  assert streamed.sizes() == {c: len(e) for c, e in reference.items()}
  assert len(streamed.client_ids) >= 8
  sampler = federated.ClientSampler(streamed.client_ids, 4, seed=7)
  rounds = 0
  for local_epochs, fixed_shape in ((None, False), (1, False), (2, True)):
    for round_index in (0, 1, 5):
      kwargs = dict(local_steps=3, batch_size=2, local_epochs=local_epochs,
                    fixed_shape=fixed_shape)
      ids, data = _sampled_round(streamed, sampler, round_index, 7, **kwargs)
      expected = federated.make_round_data(
          [reference[c] for c in ids], ids, round_index, 7,
          buckets=streamed.buckets, **kwargs)
      _assert_bitwise_equal(data, expected)
      assert data.batches["example_mask"].sum() > 0
      rounds += 1
  assert rounds == 9


def test_a_tfrecord_dataset_is_refused_for_clients(tiny_tfrecord_dir):
  with pytest.raises(record_source.NotRandomAccess,
                     match="file_format='array_record'"):
    federated.get_client_datasets(_tiny_config(tiny_tfrecord_dir), _CHAR)


def test_the_experiment_refuses_a_tfrecord_corpus_before_pretraining(
    tiny_tfrecord_dir, tmp_path):
  config = sweep.load_config_file("configs/experiment.py:scale=tiny",
                                  str(pathlib.Path(__file__).parents[1]))
  config.data_dir = tiny_tfrecord_dir
  trained = []
  with pytest.raises(record_source.NotRandomAccess, match="tfrecord files"):
    experiment.run_experiment(
        config, str(tmp_path / "w"),
        train_central=lambda *args: trained.append(args),
        train_federated=lambda *args: trained.append(args))
  assert not trained and not (tmp_path / "w" / "pretrain").exists()


# A fake with the synthetic corpus's features: 7 utterances, 3 usable speakers.
# (id, speaker id, text, samples, domain: 0 long / 1 short, silent)
_BAD_SPEAKER = b"sp\xff"  # not UTF-8
_FAKE = [
    ("u0", "s1", "Hello there", 4000, 1, False),
    ("u1", "s2", "good morning", 6000, 1, False),
    ("u2", "s1", "set a timer", 3000, 0, False),
    ("u3", _BAD_SPEAKER, "call my sister", 5000, 1, False),
    ("u4", "s3", "play music", 7000, 1, True),
    ("u5", "s2", "turn it off", 2500, 1, False),
    ("u6", "", "what time is it", 3500, 1, False),
]


def _fake_examples():
  for i, (uid, speaker, text, n, domain, silent) in enumerate(_FAKE):
    audio = np.zeros((n,), np.int16)
    if not silent:
      audio[:] = 3
      audio[0] = i + 1
    yield uid, {"audio": audio, "text": text, "speaker_id": speaker,
                "domain": domain, "duration": n / 16000, "id": uid}


CflIndexStandIn = stand_ins.builder_class(
    "CflIndexStandIn", "Train split of `_FAKE`.", {"train": _fake_examples})


@pytest.fixture(scope="module")
def fake_config(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("index_fake"))
  CflIndexStandIn(data_dir=data_dir).download_and_prepare(
      file_format="array_record")
  config = _tiny_config(data_dir)
  config.dataset = "cfl_index_stand_in"
  config.builder_config = ""
  config.bucket_seconds = (0.25, 0.5)
  config.label_lengths = (16, 24)
  config.skip_ctc_unalignable = False  # Its utterances are far too short.
  return config


def test_speaker_index_content_by_hand(fake_config):
  source = federated.open_record_source(fake_config, "train")
  assert len(source) == 7
  # TFDS orders records by a hash of their keys: find where each one went.
  order = [e["id"] for e in source.read(range(7))]
  assert sorted(order) == [f"u{i}" for i in range(7)]
  at = {uid: order.index(uid) for uid in order}
  fake = {row[0]: row for row in _FAKE}
  path = record_source.index_path(source)
  assert not path.exists()
  index = record_source.load_speaker_index(source)
  assert path == source.dataset_dir / "speaker_index" / "train.json"
  assert path.exists()
  assert index["format"] == 1 and index["num_records"] == 7
  assert index["dataset"] == "cfl_index_stand_in" and index["split"] == "train"
  # Blank and undecodable speaker ids belong to no client.
  assert index["speakers"] == {"s1": sorted([at["u0"], at["u2"]]),
                               "s2": sorted([at["u1"], at["u5"]]),
                               "s3": [at["u4"]]}
  assert list(index["speakers"]) == ["s1", "s2", "s3"]
  records = index["records"]
  assert records["id"] == order
  assert records["num_samples"] == [fake[u][3] for u in order]
  assert records["text"] == [fake[u][2].lower() for u in order]
  assert records["domain"] == [("long", "short")[fake[u][4]] for u in order]
  assert records["audio_problem"] == [
      ["silent_audio", ""] if u == "u4" else None for u in order]
  assert records["speaker_id"][at["u3"]] == {"undecodable": "c3D/"}
  assert records["speaker_id"][at["u6"]] == ""
  assert record_source.index_example(index, at["u3"])[0]["speaker_id"] == (
      _BAD_SPEAKER)
  # Loaded again, it is read from the file: no record is read.
  before = source.records_read
  assert record_source.load_speaker_index(source) == index
  assert source.records_read == before


def test_client_table_from_the_index(fake_config):
  skips = batching.SkipCounter()
  datasets = federated.get_client_datasets(fake_config, _CHAR, domains=(),
                                                skips=skips)
  assert dict(skips.counts) == {"silent_audio": 1, "undecodable_speaker_id": 1,
                                "missing_speaker_id": 1}
  assert datasets.sizes() == {"s1": 2, "s2": 2}
  # 4000 samples (0.25 s) fit bucket 0, 6000 bucket 1.
  by_id = {e["id"]: e for c in datasets.client_ids
           for e in datasets.read_client(c)}
  assert {u: e["bucket"] for u, e in by_id.items()} == {
      "u0": 0, "u2": 0, "u1": 1, "u5": 0}
  short = federated.get_client_datasets(fake_config, _CHAR)  # 'short'
  assert short.sizes() == {"s1": 1, "s2": 2}


def test_a_stale_index_is_named(fake_config):
  source = federated.open_record_source(fake_config, "train")
  index = record_source.load_speaker_index(source)
  path = record_source.index_path(source)
  saved = path.read_text()
  try:
    path.write_text(saved.replace('"num_records": 7', '"num_records": 8'))
    with pytest.raises(ValueError, match="delete it"):
      record_source.load_speaker_index(source)
  finally:
    path.write_text(saved)
  assert record_source.load_speaker_index(source) == index


def _fake_mesh(process_of_device):
  """What `process_client_range` reads of a mesh: the clients axis's devices
  and their processes."""
  devices = np.array([types.SimpleNamespace(process_index=p)
                      for p in process_of_device])
  return types.SimpleNamespace(shape={mesh_lib.CLIENTS_AXIS: devices.size},
                               devices=devices)


def test_each_process_reads_only_its_block_of_clients(tiny_corpus_dir):
  datasets = federated.get_client_datasets(
      _tiny_config(tiny_corpus_dir), _CHAR)
  read = []
  original_read = datasets.source.read

  def recording_read(indices):
    read.extend(int(i) for i in indices)
    return original_read(indices)

  datasets.source.read = recording_read
  mesh = _fake_mesh([0, 0, 1, 1])  # 2 processes of 2 devices, C = 4.
  sampler = federated.ClientSampler(datasets.client_ids, 4, seed=3)
  kwargs = dict(local_steps=4, batch_size=2, local_epochs=None)
  for round_index in (0, 1, 2):
    del read[:]
    ids, full = _sampled_round(datasets, sampler, round_index, 3, **kwargs)
    assert sorted(read) == sorted(
        int(i) for c in ids for i in datasets.records[c])
    blocks = []
    for process in (0, 1):
      first, last = mesh_lib.process_client_range(4, mesh, process)
      assert (first, last) == (2 * process, 2 * process + 2)
      del read[:]
      reads_before = datasets.source.records_read
      _, block = _sampled_round(datasets, sampler, round_index, 3,
                                client_range=(first, last), **kwargs)
      mine = {int(i) for c in ids[first:last] for i in datasets.records[c]}
      others = {int(i) for c in ids[:first] + ids[last:]
                for i in datasets.records[c]}
      # K*B = 8 slots: every example of these small clients is used, and
      # each record is read once in the round, however often it repeats.
      assert sorted(read) == sorted(mine)
      assert not set(read) & others
      assert datasets.source.records_read - reads_before == len(mine)
      blocks.append(block)
    _assert_bitwise_equal(
        jax.tree.map(lambda *b: np.concatenate(b), *blocks), full)


def test_a_round_reads_only_the_positions_its_plans_use(tiny_corpus_dir):
  datasets = federated.get_client_datasets(
      _tiny_config(tiny_corpus_dir), _CHAR)
  biggest = max(datasets.client_ids, key=lambda c: datasets.sizes()[c])
  n = datasets.sizes()[biggest]
  assert n >= 3
  plan = federated.client_step_plan(
      n, federated.client_rng(0, 4, biggest), 1, 2)
  used = sorted({i for step in plan for i in step})
  assert len(used) == 2
  before = datasets.source.records_read
  federated.make_round_data([datasets.client(biggest)], [biggest], 4, 0,
                            local_steps=1, batch_size=2,
                            buckets=datasets.buckets)
  assert datasets.source.records_read - before == 2


_STAND_IN = librispeech_stand_in.StandInSize(
    train_speakers=5, utterances_per_speaker=3, eval_speakers=2,
    eval_utterances_per_speaker=2, min_seconds=2.0, max_seconds=9.0, seed=1)


@pytest.fixture(scope="module")
def librispeech_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("librispeech_stand_in"))
  librispeech_stand_in.build(data_dir, _STAND_IN)
  return data_dir


@pytest.mark.parametrize("domain", ["all", "short"])
def test_federated_librispeech_config_reads_the_stand_in(librispeech_dir,
                                                         domain):
  config = entry_point.parse_config(
      f"{ROOT}/configs/federated.py:size=tiny,corpus=librispeech,"
      f"domain={domain}")
  assert config.mode == "federated" and config.data.dataset == "librispeech"
  assert config.data.librispeech_domain_mode == (
      "long" if domain == "all" else "by_duration")
  assert tuple(config.data.client_domains) == (
      () if domain == "all" else ("short",))
  data = config.data
  data.data_dir = librispeech_dir
  data.tokenizer.kind = "char"
  data.labels_per_second = 24.0
  # The train split is train_clean100+train_clean360+train_other500.
  source = federated.open_record_source(data, "train")
  assert len(source) == 15
  examples = source.read(range(15))
  durations = {}
  for e in examples:
    durations.setdefault(e["speaker_id"], []).append(e["duration"])
  assert sorted(durations) == ["100", "101", "102", "103", "104"]
  datasets = federated.get_client_datasets(data, _CHAR)
  keep = (lambda d: True) if domain == "all" else (lambda d: d <= 4.0)
  expected = {s: sum(map(keep, d)) for s, d in sorted(durations.items())}
  assert datasets.sizes() == {s: n for s, n in expected.items() if n}
  assert sum(datasets.sizes().values()) == (15 if domain == "all" else
                                            sum(expected.values()))
  sampler = federated.ClientSampler(datasets.client_ids, 2, seed=0)
  ids, round_data = _sampled_round(datasets, sampler, 0, 0, local_steps=2,
                                   batch_size=2)
  assert ids == sampler.sample(0)
  np.testing.assert_array_equal(round_data.num_examples, [4, 4])
  # Audio: the stand-in's int16 samples / 32768, in the first row's place.
  first = datasets.read_client(ids[0])
  row = round_data.batches["audio"][0, 0, 0]
  n = int((1 - round_data.batches["audio_paddings"][0, 0, 0]).sum())
  assert any(e["audio"].size == n and np.array_equal(
      e["audio"] / np.float32(32768), row[:n]) for e in first)
  # The eval split (dev_clean) is read through the same random-access files.
  assert len(list(input_pipeline.load_split_from_config(data, "dev"))) == 4


def test_stand_in_lengths_are_those_generated(librispeech_dir):
  source = record_source.RecordSource("librispeech", "dev_clean",
                                      librispeech_dir)
  lengths = [e["audio"].size for e in source.read(range(len(source)))]
  assert sorted(lengths) == sorted(
      librispeech_stand_in.num_samples_of(_STAND_IN, "dev_clean"))
  assert len(lengths) == 4


def test_a_record_that_disagrees_with_the_index_is_named(fake_config):
  source = federated.open_record_source(fake_config, "train")
  index = record_source.load_speaker_index(source)
  path = record_source.index_path(source)
  saved = path.read_text()
  at = index["records"]["id"].index("u1")  # "good morning", 6000 samples
  try:
    # The index says u1 is 4000 samples long: bucket 0, the record is bucket 1.
    index["records"]["num_samples"][at] = 4000
    path.write_text(json.dumps(index))
    datasets = federated.get_client_datasets(fake_config, _CHAR,
                                                  domains=())
    assert datasets.record_buckets["s2"].tolist() == [0, 0]
    with pytest.raises(federated.IndexStale, match="delete the index"):
      datasets.read_client("s2")
  finally:
    path.write_text(saved)
  datasets = federated.get_client_datasets(fake_config, _CHAR, domains=())
  assert sorted(e["id"] for e in datasets.read_client("s2")) == ["u1", "u5"]
