"""TFDS builder 'synthetic_speech': English speech synthesized locally.

Many synthetic speakers (each one a federated client) read two domains of text:

* 'long':  sentences of real English prose (`long_text` 'prose', the default:
  the Debian fortunes and the King James Bible, `text_sources.prose_sentences`),
  or of a closed-vocabulary grammar ('story'), kept when 3-10 s long.
* 'short': spoken-assistant commands from templates, kept when <= 2 s long
  ("set a timer for five minutes", "call mom", "turn on the kitchen lights";
  `commands.split_commands`).

Speakers are eSpeak NG voice variants x English accents x rate x pitch, and Flite
voices x duration stretch x pitch (see `tts_engines.Speaker` for the ids; the
engine is the first part of a speaker id). Audio is 16 kHz int16, trimmed of
silence, given per-utterance acoustic effects drawn from the config's ranges
(speed perturbation, synthetic-room reverberation, white / pink / brown noise
or babble of other speakers of the same split, a telephone or low-pass
channel: `augment.py`) and peak-normalized to a per-speaker level.

Splits and the held-out-speaker rule. A speaker's *timbre* is its eSpeak NG
variant (the formant set, whatever the accent, rate or pitch) or its Flite voice
(kal and kal16 count as one). For each engine the timbres are shuffled with the
seed and dealt out: the first ones to 'dev', the next to 'test', the rest to
'train' (each held-out split gets at least one timbre of an engine it uses, and
about its share of the speakers otherwise). So dev and test speakers are not only
unseen (engine, voice, accent, rate, pitch) combinations: no train speaker shares
their timbre. The long-domain sentences are split 80% / 10% / 10% of the
shuffled pool, and the commands' slot values and templates are dealt out to the
splits (`commands`), so no dev or test transcript is ever heard in train.
Leave-one-engine-out: `input_pipeline.leave_one_engine_out` selects the train
speakers of the other engine and the test speakers of the held-out one.

Determinism. Everything is a function of the config (seed included): the
speakers, the texts, the levels, the noise. eSpeak NG and Flite are deterministic
programs, synthesis runs in a pool of threads whose results are consumed in
submission order, and examples are serialized with a fixed feature order (see
`SyntheticSpeech._download_and_prepare`), so the same config writes the same
record files, byte for byte, in any process and with any number of threads.

Usage:
  python -m conformer_fl.data.synthetic_speech --config=demo --data_dir=/tmp/tfds
  builder = synthetic_speech.build('tiny', data_dir)   # prepared, idempotent
  train = builder.as_data_source(split='train')       # ArrayRecord: train[i]
(`build(..., file_format='tfrecord')` writes tfrecord files instead, read with
`builder.as_dataset`; the federated clients need ArrayRecord.)
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import time
from typing import Any, TypeVar
from unittest import mock

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

from conformer_fl.data import augment
from conformer_fl.data import commands
from conformer_fl.data import corpus_card as corpus_card_lib
from conformer_fl.data import text_sources
from conformer_fl.data import tts_engines
from conformer_fl.data.tts_engines import Speaker

SPLITS = ("train", "dev", "test")
# ArrayRecord: random access by record index (`tfds.data_source`), which the
# federated clients read per round (conformer_fl/data/record_source.py).
DEFAULT_FILE_FORMAT = "array_record"
DOMAINS = ("long", "short")

# eSpeak NG material (`espeak-ng --voices=en`, `espeak-ng --voices=variant`): the
# plain-sounding variants only (no whisper, croak or robot voices).
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                  "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3",
                   "f4", "f5", "klatt", "klatt2", "klatt3")
ESPEAK_RATES = (140, 155, 170, 185)  # words per minute
ESPEAK_PITCHES = (30, 40, 50, 60, 70)
# Flite (`flite -lv`); awb_time is a limited-domain (clock) voice and is left out.
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
FLITE_STRETCHES = (0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15)
# Mean pitch (Hz) of each Flite voice's speakers: 0 is the voice's own (kal
# about 105 Hz, awb 130, slt 180); rms ignores the setting.
FLITE_F0 = {"kal": (0, 90, 120), "kal16": (0, 90, 120), "awb": (0, 110, 150),
            "slt": (0, 155, 205), "rms": (0,)}


@dataclasses.dataclass(eq=False)
class SyntheticSpeechConfig(tfds.core.BuilderConfig):
  """Size and randomness of one synthetic corpus.

  Attributes:
    num_train_speakers: speakers (clients) in 'train'.
    num_dev_speakers: held-out speakers in 'dev'.
    num_test_speakers: held-out speakers in 'test'.
    long_per_speaker: 'long' utterances each speaker reads.
    short_per_speaker: 'short' utterances each speaker reads.
    seed: seeds speakers, texts, levels and noise.
    flite_fraction: share of each split's speakers voiced by Flite (the rest
      by eSpeak NG; Flite fills at most its timbres' combinations).
    long_seconds: (min, max) duration of a 'long' utterance.
    short_max_seconds: longest 'short' utterance.
    max_chars_per_second: fastest speech kept, in transcript characters
      (spaces included) per second of audio; faster utterances (a fast voice
      sped up by 1.1) are not kept, as if too short. 21 keeps every utterance
      within what a CTC model with 25 output frames per second can align.
    peak_dbfs_range: per-speaker peak level, uniform in this range (dB full scale).
    augmentation: the acoustic effects drawn per utterance (speed, reverb,
      noise, channel) and their ranges: `augment.Augmentation`;
      `augment.CLEAN` for none.
    babble_clips: babble clips per split, each a mixture of
      `augmentation.babble_talkers` speakers of the split reading its text.
    num_workers: synthesis threads (each runs one engine process at a time).
    long_text: text of the 'long' domain: 'prose' (open-vocabulary English
      of the fortunes and the King James Bible; held-out sentences bring
      words never heard in train), 'story' (a closed-vocabulary grammar:
      every word of a held-out sentence is heard in train) or 'fortunes'
      (fortunes-min only).
    prose_words: (min, max) words of a 'prose' or 'fortunes' sentence.
    prose_per_source: 'prose' sentences drawn from each source.
    story_pool_size: distinct 'story' sentences drawn before the 80/10/10
      split into train/dev/test pools.
    story_words: (min, max) words of a 'story' sentence.
  """

  num_train_speakers: int = 8
  num_dev_speakers: int = 2
  num_test_speakers: int = 2
  long_per_speaker: int = 2
  short_per_speaker: int = 3
  seed: int = 0
  flite_fraction: float = 0.2
  long_seconds: tuple[float, float] = (3.0, 10.0)
  short_max_seconds: float = 2.0
  max_chars_per_second: float = 21.0
  peak_dbfs_range: tuple[float, float] = (-12.0, -2.0)
  augmentation: augment.Augmentation = augment.Augmentation()
  babble_clips: int = 8
  num_workers: int = 2
  long_text: str = "prose"
  prose_words: tuple[int, int] = (6, 20)
  prose_per_source: int = 8000
  story_pool_size: int = 20000
  story_words: tuple[int, int] = (8, 24)

  def num_speakers(self, split: str) -> int:
    return {"train": self.num_train_speakers, "dev": self.num_dev_speakers,
            "test": self.num_test_speakers}[split]


def _config(name: str, description: str, **sizes) -> SyntheticSpeechConfig:
  return SyntheticSpeechConfig(name=name, description=description, **sizes)


CONFIGS = (
    # Half Flite: a Flite speaker in each of dev and test.
    _config("tiny", "For tests: 8+2+2 speakers (half Flite), 2 long + 3 short"
            " each; < 1 min.",
            num_train_speakers=8, num_dev_speakers=2, num_test_speakers=2,
            long_per_speaker=2, short_per_speaker=3, flite_fraction=0.5),
    # A quarter Flite: 2 Flite speakers in dev and in test, one Flite voice
    # each (leave_one_engine_out reads the test ones).
    # Long form from the closed-vocabulary 'story' grammar: on 'prose' the
    # demo's model (1600 steps) reaches dev WER 0.97, CER 0.44, and its WER
    # no longer moves when a module is reset. Its commands (the federated
    # domain) keep held-out templates and slot values.
    _config("demo", "The demo default: 64+8+8 eSpeak NG and Flite speakers,"
            " 24 long (2-6 s, 'story' grammar) + 24 short each.",
            num_train_speakers=64, num_dev_speakers=8, num_test_speakers=8,
            long_per_speaker=24, short_per_speaker=24, long_seconds=(2.0, 6.0),
            prose_words=(5, 12), flite_fraction=0.25, long_text="story"),
    # The claim-5 study's corpus: the demo's recipe with more speakers and
    # utterances.
    _config("study", "The study's: 96+8+8 eSpeak NG and Flite speakers,"
            " 25 long (2-6 s, 'story' grammar) + 30 short each.",
            num_train_speakers=96, num_dev_speakers=8, num_test_speakers=8,
            long_per_speaker=25, short_per_speaker=30, long_seconds=(2.0, 6.0),
            prose_words=(5, 12), flite_fraction=0.25, long_text="story"),
    _config("small", "200+20+20 speakers, 20 long + 30 short each.",
            num_train_speakers=200, num_dev_speakers=20, num_test_speakers=20,
            long_per_speaker=20, short_per_speaker=30),
    _config("medium", "800+50+50 speakers, 25 long + 40 short each.",
            num_train_speakers=800, num_dev_speakers=50, num_test_speakers=50,
            long_per_speaker=25, short_per_speaker=40),
)


# ---------------------------------------------------------------------------
# Speakers and texts (pure functions of the config).
# ---------------------------------------------------------------------------


def _engine_combos(engine: str) -> dict[str, list[Speaker]]:
  """All speakers of an engine, grouped by timbre (level not yet set)."""
  groups = collections.defaultdict(list)
  if engine == "espeak":
    for variant in ESPEAK_VARIANTS:
      for accent in ESPEAK_ACCENTS:
        for rate in ESPEAK_RATES:
          for pitch in ESPEAK_PITCHES:
            s = Speaker("espeak", variant, accent=accent, rate=rate, pitch=pitch)
            groups[s.timbre].append(s)
  else:
    for voice in FLITE_VOICES:
      for stretch in FLITE_STRETCHES:
        for f0 in FLITE_F0[voice]:
          s = Speaker("flite", voice, duration_stretch=stretch, f0=f0)
          groups[s.timbre].append(s)
  return dict(groups)


def _deal_timbres(timbres: Sequence[str], counts: dict[str, int],
                  rng: np.random.Generator) -> dict[str, list[str]]:
  """Shuffles timbres and gives dev, then test, then train their share."""
  order = [timbres[i] for i in rng.permutation(len(timbres))]
  total = sum(counts.values())
  dealt, start = {}, 0
  for split in ("dev", "test"):
    share = math.ceil(len(order) * counts[split] / total)
    take = 0 if counts[split] == 0 else max(1, share)
    dealt[split], start = order[start:start + take], start + take
  dealt["train"] = order[start:]
  for split, n in counts.items():
    if n and not dealt[split]:
      raise ValueError(f"Too few timbres to hold out speakers for split {split!r}.")
  return dealt


def assign_speakers(config: SyntheticSpeechConfig) -> dict[str, list[Speaker]]:
  """Returns the speakers of each split (see the module docstring for the rule)."""
  rng = np.random.default_rng([config.seed, 1])
  by_split = {split: [] for split in SPLITS}
  requested_flite = {split: round(config.flite_fraction * config.num_speakers(split))
                     for split in SPLITS}
  for engine in ("flite", "espeak"):
    groups = _engine_combos(engine)
    if engine == "flite":
      counts = requested_flite
    else:  # eSpeak NG voices every speaker that Flite could not.
      counts = {split: config.num_speakers(split) - len(by_split[split])
                for split in SPLITS}
    if not any(counts.values()):
      continue  # No speaker of this engine (e.g. flite_fraction=0).
    dealt = _deal_timbres(sorted(groups), counts, rng)
    for split in SPLITS:
      timbres = dealt[split]
      combos = [[groups[t][i] for i in rng.permutation(len(groups[t]))]
                for t in timbres]
      capacity = sum(len(c) for c in combos)
      count = counts[split]
      if engine == "flite":
        count = min(count, capacity)  # Flite has few voices; eSpeak NG fills in.
      elif count > capacity:
        raise ValueError(
            f"Split {split!r} asks for {count} eSpeak NG speakers but its"
            f" timbres {timbres} only give {capacity} combinations.")
      # Round-robin over the split's timbres, a new combination on each pass.
      chosen, k = [], 0
      while len(chosen) < count:
        pass_index, t = divmod(k, len(timbres))
        if pass_index < len(combos[t]):
          chosen.append(combos[t][pass_index])
        k += 1
      by_split[split].extend(chosen)
  assigned = {}
  lo, hi = config.peak_dbfs_range
  for split in SPLITS:
    order = rng.permutation(len(by_split[split]))
    speakers = [by_split[split][i] for i in order]
    assigned[split] = [
        dataclasses.replace(s, peak_dbfs=round(float(rng.uniform(lo, hi)), 2))
        for s in speakers]
  return assigned


def sentence_pools(config: SyntheticSpeechConfig,
                   sentences: Sequence[str]) -> dict[str, list[str]]:
  """Splits the shuffled long-domain sentences 80/10/10 into train/dev/test pools."""
  rng = np.random.default_rng([config.seed, 2])
  order = [sentences[i] for i in rng.permutation(len(sentences))]
  n_dev = n_test = max(1, len(order) // 10)
  return {"dev": order[:n_dev], "test": order[n_dev:n_dev + n_test],
          "train": order[n_dev + n_test:]}


LONG_TEXTS = ("prose", "story", "fortunes")


def long_sentences(config: SyntheticSpeechConfig) -> list[str]:
  """The sorted pool of 'long' domain sentences of `config.long_text`.

  Raises:
    ValueError: an unknown `long_text`.
  """
  return list(_long_sentences(config.long_text, config.seed,
                              config.story_pool_size, config.story_words,
                              config.prose_words, config.prose_per_source))


@functools.lru_cache(maxsize=4)
def _long_sentences(long_text: str, seed: int, story_pool_size: int,
                    story_words: tuple[int, int], prose_words: tuple[int, int],
                    prose_per_source: int) -> tuple[str, ...]:
  if long_text == "prose":
    return tuple(text_sources.prose_sentences(seed, prose_per_source,
                                              *prose_words))
  if long_text == "story":
    return tuple(text_sources.story_sentences(story_pool_size, seed,
                                              *story_words))
  if long_text == "fortunes":
    return tuple(text_sources.fortune_sentences(min_words=prose_words[0],
                                                max_words=prose_words[1]))
  raise ValueError(f"SyntheticSpeechConfig.long_text={long_text!r};"
                   f" expected one of {LONG_TEXTS}.")


@dataclasses.dataclass(frozen=True)
class SynthesisTask:
  """The utterances of one speaker in one domain: read candidates until enough fit."""

  split: str
  speaker_index: int
  speaker: Speaker
  domain: str
  candidates: tuple[str, ...]
  count: int
  min_seconds: float
  max_seconds: float
  max_chars_per_second: float
  augmentation: augment.Augmentation
  seed: int


def _derived_seed(*keys: int) -> int:
  """A 32-bit seed that depends on `keys` only (numpy SeedSequence hashing)."""
  return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def synthesis_tasks(config: SyntheticSpeechConfig) -> list[SynthesisTask]:
  """Every (speaker, domain) task of the corpus, in the order examples are written."""
  speakers = assign_speakers(config)
  pools = sentence_pools(config, long_sentences(config))
  command_pools = commands.split_commands(config.seed)
  tasks = []
  for split_index, split in enumerate(SPLITS):
    for i, speaker in enumerate(speakers[split]):
      rng = np.random.default_rng([config.seed, 3, split_index, i])
      pool = pools[split]
      long_texts = tuple(pool[j] for j in rng.permutation(len(pool)))
      pool = command_pools[split]
      size = min(len(pool), 4 * config.short_per_speaker + 10)
      short_texts = tuple(pool[j] for j in rng.choice(len(pool), size,
                                                      replace=False))
      common = dict(split=split, speaker_index=i, speaker=speaker,
                    augmentation=config.augmentation,
                    max_chars_per_second=config.max_chars_per_second)
      tasks.append(SynthesisTask(
          domain="long", candidates=long_texts, count=config.long_per_speaker,
          min_seconds=config.long_seconds[0], max_seconds=config.long_seconds[1],
          seed=_derived_seed(config.seed, 4, split_index, i, 0),
          **common))
      tasks.append(SynthesisTask(
          domain="short", candidates=short_texts, count=config.short_per_speaker,
          min_seconds=0.0, max_seconds=config.short_max_seconds,
          seed=_derived_seed(config.seed, 4, split_index, i, 1),
          **common))
  return tasks


def run_task(task: SynthesisTask, babble: Sequence[np.ndarray] = ()
             ) -> list[tuple[str, np.ndarray]]:
  """Synthesizes candidates in order until `task.count` fit the duration window.

  An utterance fits when its duration is in [min_seconds, max_seconds] and
  at least len(text) / max_chars_per_second (not too fast). Each candidate is synthesized clean, given its drawn effects
  (`augment.draw`, `augment.apply`; babble noise from one of `babble`, clips
  of other speakers of the split) and scaled to the speaker's level; the
  window applies to the result. If the candidates run out, the closest
  misfits fill the rest (in candidate order), so a task always returns
  `task.count` utterances.

  Returns:
    [(normalized text, int16 audio [N])] of length task.count.
  """
  rng = np.random.default_rng(task.seed)
  fitting, misfits = [], []
  for text in task.candidates:
    effects = augment.draw(rng, task.augmentation, bool(babble))
    clip = babble[int(rng.integers(len(babble)))] if babble else None
    audio = augment.apply(tts_engines.synthesize(task.speaker, text), effects,
                          task.augmentation, clip)
    audio = tts_engines.to_int16(audio, task.speaker.peak_dbfs)
    seconds = audio.size / tts_engines.SAMPLE_RATE
    shortest = max(task.min_seconds, len(text) / task.max_chars_per_second)
    if shortest <= seconds <= task.max_seconds:
      fitting.append((text, audio))
      if len(fitting) == task.count:
        return fitting
    else:
      miss = max(shortest - seconds, seconds - task.max_seconds)
      misfits.append((miss, len(misfits), text, audio))
  misfits.sort(key=lambda m: m[:2])
  fillers = [(text, audio) for _, _, text, audio in misfits]
  return fitting + fillers[:task.count - len(fitting)]


@dataclasses.dataclass(frozen=True)
class BabbleTask:
  """One babble clip: `talkers` of a split each read one of `texts`, mixed."""

  split: str
  talkers: tuple[Speaker, ...]
  texts: tuple[str, ...]
  seed: int


def babble_tasks(config: SyntheticSpeechConfig) -> list[BabbleTask]:
  """The babble clips of every split (none if the config draws no babble).

  Clip k of a split leaves out speaker k (in a seeded order) and mixes
  `babble_talkers` of the others reading sentences of the split's long-domain
  pool, so every speaker of a split with two or more speakers has a clip of
  other speakers; a split of one speaker has none.
  """
  if not config.augmentation.uses_babble or config.babble_clips <= 0:
    return []
  speakers = assign_speakers(config)
  pools = sentence_pools(config, long_sentences(config))
  tasks = []
  for split_index, split in enumerate(SPLITS):
    members = speakers[split]
    rng = np.random.default_rng([config.seed, 6, split_index])
    order = rng.permutation(len(members))
    if len(members) < 2:
      continue
    for k in range(min(config.babble_clips, len(members))):
      left_out = int(order[k])
      others = [m for m in range(len(members)) if m != left_out]
      count = min(config.augmentation.babble_talkers, len(others))
      chosen = sorted(rng.choice(others, size=count, replace=False).tolist())
      pool = pools[split]
      texts = tuple(pool[int(j)] for j in rng.integers(len(pool), size=count))
      tasks.append(BabbleTask(split, tuple(members[m] for m in chosen), texts,
                              _derived_seed(config.seed, 7, split_index, k)))
  return tasks


def run_babble_task(task: BabbleTask) -> np.ndarray:
  """The babble clip of `task`: float [N] of unit power (`augment.babble_clip`)."""
  clean = [tts_engines.synthesize(s, t) for s, t in zip(task.talkers, task.texts)]
  return augment.babble_clip(clean, np.random.default_rng(task.seed))


def babble_for(speaker: Speaker, split: str, tasks: Sequence[BabbleTask],
               clips: Sequence[np.ndarray]) -> list[np.ndarray]:
  """The clips of `split` in which `speaker` does not talk."""
  return [clip for task, clip in zip(tasks, clips)
          if task.split == split and speaker not in task.talkers]


_In = TypeVar("_In")
_Out = TypeVar("_Out")


def ordered_parallel_map(fn: Callable[[_In], _Out], items: Iterable[_In],
                         num_workers: int) -> Iterator[_Out]:
  """Like map(fn, items) on `num_workers` threads, results in input order.

  At most 2 * num_workers items are in flight, so memory stays bounded.
  """
  window = 2 * max(1, num_workers)
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= window:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


# ---------------------------------------------------------------------------
# The TFDS builder.
# ---------------------------------------------------------------------------


def _serialize_deterministically(serializer, example) -> bytes:
  """ExampleSerializer.serialize_example with the map keys in a fixed order."""
  return serializer.get_tf_example(example).SerializeToString(deterministic=True)


class Int16Audio(tfds.features.Audio):
  """tfds.features.Audio of int16 samples [N], stored as raw bytes.

  TFDS's default stores samples in an int64 list (about 2.5x the bytes of int16
  PCM here, and slow to parse). `Audio(encoding='bytes')` would store raw bytes,
  but TFDS 4.9.10's `Audio.encode_example` returns numpy input unencoded, which
  then fails to serialize; this class applies the Tensor encoding that Audio
  skips. Decoding is the inherited one: int16 [N].
  """

  def __init__(self, *, sample_rate: int, **kwargs):
    kwargs = {"shape": (None,), "dtype": np.int16,
              "encoding": tfds.features.Encoding.BYTES, **kwargs}
    super().__init__(sample_rate=sample_rate, **kwargs)

  def encode_example(self, audio: np.ndarray):
    """Encodes int16 samples [N] (a numpy array) as raw bytes."""
    audio = np.asarray(audio)
    if audio.dtype != np.int16 or audio.ndim != 1:
      raise ValueError(
          f"Int16Audio takes int16 samples of shape [N], got {audio.dtype}"
          f" {audio.shape}.")
    return tfds.features.Tensor.encode_example(self, audio)


def features() -> tfds.features.FeaturesDict:
  """The corpus's example schema (also LibriSpeech's fields that the pipeline reads).

  audio int16 [N] at 16 kHz, text, speaker_id, domain ('long' | 'short'),
  duration in seconds, id. Test stand-in datasets use it too.
  """
  return tfds.features.FeaturesDict({
      "audio": Int16Audio(sample_rate=tts_engines.SAMPLE_RATE),
      "text": tfds.features.Text(),
      "speaker_id": tfds.features.Text(),
      "domain": tfds.features.ClassLabel(names=list(DOMAINS)),
      "duration": tfds.features.Scalar(dtype=np.float32),
      "id": tfds.features.Text(),
  })


class SyntheticSpeech(tfds.core.GeneratorBasedBuilder,
                      # Under `python -m`, this file is also importable as
                      # conformer_fl.data.synthetic_speech: register only that copy.
                      skip_registration=__name__ == "__main__"):
  """English speech by eSpeak NG and Flite speakers; one speaker = one client."""

  VERSION = tfds.core.Version("2.2.0")
  # TFDS 4.9.10 locates the builder file through the `importlib_resources`
  # backport, which it does not install on Python >= 3.9; this file is the answer.
  code_path = epath.Path(__file__)
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "1.1.0": "Long-form text from the closed-vocabulary 'story' grammar;"
               " demo: 48+8+8 speakers, 50 long + 30 short each.",
      "2.0.0": "Long-form text from real prose (fortunes, King James Bible);"
               " commands with split templates and slot values; acoustic"
               " augmentation; Flite pitch; demo: a quarter Flite speakers.",
      "2.1.0": "demo: long-form text from the 'story' grammar (small and"
               " medium keep 'prose').",
      "2.2.0": "demo: 64+8+8 speakers, 24 long + 24 short each; 'study':"
               " the former demo (96+8+8, 25 long + 30 short).",
  }
  BUILDER_CONFIGS = list(CONFIGS)
  DEFAULT_CONFIG_NAME = "demo"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[1],
        features=features(),
        supervised_keys=("audio", "text"),
        homepage="https://github.com/espeak-ng/espeak-ng",
    )

  def _download_and_prepare(self, *args, **kwargs):
    # tf.train.Example holds its features in a protobuf map, whose serialization
    # order changes from process to process unless asked to be deterministic;
    # that would make the same corpus differ in bytes between two builds.
    with mock.patch.object(example_serializer.ExampleSerializer,
                           "serialize_example", _serialize_deterministically):
      return super()._download_and_prepare(*args, **kwargs)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing is downloaded.
    tts_engines.check_system_packages()
    config = self.builder_config
    tasks = synthesis_tasks(config)
    bab_tasks = babble_tasks(config)
    clips = list(ordered_parallel_map(run_babble_task, bab_tasks,
                                      config.num_workers))
    return {split: self._generate_examples(
        [(t, babble_for(t.speaker, split, bab_tasks, clips))
         for t in tasks if t.split == split]) for split in SPLITS}

  def _generate_examples(
      self, tasks: Sequence[tuple[SynthesisTask, list[np.ndarray]]]):
    results = ordered_parallel_map(lambda tb: run_task(*tb), tasks,
                                   self.builder_config.num_workers)
    tasks = [t for t, _ in tasks]
    for task, utterances in zip(tasks, results):
      for j, (text, audio) in enumerate(utterances):
        if not text:
          raise ValueError(f"Empty transcript for {task.speaker.speaker_id}.")
        example_id = f"{task.speaker.speaker_id}/{task.domain}/{j:03d}"
        yield example_id, {
            "audio": audio,
            "text": text,
            "speaker_id": task.speaker.speaker_id,
            "domain": task.domain,
            "duration": np.float32(audio.size / tts_engines.SAMPLE_RATE),
            "id": example_id,
        }


def build(config: str | SyntheticSpeechConfig = "demo",
          data_dir: str | None = None,
          file_format: str = DEFAULT_FILE_FORMAT) -> SyntheticSpeech:
  """Returns the prepared builder, synthesizing the corpus only if not yet there.

  Args:
    config: a config name ('tiny', 'demo', 'study', 'small', 'medium') or a
      SyntheticSpeechConfig.
    data_dir: TFDS data directory (default: TFDS's, ~/tensorflow_datasets).
    file_format: TFDS record format: 'array_record' (random access, which the
      federated clients need: `conformer_fl.data.record_source`) or 'tfrecord'
      (read only sequentially, through tf.data). A corpus already prepared in
      `data_dir` is reused whatever its format.

  Raises:
    tts_engines.MissingSystemPackagesError: a Debian package the corpus needs
      (espeak-ng, flite, fortunes-min, fortunes, bible-kjv) is missing
      (checked before any work).
  """
  tts_engines.check_system_packages()
  builder = prepare(SyntheticSpeech(config=config, data_dir=data_dir),
                    file_format)
  if not (builder.data_path / corpus_card_lib.CARD_FILE).exists():
    write_corpus_card(builder)
  return builder


def corpus_card(builder: SyntheticSpeech) -> dict[str, Any]:
  """The card of a prepared corpus (`corpus_card.make_card`): engines,
  voices, augmentation, text sources, sizes per split, OOV rates."""
  domain_names = builder.info.features["domain"].names
  records = {
      split: [{"text": ex["text"].decode(),
               "speaker_id": ex["speaker_id"].decode(),
               "domain": domain_names[ex["domain"]],
               "duration": float(ex["duration"])}
              for ex in split_records(builder, split, decode_audio=False)]
      for split in SPLITS if split in builder.info.splits}
  return corpus_card_lib.make_card(builder.builder_config,
                                   str(builder.info.version), records)


def write_corpus_card(builder: SyntheticSpeech) -> epath.Path:
  """Writes `corpus_card(builder)` as corpus_card.json beside the records."""
  path = builder.data_path / corpus_card_lib.CARD_FILE
  path.write_text(json.dumps(corpus_card(builder), indent=1, sort_keys=True))
  return path


def prepare(builder: tfds.core.DatasetBuilder,
            file_format: str = DEFAULT_FILE_FORMAT) -> tfds.core.DatasetBuilder:
  """Prepares a locally generated corpus unless prepared; returns the builder.

  Nothing is downloaded (the builder generates its examples); a prepared
  dataset is reused whatever its file format.
  """
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
          try_download_gcs=False),
      file_format=file_format)
  return builder


def split_records(builder: tfds.core.DatasetBuilder, split: str,
                  decode_audio: bool = True) -> Iterator[dict[str, Any]]:
  """The records of a prepared split as numpy dicts, in order, in either format.

  ArrayRecord files are read through the random-access data source, tfrecord
  files through tf.data. With decode_audio False, 'audio' is left encoded.
  """
  decoders = None if decode_audio else {"audio": tfds.decode.SkipDecoding()}
  if builder.info.file_format in tfds.core.FileFormat.with_tf_data():
    yield from tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders))
    return
  source = builder.as_data_source(split=split, decoders=decoders)
  for i in range(len(source)):
    yield source[i]


def corpus_statistics(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """Speakers, utterances and hours per split and domain of a prepared builder.

  Returns:
    {split: {'speakers': int, 'utterances': int, 'hours': float,
             domain: {'utterances', 'hours', 'mean_seconds', 'min_seconds',
                      'max_seconds'}}} plus 'total': {'speakers', 'utterances',
    'hours'}.
  """
  domain_names = builder.info.features["domain"].names
  stats = {}
  for split in builder.info.splits:
    durations = collections.defaultdict(list)
    speakers = set()
    for ex in split_records(builder, split, decode_audio=False):
      durations[domain_names[ex["domain"]]].append(float(ex["duration"]))
      speakers.add(ex["speaker_id"].decode())
    split_stats = {"speakers": len(speakers),
                   "utterances": sum(len(d) for d in durations.values()),
                   "hours": sum(sum(d) for d in durations.values()) / 3600.0}
    for domain in domain_names:
      d = np.asarray(durations.get(domain, []), dtype=np.float64)
      split_stats[domain] = {
          "utterances": int(d.size), "hours": float(d.sum() / 3600.0),
          "mean_seconds": float(d.mean()) if d.size else 0.0,
          "min_seconds": float(d.min()) if d.size else 0.0,
          "max_seconds": float(d.max()) if d.size else 0.0}
    stats[split] = split_stats
  splits = [s for s in SPLITS if s in stats]
  stats["total"] = {key: sum(stats[s][key] for s in splits)
                    for key in ("speakers", "utterances", "hours")}
  return stats


def format_statistics(stats: dict[str, Any]) -> str:
  """A plain-text table of `corpus_statistics` output."""
  header = (f"{'split':<6} {'domain':<6} {'speakers':>8} {'utts':>6} {'hours':>7}"
            f" {'mean s':>7} {'min s':>6} {'max s':>6}")
  lines = [header, "-" * len(header)]
  for split in (s for s in SPLITS if s in stats):
    st = stats[split]
    for domain in DOMAINS:
      d = st[domain]
      lines.append(f"{split:<6} {domain:<6} {st['speakers']:>8} {d['utterances']:>6}"
                   f" {d['hours']:>7.3f} {d['mean_seconds']:>7.2f}"
                   f" {d['min_seconds']:>6.2f} {d['max_seconds']:>6.2f}")
  t = stats["total"]
  lines.append(f"{'total':<6} {'all':<6} {t['speakers']:>8} {t['utterances']:>6}"
               f" {t['hours']:>7.3f}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  """CLI: build a config (if needed) and print its statistics and build time."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  config_name, data_dir = flags.FLAGS.config, flags.FLAGS.data_dir
  probe = SyntheticSpeech(config=config_name, data_dir=data_dir)
  already = probe.is_prepared()
  start = time.perf_counter()
  builder = build(config_name, data_dir, flags.FLAGS.file_format)
  seconds = time.perf_counter() - start
  print(f"synthetic_speech/{config_name} at {builder.data_dir}")
  if already:
    print(f"already prepared: reused in {seconds:.1f} s (no synthesis)")
  else:
    print(f"build wall time: {seconds:.1f} s"
          f" ({builder.builder_config.num_workers} synthesis threads)")
  print(format_statistics(corpus_statistics(builder)))
  card_path = builder.data_path / corpus_card_lib.CARD_FILE
  card = json.loads(card_path.read_text())
  for split, rates in card["oov_rate"].items():
    print(f"{split} OOV rate (word tokens not in train): {rates['all']:.3f}"
          f" (long {rates['long']:.3f}, short {rates['short']:.3f});"
          f" transcripts shared with train:"
          f" {card['transcript_overlap_with_train'][split]}")
  print(f"corpus card: {card_path}")


if __name__ == "__main__":
  # Run the importable copy of this module (whose builder is the registered one).
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top,import-self
  from conformer_fl.data import synthetic_speech
  flags.DEFINE_string("config", "demo",
                      "Config name: tiny, demo, study, small or medium.")
  from conformer_fl.data import paths  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("data_dir", paths.DEFAULT_DATA_DIR,
                      "TFDS data directory (the configs' default).")
  flags.DEFINE_enum("file_format", DEFAULT_FILE_FORMAT,
                    ["array_record", "tfrecord"], "TFDS record format.")
  app.run(synthetic_speech.main)
