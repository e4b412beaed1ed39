"""Padding invariance: appended padding never changes outputs at valid frames.

Checked for the encoder alone (feature frames, each conv-module norm, eval and
train mode), for the whole model from audio samples (CTC and RNN-T), and the
norms' statistics against numpy over valid frames only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conformer_fl import models
from conformer_fl.models import conformer

NORMS = ("batch_norm", "group_norm", "layer_norm")
TIME, EXTRA = 40, 13  # feature frames, appended padded frames.
LENGTHS = (40, 27)


def _features(extra: int, garbage: float):
  rng = np.random.default_rng(1)
  features = rng.normal(size=(2, TIME, 80)).astype(np.float32)
  features = np.concatenate([features, np.zeros((2, extra, 80), np.float32)],
                            axis=1)
  paddings = np.ones((2, TIME + extra), np.float32)
  for b, length in enumerate(LENGTHS):
    paddings[b, :length] = 0.0
  # Padded frames hold arbitrary values: they must not matter.
  features[paddings > 0] = garbage
  return features, paddings


def _random_variables(init_fn, seed: int = 0):
  """Variables of init_fn's structure filled from numpy (no init compile).

  Any parameter values serve these tests; running variances stay positive.
  """
  shapes = jax.eval_shape(init_fn, jax.random.key(0))
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    values = rng.normal(0.0, 0.3, leaf.shape).astype(np.float32)
    if path[-1].key == "var":
      values = np.abs(values) + 0.5
    return jnp.asarray(values)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _encoder(norm: str) -> conformer.ConformerEncoder:
  # One block suffices: blocks are alike and each block's output at padded
  # frames is checked to be exactly zero, so nothing can leak further.
  return conformer.ConformerEncoder(conformer.ConformerConfig(
      num_blocks=1, model_dim=32, num_heads=2, conv_kernel_size=8,
      conv_norm=norm, conv_norm_groups=4, dropout_rate=0.0))


@pytest.fixture(scope="module")
def encoder_variables():
  features, paddings = _features(0, 0.0)
  result = {}
  for norm in NORMS:
    result[norm] = _random_variables(lambda rng, n=norm: _encoder(n).init(
        rng, features, paddings, train=False))
  return result


# Train mode differs from eval only for batch_norm (dropout is off here).
@pytest.mark.parametrize("norm,train", [(norm, False) for norm in NORMS] +
                         [("batch_norm", True)])
def test_encoder_padding_invariance(encoder_variables, norm, train):
  encoder = _encoder(norm)
  variables = encoder_variables[norm]
  run = jax.jit(lambda f, p: encoder.apply(
      variables, f, p, train=train,
      mutable=["batch_stats"] if train else False))
  short = run(*_features(0, 0.0))
  long = run(*_features(EXTRA, 7.0))
  (short_out, short_pad), (long_out, long_pad) = (
      (short[0], long[0]) if train else (short, long))
  assert short_out.shape[1] == 10 and long_out.shape[1] == 14
  assert np.all(np.asarray(short_out)[np.asarray(short_pad) > 0] == 0.0)
  np.testing.assert_array_equal(long_pad[:, :10], short_pad)
  assert np.all(np.asarray(long_pad)[:, 10:] == 1.0)
  valid = np.asarray(short_pad) == 0.0
  np.testing.assert_allclose(np.asarray(long_out)[:, :10][valid],
                             np.asarray(short_out)[valid], atol=2e-5)
  assert np.all(np.asarray(long_out)[np.asarray(long_pad) > 0] == 0.0)
  if train and norm == "batch_norm":  # Same updated running statistics.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 short[1], long[1])


def test_subsampling_paddings_rule():
  features, paddings = _features(EXTRA, 0.0)
  _, out_paddings = conformer.ConvSubsampling(32).init_with_output(
      jax.random.key(0), features, paddings, train=False)[0]
  np.testing.assert_array_equal(out_paddings, paddings[:, ::4])
  # ceil(length / 4) valid frames.
  np.testing.assert_array_equal((1 - out_paddings).sum(1), [10, 7])


def test_batch_norm_statistics_over_valid_frames_only():
  rng = np.random.default_rng(2)
  x = rng.normal(2.0, 3.0, size=(3, 11, 6)).astype(np.float32)
  paddings = np.zeros((3, 11), np.float32)
  paddings[1, 7:] = 1.0
  paddings[2, 2:] = 1.0
  x[paddings > 0] = 100.0  # Would dominate the statistics if counted.
  norm = conformer.MaskedBatchNorm(momentum=0.9, epsilon=1e-3)
  variables = norm.init(jax.random.key(0), x, paddings, train=False)
  y, state = norm.apply(variables, x, paddings, train=True,
                        mutable=["batch_stats"])
  valid = x[paddings == 0]  # [N, D]
  mean, var = valid.mean(axis=0), valid.var(axis=0)
  np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * mean,
                             rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"], 0.9 + 0.1 * var,
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y)[paddings == 0],
                             (valid - mean) / np.sqrt(var + 1e-3), atol=1e-4)
  # Evaluation uses the running statistics.
  y_eval = norm.apply({"params": variables["params"], **state}, x, paddings,
                      train=False)
  expected = (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-3)
  np.testing.assert_allclose(y_eval, expected, rtol=1e-4, atol=1e-4)


def test_group_norm_statistics_over_valid_frames_only():
  rng = np.random.default_rng(3)
  x = rng.normal(1.0, 2.0, size=(2, 9, 8)).astype(np.float32)
  paddings = np.zeros((2, 9), np.float32)
  paddings[1, 4:] = 1.0
  x[paddings > 0] = -50.0
  norm = conformer.MaskedGroupNorm(num_groups=2, epsilon=1e-5)
  variables = norm.init(jax.random.key(0), x, paddings, train=False)
  y = np.asarray(norm.apply(variables, x, paddings, train=True))
  for b in range(2):
    for g in range(2):
      valid = x[b][paddings[b] == 0][:, 4 * g:4 * g + 4]
      expected = (valid - valid.mean()) / np.sqrt(valid.var() + 1e-5)
      np.testing.assert_allclose(y[b][paddings[b] == 0][:, 4 * g:4 * g + 4],
                                 expected, atol=1e-4)


def _audio_batch(extra_samples: int, extra_labels: int, vocab_size: int):
  rng = np.random.default_rng(4)
  samples, num_labels = 9600, 4
  audio = rng.uniform(-0.5, 0.5, (2, samples)).astype(np.float32)
  audio = np.pad(audio, ((0, 0), (0, extra_samples)))
  audio_paddings = np.zeros_like(audio)
  audio_paddings[0, samples:] = 1.0
  audio_paddings[1, 6100:] = 1.0
  audio[audio_paddings > 0] = 0.9  # Garbage in the padding.
  labels = np.zeros((2, num_labels + extra_labels), np.int32)
  labels[:, :num_labels] = rng.integers(1, vocab_size, (2, num_labels))
  labels[1, 3:] = 0
  label_paddings = (labels == 0).astype(np.float32)
  return {"audio": audio, "audio_paddings": audio_paddings, "labels": labels,
          "label_paddings": label_paddings}


@pytest.mark.parametrize("decoder", ["ctc", "rnnt"])
def test_model_padding_invariance_from_audio(decoder):
  config = models.get_model_config("tiny", decoder=decoder, num_blocks=1,
                                   conv_norm="group_norm", conv_norm_groups=4)
  model = models.build_model(config)
  short = _audio_batch(0, 0, config.vocab_size)
  long = _audio_batch(4 * 160 * 3 + 77, 2, config.vocab_size)
  variables = _random_variables(lambda rng: model.init(
      rng, short["audio"], short["audio_paddings"], short["labels"],
      short["label_paddings"], train=False))
  run = jax.jit(lambda batch: model.apply(
      variables, batch["audio"], batch["audio_paddings"], batch["labels"],
      batch["label_paddings"], train=False))
  short_out, long_out = run(short), run(long)
  short_pad = np.asarray(short_out["logit_paddings"])
  frames = short_pad.shape[1]
  assert long_out["logit_paddings"].shape[1] > frames
  np.testing.assert_array_equal(long_out["logit_paddings"][:, :frames],
                                short_pad)
  valid = short_pad == 0.0
  short_logits = np.asarray(short_out["logits"])
  long_logits = np.asarray(long_out["logits"])[:, :frames]
  if decoder == "rnnt":  # Also padded label positions appended.
    long_logits = long_logits[:, :, :short_logits.shape[2]]
  np.testing.assert_allclose(long_logits[valid], short_logits[valid],
                             atol=5e-5)
  # The loss (what per_example_loss computes from these outputs) too.
  loss_fn = models.ctc_loss if decoder == "ctc" else models.rnnt_loss
  loss = lambda batch, out: loss_fn(out["logits"], out["logit_paddings"],
                                    batch["labels"], batch["label_paddings"])
  np.testing.assert_allclose(loss(long, long_out), loss(short, short_out),
                             rtol=1e-5)
