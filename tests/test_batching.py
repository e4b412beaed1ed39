"""Tests of conformer_fl.data.batching and the central-training input pipeline.

Unit tests check padding, masks and bucket choice against hand-computed values;
the pipeline tests read a tiny in-test TFDS dataset with the synthetic corpus's
features through `input_pipeline.get_train_batches` / `get_eval_batches`.
"""

import functools
import logging
import threading

import numpy as np
import pytest

from conformer_fl.data import batching
from conformer_fl.data import input_pipeline
from conformer_fl.data import tokenizer as tokenizer_lib

import stand_ins  # tests/stand_ins.py

_CHAR = tokenizer_lib.CharTokenizer()
_BUCKETS = batching.make_buckets([0.5, 1.0], labels_per_second=24)


def _example(index, num_samples, text="ab", speaker="s0"):
  """An example whose audio encodes `index` in its first sample."""
  audio = np.full((num_samples,), 7, np.int16)
  audio[:1] = index + 1
  return {"audio": audio, "text": text, "speaker_id": speaker, "domain": "long",
          "duration": num_samples / 16000, "id": f"utt{index}"}


def _index_of(audio_row):
  return int(round(audio_row[0] * batching.INT16_SCALE)) - 1


def test_make_buckets_derives_label_lengths_by_hand():
  assert _BUCKETS.audio_lengths == (8000, 16000)
  # ceil(0.5 * 24) = 12 -> 16; ceil(1.0 * 24) = 24 -> 24.
  assert _BUCKETS.label_lengths == (16, 24)
  explicit = batching.make_buckets([2, 4], label_lengths=[10, 30])
  assert explicit == batching.Buckets((32000, 64000), (10, 30))
  with pytest.raises(ValueError, match="strictly increasing"):
    batching.make_buckets([4, 2], labels_per_second=10)
  with pytest.raises(ValueError, match="labels_per_second"):
    batching.make_buckets([2, 4])


def test_bucket_choice_needs_audio_and_labels_to_fit():
  assert _BUCKETS.find(8000, 16) == 0
  assert _BUCKETS.find(8001, 1) == 1
  assert _BUCKETS.find(100, 17) == 1   # labels push it into the larger bucket
  assert _BUCKETS.find(16001, 1) is None
  assert _BUCKETS.find(100, 25) is None


def test_pad_batch_values_and_masks_by_hand():
  a = {"audio": np.array([16384, -32768, 1], np.int16),
       "labels": np.array([5, 6], np.int32)}
  b = {"audio": np.array([0.25, -0.5], np.float32),
       "labels": np.array([7, 8, 9, 10], np.int32)}
  batch = batching.pad_batch([a, b], audio_length=4, label_length=5, batch_size=3)
  np.testing.assert_array_equal(batch["audio"], np.array(
      [[0.5, -1.0, 1 / 32768, 0], [0.25, -0.5, 0, 0], [0, 0, 0, 0]], np.float32))
  np.testing.assert_array_equal(batch["audio_paddings"], np.array(
      [[0, 0, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1]], np.float32))
  np.testing.assert_array_equal(batch["labels"], np.array(
      [[5, 6, 0, 0, 0], [7, 8, 9, 10, 0], [0, 0, 0, 0, 0]], np.int32))
  np.testing.assert_array_equal(batch["label_paddings"], np.array(
      [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], np.float32))
  np.testing.assert_array_equal(batch["example_mask"], [1, 1, 0])
  assert {k: v.dtype for k, v in batch.items()} == {
      "audio": np.float32, "audio_paddings": np.float32, "labels": np.int32,
      "label_paddings": np.float32, "example_mask": np.float32}
  with pytest.raises(ValueError, match="does not fit"):
    batching.pad_batch([a], audio_length=2, label_length=5, batch_size=1)


def test_prepare_example_tokenizes_and_buckets():
  skips = batching.SkipCounter()
  prepared = batching.prepare_example(
      _example(3, 9000, text="Hello, World!"), _CHAR, _BUCKETS, skips)
  assert prepared["bucket"] == 1
  assert _CHAR.decode(prepared["labels"]) == "hello world"
  assert prepared["labels"].dtype == np.int32
  assert prepared["audio"].dtype == np.int16
  assert prepared["duration"] == pytest.approx(9000 / 16000)
  assert skips.total == 0


