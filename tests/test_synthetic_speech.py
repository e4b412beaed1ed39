"""Tests of the synthesized TFDS corpus 'synthetic_speech' and its text and TTS helpers.

The 'tiny' config is built once per module (a few seconds); a smaller custom config
is built three more times for the determinism check.
"""

import collections
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conformer_fl.data import augment
from conformer_fl.data import commands
from conformer_fl.data import corpus_card
from conformer_fl.data import synthetic_speech
from conformer_fl.data import text_sources
from conformer_fl.data import tts_engines
from conformer_fl.text import ALPHABET, normalize_text

TINY = synthetic_speech.SyntheticSpeech.builder_configs["tiny"]


@pytest.fixture(scope="module")
def tiny_builder(tiny_corpus_dir):
  return synthetic_speech.build("tiny", tiny_corpus_dir)


@pytest.fixture(scope="module")
def tiny_examples(tiny_builder):
  """{split: [example dict of numpy values]} of the tiny corpus."""
  return {split: list(synthetic_speech.split_records(tiny_builder, split))
          for split in synthetic_speech.SPLITS}


def _timbre(speaker_id: str) -> str:
  """'espeak/en-us+m3/s160/p45' -> 'espeak/m3'; 'flite/kal16/d1.00' -> 'flite/kal'."""
  engine, voice = speaker_id.split("/")[:2]
  if engine == "espeak":
    return "espeak/" + voice.split("+")[1]
  return "flite/" + ("kal" if voice.startswith("kal") else voice)


def _record_digests(builder) -> dict[str, str]:
  """sha256 of every record file the builder wrote, by file name."""
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(builder.data_path.iterdir())
          if ".array_record" in p.name}


def test_features_schema(tiny_builder):
  features = tiny_builder.info.features
  assert sorted(features.keys()) == sorted(
      ["audio", "text", "speaker_id", "domain", "duration", "id"])
  assert features["audio"].np_dtype == np.int16
  assert features["audio"].sample_rate == 16000
  assert features["domain"].names == ["long", "short"]
  assert features["duration"].np_dtype == np.float32
  assert tiny_builder.info.name == "synthetic_speech"
  with pytest.raises(ValueError, match="int16 samples"):
    features["audio"].encode_example(np.zeros(10, np.float32))


def test_audio_is_stored_as_two_bytes_a_sample(tiny_builder, tiny_examples):
  samples = sum(ex["audio"].size for examples in tiny_examples.values()
                for ex in examples)
  # The serialized records (ArrayRecord compresses them again in its files).
  record_bytes = sum(
      len(record) for split in synthetic_speech.SPLITS
      for record in tiny_builder.as_data_source(
          split=split,
          deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES))
  assert 2 * samples < record_bytes < 2 * samples + 300 * 60  # 60 examples


def test_split_sizes_follow_the_config(tiny_examples):
  for split, examples in tiny_examples.items():
    per_speaker = collections.Counter(
        (ex["speaker_id"].decode(), int(ex["domain"])) for ex in examples)
    speakers = {s for s, _ in per_speaker}
    assert len(speakers) == TINY.num_speakers(split)
    for speaker in speakers:
      assert per_speaker[(speaker, 0)] == TINY.long_per_speaker
      assert per_speaker[(speaker, 1)] == TINY.short_per_speaker
    ids = [ex["id"].decode() for ex in examples]
    assert len(set(ids)) == len(ids)


def test_audio_is_int16_16khz_and_duration_matches(tiny_examples):
  for examples in tiny_examples.values():
    for ex in examples:
      audio = ex["audio"]
      assert audio.dtype == np.int16 and audio.ndim == 1
      assert ex["duration"] == pytest.approx(audio.size / 16000, abs=1e-6)
      # Peak-normalized to -12..-2 dBFS before noise: never silent, never clipped.
      peak = np.abs(audio.astype(np.int32)).max()
      assert 0.2 * 32768 < peak < 32767


def test_text_is_normalized_and_non_empty(tiny_examples):
  for examples in tiny_examples.values():
    for ex in examples:
      text = ex["text"].decode()
      assert text and normalize_text(text) == text
      assert set(text) <= set(ALPHABET)


