"""LibriSpeech loading, on a stand-in with the exact TFDS LibriSpeech schema.

`tfds.testing.mock_data(as_dataset_fn=...)` keeps the real TFDS 'librispeech'
builder (its features: 'speech' int16, 'text', 'speaker_id' int64, 'chapter_id'
int64, 'id') and replaces only the stored records by the examples below, so
`tfds.load('librispeech', split=...)` inside the pipeline reads them.
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conformer_fl.data import batching
from conformer_fl.data import input_pipeline
from conformer_fl.data import librispeech
from conformer_fl.data import tokenizer as tokenizer_lib

_CHAR = tokenizer_lib.CharTokenizer()

# (speaker, chapter, utterance, samples, transcript as LibriSpeech writes it)
_RECORDS = {
    "train": [
        (19, 198, 0, 4000, "NORTHANGER ABBEY"),
        (19, 198, 1, 12000, "THIS LITTLE WORK WAS FINISHED"),
        (26, 495, 0, 6000, "CHAPTER ONE"),
        (26, 495, 1, 9000, "NO ONE WHO HAD EVER SEEN"),
        (26, 496, 2, 3000, "HER FATHER WAS A CLERGYMAN"),
        (103, 1240, 0, 15000, "MISSUS RACHEL LYNDE'S HOUSE"),
        (103, 1240, 1, 0, "EMPTY AUDIO"),
    ],
    "dev": [
        (84, 121123, 0, 2000, "GO DO YOU HEAR"),
        (84, 121123, 1, 8000, "BUT IN LESS THAN FIVE MINUTES"),
        (174, 50561, 0, 16000, "FORGOTTEN TOO THE NAME OF GILLIAN"),
        (251, 136532, 0, 5000, "I DON'T KNOW"),
        (251, 136532, 1, 20000, "TOO LONG FOR THE BUCKETS"),
    ],
}
_TFDS_SPLIT_TO_RECORDS = {
    librispeech.FULL_TRAIN_SPLIT: "train", "train_clean100": "train",
    "dev_clean": "dev", "test_clean": "dev",
}


def _speech(index, num_samples):
  """Audio whose first sample encodes `index` (the record's position + 1)."""
  audio = np.full((num_samples,), -9, np.int16)
  audio[:1] = index + 1
  return audio


def _fake_as_dataset(requested_splits):
  """An `as_dataset_fn` for mock_data serving `_RECORDS`; logs the splits asked."""

  def as_dataset(builder, split, *args, **kwargs):
    del args, kwargs
    requested_splits.append(str(split))
    records = _RECORDS[_TFDS_SPLIT_TO_RECORDS[str(split)]]

    def generate():
      for i, (speaker, chapter, utt, n, text) in enumerate(records):
        yield {"speech": _speech(i, n), "text": text, "speaker_id": speaker,
               "chapter_id": chapter, "id": f"{speaker}-{chapter}-{utt:04d}"}

    signature = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype),
        builder.info.features.get_tensor_info())
    return tf.data.Dataset.from_generator(generate, output_signature=signature)

  return as_dataset


@pytest.fixture()
def fake_records():
  """Yields the list of TFDS split strings that the code under test asked for."""
  requested_splits = []
  with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset(requested_splits)):
    yield requested_splits


def _config():
  config = input_pipeline.default_data_config()
  config.dataset = "librispeech"
  config.builder_config = ""
  config.data_dir = "/nonexistent/tfds"  # mock_data serves the records
  config.bucket_seconds = (0.5, 1.0)
  config.labels_per_second = 40.0
  config.batch_size = 2
  config.eval_batch_size = 2
  config.train_domains = ()
  config.eval_domains = ()
  config.client_domains = ()
  config.tokenizer.kind = "char"
  return config


def test_stand_in_has_the_real_librispeech_schema(fake_records):
  del fake_records
  builder = tfds.builder("librispeech")
  features = builder.info.features
  assert set(features.keys()) == {"speech", "text", "speaker_id", "chapter_id", "id"}
  assert features["speech"].dtype == np.int16
  assert features["speaker_id"].dtype == np.int64


