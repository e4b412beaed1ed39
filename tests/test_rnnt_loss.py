"""Tests of the RNN-T loss against a brute-force enumeration of alignments."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conformer_fl.models.rnnt import rnnt_loss

BLANK = 0
_loss = jax.jit(rnnt_loss, static_argnames="blank_id")


def _log_softmax(x):
  x = x - np.max(x, axis=-1, keepdims=True)
  return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def enumerated_nll(logits, labels):
  """-log sum over every alignment of one unpadded example, float64.

  An alignment is a sequence of T blanks and U labels ending in a blank; it is
  fixed by which of the first T + U - 1 moves are label emissions.

  Args:
    logits: [T, U + 1, V].
    labels: [U].
  """
  log_probs = _log_softmax(np.asarray(logits, np.float64))
  num_time, num_labels = log_probs.shape[0], len(labels)
  path_scores = []
  for emit_moves in itertools.combinations(
      range(num_time + num_labels - 1), num_labels
  ):
    t = u = 0
    score = 0.0
    for move in range(num_time + num_labels):
      if move in emit_moves:
        score += log_probs[t, u, labels[u]]
        u += 1
      else:
        score += log_probs[t, u, BLANK]
        t += 1
    assert (t, u) == (num_time, num_labels)
    path_scores.append(score)
  top = max(path_scores)
  return -(top + math.log(sum(math.exp(s - top) for s in path_scores)))


def padded_batch(rng, time_lengths, label_lengths, max_time, max_labels, vocab):
  """Random logits and labels with garbage in every padded position."""
  batch = len(time_lengths)
  logits = rng.normal(size=(batch, max_time, max_labels + 1, vocab)) * 2.0
  labels = rng.integers(1, vocab, size=(batch, max_labels))
  logit_paddings = np.ones((batch, max_time), np.float32)
  label_paddings = np.ones((batch, max_labels), np.float32)
  for b, (t_len, u_len) in enumerate(zip(time_lengths, label_lengths)):
    logit_paddings[b, :t_len] = 0.0
    label_paddings[b, :u_len] = 0.0
  return logits.astype(np.float32), logit_paddings, labels.astype(np.int32), (
      label_paddings
  )


def batch_reference(logits, logit_paddings, labels, label_paddings):
  losses = []
  for b in range(logits.shape[0]):
    t_len = int(np.sum(1 - logit_paddings[b]))
    u_len = int(np.sum(1 - label_paddings[b]))
    losses.append(
        enumerated_nll(logits[b, :t_len, :u_len + 1], labels[b, :u_len])
    )
  return np.array(losses)


@pytest.fixture(scope="module")
def mixed_batch():
  """B = 5, T <= 4, U <= 3, V = 4, including U_b = 0 and T_b = 1 examples."""
  rng = np.random.default_rng(0)
  return padded_batch(
      rng, time_lengths=[4, 2, 3, 1, 4], label_lengths=[3, 1, 0, 2, 2],
      max_time=4, max_labels=3, vocab=4,
  )


def test_uniform_logits_hand_computed():
  # V = 2 with all-zero logits: every move has probability 1/2 and there are
  # C(T + U - 1, U) alignments of T + U moves, so
  # loss = (T + U) ln 2 - ln C(T + U - 1, U). T = 3, U = 2: 5 ln 2 - ln 6.
  logits = np.zeros((1, 3, 3, 2), np.float32)
  loss = _loss(logits, np.zeros((1, 3)), np.ones((1, 2), np.int32),
               np.zeros((1, 2)))
  np.testing.assert_allclose(
      np.asarray(loss), [5 * math.log(2) - math.log(6)], rtol=1e-6
  )


def test_matches_path_enumeration_on_padded_batch(mixed_batch):
  loss = np.asarray(_loss(*mixed_batch))
  expected = batch_reference(*mixed_batch)
  assert loss.shape == (5,) and loss.dtype == np.float32
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-5)
  assert np.all(loss >= 0.0)


def test_matches_path_enumeration_on_unpadded_examples():
  rng = np.random.default_rng(1)
  for num_time, num_labels in [(1, 3), (4, 1), (3, 3)]:
    logits, logit_paddings, labels, label_paddings = padded_batch(
        rng, [num_time], [num_labels], num_time, num_labels, vocab=4
    )
    loss = _loss(logits, logit_paddings, labels, label_paddings)
    expected = batch_reference(logits, logit_paddings, labels, label_paddings)
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5)


def test_non_zero_blank_id():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(1, 3, 3, 4)).astype(np.float32)
  labels = np.array([[0, 1]], np.int32)  # With blank 3, id 0 is a label.
  loss = _loss(logits, np.zeros((1, 3)), labels, np.zeros((1, 2)), blank_id=3)
  # Moving the blank to index 0 reduces the case to the reference's convention.
  permuted = logits[..., [3, 0, 1, 2]]
  expected = enumerated_nll(permuted[0], [1, 2])
  np.testing.assert_allclose(np.asarray(loss), [expected], rtol=1e-5)


def test_padding_invariance(mixed_batch):
  logits, logit_paddings, labels, label_paddings = mixed_batch
  rng = np.random.default_rng(3)
  extra_time, extra_labels = 3, 2
  big_logits = rng.normal(size=(5, 4 + extra_time, 3 + extra_labels + 1, 4))
  big_logits[:, :4, :4] = logits
  big_logits = big_logits.astype(np.float32)
  big_logit_paddings = np.concatenate(
      [logit_paddings, np.ones((5, extra_time))], axis=1
  )
  big_labels = np.concatenate(
      [labels, rng.integers(1, 4, size=(5, extra_labels))], axis=1
  ).astype(np.int32)
  big_label_paddings = np.concatenate(
      [label_paddings, np.ones((5, extra_labels))], axis=1
  )
  np.testing.assert_allclose(
      np.asarray(_loss(big_logits, big_logit_paddings, big_labels,
                       big_label_paddings)),
      np.asarray(_loss(*mixed_batch)),
      rtol=1e-6,
  )


def test_fully_padded_example_has_zero_loss_and_gradient():
  rng = np.random.default_rng(4)
  logits, logit_paddings, labels, label_paddings = padded_batch(
      rng, [3, 0], [2, 0], max_time=3, max_labels=2, vocab=4
  )
  per_example, vjp = jax.vjp(
      lambda x: _loss(x, logit_paddings, labels, label_paddings), logits
  )
  (grad,) = vjp(np.ones(2, np.float32))
  loss = jnp.sum(per_example)
  assert float(per_example[1]) == 0.0
  assert np.isfinite(float(loss))
  assert np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_array_equal(np.asarray(grad[1]), 0.0)


def test_gradient_matches_finite_differences_of_reference():
  rng = np.random.default_rng(5)
  logits, logit_paddings, labels, label_paddings = padded_batch(
      rng, [3, 2], [2, 1], max_time=3, max_labels=2, vocab=3
  )
  weights = np.array([1.0, 0.7])

  def objective(x):
    return jnp.sum(weights * rnnt_loss(x, logit_paddings, labels,
                                       label_paddings))

  grad = np.asarray(jax.jit(jax.grad(objective))(logits))
  assert np.all(np.isfinite(grad))

  logits64 = logits.astype(np.float64)
  expected = np.zeros_like(logits64)
  eps = 1e-5
  for index in np.ndindex(*logits.shape):
    plus, minus = logits64.copy(), logits64.copy()
    plus[index] += eps
    minus[index] -= eps
    expected[index] = (
        weights @ batch_reference(plus, logit_paddings, labels, label_paddings)
        - weights @ batch_reference(minus, logit_paddings, labels,
                                    label_paddings)
    ) / (2 * eps)
  np.testing.assert_allclose(grad, expected, atol=2e-5)
  # Padded frames and label positions get exactly zero gradient.
  assert np.all(grad[1, 2:] == 0.0) and np.all(grad[1, :, 2:] == 0.0)


def test_long_sequence_is_finite_and_matches_lattice_recursion_in_float64():
  # Long enough that probabilities underflow outside log space.
  rng = np.random.default_rng(6)
  num_time, num_labels, vocab = 60, 20, 6
  logits, logit_paddings, labels, label_paddings = padded_batch(
      rng, [num_time], [num_labels], num_time, num_labels, vocab
  )
  loss, grad = jax.jit(jax.value_and_grad(
      lambda x: rnnt_loss(x, logit_paddings, labels, label_paddings)[0]
  ))(logits)
  # Independent float64 recursion over (t, u) with explicit Python loops.
  log_probs = _log_softmax(logits[0].astype(np.float64))
  alpha = np.full((num_time, num_labels + 1), -np.inf)
  alpha[0, 0] = 0.0
  for t in range(num_time):
    for u in range(num_labels + 1):
      if t == u == 0:
        continue
      terms = []
      if t > 0:
        terms.append(alpha[t - 1, u] + log_probs[t - 1, u, BLANK])
      if u > 0:
        terms.append(alpha[t, u - 1] + log_probs[t, u - 1, labels[0, u - 1]])
      alpha[t, u] = np.logaddexp.reduce(terms)
  expected = -(alpha[-1, -1] + log_probs[-1, -1, BLANK])
  assert expected > 100.0  # exp(-loss) would underflow in float32.
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(grad)))
  # d loss / d logits sums to zero over the vocabulary (softmax invariance).
  np.testing.assert_allclose(np.asarray(grad).sum(-1), 0.0, atol=1e-5)


def test_rejects_inconsistent_shapes():
  with pytest.raises(ValueError, match="U \\+ 1"):
    rnnt_loss(np.zeros((1, 3, 3, 4)), np.zeros((1, 3)),
              np.zeros((1, 3), np.int32), np.zeros((1, 3)))
  with pytest.raises(ValueError, match="logit_paddings"):
    rnnt_loss(np.zeros((1, 3, 3, 4)), np.zeros((1, 2)),
              np.zeros((1, 2), np.int32), np.zeros((1, 2)))