def test_held_out_speakers_share_no_timbre_with_train(tiny_examples):
  speakers = {split: {ex["speaker_id"].decode() for ex in examples}
              for split, examples in tiny_examples.items()}
  train_timbres = {_timbre(s) for s in speakers["train"]}
  for held_out in ("dev", "test"):
    assert speakers[held_out].isdisjoint(speakers["train"])
    assert {_timbre(s) for s in speakers[held_out]}.isdisjoint(train_timbres)
  assert speakers["dev"].isdisjoint(speakers["test"])


def test_no_transcript_is_shared_between_splits(tiny_examples):
  texts = {split: {ex["text"].decode() for ex in examples}
           for split, examples in tiny_examples.items()}
  assert len(texts["train"]) >= 30  # 40 utterances, few repeated commands
  assert not texts["test"] & texts["train"]
  assert not texts["dev"] & texts["train"]
  assert not texts["test"] & texts["dev"]


def test_corpus_card_beside_the_corpus(tiny_builder, tiny_examples):
  card = json.loads((tiny_builder.data_path / "corpus_card.json").read_text())
  assert card == json.loads(json.dumps(
      synthetic_speech.corpus_card(tiny_builder)))
  assert card["engines"]["flite"]["speakers"] == {"train": 4, "dev": 1,
                                                  "test": 1}
  assert card["engines"]["espeak"]["speakers"] == {"train": 4, "dev": 1,
                                                   "test": 1}
  for split in ("dev", "test"):
    assert not set(card["engines"]["flite"]["voices"][split]) & set(
        card["engines"]["flite"]["voices"]["train"])
    assert card["transcript_overlap_with_train"][split] == 0
  assert card["sizes"]["train"]["utterances"] == 40
  assert card["sizes"]["test"]["by_engine"]["flite"]["utterances"] == 5
  assert card["augmentation"]["speed_factors"] == [0.9, 1.0, 1.1]
  assert card["text"]["long"]["long_text"] == "prose"
  # The OOV rate of the recorded transcripts, recomputed here.
  words = lambda split: [w for ex in tiny_examples[split]
                         for w in ex["text"].decode().split()]
  train_vocabulary = set(words("train"))
  for split in ("dev", "test"):
    tokens = words(split)
    rate = sum(w not in train_vocabulary for w in tokens) / len(tokens)
    assert card["oov_rate"][split]["all"] == pytest.approx(rate)
    assert 0.05 < rate < 0.9  # open vocabulary: held-out words are new


def test_oov_rate_and_overlap():
  train = ["the cat sat", "a dog ran"]
  assert corpus_card.oov_rate(train, ["the cat ran fast", "a bird"]) == 2 / 6
  assert corpus_card.oov_rate(train, []) == 0.0
  assert corpus_card.transcript_overlap(train, ["a dog ran", "x", "a dog ran"]
                                        ) == 1


def test_domain_durations(tiny_examples):
  durations = collections.defaultdict(list)
  for examples in tiny_examples.values():
    for ex in examples:
      durations[int(ex["domain"])].append(float(ex["duration"]))
      # Not faster than max_chars_per_second.
      assert len(ex["text"]) <= TINY.max_chars_per_second * ex["duration"]
  long, short = np.array(durations[0]), np.array(durations[1])
  assert short.max() <= TINY.short_max_seconds + 1e-6 <= 2.5
  assert long.min() >= TINY.long_seconds[0] - 1e-6
  assert long.max() <= TINY.long_seconds[1] + 1e-6
  assert long.mean() > 2.0 * short.mean()


def test_corpus_statistics_match_the_examples(tiny_builder, tiny_examples):
  stats = synthetic_speech.corpus_statistics(tiny_builder)
  for split, examples in tiny_examples.items():
    assert stats[split]["speakers"] == TINY.num_speakers(split)
    assert stats[split]["utterances"] == len(examples)
    seconds = sum(float(ex["duration"]) for ex in examples)
    assert stats[split]["hours"] == pytest.approx(seconds / 3600, rel=1e-6)
    n_short = sum(int(ex["domain"]) == 1 for ex in examples)
    assert stats[split]["short"]["utterances"] == n_short
  assert stats["total"]["speakers"] == 12
  assert stats["total"]["utterances"] == 12 * (2 + 3)
  assert "train" in synthetic_speech.format_statistics(stats)


