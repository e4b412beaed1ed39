"""Tests of CTC greedy decoding, the CTC loss, WER and text normalization."""

import math

import jax
import numpy as np
import optax
import pytest

from conformer_fl import text
from conformer_fl import wer
from conformer_fl.models import decoding

VOCAB = 5


def one_hot_logits(frame_ids, max_time):
  """Logits with argmax frame_ids[b][t] at frame t; extra frames argmax 3."""
  logits = np.zeros((len(frame_ids), max_time, VOCAB), np.float32)
  logits[:, :, 3] = 5.0  # Padded frames would decode to 3 if not ignored.
  for b, ids in enumerate(frame_ids):
    for t, token in enumerate(ids):
      logits[b, t] = 0.0
      logits[b, t, token] = 5.0
  return logits


def test_ctc_greedy_decode_hand_built_sequences():
  frame_ids = [
      [1, 1, 0, 1, 2, 2, 0, 0, 4, 4],  # -> 1 1 2 4 (blank splits the 1s).
      [0, 0, 0, 0],  # -> nothing.
      [2, 2, 2, 2, 2, 2],  # -> 2.
      [4, 0, 4, 0, 4, 4, 1, 0],  # -> 4 4 4 1.
  ]
  max_time = 10
  logits = one_hot_logits(frame_ids, max_time)
  paddings = np.ones((4, max_time), np.float32)
  for b, ids in enumerate(frame_ids):
    paddings[b, :len(ids)] = 0.0
  ids, id_paddings = jax.jit(decoding.ctc_greedy_decode)(logits, paddings)
  expected_ids = np.zeros((4, max_time), np.int32)
  expected_paddings = np.ones((4, max_time), np.float32)
  for b, decoded in enumerate([[1, 1, 2, 4], [], [2], [4, 4, 4, 1]]):
    expected_ids[b, :len(decoded)] = decoded
    expected_paddings[b, :len(decoded)] = 0.0
  np.testing.assert_array_equal(np.asarray(ids), expected_ids)
  np.testing.assert_array_equal(np.asarray(id_paddings), expected_paddings)
  assert ids.dtype == np.int32 and id_paddings.dtype == np.float32


def test_ctc_greedy_decode_with_other_blank_id():
  logits = one_hot_logits([[3, 3, 1, 3, 0, 0]], 6)
  ids, id_paddings = decoding.ctc_greedy_decode(
      logits, np.zeros((1, 6)), blank_id=3
  )
  # With blank 3, id 0 is an ordinary token: 3 3 1 3 0 0 -> 1 0.
  np.testing.assert_array_equal(np.asarray(ids), [[1, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(id_paddings), [[0, 0, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def ctc_batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, VOCAB)).astype(np.float32)
  logit_paddings = np.zeros((3, 6), np.float32)
  logit_paddings[1, 4:] = 1.0
  labels = np.array([[1, 2, 2], [3, 0, 0], [4, 1, 0]], np.int32)
  label_paddings = np.array([[0, 0, 0], [0, 1, 1], [0, 0, 1]], np.float32)
  return logits, logit_paddings, labels, label_paddings


def test_ctc_loss_equals_optax_and_is_finite(ctc_batch):
  loss = np.asarray(decoding.ctc_loss(*ctc_batch))
  expected = np.asarray(optax.ctc_loss(*ctc_batch, blank_id=0))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert loss.shape == (3,) and np.all(np.isfinite(loss)) and np.all(loss > 0)


def test_ctc_loss_single_frame_hand_computed():
  # One valid frame and one label: the only alignment emits the label there.
  logits = np.array([[[0.5, 2.0, -1.0], [9.0, 9.0, 9.0]]], np.float32)
  loss = decoding.ctc_loss(
      logits, np.array([[0.0, 1.0]]), np.array([[1]]), np.array([[0.0]])
  )
  log_z = math.log(math.exp(0.5) + math.exp(2.0) + math.exp(-1.0))
  np.testing.assert_allclose(np.asarray(loss), [log_z - 2.0], rtol=1e-5)


def test_ctc_loss_rejects_bad_shapes():
  with pytest.raises(ValueError, match="logit_paddings"):
    decoding.ctc_loss(np.zeros((1, 4, 3)), np.zeros((1, 3)),
                      np.zeros((1, 2), np.int32), np.zeros((1, 2)))


@pytest.mark.parametrize("raw, normalized", [
    ("Hello, World!", "hello world"),
    ("It's   a  TEST.", "it's a test"),
    ("'quoted' -- dash", "quoted dash"),
    ("Café au lait", "cafe au lait"),
])
def test_normalize_text_docstring_cases(raw, normalized):
  assert text.normalize_text(raw) == normalized


def test_wer_ignores_case_and_punctuation():
  assert wer.word_error_rate(["Hello, World!"], ["hello world"]) == 0.0
  assert wer.wer_counts(["Hello, World!"], ["hello world"]) == (0, 2)


def test_wer_counts_substitution_deletion_insertion_by_hand():
  references = [
      "the cat sat on the mat",  # 6 words.
      "a quick test",  # 3 words.
      "one two",  # 2 words.
  ]
  hypotheses = [
      "the bat sat on the mat",  # 1 substitution.
      "a test",  # 1 deletion.
      "one two three four",  # 2 insertions.
  ]
  assert wer.wer_counts(references, hypotheses) == (4, 11)
  assert wer.word_error_rate(references, hypotheses) == pytest.approx(4 / 11)


def test_wer_is_corpus_level_not_mean_of_utterances():
  # Per-utterance WERs 1.0 and 0.0 would average to 0.5; corpus WER is 1 / 4.
  assert wer.word_error_rate(["a", "b c d"], ["x", "b c d"]) == 0.25


def test_wer_counts_aggregate_across_batches():
  first = wer.wer_counts(["red green blue"], ["red blue"])
  second = wer.wer_counts(["one"], ["one two"])
  assert first == (1, 3) and second == (1, 1)
  assert wer.wer_counts(
      ["red green blue", "one"], ["red blue", "one two"]
  ) == (first[0] + second[0], first[1] + second[1])


def test_wer_empty_texts_after_normalization():
  # A reference of only punctuation has no words: hypothesis words are
  # insertions.
  assert wer.wer_counts(["?!", "go home"], ["oh no", "go home"]) == (2, 2)
  # An empty hypothesis deletes every reference word.
  assert wer.wer_counts(["go home now"], [""]) == (3, 3)
  # Nothing to score at all.
  assert wer.word_error_rate(["..."], [""]) == 0.0
  # No reference words but insertions: the denominator is floored at 1.
  assert wer.word_error_rate([""], ["a b"]) == 2.0


def test_wer_rejects_mismatched_inputs():
  with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
    wer.wer_counts(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="single string"):
    wer.word_error_rate("a b", "a b")