def test_bad_examples_are_skipped_and_counted_by_reason(caplog):
  good = _example(0, 4000)
  bad = {
      "empty_audio": dict(good, audio=np.zeros((0,), np.int16)),
      "silent_audio": dict(good, audio=np.zeros((4000,), np.int16)),
      "nonfinite_audio": dict(good, audio=np.array([0.1, np.nan], np.float32)),
      "audio_out_of_range": dict(good, audio=np.array([0.1, 3.0], np.float32)),
      "bad_audio_dtype": dict(good, audio=np.ones((4000,), np.int32)),
      "empty_transcript": dict(good, text=" ?! "),
      "audio_too_long": _example(1, 16001),
      "labels_too_long": _example(2, 4000, text="a" * 25),
  }
  skips = batching.SkipCounter("unit")
  stream = [good, *bad.values(), dict(good, audio=np.ones((2, 2), np.int16)), good]
  with caplog.at_level(logging.WARNING):
    kept = list(batching.prepare_examples(stream, _CHAR, _BUCKETS, skips))
  assert len(kept) == 2
  expected = {reason: 1 for reason in bad}
  expected["bad_audio_dtype"] = 2  # int32 audio and 2-D audio
  assert dict(skips.counts) == expected
  assert skips.total == 9
  assert "labels_too_long" in caplog.text and "utt2" in caplog.text
  skips.log_summary()
  assert "skipped 9 examples" in caplog.text
  with pytest.raises(ValueError, match="Unknown skip reason"):
    skips.skip("cosmic_rays")


def test_max_label_rate_skips_labels_denser_than_the_limit():
  skips = batching.SkipCounter()
  # 16000 samples = 1 s; 10 characters -> 10 labels per second.
  example = _example(0, 16000, text="abcdefghij")
  assert batching.prepare_example(example, _CHAR, _BUCKETS, skips,
                                  max_label_rate=10.0) is not None
  assert batching.prepare_example(example, _CHAR, _BUCKETS, skips,
                                  max_label_rate=9.9) is None
  assert dict(skips.counts) == {"labels_too_dense": 1}


def _prepared_stream(num, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1000, 16000, size=num)
  skips = batching.SkipCounter()
  return list(batching.prepare_examples(
      (_example(i, int(n)) for i, n in enumerate(lengths)), _CHAR, _BUCKETS, skips))


