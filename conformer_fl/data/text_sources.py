"""Long-form text for the synthetic corpus: real English prose, or a grammar.

Sources, all local and deterministic:

* `fortune_sentences`: English sentences from the Debian `fortunes-min` and
  `fortunes` files in /usr/share/games/fortunes (PROSE_FORTUNE_FILES: the
  prose ones; no ASCII art, program code, chat logs or TV quotes). Entries
  are separated by lines holding a single '%'; attribution lines ('-- Mark
  Twain') are dropped; entries are split into sentences. A sentence is kept
  only when a speech synthesizer would say exactly the words of its
  normalized transcript: no digits or symbols that are read aloud ('$', '%',
  '&', ...), no acronyms or Roman numerals in capitals (spelled letter by
  letter), no abbreviations with periods ('Mr.'), no single letters other
  than 'a' and 'I'.
* `bible_sentences`: the King James Bible (Debian `bible-kjv`, read with its
  `bible` program), verses split into sentences and clauses at '.', '!', '?',
  ':' and ';', with the same filter ('LORD' and 'GOD', in capitals there, read
  as words).
* `prose_sentences`: both of the above, at most `per_source` of each (a seeded
  sample), the long-form domain of the built-in corpus configs: open
  vocabulary, so held-out sentences bring words never heard in train.
* `story_sentences`: a seeded grammar of everyday narrative sentences (8-24
  words, "on monday my sister drove to the market and bought twelve eggs")
  over a closed vocabulary of about 250 words, where every word of a held-out
  sentence is heard in training.

Short commands are in `conformer_fl/data/commands.py`. Every returned string
is already in `conformer_fl.text.normalize_text` form.
"""

from collections.abc import Sequence
import os
import re
import subprocess

import numpy as np

from conformer_fl.text import normalize_text

FORTUNE_DIR = "/usr/share/games/fortunes"
FORTUNE_FILES = ("fortunes", "literature", "riddles")
# fortunes-min's files and the prose files of `fortunes`.
PROSE_FORTUNE_FILES = FORTUNE_FILES + (
    "art", "computers", "cookie", "education", "food", "humorists", "kids",
    "law", "love", "medicine", "men-women", "miscellaneous", "people", "pets",
    "platitudes", "politics", "science", "songs-poems", "sports", "wisdom",
    "work")
# Every verse of the King James Bible, as the `bible` program names them.
BIBLE_VERSES = "Gen1:1-Rev22:21"

# Characters a raw sentence may contain; anything else (digits, '$', '&', '[', '/',
# control characters from overstriking, ...) rejects the sentence.
_ALLOWED_RAW = re.compile(r"^[A-Za-z\s'\".,;:!?()\-]+$")
_QA_PREFIX = re.compile(r"^[QA]:\s*")  # riddles: "Q: ..." / "A: ..."
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')]*\s+")
_CLAUSE_END = re.compile(r"(?<=[.!?:;])[\"')]*\s+")
_VERSE_REFERENCE = re.compile(r"^\S+?\d+:\d+\s+")
_ACRONYM = re.compile(r"\b[A-Z]{2,}\b")
# Abbreviations the synthesizers expand ("Mr." -> "mister") or spell out.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc wm co inc ltd esq prof rev gen col capt lt sgt"
    " tm ok".split()
)


def read_fortune_entries(path: str) -> list[str]:
  """Returns the '%'-separated entries of one fortune file, attributions removed."""
  with open(path, encoding="latin-1") as f:
    lines = f.read().splitlines()
  entries, current = [], []
  for line in lines + ["%"]:
    if line.strip() == "%":
      if current:
        entries.append(" ".join(current))
      current = []
    elif line.strip().startswith("--"):
      continue  # attribution or a section byline
    elif line.strip():
      current.append(_QA_PREFIX.sub("", line.strip()))
  return entries


def _is_speakable(sentence: str) -> bool:
  """True when a synthesizer would read exactly the words of the transcript."""
  if not _ALLOWED_RAW.match(sentence) or _ACRONYM.search(sentence):
    return False
  for raw_word in sentence.split():
    word = raw_word.strip("\"'.,;:!?()-")
    if not word:
      continue
    if "." in word:  # initials or abbreviations ("e.g", "U.S")
      return False
    if word.lower() in _ABBREVIATIONS:
      return False
    if len(word) == 1 and word not in ("a", "A", "I"):
      return False
  return True


def split_sentences(entry: str) -> list[str]:
  """Splits a fortune entry into sentences at '.', '!' or '?' followed by space.

  A period after an abbreviation ("Mr. Smith") or an initial ("J. Doe") does not
  end a sentence (and `_is_speakable` later rejects the sentence).
  """
  sentences = []
  for piece in (p.strip() for p in _SENTENCE_END.split(entry)):
    if not piece:
      continue
    last_word = sentences[-1].split()[-1].rstrip(".").lower() if sentences else ""
    if sentences and (last_word in _ABBREVIATIONS or len(last_word) == 1):
      sentences[-1] += " " + piece
    else:
      sentences.append(piece)
  return sentences