def test_build_again_reuses_the_prepared_data(tiny_builder, monkeypatch):
  digests = _record_digests(tiny_builder)

  def fail(*args):
    raise AssertionError("build() synthesized again although the data exists.")

  monkeypatch.setattr(synthetic_speech, "run_task", fail)
  again = synthetic_speech.build("tiny", str(tiny_builder.data_dir_root))
  assert again.data_path == tiny_builder.data_path
  assert _record_digests(again) == digests


def test_same_seed_gives_same_bytes(tmp_path):
  def micro(seed, num_workers=2):
    return synthetic_speech.SyntheticSpeechConfig(
        name="micro", num_train_speakers=2, num_dev_speakers=1, num_test_speakers=1,
        long_per_speaker=1, short_per_speaker=2, flite_fraction=0.5, seed=seed,
        num_workers=num_workers)

  first = synthetic_speech.build(micro(0), str(tmp_path / "a"))
  # Another process (other hash seeds, other protobuf map order) with another
  # thread count must not change a byte.
  script = (
      "from conformer_fl.data import synthetic_speech as s\n"
      "c = s.SyntheticSpeechConfig(name='micro', num_train_speakers=2,"
      " num_dev_speakers=1, num_test_speakers=1, long_per_speaker=1,"
      " short_per_speaker=2, flite_fraction=0.5, seed=0, num_workers=1)\n"
      f"s.build(c, {str(tmp_path / 'b')!r})\n")
  subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                 env={**os.environ, "PYTHONHASHSEED": "123"})
  second = synthetic_speech.SyntheticSpeech(
      config=micro(0), data_dir=str(tmp_path / "b"))
  other = synthetic_speech.build(micro(1), str(tmp_path / "c"))
  digests = _record_digests(first)
  assert len(digests) == 3  # one record file per split
  assert _record_digests(second) == digests
  assert _record_digests(other) != digests
  engines = {ex["speaker_id"].decode().split("/")[0]
             for ex in synthetic_speech.split_records(first, "train")}
  assert engines == {"espeak", "flite"}


def test_missing_packages_are_named_before_any_work(tmp_path, monkeypatch):
  real_which = tts_engines.shutil.which
  monkeypatch.setattr(tts_engines.shutil, "which",
                      lambda cmd: None if cmd == "flite" else real_which(cmd))
  monkeypatch.setattr(synthetic_speech, "synthesis_tasks", lambda config: 1 / 0)
  with pytest.raises(tts_engines.MissingSystemPackagesError) as error:
    synthetic_speech.build("tiny", str(tmp_path))
  message = str(error.value)
  assert "flite" in message and "espeak-ng (" not in message
  assert ("apt-get install espeak-ng flite fortunes-min fortunes bible-kjv"
          in message)
  assert not any(tmp_path.iterdir())

  monkeypatch.setattr(tts_engines.shutil, "which", lambda cmd: None)
  with pytest.raises(tts_engines.MissingSystemPackagesError,
                     match=r"espeak-ng .*flite .*fortunes-min .*fortunes .*bible-kjv"):
    tts_engines.check_system_packages(fortune_dir=str(tmp_path / "none"))


def test_assign_speakers_is_deterministic_and_respects_counts():
  config = synthetic_speech.SyntheticSpeechConfig(
      name="mixed", num_train_speakers=48, num_dev_speakers=6,
      num_test_speakers=6, flite_fraction=0.2)
  first = synthetic_speech.assign_speakers(config)
  assert first == synthetic_speech.assign_speakers(config)
  assert {s: len(v) for s, v in first.items()} == {"train": 48, "dev": 6, "test": 6}
  assert sum(sp.engine == "flite" for sp in first["train"]) == round(0.2 * 48)
  ids = [sp.speaker_id for v in first.values() for sp in v]
  assert len(set(ids)) == len(ids)
  for split in ("dev", "test"):
    assert {sp.timbre for sp in first[split]}.isdisjoint(
        {sp.timbre for sp in first["train"]})