def test_bucket_by_length_is_deterministic_and_shuffles_within_buckets():
  examples = _prepared_stream(40)

  def run(seed, drop_remainder=True):
    return [(b, [e["id"] for e in g]) for b, g in batching.bucket_by_length(
        examples, len(_BUCKETS), 4, seed, shuffle_buffer=10,
        drop_remainder=drop_remainder)]

  first = run(3)
  assert first == run(3)
  assert first != run(4)
  by_id = {e["id"]: e for e in examples}
  for bucket, ids in first:
    assert len(ids) == 4
    assert all(by_id[i]["bucket"] == bucket for i in ids)
  # drop_remainder=False: every example exactly once; True: all but < 4 per bucket.
  all_ids = [i for _, ids in run(3, drop_remainder=False) for i in ids]
  assert sorted(all_ids) == sorted(by_id)
  kept = [i for _, ids in first for i in ids]
  assert len(set(kept)) == len(kept)
  per_bucket = np.bincount([e["bucket"] for e in examples], minlength=2)
  assert len(kept) == sum(4 * (n // 4) for n in per_bucket)


def test_eval_batches_hold_every_example_exactly_once():
  examples = _prepared_stream(23, seed=1)
  batches = list(batching.eval_batches(examples, _BUCKETS, batch_size=4))
  seen = []
  for batch in batches:
    bucket = _BUCKETS.audio_lengths.index(batch["audio"].shape[1])
    assert batch["labels"].shape == (4, _BUCKETS.label_lengths[bucket])
    for row in range(4):
      if batch["example_mask"][row]:
        seen.append(_index_of(batch["audio"][row]))
      else:  # filler rows are pure padding
        assert not batch["audio"][row].any() and batch["audio_paddings"][row].all()
        assert batch["label_paddings"][row].all() and not batch["labels"][row].any()
  assert sorted(seen) == list(range(23))
  per_bucket = np.bincount([e["bucket"] for e in examples], minlength=2)
  assert len(batches) == sum(-(-n // 4) for n in per_bucket)


def test_eval_batches_number_speakers_in_order_of_first_appearance():
  skips = batching.SkipCounter()
  speakers = ["b", "a", "b", "c", "a", "c", "b"]
  lengths = [4000, 12000, 4000, 12000, 4000, 4000, 12000]
  examples = [batching.prepare_example(_example(i, n, speaker=s), _CHAR,
                                       _BUCKETS, skips)
              for i, (n, s) in enumerate(zip(lengths, speakers))]
  batches = list(batching.eval_batches(examples, _BUCKETS, batch_size=3))
  index = {"b": 0, "a": 1, "c": 2}
  seen = 0
  for batch in batches:
    assert batch["speaker"].dtype == np.int32
    for row in range(3):
      if batch["example_mask"][row]:
        example = _index_of(batch["audio"][row])
        assert batch["speaker"][row] == index[speakers[example]]
        seen += 1
      else:
        assert batch["speaker"][row] == -1
  assert seen == 7


# A tiny TFDS dataset with the synthetic corpus's features (audio int16, text,
# speaker_id, domain ClassLabel, duration, id).
_TRAIN_LENGTHS = [3000, 5000, 7000, 7900, 9000, 11000, 12000, 15000, 4000, 6000,
                  10000, 14000, 2000]


def _batching_examples(split):
  if split == "train":
    lengths = _TRAIN_LENGTHS + [0, 20000]  # empty audio, too long
    texts = ["ab cd"] * len(lengths)
  else:
    lengths = [1000, 2000, 3000, 9000, 10000, 11000, 12000, 17000]
    texts = ["xy"] * len(lengths)
  for i, n in enumerate(lengths):
    ex = _example(i, n, text=texts[i], speaker=f"spk{i % 3}")
    yield f"{split}{i}", dict(ex, audio=ex["audio"], domain=i % 2,
                              duration=n / 16000, id=f"{split}{i}")


CflBatchingStandIn = stand_ins.builder_class(
    "CflBatchingStandIn",
    "Train: 13 valid examples + 2 bad ones; dev: 7 valid + 1 too long.",
    {split: functools.partial(_batching_examples, split)
     for split in ("train", "dev")})


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  CflBatchingStandIn(data_dir=data_dir).download_and_prepare()
  config = input_pipeline.default_data_config()
  config.dataset = "cfl_batching_stand_in"
  config.builder_config = ""
  config.data_dir = data_dir
  config.bucket_seconds = (0.5, 1.0)
  config.labels_per_second = 24.0
  config.batch_size = 2
  config.eval_batch_size = 3
  config.tokenizer.kind = "char"
  return config


def _ids_of(batch):
  return [_index_of(row) for row, m in zip(batch["audio"], batch["example_mask"]) if m]


def test_train_batches_are_deterministic_epoch_aware_and_resumable(data_config):
  def take(seed, n, start_step=0):
    it = input_pipeline.get_train_batches(data_config, _CHAR, seed=seed,
                                          start_step=start_step)
    return [next(it) for _ in range(n)]

  first = take(0, 12)
  again = take(0, 12)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = take(1, 12)
  assert [_ids_of(b) for b in first] != [_ids_of(b) for b in other]
  resumed = take(0, 4, start_step=8)
  assert [_ids_of(b) for b in resumed] == [_ids_of(b) for b in first[8:12]]
  # 13 valid examples: bucket 0 (<= 8000 samples) has 7, bucket 1 has 6, so an
  # epoch is 3 + 3 = 6 full batches of 2 and each epoch holds 12 distinct examples.
  for epoch in range(2):
    ids = [i for b in first[6 * epoch:6 * epoch + 6] for i in _ids_of(b)]
    assert len(ids) == len(set(ids)) == 12
    assert set(ids) <= set(range(len(_TRAIN_LENGTHS)))
  assert all(b["example_mask"].all() for b in first)


def test_train_batches_count_skipped_examples(data_config):
  skips = batching.SkipCounter()
  it = input_pipeline.get_train_batches(data_config, _CHAR, seed=0, skips=skips)
  next(it)
  assert dict(skips.counts) == {"empty_audio": 1, "audio_too_long": 1}


def test_eval_batches_from_tfds_every_example_once(data_config):
  skips = batching.SkipCounter()
  batches = list(input_pipeline.get_eval_batches(data_config, _CHAR, skips=skips))
  ids = sorted(i for b in batches for i in _ids_of(b))
  assert ids == list(range(7))
  assert dict(skips.counts) == {"audio_too_long": 1}
  # Dev lengths 1000, 2000, 3000 -> bucket 0; 9000..12000 -> bucket 1; 17000 is
  # skipped. Batches of 3: bucket 0 gives one full batch, bucket 1 a full one and
  # a last one with 1 example + 2 filler rows (batch order follows TFDS's order).
  shapes_and_counts = sorted((b["audio"].shape, int(b["example_mask"].sum()))
                             for b in batches)
  assert shapes_and_counts == [((3, 8000), 3), ((3, 16000), 1), ((3, 16000), 3)]
  assert batches[-1]["audio"].shape == (3, 16000)
  assert batches[-1]["example_mask"].tolist() == [1, 0, 0]
  labels = batches[0]["labels"][0]
  assert _CHAR.decode(labels) == "xy"


def test_domain_filter(data_config):
  examples = list(input_pipeline.load_split_from_config(
      data_config, "dev", domains=("short",)))
  # TFDS stores examples in an order of its own (hashed keys): compare sets.
  assert sorted(e["id"] for e in examples) == ["dev1", "dev3", "dev5", "dev7"]
  by_id = {e["id"]: e for e in examples}
  assert all(e["domain"] == "short" for e in examples)
  assert by_id["dev5"]["speaker_id"] == "spk2"
  assert by_id["dev5"]["text"] == "xy"
  assert by_id["dev5"]["duration"] == pytest.approx(11000 / 16000)
  assert by_id["dev5"]["audio"].dtype == np.int16
  assert _index_of(by_id["dev5"]["audio"] / batching.INT16_SCALE) == 5


def test_max_labels_per_second_by_hand():
  examples = [
      {"audio": np.ones((16000,), np.int16), "text": "abcd"},      # 4 / 1 s
      {"audio": np.ones((8000,), np.int16), "text": "abc"},        # 3 / 0.5 s
      {"audio": np.ones((1600,), np.int16), "text": "abcdefgh"},   # 0.1 s: ignored
      {"audio": np.ones((32000,), np.int16), "text": ""},          # no text
  ]
  assert input_pipeline.max_labels_per_second(examples, _CHAR) == 6.0
  assert input_pipeline.max_labels_per_second(examples, _CHAR,
                                              min_seconds=0.1) == 80.0


def test_train_batches_error_when_no_full_batch_reaches_consumer(data_config):
  config = data_config.copy_and_resolve_references()
  config.batch_size = 50  # more than the 13 valid training examples
  it = input_pipeline.get_train_batches(config, _CHAR, seed=0)
  with pytest.raises(ValueError, match="gives no full batch of 50"):
    next(it)


def test_prefetch_in_thread_keeps_order_and_reraises():
  assert list(input_pipeline.prefetch_in_thread(iter(range(7)), 2)) == list(range(7))
  threads = []

  def failing():
    threads.append(threading.get_ident())
    yield 1
    raise RuntimeError("producer broke")

  it = input_pipeline.prefetch_in_thread(failing(), 3)
  assert next(it) == 1
  assert threads and threads[0] != threading.get_ident()  # ran in another thread
  with pytest.raises(RuntimeError, match="producer broke"):
    next(it)
  plain = iter(range(3))
  assert input_pipeline.prefetch_in_thread(plain, 0) is plain


@pytest.mark.parametrize("cache", [True, False])
def test_prefetched_train_batches_equal_unprefetched(data_config, cache):
  def take(prefetch):
    config = data_config.copy_and_resolve_references()
    config.cache_train_in_memory = cache
    config.shuffle_buffer = 0 if cache else 3
    config.prefetch_batches = prefetch
    it = input_pipeline.get_train_batches(config, _CHAR, seed=5, start_step=1)
    return [next(it) for _ in range(14)]  # over two epochs of 6 batches

  plain, prefetched = take(0), take(2)
  for a, b in zip(plain, prefetched, strict=True):
    assert sorted(a) == sorted(b)
    for key in a:
      assert a[key].dtype == b[key].dtype
      np.testing.assert_array_equal(a[key], b[key])
