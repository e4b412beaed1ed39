"""Text for the synthetic corpus: long-form sentences and spoken commands (short).

Three sources, all local and deterministic:

* `fortune_sentences`: English sentences from the Debian `fortunes-min` files
  (/usr/share/games/fortunes/{fortunes,literature,riddles}). Entries are separated
  by lines holding a single '%'; attribution lines ('-- Mark Twain') are dropped;
  entries are split into sentences. A sentence is kept only when a speech
  synthesizer would say exactly the words of its normalized transcript: no digits
  or symbols that are read aloud ('$', '%', '&', ...), no acronyms or Roman numerals
  in capitals (spelled letter by letter), no abbreviations with periods ('Mr.'),
  no single letters other than 'a' and 'I'.
* `story_sentences`: a seeded grammar of everyday narrative sentences (8-24
  words, "on monday my sister drove to the market and bought twelve eggs")
  over a closed vocabulary of about 250 words. The long-form domain of the
  built-in corpus configs reads these: every word of a held-out sentence is
  heard in training, so a small model trained for minutes can transcribe it.
* `command_phrase`: a seeded grammar of short assistant commands ("set a timer
  for five minutes", "call mom", "turn on the kitchen lights"), numbers spelled
  as words.

Every returned string is already in `conformer_fl.text.normalize_text` form.
"""

from collections.abc import Sequence
import os
import re

import numpy as np

from conformer_fl.text import normalize_text

FORTUNE_DIR = "/usr/share/games/fortunes"
FORTUNE_FILES = ("fortunes", "literature", "riddles")

# Characters a raw sentence may contain; anything else (digits, '$', '&', '[', '/',
# control characters from overstriking, ...) rejects the sentence.
_ALLOWED_RAW = re.compile(r"^[A-Za-z\s'\".,;:!?()\-]+$")
_QA_PREFIX = re.compile(r"^[QA]:\s*")  # riddles: "Q: ..." / "A: ..."
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')]*\s+")
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


_CONTACTS = (
    "mom", "dad", "grandma", "grandpa", "alice", "bob", "emma", "james", "olivia",
    "the office", "my sister", "my brother", "doctor green", "the plumber",
)
_ROOMS = ("kitchen", "bedroom", "living room", "bathroom", "hallway", "garage",
          "office", "porch")
_DEVICES = ("lights", "lamp", "fan", "heater", "radio", "tv")
_GENRES = ("jazz", "rock", "classical", "country", "pop", "blues", "folk")
_CITIES = ("paris", "london", "boston", "chicago", "denver", "tokyo", "madrid",
           "dublin", "seattle", "berlin")
_ITEMS = ("milk", "eggs", "bread", "apples", "coffee", "rice", "butter",
          "cheese", "tea", "onions")
_TASKS = ("call the bank", "water the plants", "buy milk", "feed the cat",
          "take out the trash", "pay rent", "book a table")
_SINGLE = ("stop", "pause", "next song", "volume up", "volume down",
           "what time is it", "good morning", "good night", "cancel that",
           "read my messages", "what's on my calendar", "skip this song",
           "play the news", "repeat that", "yes please", "no thanks")
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
         "sunday", "tomorrow", "tonight")


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


def command_phrase(rng: np.random.Generator) -> str:
  """Draws one short command (2..7 words) from the grammar; normalized text."""
  pick = lambda options: _choice(rng, options)
  number = lambda lo, hi: number_to_words(int(rng.integers(lo, hi + 1)))
  templates = (
      lambda: f"set a timer for {number(2, 59)} minutes",
      lambda: f"set an alarm for {number(1, 12)} o'clock",
      lambda: f"call {pick(_CONTACTS)}",
      lambda: f"text {pick(_CONTACTS)}",
      lambda: f"turn {pick(('on', 'off'))} the {pick(_ROOMS)} {pick(_DEVICES)}",
      lambda: f"play some {pick(_GENRES)} music",
      lambda: f"what's the weather in {pick(_CITIES)}",
      lambda: f"weather for {pick(_DAYS)}",
      lambda: f"add {pick(_ITEMS)} to my list",
      lambda: f"remind me to {pick(_TASKS)}",
      lambda: f"set the heat to {number(55, 80)} degrees",
      lambda: f"dim the lights to {number(10, 90)} percent",
      lambda: f"skip {number(2, 9)} songs",
      lambda: pick(_SINGLE),
  )
  return normalize_text(templates[int(rng.integers(len(templates)))]())


# The 'story' grammar of the long-form domain: everyday narrative sentences
# over a closed vocabulary (a few hundred words), so that the words of the
# held-out dev and test sentences are all heard in training while the
# sentences themselves are new. Some words (numbers, days, rooms, cities,
# people, groceries) are shared with the command grammar above; the commands'
# own verbs and nouns ("set", "timer", "weather", "volume", ...) are not.
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
  # As in `command_phrase`: one template drawn, then its own draws.
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