def test_common_examples_and_split_mapping(fake_records):
  dev = list(librispeech.load_librispeech("dev", "/nonexistent/tfds"))
  assert fake_records == ["dev_clean"]
  assert [e["id"] for e in dev] == ["84-121123-0000", "84-121123-0001",
                                    "174-50561-0000", "251-136532-0000",
                                    "251-136532-0001"]
  first = dev[3]
  assert first["text"] == "i don't know"
  assert first["speaker_id"] == "251"
  assert first["domain"] == "long"
  assert first["duration"] == pytest.approx(5000 / 16000)
  assert first["audio"].dtype == np.int16
  np.testing.assert_array_equal(first["audio"], _speech(3, 5000))
  list(librispeech.load_librispeech("train"))
  list(librispeech.load_librispeech(
      "train", options=librispeech.LibriSpeechOptions(
          split_map={"train": "train_clean100"})))
  list(librispeech.load_librispeech("test"))
  assert fake_records[1:] == [
      librispeech.FULL_TRAIN_SPLIT, "train_clean100", "test_clean"]


def test_domain_by_duration_threshold(fake_records):
  del fake_records
  options = librispeech.LibriSpeechOptions(domain_mode="by_duration",
                                           short_max_seconds=0.5)
  domains = {e["id"]: e["domain"]
             for e in librispeech.load_librispeech("dev", options=options)}
  # 2000 and 8000 samples (<= 0.5 s, the boundary included) are short.
  assert domains == {"84-121123-0000": "short", "84-121123-0001": "short",
                     "174-50561-0000": "long", "251-136532-0000": "short",
                     "251-136532-0001": "long"}
  with pytest.raises(ValueError, match="domain_mode"):
    librispeech.LibriSpeechOptions(domain_mode="random")


def test_eval_batches_through_the_common_pipeline(fake_records):
  del fake_records
  config = _config()
  config.eval_batch_size = 3
  skips = batching.SkipCounter()
  batches = list(input_pipeline.get_eval_batches(config, _CHAR, skips=skips))
  assert dict(skips.counts) == {"audio_too_long": 1}
  # Buckets: 0 = (8000 samples, 24 labels), 1 = (16000, 40). Dev records 0 (2000
  # samples, 14 chars) and 3 (5000, 12) -> bucket 0; record 1 (8000 samples but
  # 29 chars) and record 2 (16000, 33) -> bucket 1; record 4 (20000) skipped.
  # Neither bucket fills a batch of 3: both are flushed at the end, in order.
  assert [b["audio"].shape for b in batches] == [(3, 8000), (3, 16000)]
  assert [b["labels"].shape for b in batches] == [(3, 24), (3, 40)]
  assert [b["example_mask"].tolist() for b in batches] == [[1, 1, 0], [1, 1, 0]]
  texts = [_CHAR.decode(b["labels"][r]) for b in batches for r in range(2)]
  assert texts == ["go do you hear", "i don't know",
                   "but in less than five minutes",
                   "forgotten too the name of gillian"]
  np.testing.assert_allclose(batches[0]["audio"][1, :5000],
                             _speech(3, 5000) / 32768.0)
  assert not batches[0]["audio"][1, 5000:].any()
  np.testing.assert_array_equal(batches[0]["audio_paddings"][1],
                                [0] * 5000 + [1] * 3000)
  np.testing.assert_array_equal(batches[0]["label_paddings"][1],
                                [0] * 12 + [1] * 12)
  assert batches[0]["audio_paddings"][2].all()


def test_train_batches_and_tokenizer(fake_records, tmp_path):
  del fake_records
  config = _config()
  config.tokenizer.kind = "sentencepiece"
  config.tokenizer.vocab_size = 40
  tokenizer = input_pipeline.get_tokenizer(config, str(tmp_path))
  assert tokenizer.vocab_size == 40
  assert tokenizer.decode(tokenizer.encode("chapter one")) == "chapter one"
  skips = batching.SkipCounter()
  it = input_pipeline.get_train_batches(config, tokenizer, seed=0, skips=skips)
  batches = [next(it) for _ in range(4)]
  assert dict(skips.counts) == {"empty_audio": 1}
  for batch in batches:
    assert batch["audio"].shape in ((2, 8000), (2, 16000))
    assert batch["example_mask"].tolist() == [1, 1]
    assert batch["labels"].dtype == np.int32 and batch["labels"].min() >= 0
  # The federated clients of LibriSpeech (read by record index, which this
  # mock of tf.data cannot serve): tests/test_client_streaming.py.