def fortune_sentences(
    fortune_dir: str = FORTUNE_DIR,
    files: Sequence[str] = FORTUNE_FILES,
    min_words: int = 6,
    max_words: int = 22,
) -> list[str]:
  """Returns the sorted, de-duplicated, normalized speakable sentences.

  Args:
    fortune_dir: directory of the fortune files.
    files: file names inside `fortune_dir`, read in this order.
    min_words: shortest sentence kept, in words of the normalized text.
    max_words: longest sentence kept.

  Returns:
    Normalized sentences, sorted so that the result does not depend on file order.
  """
  sentences = set()
  for name in files:
    for entry in read_fortune_entries(os.path.join(fortune_dir, name)):
      for sentence in split_sentences(entry):
        if not _is_speakable(sentence):
          continue
        text = normalize_text(sentence)
        if min_words <= len(text.split()) <= max_words:
          sentences.add(text)
  return sorted(sentences)


def bible_sentences(min_words: int = 6, max_words: int = 22) -> list[str]:
  """The sorted, de-duplicated, normalized speakable sentences of the KJV.

  Verses (`bible -f`, one a line after its reference) are split at '.', '!',
  '?', ':' and ';'; the pieces pass `_is_speakable` after 'LORD' and 'GOD'
  are written in lower case.

  Raises:
    RuntimeError: the `bible` program failed.
  """
  result = subprocess.run(["bible", "-f", BIBLE_VERSES], capture_output=True,
                          check=False)
  if result.returncode != 0:
    raise RuntimeError(f"`bible -f {BIBLE_VERSES}` failed: exit"
                       f" {result.returncode}; is Debian's bible-kjv installed?")
  sentences = set()
  for line in result.stdout.decode("latin-1").splitlines():
    verse = _VERSE_REFERENCE.sub("", line.strip())
    verse = verse.replace("LORD", "Lord").replace("GOD", "God")
    for piece in _CLAUSE_END.split(verse):
      piece = piece.strip()
      if not piece or not _is_speakable(piece):
        continue
      text = normalize_text(piece)
      if min_words <= len(text.split()) <= max_words:
        sentences.add(text)
  return sorted(sentences)


PROSE_SOURCES = ("fortunes", "bible")


def prose_sentences(seed: int, per_source: int, min_words: int = 6,
                    max_words: int = 22,
                    sources: Sequence[str] = PROSE_SOURCES) -> list[str]:
  """Sentences of real English prose: at most `per_source` of each source.

  Args:
    seed: seeds the sample of a source with more than `per_source` sentences.
    per_source: sentences kept of each source.
    min_words: shortest sentence kept, in words.
    max_words: longest sentence kept.
    sources: 'fortunes' (PROSE_FORTUNE_FILES) and/or 'bible' (the KJV).

  Returns:
    The sorted union of the sources' samples.

  Raises:
    ValueError: an unknown source.
  """
  pool = set()
  for index, source in enumerate(sources):
    if source == "fortunes":
      sentences = fortune_sentences(files=PROSE_FORTUNE_FILES,
                                    min_words=min_words, max_words=max_words)
    elif source == "bible":
      sentences = bible_sentences(min_words, max_words)
    else:
      raise ValueError(f"Unknown prose source {source!r}; expected one of"
                       f" {PROSE_SOURCES}.")
    if len(sentences) > per_source:
      rng = np.random.default_rng([seed, 9, index])
      sentences = [sentences[i] for i in
                   sorted(rng.choice(len(sentences), per_source, replace=False))]
    pool.update(sentences)
  return sorted(pool)


_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve"
    " thirteen fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_words(n: int) -> str:
  """Spells 0 <= n < 1000 in English words ("one hundred twenty three")."""
  if not 0 <= n < 1000:
    raise ValueError(f"number_to_words supports 0..999, got {n}.")
  if n < 20:
    return _ONES[n]
  if n < 100:
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
  hundreds, rest = divmod(n, 100)
  words = _ONES[hundreds] + " hundred"
  return words if rest == 0 else words + " " + number_to_words(rest)


_ROOMS = ("kitchen", "bedroom", "living room", "bathroom", "hallway", "garage",
          "office", "porch")
_CITIES = ("paris", "london", "boston", "chicago", "denver", "tokyo", "madrid",
           "dublin", "seattle", "berlin")
_ITEMS = ("milk", "eggs", "bread", "apples", "coffee", "rice", "butter",
          "cheese", "tea", "onions")
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
         "sunday", "tomorrow", "tonight")


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