def test_speaker_ids():
  assert tts_engines.Speaker("espeak", "m3", "en-us", 160, 45).speaker_id == (
      "espeak/en-us+m3/s160/p45")
  flite = tts_engines.Speaker("flite", "kal16", duration_stretch=1.05)
  assert flite.speaker_id == "flite/kal16/d1.05"
  assert flite.timbre == "flite/kal"
  pitched = tts_engines.Speaker("flite", "slt", duration_stretch=0.9, f0=155)
  assert pitched.speaker_id == "flite/slt/d0.90/f155"
  assert tts_engines.engine_of(pitched.speaker_id) == "flite"
  assert tts_engines.engine_of("espeak/en-us+m3/s160/p45") == "espeak"
  assert tts_engines.engine_of("1234") == tts_engines.engine_of("") == ""


def test_number_to_words():
  assert text_sources.number_to_words(0) == "zero"
  assert text_sources.number_to_words(17) == "seventeen"
  assert text_sources.number_to_words(40) == "forty"
  assert text_sources.number_to_words(59) == "fifty nine"
  assert text_sources.number_to_words(305) == "three hundred five"
  assert text_sources.number_to_words(999) == "nine hundred ninety nine"
  with pytest.raises(ValueError, match="0..999"):
    text_sources.number_to_words(1000)


def test_fortune_parsing_and_sentence_filter(tmp_path):
  (tmp_path / "f").write_text(
      "The cat sat on the mat all day long.  It was happy there, they say!\n"
      "\t\t-- Some Author, \"A Book\"\n%\n"
      "Mr. Smith bought three apples at the market today.\n%\n"
      "We paid 5 dollars for the big old lamp yesterday.\n%\n"
      "The NASA people like to count backwards all day long.\n%\n"
      "Q:\tWhat do you call a very sleepy old dinosaur today?\n"
      "A:\tA dinosnore, of course, my good friend.\n%\n")
  assert text_sources.split_sentences("Mr. Smith went home.  He slept! J. Doe") == [
      "Mr. Smith went home.", "He slept!", "J. Doe"]
  entries = text_sources.read_fortune_entries(str(tmp_path / "f"))
  assert len(entries) == 5 and "Author" not in entries[0]
  sentences = text_sources.fortune_sentences(str(tmp_path), ["f"], min_words=5)
  assert sentences == [
      "a dinosnore of course my good friend",
      "it was happy there they say",
      "the cat sat on the mat all day long",
      "what do you call a very sleepy old dinosaur today",
  ]


def test_fortune_sentences_of_the_system_files_are_clean():
  sentences = text_sources.fortune_sentences()
  assert len(sentences) > 500
  for s in sentences:
    assert normalize_text(s) == s and 6 <= len(s.split()) <= 22


def test_prose_sentences_mix_fortunes_and_the_bible():
  bible = text_sources.bible_sentences(5, 12)
  assert len(bible) > 10000
  assert "in the beginning god created the heaven and the earth" in bible
  assert "and god said let there be light" in bible  # split at ':'
  prose = text_sources.prose_sentences(0, 3000, 5, 12)
  assert 5990 <= len(prose) <= 6000 and prose == sorted(prose)
  assert 3000 <= len(set(prose) & set(bible)) <= 3010  # fortunes quote it
  assert prose == text_sources.prose_sentences(0, 3000, 5, 12)
  assert prose != text_sources.prose_sentences(1, 3000, 5, 12)
  for s in prose:
    assert normalize_text(s) == s and 5 <= len(s.split()) <= 12
  with pytest.raises(ValueError, match="Unknown prose source"):
    text_sources.prose_sentences(0, 10, sources=("news",))


