"""What a built synthetic corpus is: engines, voices, effects, texts, sizes, OOV.

`make_card` assembles the card from the examples' metadata (no audio) and the
builder config; `synthetic_speech.write_corpus_card` writes it as
corpus_card.json beside the corpus's record files. Word statistics:

* `oov_rate`: the share of a split's word tokens (running words) whose word
  never occurs in the train split's transcripts (all domains): the words a
  model trained on train has never heard.
* `transcript_overlap`: how many distinct transcripts two splits share.
"""

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from conformer_fl.data import commands
from conformer_fl.data import text_sources
from conformer_fl.data import tts_engines

CARD_FILE = "corpus_card.json"

# What each long-domain `long_text` reads.
LONG_TEXT_SOURCES = {
    "prose": "real English prose: the Debian fortunes-min and fortunes files "
             f"{', '.join(text_sources.PROSE_FORTUNE_FILES)} (in "
             f"{text_sources.FORTUNE_DIR}) and the King James Bible (Debian "
             "bible-kjv), split into sentences, normalized",
    "story": "a seeded grammar of narrative sentences over a closed vocabulary"
             " of about 250 words (text_sources.story_sentences)",
    "fortunes": "the Debian fortunes-min files"
                f" {', '.join(text_sources.FORTUNE_FILES)}, split into"
                " sentences, normalized",
}


def oov_rate(train_texts: Iterable[str], texts: Iterable[str]) -> float:
  """Share of the word tokens of `texts` not in the vocabulary of `train_texts`.

  Returns:
    A rate in [0, 1]; 0.0 when `texts` has no word.
  """
  vocabulary = {w for t in train_texts for w in t.split()}
  tokens = [w for t in texts for w in t.split()]
  if not tokens:
    return 0.0
  return sum(w not in vocabulary for w in tokens) / len(tokens)


def transcript_overlap(texts_a: Iterable[str], texts_b: Iterable[str]) -> int:
  """Number of distinct transcripts found in both `texts_a` and `texts_b`."""
  return len(set(texts_a) & set(texts_b))


def make_card(config: Any, version: str,
              records: Mapping[str, Sequence[Mapping[str, Any]]]
              ) -> dict[str, Any]:
  """The corpus card of a built corpus.

  Args:
    config: its `synthetic_speech.SyntheticSpeechConfig`.
    version: the dataset version.
    records: {split: [{'text', 'speaker_id', 'domain' ('long' | 'short'),
      'duration' (seconds)}]} of every example.

  Returns:
    A JSON-ready dict: 'engines' (speakers and voices (timbres) per engine
    and split), 'augmentation' (the effects' probabilities and ranges),
    'text' (sources and transcripts per domain and split), 'sizes'
    (speakers, utterances, hours per split, engine and domain), 'oov_rate'
    (dev and test, all and per domain, against train's vocabulary),
    'transcript_overlap_with_train' (dev and test), 'vocabulary'.
  """
  splits = [s for s in ("train", "dev", "test") if s in records]
  engines = collections.defaultdict(lambda: collections.defaultdict(dict))
  sizes = {}
  for split in splits:
    by_engine = collections.defaultdict(set)
    size = {"speakers": 0, "utterances": 0, "hours": 0.0,
            "by_engine": {}, "by_domain": {}}
    for r in records[split]:
      engine = tts_engines.engine_of(r["speaker_id"])
      by_engine[engine].add(r["speaker_id"])
      hours = float(r["duration"]) / 3600.0
      size["utterances"] += 1
      size["hours"] += hours
      for key, group in (("by_engine", engine), ("by_domain", r["domain"])):
        entry = size[key].setdefault(group, {"utterances": 0, "hours": 0.0})
        entry["utterances"] += 1
        entry["hours"] += hours
    size["speakers"] = sum(len(v) for v in by_engine.values())
    for engine, ids in sorted(by_engine.items()):
      engines[engine]["speakers"][split] = len(ids)
      engines[engine]["voices"][split] = sorted(
          {tts_engines.timbre_of(i) for i in ids})
    sizes[split] = size

  texts = {split: [r["text"] for r in records[split]] for split in splits}
  by_domain = {split: collections.defaultdict(list) for split in splits}
  for split in splits:
    for r in records[split]:
      by_domain[split][r["domain"]].append(r["text"])
  oov, overlap = {}, {}
  for split in (s for s in ("dev", "test") if s in records):
    oov[split] = {"all": oov_rate(texts["train"], texts[split])}
    for domain in ("long", "short"):
      oov[split][domain] = oov_rate(texts["train"], by_domain[split][domain])
    overlap[split] = transcript_overlap(texts["train"], texts[split])

  long_text = config.long_text
  return {
      "name": f"synthetic_speech/{config.name}",
      "version": version,
      "seed": config.seed,
      "engines": {e: {k: dict(v) for k, v in d.items()}
                  for e, d in sorted(engines.items())},
      "flite_fraction": config.flite_fraction,
      "augmentation": {**dataclasses.asdict(config.augmentation),
                       "babble_clips_per_split": config.babble_clips},
      "peak_dbfs_range": list(config.peak_dbfs_range),
      "text": {
          "long": {"long_text": long_text,
                   "source": LONG_TEXT_SOURCES.get(long_text, long_text),
                   "seconds": list(config.long_seconds),
                   "distinct_transcripts": {
                       s: len(set(by_domain[s]["long"])) for s in splits}},
          "short": {"source": "spoken-assistant commands: templates and slot"
                              " values dealt to the splits"
                              " (conformer_fl/data/commands.py)",
                    "templates": len(commands.TEMPLATES),
                    "max_seconds": config.short_max_seconds,
                    "distinct_transcripts": {
                        s: len(set(by_domain[s]["short"])) for s in splits}},
      },
      "sizes": sizes,
      "vocabulary": {s: len({w for t in texts[s] for w in t.split()})
                     for s in splits},
      "oov_rate": oov,
      "transcript_overlap_with_train": overlap,
  }
