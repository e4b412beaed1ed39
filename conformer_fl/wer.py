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
import numpy as np

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


def utterance_errors(references: Sequence[str], hypotheses: Sequence[str],
                     unit: str = "word") -> tuple[np.ndarray, np.ndarray]:
  """Per-pair edit errors and reference lengths, in words or characters.

  Args:
    references: N reference transcripts.
    hypotheses: N hypotheses, aligned with `references`.
    unit: 'word' (WER's counts) or 'char' (CER's: the characters of the
      normalized text, spaces between words included).

  Returns:
    (errors int64 [N], lengths int64 [N]); errors.sum() / lengths.sum() is the
    corpus WER (or CER) of the N pairs.
  """
  if unit not in ("word", "char"):
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}.")
  if len(references) != len(hypotheses):
    raise ValueError(
        f"Got {len(references)} references but {len(hypotheses)} hypotheses."
    )
  errors = np.zeros(len(references), np.int64)
  lengths = np.zeros(len(references), np.int64)
  for i, (reference, hypothesis) in enumerate(zip(references, hypotheses)):
    if unit == "word":
      errors[i], lengths[i] = wer_counts([reference], [hypothesis])
      continue
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    lengths[i] = len(ref)
    if not ref or not hyp:
      errors[i] = len(ref) + len(hyp)
    else:
      out = jiwer.process_characters(ref, hyp)
      errors[i] = out.substitutions + out.deletions + out.insertions
  return errors, lengths


def bootstrap_rate_interval(errors: np.ndarray, lengths: np.ndarray, *,
                            level: float = 0.95, num_samples: int = 2000,
                            seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of a corpus error rate, over utterances.

  Utterances are resampled with replacement (the words of one utterance stay
  together, since their errors are not independent) and the corpus rate
  sum(errors) / sum(lengths) is recomputed for each resample.

  Args:
    errors: int [N] errors of each utterance (`utterance_errors`).
    lengths: int [N] reference lengths.
    level: coverage of the interval.
    num_samples: bootstrap resamples.
    seed: the resampling seed (the interval is deterministic for a seed).

  Returns:
    (low, high) of the `level` interval.
  """
  errors = np.asarray(errors, np.float64)
  lengths = np.asarray(lengths, np.float64)
  rng = np.random.default_rng(seed)
  index = rng.integers(0, len(errors), size=(num_samples, len(errors)))
  rates = errors[index].sum(1) / np.maximum(lengths[index].sum(1), 1.0)
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(rates, [tail, 1.0 - tail])
  return float(low), float(high)


def paired_bootstrap_difference(
    errors_a: np.ndarray, errors_b: np.ndarray, lengths: np.ndarray, *,
    level: float = 0.95, num_samples: int = 2000,
    seed: int = 0) -> dict[str, float]:
  """WER(a) - WER(b) with a two-level paired bootstrap interval.

  Both systems are scored on the same N utterances, once per seed (the seeds
  of a and b paired: seed s of a against seed s of b). Each resample draws S
  seeds and N utterances with replacement, the same draws for a and b, and
  takes the difference of the two corpus WERs pooled over the drawn seeds.
  The interval so covers both the choice of test utterances and the seed.

  Args:
    errors_a: int [S, N] word errors of system a, per seed and utterance.
    errors_b: int [S, N] word errors of system b.
    lengths: int [N] reference words of each utterance.
    level: coverage of the interval.
    num_samples: bootstrap resamples.
    seed: the resampling seed.

  Returns:
    {'difference': pooled WER(a) - WER(b) over all seeds, 'low', 'high',
     'level', 'num_seeds', 'num_utterances'}.
  """
  errors_a = np.asarray(errors_a, np.float64)
  errors_b = np.asarray(errors_b, np.float64)
  lengths = np.asarray(lengths, np.float64)
  if errors_a.shape != errors_b.shape or errors_a.shape[1:] != lengths.shape:
    raise ValueError(f"Shapes differ: a {errors_a.shape}, b {errors_b.shape},"
                     f" lengths {lengths.shape}; expected [S, N], [S, N], [N].")
  num_seeds, num_utts = errors_a.shape
  diff = errors_a - errors_b                                        # [S, N]
  rng = np.random.default_rng(seed)
  seeds = rng.integers(0, num_seeds, size=(num_samples, num_seeds))
  utts = rng.integers(0, num_utts, size=(num_samples, num_utts))
  # Sum of the drawn seeds' differences over the drawn utterances.
  picked = diff[seeds[:, :, None], utts[:, None, :]].sum(axis=(1, 2))
  words = lengths[utts].sum(1) * num_seeds
  samples = picked / np.maximum(words, 1.0)
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(samples, [tail, 1.0 - tail])
  return dict(difference=float(diff.sum() / max(lengths.sum() * num_seeds, 1)),
              low=float(low), high=float(high), level=level,
              num_seeds=int(num_seeds), num_utterances=int(num_utts))
