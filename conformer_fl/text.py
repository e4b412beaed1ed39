"""The one text normalization shared by the corpus builders, the tokenizer and WER.

Transcripts and hypotheses are normalized the same way before a tokenizer is trained
and before WER is scored, so that punctuation and case never count as errors:

1. Unicode NFKD, accents stripped, lower-cased.
2. Digits are spelled out one word per digit is *not* done here: the corpus builders
   write numbers as words already, and LibriSpeech transcripts contain none.
3. Apostrophes inside words are kept ("don't"); every other character that is not
   a lower-case letter a-z or an apostrophe becomes a space.
4. Runs of whitespace collapse to one space; leading and trailing space is removed.

Examples:
  "Hello, World!"        -> "hello world"
  "It's   a  TEST."      -> "it's a test"
  "'quoted' -- dash"     -> "quoted dash"
  "Café au lait"         -> "cafe au lait"
"""

import re
import unicodedata

# Characters a normalized transcript may contain, in a stable order. A character
# tokenizer uses exactly this alphabet.
ALPHABET = " '" + "abcdefghijklmnopqrstuvwxyz"

_NOT_ALLOWED = re.compile(r"[^a-z' ]+")
_LONE_APOSTROPHE = re.compile(r"(?<![a-z])'|'(?![a-z])")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
  """Returns `text` in the project's canonical form (see the module docstring)."""
  text = unicodedata.normalize("NFKD", text)
  text = "".join(c for c in text if not unicodedata.combining(c))
  text = text.lower().replace("\u2019", "'").replace("`", "'")
  text = _NOT_ALLOWED.sub(" ", text)
  text = _LONE_APOSTROPHE.sub(" ", text)
  return _SPACES.sub(" ", text).strip()