def test_commands_share_no_transcript_or_dealt_slot_value_across_splits():
  split = commands.split_commands(seed=0)
  assert split == commands.split_commands(seed=0)
  assert split != commands.split_commands(seed=1)
  sizes = {s: len(v) for s, v in split.items()}
  assert sizes["train"] > 500 and sizes["dev"] > 30 and sizes["test"] > 30
  assert not set(split["dev"]) & set(split["train"])
  assert not set(split["test"]) & (set(split["train"]) | set(split["dev"]))
  for texts in split.values():
    assert texts == sorted(set(texts))
    for t in texts:
      assert normalize_text(t) == t and 1 <= len(t.split()) <= 7
  # Every template has a slot whose values are dealt to the splits.
  for template in commands.TEMPLATES:
    assert set(commands.template_slots(template)) - commands.SHARED_SLOTS
  # A contact of test is never a word of a train command.
  train_words = {w for t in split["train"] for w in t.split()}
  test_only = [c for c in commands.SLOTS["contact"]
               if any(t == f"call {c}" for t in split["test"])]
  assert test_only and not any(set(c.split()) <= train_words
                               for c in test_only if " " not in c)


def test_resample_keeps_frequency_and_length():
  rate = 22050
  t = np.arange(rate) / rate
  tone = np.sin(2 * np.pi * 440.0 * t)
  out = tts_engines.resample_to_16k(tone, rate)
  assert out.size == 16000
  spectrum = np.abs(np.fft.rfft(out[2000:14000] * np.hanning(12000)))
  assert np.argmax(spectrum) * 16000 / 12000 == pytest.approx(440.0, abs=2.0)
  assert np.array_equal(tts_engines.resample_to_16k(np.ones(5), 16000), np.ones(5))


def test_trim_silence_keeps_a_margin():
  audio = np.zeros(16000)
  audio[8000:8100] = 0.5
  trimmed = tts_engines.trim_silence(audio, threshold=0.01, margin_seconds=0.1)
  assert trimmed.size == 100 + 2 * 1600
  assert np.array_equal(tts_engines.trim_silence(np.zeros(10)), np.zeros(10))


def test_engines_are_deterministic_and_write_16k_int16(tmp_path):
  speakers = [tts_engines.Speaker("espeak", "f3", "en-gb", 170, 60),
              tts_engines.Speaker("flite", "kal", duration_stretch=0.9)]
  for speaker in speakers:
    a = tts_engines.to_int16(tts_engines.synthesize(speaker, "call mom"), -6.0)
    b = tts_engines.to_int16(tts_engines.synthesize(speaker, "call mom"), -6.0)
    assert a.dtype == np.int16 and a.tobytes() == b.tobytes()
    assert 0.3 < a.size / 16000 < 2.0
    assert np.abs(a.astype(np.int32)).max() == round(32768 * 10 ** (-6 / 20))
  # A Flite pitch setting changes the voice's pitch (kal: about 105 Hz).
  low, high = (tts_engines.synthesize(
      tts_engines.Speaker("flite", "kal", f0=f0), "hello there my friend")
      for f0 in (80, 200))
  def pitch_hz(audio):  # median autocorrelation peak (60-400 Hz) of 5 windows
    estimates = []
    for start in np.linspace(0.2, 0.6, 5) * audio.size:
      seg = audio[int(start):int(start) + 2048]
      ac = np.correlate(seg, seg, "full")[seg.size - 1:]
      estimates.append(16000 / (40 + int(np.argmax(ac[40:267]))))
    return float(np.median(estimates))
  assert pitch_hz(low) < 110 < 180 < pitch_hz(high)
  # The WAV reader rejects what it cannot represent.
  path = tmp_path / "stereo.wav"
  with wave.open(str(path), "wb") as w:
    w.setnchannels(2), w.setsampwidth(2), w.setframerate(16000)
    w.writeframes(np.zeros(20, np.int16).tobytes())
  with pytest.raises(ValueError, match="mono 16-bit"):
    tts_engines._read_wav(path.read_bytes())  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="non-empty"):
    tts_engines.synthesize(speakers[0], "")


@pytest.mark.parametrize("name, num_train, flite_train",
                         [("demo", 64, 16), ("study", 96, 24)])
