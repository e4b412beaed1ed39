"""Word error rate, scored with jiwer after the project's text normalization.

Both references and hypotheses go through `conformer_fl.text.normalize_text`
(see conformer_fl/text.py: accents stripped, lower-cased, every character other
than a-z and in-word apostrophes becomes a space, whitespace collapsed), so case
and punctuation never count as errors: "Hello, World!" vs "hello world" is 0.0.
Words are the space-separated tokens of the normalized text.

Corpus-level WER = (substitutions + deletions + insertions) summed over all
pairs / reference words summed over all pairs (not a mean of per-utterance
WERs).

Empty texts after normalization: a pair with an empty reference contributes 0
reference words and one insertion per hypothesis word; an empty hypothesis
contributes one deletion per reference word. When the whole corpus has no
reference words, `word_error_rate` returns 0.0 if there are no errors and the
number of inserted words otherwise (the denominator is floored at one word, so
the result stays finite and JSON-serializable).
"""

from collections.abc import Sequence

import jiwer

from conformer_fl.text import normalize_text


def wer_counts(
    references: Sequence[str], hypotheses: Sequence[str]
) -> tuple[int, int]:
  """(word errors, reference words) over pairs of texts, after normalization.

  The counts add across batches: sum the errors and the words, then divide.

  Args:
    references: N reference transcripts.
    hypotheses: N hypotheses, aligned with `references`.

  Returns:
    (errors, words): substitutions + deletions + insertions, and the number of
    reference words, both summed over the N pairs.

  Raises:
    ValueError: if the two sequences differ in length or hold non-strings.
  """
  if isinstance(references, str) or isinstance(hypotheses, str):
    raise ValueError(
        "wer_counts expects sequences of strings, not a single string."
    )
  if len(references) != len(hypotheses):
    raise ValueError(
        f"Got {len(references)} references but {len(hypotheses)} hypotheses."
    )
  errors = 0
  words = 0
  scored_references = []
  scored_hypotheses = []
  for reference, hypothesis in zip(references, hypotheses):
    if not isinstance(reference, str) or not isinstance(hypothesis, str):
      raise ValueError(
          "References and hypotheses must be str; got"
          f" {type(reference).__name__} and {type(hypothesis).__name__}."
      )
    reference_words = normalize_text(reference).split()
    hypothesis_words = normalize_text(hypothesis).split()
    words += len(reference_words)
    if not reference_words or not hypothesis_words:
      # All insertions or all deletions; jiwer is not asked about empty texts.
      errors += len(reference_words) + len(hypothesis_words)
    else:
      scored_references.append(" ".join(reference_words))
      scored_hypotheses.append(" ".join(hypothesis_words))
  if scored_references:
    output = jiwer.process_words(scored_references, scored_hypotheses)
    errors += output.substitutions + output.deletions + output.insertions
  return int(errors), int(words)


def word_error_rate(
    references: Sequence[str], hypotheses: Sequence[str]
) -> float:
  """Corpus-level WER of `hypotheses` against `references` (module docstring).

  Args:
    references: N reference transcripts.
    hypotheses: N hypotheses, aligned with `references`.

  Returns:
    total word errors / total reference words (denominator floored at 1).
  """
  errors, words = wer_counts(references, hypotheses)
  return errors / max(words, 1)