# The 'story' grammar of the long-form domain: everyday narrative sentences
# over a closed vocabulary (a few hundred words), so that the words of the
# held-out dev and test sentences are all heard in training while the
# sentences themselves are new.
_PEOPLE = (
    "my sister", "my brother", "our neighbor", "the old farmer", "the teacher",
    "a young doctor", "the driver", "my grandmother", "the little boy",
    "the girl next door", "alice", "bob", "emma", "james", "olivia", "mom",
    "dad", "the baker", "a tall man", "the children", "my friend", "the nurse",
)
_PLACES = (
    "the market", "the station", "the river", "the library", "the park",
    "the old church", "the beach", "the hospital", "the school", "the bakery",
    "the harbor", "the village", "the bridge", "the garden", "the city",
    "the museum", "the farm", "the hotel",
) + tuple(f"the {room}" for room in _ROOMS[:6]) + _CITIES
_ADJECTIVES = ("red", "small", "heavy", "old", "new", "green", "warm", "broken",
               "wooden", "bright", "empty", "yellow", "quiet", "little", "big",
               "white", "black", "soft")
_THINGS = ("box", "basket", "book", "letter", "chair", "bicycle", "coat",
           "bottle", "blanket", "key", "map", "cup", "clock", "hat", "bag",
           "picture", "window", "door", "table", "candle", "ladder", "boat")
_PLURAL_THINGS = tuple(t + ("es" if t.endswith("x") else "s") for t in _THINGS)
_FOODS = _ITEMS + ("soup", "cake", "potatoes", "fish", "oranges", "carrots",
                   "sandwiches", "cookies")
_MOVES = ("walked to", "drove to", "ran to", "went back to", "hurried to",
          "came home from", "rode a bicycle to", "took the train to",
          "waited outside", "stayed at")
_ACTS = ("bought", "found", "carried", "painted", "cleaned", "opened", "sold",
         "fixed", "lost", "borrowed", "wrapped", "dropped", "moved", "hid")
_EATS = ("cooked", "ate", "shared", "baked", "packed", "brought")
_TIMES = ("this morning", "last night", "after dinner", "before lunch",
          "in the evening", "early in the morning", "late at night",
          "during the storm", "after school", "at noon") + tuple(
              f"on {day}" for day in _DAYS[:7])
_FEELINGS = ("happy", "tired", "hungry", "cold", "surprised", "worried",
             "quiet", "proud", "angry", "sleepy")
_LINKS = ("and then", "but", "because", "so", "while", "before", "after")


def story_sentence(rng: np.random.Generator, min_words: int = 8,
                   max_words: int = 24) -> str:
  """Draws one narrative sentence of the 'story' grammar; normalized text.

  A sentence is one or two clauses (a person going somewhere, doing something
  to an object, eating, or feeling), joined by a linking word, with an
  optional time phrase; numbers are spelled as words.

  Args:
    rng: the generator to draw from.
    min_words: shortest sentence returned, in words.
    max_words: longest sentence returned.

  Returns:
    A sentence of min_words..max_words words.
  """
  pick = lambda options: _choice(rng, options)
  number = lambda lo, hi: number_to_words(int(rng.integers(lo, hi + 1)))
  # One template drawn, then its own draws.
  draw = lambda templates: templates[int(rng.integers(len(templates)))]()
  objects = (
      lambda: f"a {pick(_ADJECTIVES)} {pick(_THINGS)}",
      lambda: f"the {pick(_ADJECTIVES)} {pick(_THINGS)}",
      lambda: f"{number(2, 99)} {pick(_ADJECTIVES)} {pick(_PLURAL_THINGS)}",
      lambda: f"{number(2, 12)} {pick(_FOODS)}",
  )
  predicates = (
      lambda: f"{pick(_MOVES)} {pick(_PLACES)}",
      lambda: f"{pick(_ACTS)} {draw(objects)}",
      lambda: f"{pick(_ACTS)} {draw(objects)} at {pick(_PLACES)}",
      lambda: f"{pick(_EATS)} {pick(_FOODS)} for {pick(_PEOPLE)}",
      lambda: f"felt {pick(_FEELINGS)}",
  )
  clause = lambda subject: f"{subject} {draw(predicates)}"

  while True:
    subject = pick(_PEOPLE)
    words = clause(subject)
    if rng.random() < 0.7:
      other = subject if rng.random() < 0.3 else pick(_PEOPLE)
      words += f" {pick(_LINKS)} {clause(other)}"
    if rng.random() < 0.6:
      time_phrase = pick(_TIMES)
      words = (f"{time_phrase} {words}" if rng.random() < 0.4
               else f"{words} {time_phrase}")
    text = normalize_text(words)
    if min_words <= len(text.split()) <= max_words:
      return text


def story_sentences(count: int, seed: int, min_words: int = 8,
                    max_words: int = 24) -> list[str]:
  """`count` distinct sentences of the 'story' grammar, sorted; seeded.

  Raises:
    ValueError: the grammar cannot give `count` distinct sentences.
  """
  rng = np.random.default_rng([seed, 5])
  sentences = set()
  for _ in range(20 * count):
    sentences.add(story_sentence(rng, min_words, max_words))
    if len(sentences) == count:
      return sorted(sentences)
  raise ValueError(f"The story grammar gave only {len(sentences)} distinct"
                   f" sentences of {min_words}-{max_words} words, not {count}.")