def test_demo_config_has_both_engines_and_holds_out_timbres(
    name, num_train, flite_train):
  demo = synthetic_speech.SyntheticSpeech.builder_configs[name]
  speakers = synthetic_speech.assign_speakers(demo)
  assert {s: len(v) for s, v in speakers.items()} == {
      "train": num_train, "dev": 8, "test": 8}
  flite = {split: sum(s.engine == "flite" for s in v)
           for split, v in speakers.items()}
  assert flite == {"train": flite_train, "dev": 2, "test": 2}
  timbres = {split: {s.timbre for s in v} for split, v in speakers.items()}
  assert not timbres["dev"] & timbres["train"]
  assert not timbres["test"] & timbres["train"]
  assert not timbres["dev"] & timbres["test"]


def test_story_sentences_cover_held_out_words():
  sentences = text_sources.story_sentences(2000, seed=0, min_words=5,
                                           max_words=14)
  assert len(set(sentences)) == 2000 == len(sentences)
  assert sentences == sorted(sentences)
  assert all(5 <= len(s.split()) <= 14 for s in sentences)
  assert all(normalize_text(s) == s for s in sentences)
  assert sentences == text_sources.story_sentences(2000, 0, 5, 14)
  pools = synthetic_speech.sentence_pools(TINY, sentences)
  train_words = {w for s in pools["train"] for w in s.split()}
  for split in ("dev", "test"):
    assert not set(pools[split]) & set(pools["train"])
    held_out_words = {w for s in pools[split] for w in s.split()}
    assert held_out_words <= train_words


def test_leave_one_engine_out_selects_by_engine(tiny_builder, tiny_examples):
  from conformer_fl.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config = input_pipeline.default_data_config()
  config.data_dir = str(tiny_builder.data_dir_root)
  train, held_out = input_pipeline.leave_one_engine_out(config, "flite")
  assert train.train_engines == ("espeak",) and held_out.eval_split == "test"
  train_ids = {e["speaker_id"] for e in input_pipeline.load_split_from_config(
      train, "train", engines=train.train_engines)}
  test_ids = [e["speaker_id"] for e in input_pipeline.load_split_from_config(
      held_out, held_out.eval_split, engines=held_out.eval_engines)]
  engine = lambda i: i.split("/")[0]
  all_train = {ex["speaker_id"].decode() for ex in tiny_examples["train"]}
  assert train_ids == {i for i in all_train if engine(i) == "espeak"}
  assert len(train_ids) == 4  # tiny: half of the 8 train speakers are Flite
  # The 1 Flite test speaker of tiny, all of its utterances.
  assert {engine(i) for i in test_ids} == {"flite"}
  assert len(test_ids) == sum(engine(ex["speaker_id"].decode()) == "flite"
                              for ex in tiny_examples["test"]) == 5
  with pytest.raises(ValueError, match="Unknown speech engines"):
    input_pipeline.leave_one_engine_out(config, "festival")
  # The federated clients of the training config: the 4 eSpeak NG speakers.
  from conformer_fl.data import federated  # pylint: disable=g-import-not-at-top
  from conformer_fl.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  train.client_domains = ()
  train.bucket_seconds = (16.0,)
  clients = federated.get_client_datasets(train, tokenizer_lib.CharTokenizer())
  assert set(clients.client_ids) == train_ids


def test_babble_is_made_of_other_speakers_of_the_same_split():
  speakers = synthetic_speech.assign_speakers(TINY)
  tasks = synthetic_speech.babble_tasks(TINY)
  # min(babble_clips = 8, speakers) clips per split.
  assert [t.split for t in tasks] == ["train"] * 8 + ["dev"] * 2 + ["test"] * 2
  pools = synthetic_speech.sentence_pools(
      TINY, synthetic_speech.long_sentences(TINY))
  for task in tasks:
    assert set(task.talkers) <= set(speakers[task.split])
    assert len(task.talkers) == min(4, len(speakers[task.split]) - 1)
    assert set(task.texts) <= set(pools[task.split])
  clips = [np.full(3, i, float) for i in range(len(tasks))]
  for split, members in speakers.items():
    for speaker in members:
      mine = synthetic_speech.babble_for(speaker, split, tasks, clips)
      assert mine  # every speaker of a split of 2 or more has babble
      for clip in mine:
        task = tasks[int(clip[0])]
        assert task.split == split and speaker not in task.talkers
  clean = dataclasses.replace(TINY, augmentation=augment.CLEAN)
  assert synthetic_speech.babble_tasks(clean) == []
