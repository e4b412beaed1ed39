"""The experiment's statistics: per-utterance errors, intervals, paired tests."""

import numpy as np
import pytest

from conformer_fl import wer as wer_lib
from conformer_fl.experiment import evidence
from conformer_fl.experiment import summary as summary_lib


def test_utterance_errors_in_words_and_characters():
  references = ["the cat sat", "a b", "hello"]
  hypotheses = ["the cat sat", "a c d", ""]
  errors, words = wer_lib.utterance_errors(references, hypotheses, "word")
  np.testing.assert_array_equal(errors, [0, 2, 1])   # 1 sub + 1 ins; 1 del.
  np.testing.assert_array_equal(words, [3, 2, 1])
  assert errors.sum() / words.sum() == wer_lib.word_error_rate(references,
                                                               hypotheses)
  char_errors, chars = wer_lib.utterance_errors(references, hypotheses, "char")
  np.testing.assert_array_equal(chars, [11, 3, 5])
  # "a b" -> "a c d": b->c, then " d" inserted: 3 character edits.
  np.testing.assert_array_equal(char_errors, [0, 3, 5])
  with pytest.raises(ValueError, match="unit"):
    wer_lib.utterance_errors(references, hypotheses, "phone")


def test_bootstrap_interval_holds_the_rate_and_narrows_with_more_utterances():
  rng = np.random.default_rng(0)
  lengths = rng.integers(5, 15, size=400)
  errors = rng.binomial(lengths, 0.2)
  rate = errors.sum() / lengths.sum()
  low, high = wer_lib.bootstrap_rate_interval(errors, lengths)
  assert low < rate < high
  small = wer_lib.bootstrap_rate_interval(errors[:40], lengths[:40])
  assert (small[1] - small[0]) > 2 * (high - low)
  # Deterministic for a seed; every utterance equal gives a zero-width one.
  assert wer_lib.bootstrap_rate_interval(errors, lengths) == (low, high)
  assert wer_lib.bootstrap_rate_interval([1] * 10, [4] * 10) == (0.25, 0.25)


def test_paired_difference_by_hand():
  # Two seeds, three utterances of 10 words; a makes 1 more error on every
  # utterance of every seed: the difference is exactly 0.1 in every resample.
  lengths = np.array([10, 10, 10])
  errors_b = np.array([[2, 3, 1], [0, 4, 2]])
  errors_a = errors_b + 1
  d = wer_lib.paired_bootstrap_difference(errors_a, errors_b, lengths)
  assert d["difference"] == pytest.approx(0.1)
  assert d["low"] == pytest.approx(0.1) and d["high"] == pytest.approx(0.1)
  assert (d["num_seeds"], d["num_utterances"]) == (2, 3)
  # Equal systems: a zero difference with a zero-width interval.
  same = wer_lib.paired_bootstrap_difference(errors_b, errors_b, lengths)
  assert same["difference"] == same["low"] == same["high"] == 0.0
  # Pooled: (sum a - sum b) / (seeds * words) = (6 - 0) / 60.
  mixed = errors_b.copy()
  mixed[0] += np.array([6, 0, 0])
  d = wer_lib.paired_bootstrap_difference(mixed, errors_b, lengths)
  assert d["difference"] == pytest.approx(0.1)
  assert d["low"] <= 0.1 <= d["high"] and d["low"] >= 0.0
  with pytest.raises(ValueError, match="Shapes"):
    wer_lib.paired_bootstrap_difference(errors_a[:, :2], errors_b, lengths)


def _eval(references, hypotheses):
  return {"references": list(references), "hypotheses": list(hypotheses)}


def test_paired_differences_pairs_arms_by_seed_and_utterance():
  refs = ["one two three four", "five six seven eight"]
  results = {
      ("full", 0): _eval(refs, refs),
      ("full", 1): _eval(refs, ["one two three", "five six seven eight"]),
      ("targeted", 0): _eval(refs, ["one two", "five six seven eight"]),
      ("targeted", 1): _eval(refs, ["one two three", "five six seven eight"]),
  }
  d = evidence.paired_differences(results, ["full", "targeted"], [0, 1])
  # targeted: 2 + 1 errors, full: 0 + 1, over 2 seeds x 8 words.
  assert list(d) == ["targeted"]
  assert d["targeted"]["difference"] == pytest.approx(2 / 16)
  results[("targeted", 1)] = _eval(["other"] + refs[1:], refs)
  with pytest.raises(ValueError, match="other utterances"):
    evidence.paired_differences(results, ["full", "targeted"], [0, 1])


def test_learning_curve_sums_training_time_of_logged_steps():
  rows = [{"step": 50, "steps_per_second": 1.0},
          {"step": 100, "steps_per_second": 2.0, "eval/wer": 0.8,
           "eval/cer": 0.5},
          {"step": 200, "steps_per_second": 4.0, "eval/wer": 0.3}]
  assert evidence.learning_curve(rows) == [
      {"step": 100, "seconds": 75.0, "wer": 0.8, "cer": 0.5},
      {"step": 200, "seconds": 100.0, "wer": 0.3, "cer": None}]


def test_checks_state_each_target_with_its_measurement():
  summary = {
      "pretrain": {"dev_eval": {"wer": 0.25, "wer_low": 0.22, "wer_high": 0.28,
                                "cer": 0.1, "num_examples": 400.0}},
      "analysis": {"ambient": ["encoder/block_00/ffn1"],
                   "critical": ["encoder/block_01/mhsa"]},
      "arms": [{"arm": "full", "wer": 0.29}],
      "pretrained_not_adapted": {"wer": 0.5},
  }
  met = [c["met"] for c in evidence.checks(summary)]
  assert met == [True, True, True]
  summary["arms"][0]["wer"] = 0.36      # Over 0.30, though 28% below 0.5.
  summary["pretrain"]["dev_eval"]["wer"] = 0.31
  summary["analysis"]["ambient"] = []
  checks = evidence.checks(summary)
  assert [c["met"] for c in checks] == [False, False, False]
  assert "WER 0.310" in checks[0]["measured"]
  assert "28% lower" in checks[2]["measured"]


def test_differences_are_read_as_non_inferiority_with_a_margin():
  with_margin = summary_lib._non_inferiority_sentence(  # pylint: disable=protected-access
      {"analysis": {"thresholds": {"max_abs_wer_increase": 0.01}}})
  assert "upper bound lies below the margin, +0.010 WER" in with_margin
  assert "no difference was detected, not that there is none" in with_margin
  without = summary_lib._non_inferiority_sentence({})  # pylint: disable=protected-access
  assert "below a margin declared beforehand" in without
  lines = "\n".join(summary_lib._differences_lines(dict(  # pylint: disable=protected-access
      analysis={"thresholds": {"max_abs_wer_increase": 0.02}},
      paired_differences={"targeted": dict(
          difference=0.011, low=-0.011, high=0.032, num_seeds=3,
          num_utterances=240)})))
  assert "shows no difference" not in lines
  assert "+0.020 WER" in lines
  assert "| targeted - full | +0.011 | -0.011 to +0.032 | 3 x 240 |" in lines
