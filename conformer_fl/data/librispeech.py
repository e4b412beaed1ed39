"""LibriSpeech through TFDS, mapped to the project's common example dict.

`tfds.load('librispeech', split=..., data_dir=...)` yields examples with the
features of the TFDS LibriSpeech builder:
  'speech'     Audio int16 [N] at 16 kHz (older descriptions call it 'audio';
               both keys are accepted)
  'text'       upper-case transcript
  'speaker_id' int64, 'chapter_id' int64, 'id' string ('SPK-CHAPTER-UTT').
TFDS must have prepared the data in `data_dir` beforehand: it is never downloaded
implicitly (`download=False`; its TFDS builder downloads the archives and
needs Apache Beam). Reading an unprepared one raises `LibriSpeechNotPrepared`,
whose message names the folder searched and the command that prepares it.
Prepared as ArrayRecord files (`--file_format=array_record`, what federated runs
need: their clients are read by record index), the same records are read
through the random-access data source instead of tf.data
(conformer_fl/data/record_source.py), with the same mapping.

Each becomes the common example dict shared with the synthetic corpus:
  {'audio': int16 [N], 'text': normalized str, 'speaker_id': str, 'domain': str,
   'duration': float seconds, 'id': str}
'domain' is chosen by `LibriSpeechOptions.domain_mode`:
  'long'         every utterance is 'long' (LibriSpeech is read audiobook speech,
                 the long-utterance domain of the paper's setup);
  'by_duration'  'short' if duration <= short_max_seconds, else 'long', so that a
                 short-utterance domain can be carved out of LibriSpeech itself.

Split names: 'train', 'dev' and 'test' map through `LibriSpeechOptions.split_map`
(default train -> train_clean100+train_clean360+train_other500, dev -> dev_clean,
test -> test_clean); any other name (e.g. 'dev_other', 'train_clean100[:1%]') is
passed to TFDS unchanged.
"""

from collections.abc import Iterator, Mapping
import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from conformer_fl import text as text_lib
from conformer_fl import workdir as workdir_lib
from conformer_fl.data import batching
from conformer_fl.data import data_config

SAMPLE_RATE = 16000
FULL_TRAIN_SPLIT = data_config.LIBRISPEECH_FULL_TRAIN_SPLIT
DEFAULT_SPLIT_MAP = {
    "train": FULL_TRAIN_SPLIT,
    "dev": "dev_clean",
    "test": "test_clean",
}
DOMAIN_MODES = ("long", "by_duration")


class LibriSpeechNotPrepared(workdir_lib.RunError, FileNotFoundError):
  """The TFDS 'librispeech' dataset is not prepared in the data directory.

  A `RunError`: the entry point prints its one-line message and exits 1.
  """


def not_prepared_message(data_dir: str | None) -> str:
  """One line: what is missing, where it was looked for, how to prepare it."""
  builder = tfds.builder("librispeech", data_dir=data_dir)
  root = data_dir or "the TFDS default ($TFDS_DATA_DIR, else ~/tensorflow_datasets)"
  return (
      f"LibriSpeech is not prepared in {root}: expected the TFDS dataset"
      f" 'librispeech' {builder.version} in {builder.data_dir}. It is never"
      " downloaded implicitly; prepare it once (its TFDS builder downloads"
      " the archives and needs Apache Beam) with"
      " `tfds build librispeech --data_dir=DIR --file_format=array_record`"
      " (the format federated runs read by record index), then set"
      " $TFDS_DATA_DIR (configs/central.py:corpus=librispeech reads it) or"
      " --config.data.data_dir to DIR.")


@dataclasses.dataclass(frozen=True)
class LibriSpeechOptions:
  """How LibriSpeech is read (see the module docstring)."""

  split_map: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: dict(DEFAULT_SPLIT_MAP))
  domain_mode: str = "long"
  short_max_seconds: float = 4.0

  def __post_init__(self):
    if self.domain_mode not in DOMAIN_MODES:
      raise ValueError(f"domain_mode must be one of {DOMAIN_MODES}, got"
                       f" {self.domain_mode!r}.")


def tfds_split(split: str, options: LibriSpeechOptions) -> str:
  """TFDS split string of a project split name ('train', 'dev', 'test', ...)."""
  return options.split_map.get(split, split)


def domain_of(duration: float, options: LibriSpeechOptions) -> str:
  """'long' or 'short' for an utterance of `duration` seconds."""
  if options.domain_mode == "by_duration" and duration <= options.short_max_seconds:
    return "short"
  return "long"


def to_common_example(raw: Mapping[str, Any],
                      options: LibriSpeechOptions) -> dict[str, Any]:
  """Maps one numpy LibriSpeech example to the common example dict."""
  audio = raw["speech"] if "speech" in raw else raw["audio"]
  audio = np.asarray(audio)
  duration = float(audio.shape[0]) / SAMPLE_RATE if audio.ndim else 0.0
  # A transcript that is not UTF-8 is passed on as bytes: batching skips it.
  text = batching.decode_text(raw["text"])
  return {
      "audio": audio,
      "text": text_lib.normalize_text(text) if isinstance(text, str) else text,
      "speaker_id": str(int(raw["speaker_id"])),
      "domain": domain_of(duration, options),
      "duration": duration,
      "id": _as_str(raw["id"]),
  }


def load_librispeech(
    split: str,
    data_dir: str | None = None,
    options: LibriSpeechOptions | None = None,
    *,
    shuffle_files: bool = False,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
  """Common example dicts of a LibriSpeech split (see the module docstring).

  Args:
    split: 'train', 'dev', 'test' or a TFDS LibriSpeech split string.
    data_dir: TFDS data directory holding the prepared 'librispeech'.
    options: split map and domain rule; defaults to `LibriSpeechOptions()`.
    shuffle_files: read the shards in a seeded random order (training).
    seed: the file-shuffle seed.

  Yields:
    Common example dicts, in the dataset's (or the seeded shuffled) order.

  Raises:
    LibriSpeechNotPrepared: `data_dir` holds no prepared 'librispeech' (raised
      when the first example is asked for; nothing is downloaded).
  """
  options = options or LibriSpeechOptions()
  try:
    ds = tfds.load(
        "librispeech",
        split=tfds_split(split, options),
        data_dir=data_dir,
        download=False,
        shuffle_files=shuffle_files,
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
  except AssertionError as e:  # TFDS: "could not find data in ..."
    if tfds.builder("librispeech", data_dir=data_dir).is_prepared():
      raise
    raise LibriSpeechNotPrepared(not_prepared_message(data_dir)) from None
  ds = ds.prefetch(tf.data.AUTOTUNE)
  for raw in tfds.as_numpy(ds):
    yield to_common_example(raw, options)


def _as_str(value: Any) -> str:
  """An utterance id as str (bytes that are not UTF-8 escaped, for logs)."""
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="backslashreplace")
  return str(value)
