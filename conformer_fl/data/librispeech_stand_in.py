"""A stand-in for the TFDS 'librispeech' dataset: its schema, made-up records.

`build` prepares, in a TFDS data_dir, a dataset that `tfds.builder('librispeech',
data_dir=...)` reads as prepared LibriSpeech: the real builder's name, version
(default config, 2.1.1), features ('speech' int16 [N] at 16 kHz, 'text',
'speaker_id' int64, 'chapter_id' int64, 'id' 'SPK-CHAPTER-UTT') and split names
(train_clean100, train_clean360, train_other500, dev_clean, test_clean), with
seeded noise for audio and upper-case made-up words for transcripts. Speakers
read long utterances (LibriSpeech averages about 12 s). It lets every step of
`corpus=librispeech` run on a machine without LibriSpeech (tests, benchmarks):
nothing is downloaded.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.librispeech import librispeech_dataset_builder

from conformer_fl.data import synthetic_speech

SAMPLE_RATE = 16000
TRAIN_SPLITS = ("train_clean100", "train_clean360", "train_other500")
EVAL_SPLITS = ("dev_clean", "test_clean")
_WORDS = ("THE", "AND", "OF", "TO", "A", "IN", "THAT", "HE", "WAS", "IT", "HIS",
          "HER", "YOU", "AS", "HAD", "WITH", "FOR", "SHE", "NOT", "AT", "BUT",
          "BE", "MY", "ON", "HAVE", "HIM", "IS", "SAID", "ME", "WHICH", "BY",
          "SO", "THIS", "ALL", "FROM", "THEY", "NO", "WERE", "IF", "WOULD",
          "OR", "WHEN", "WHAT", "THERE", "BEEN", "ONE", "COULD", "VERY", "AN",
          "WHO", "THEM", "MISTER", "WE", "NOW", "MORE", "OUT", "DO", "ARE",
          "UP", "THEIR", "YOUR", "WILL", "LITTLE", "THAN", "THEN", "SOME",
          "INTO", "ANY", "WELL", "MUCH", "ABOUT", "TIME", "KNOW", "SHOULD",
          "MAN", "DID", "LIKE", "UPON", "SUCH", "NEVER", "ONLY", "GOOD", "HOW",
          "BEFORE", "OTHER", "SEE", "MUST", "AM", "OWN", "COME", "DOWN", "SAY",
          "AFTER", "THINK", "MADE", "MIGHT", "BEING", "MISSUS", "AGAIN")


@dataclasses.dataclass(frozen=True)
class StandInSize:
  """How much the stand-in holds.

  Attributes:
    train_speakers: speakers of the train splits (dealt out over the three).
    utterances_per_speaker: utterances of each train speaker.
    eval_speakers: speakers of each of dev_clean and test_clean.
    eval_utterances_per_speaker: utterances of each of those.
    min_seconds, max_seconds: utterance durations, uniform in between.
    chars_per_second: transcript length per second of audio (read English
      runs at about 14-16 characters per second).
    seed: seeds audio, durations and transcripts.
  """

  train_speakers: int = 16
  utterances_per_speaker: int = 6
  eval_speakers: int = 2
  eval_utterances_per_speaker: int = 3
  min_seconds: float = 4.0
  max_seconds: float = 24.0
  chars_per_second: float = 12.0
  seed: int = 0


class LibriSpeechStandIn(librispeech_dataset_builder.Builder,
                         skip_registration=True):
  """The TFDS LibriSpeech builder with generated records (module docstring)."""

  name = "librispeech"

  def __init__(self, size: StandInSize, **kwargs):
    self._size = size
    super().__init__(config="default", **kwargs)

  @property
  def url_infos(self) -> dict[str, object]:
    return {}  # No download, so no checksums file to look up.

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return {split: self._generate(speakers, utterances)
            for split, (speakers, utterances) in split_speakers(
                self._size).items()}

  def _generate(self, speakers: list[int],
                utterances: int) -> Iterator[tuple[str, dict]]:
    s = self._size
    for speaker in speakers:
      chapter = speaker * 10 + 1
      for utt in range(utterances):
        rng = np.random.default_rng([s.seed, speaker, utt])
        seconds = rng.uniform(s.min_seconds, s.max_seconds)  # First draw.
        num_samples = int(seconds * SAMPLE_RATE)
        audio = rng.normal(0.0, 2000.0, num_samples).clip(-32768, 32767)
        words, length = [], 0
        while length < seconds * s.chars_per_second:
          word = _WORDS[int(rng.integers(len(_WORDS)))]
          words.append(word)
          length += len(word) + 1
        key = f"{speaker}-{chapter}-{utt:04d}"
        yield key, {"speech": audio.astype(np.int16), "text": " ".join(words),
                    "speaker_id": speaker, "chapter_id": chapter, "id": key}


def split_speakers(size: StandInSize) -> dict[str, tuple[list[int], int]]:
  """Split name -> (its speaker ids, utterances per speaker)."""
  splits = {}
  for i, split in enumerate(TRAIN_SPLITS):
    speakers = range(i, size.train_speakers, len(TRAIN_SPLITS))
    splits[split] = ([100 + k for k in speakers], size.utterances_per_speaker)
  for i, split in enumerate(EVAL_SPLITS):
    splits[split] = ([10_000 + 100 * i + k for k in range(size.eval_speakers)],
                     size.eval_utterances_per_speaker)
  return splits


def num_samples_of(size: StandInSize, split: str) -> list[int]:
  """The audio length (samples) of each utterance of a split, in generation
  order, computed without generating the audio."""
  speakers, utterances = split_speakers(size)[split]
  return [int(np.random.default_rng([size.seed, speaker, utt]).uniform(
      size.min_seconds, size.max_seconds) * SAMPLE_RATE)
          for speaker in speakers for utt in range(utterances)]


def build(data_dir: str, size: StandInSize = StandInSize(),
          file_format: str = "array_record") -> tfds.core.DatasetBuilder:
  """Prepares the stand-in in `data_dir` (if not there); returns the builder.

  Args:
    data_dir: a TFDS data directory; afterwards `tfds.builder('librispeech',
      data_dir=data_dir)` is prepared.
    size: what it holds.
    file_format: 'array_record' (random access, as the federated clients
      need) or 'tfrecord'.
  """
  return synthetic_speech.prepare(LibriSpeechStandIn(size, data_dir=data_dir),
                                 file_format)
