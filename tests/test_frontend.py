"""Tests of conformer_fl.models.frontend: log-mel features and SpecAugment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from conformer_fl.models import frontend

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms.
FRAME_STEP = 160  # 10 ms.
FFT_LENGTH = 512
LOWER_HZ = 125.0
UPPER_HZ = 7600.0
NUM_MEL_BINS = 80

_log_mel = jax.jit(frontend.log_mel)


def reference_mel_matrix(num_mel_bins, fft_length, sample_rate, lower, upper):
  """HTK mel triangles written from the textbook formula, float64 [K, M]."""
  def to_mel(hz):
    return 2595.0 * np.log10(1.0 + hz / 700.0)  # == 1127 ln(1 + hz / 700).

  mel_lo, mel_hi = to_mel(lower), to_mel(upper)
  step = (mel_hi - mel_lo) / (num_mel_bins + 1)
  num_bins = fft_length // 2 + 1
  matrix = np.zeros((num_bins, num_mel_bins))
  for k in range(num_bins):
    mel_k = to_mel(k * sample_rate / fft_length)
    for m in range(num_mel_bins):
      left = mel_lo + m * step
      center = left + step
      right = center + step
      if left < mel_k <= center:
        matrix[k, m] = (mel_k - left) / step
      elif center < mel_k < right:
        matrix[k, m] = (right - mel_k) / step
  return matrix


def reference_log_mel(waveform, floor=1e-6):
  """Independent numpy log-mel of one unpadded waveform, float64 [T, M]."""
  count = 1 + (len(waveform) - FRAME_LENGTH) // FRAME_STEP
  window = signal.get_window("hann", FRAME_LENGTH)  # Periodic by default.
  frames = np.stack([
      waveform[i * FRAME_STEP:i * FRAME_STEP + FRAME_LENGTH]
      for i in range(count)
  ]).astype(np.float64)
  power = np.abs(np.fft.rfft(frames * window, n=FFT_LENGTH)) ** 2
  mel = power @ reference_mel_matrix(
      NUM_MEL_BINS, FFT_LENGTH, SAMPLE_RATE, LOWER_HZ, UPPER_HZ
  )
  return np.log(np.maximum(mel, floor))


@pytest.fixture(scope="module")
def noise_batch():
  """Two waveforms of 1600 samples; the second has 1000 valid samples."""
  rng = np.random.default_rng(0)
  waveform = (0.3 * rng.standard_normal((2, 1600))).astype(np.float32)
  paddings = np.zeros((2, 1600), np.float32)
  paddings[1, 1000:] = 1.0
  return waveform, paddings


def test_mel_filterbank_matches_textbook_formula():
  ours = frontend.mel_filterbank(
      NUM_MEL_BINS, FFT_LENGTH, SAMPLE_RATE, LOWER_HZ, UPPER_HZ
  )
  expected = reference_mel_matrix(
      NUM_MEL_BINS, FFT_LENGTH, SAMPLE_RATE, LOWER_HZ, UPPER_HZ
  )
  assert ours.shape == (FFT_LENGTH // 2 + 1, NUM_MEL_BINS)
  np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_log_mel_matches_numpy_reference(noise_batch):
  waveform, paddings = noise_batch
  features, _ = _log_mel(waveform, paddings)
  expected = reference_log_mel(waveform[0].astype(np.float64))
  assert features.shape == (2, 8, NUM_MEL_BINS)
  assert features.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(features[0]), expected, atol=1e-4)


def test_log_mel_tone_peaks_in_the_filter_centred_on_it():
  tone_hz = 1000.0
  t = np.arange(4000) / SAMPLE_RATE
  waveform = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)[None]
  features, _ = _log_mel(waveform, np.zeros_like(waveform))
  mel_edges = np.linspace(
      1127 * np.log1p(LOWER_HZ / 700), 1127 * np.log1p(UPPER_HZ / 700),
      NUM_MEL_BINS + 2,
  )
  nearest = np.argmin(np.abs(mel_edges[1:-1] - 1127 * np.log1p(tone_hz / 700)))
  peaks = np.argmax(np.asarray(features[0]), axis=-1)
  assert np.all(np.abs(peaks - nearest) <= 1)


def test_frame_count_and_padding_flags_by_hand():
  # T = 1 + (1600 - 400) // 160 = 8. Valid frames satisfy 160 t + 400 <= n:
  # n = 1600 -> 8, n = 1000 -> 4 (t <= 3.75), n = 400 -> 1, n = 399 -> 0.
  valid_samples = [1600, 1000, 400, 399]
  paddings = np.ones((4, 1600), np.float32)
  for row, n in enumerate(valid_samples):
    paddings[row, :n] = 0.0
  waveform = np.random.default_rng(1).uniform(-1, 1, (4, 1600))
  features, frame_paddings = _log_mel(waveform.astype(np.float32), paddings)
  expected = np.ones((4, 8), np.float32)
  for row, valid_frames in enumerate([8, 4, 1, 0]):
    expected[row, :valid_frames] = 0.0
  np.testing.assert_array_equal(np.asarray(frame_paddings), expected)
  assert frontend.num_frames(1600) == 8
  assert frontend.num_frames(399) == 0
  # Padded frames are zeroed; valid ones are not.
  padded = expected > 0
  assert np.all(np.asarray(features)[padded] == 0.0)
  assert np.all(np.asarray(features)[~padded] != 0.0)


def test_padding_with_garbage_does_not_change_valid_frames(noise_batch):
  waveform, _ = noise_batch
  short = waveform[:1, :1000]
  short_features, short_paddings = _log_mel(short, np.zeros_like(short))
  garbage = np.random.default_rng(2).uniform(-1, 1, (1, 600))
  long = np.concatenate([short, garbage.astype(np.float32)], axis=1)
  long_paddings = np.concatenate(
      [np.zeros((1, 1000)), np.ones((1, 600))], axis=1
  ).astype(np.float32)
  long_features, long_frame_paddings = _log_mel(long, long_paddings)
  num_valid = short_features.shape[1]
  assert num_valid == 4
  np.testing.assert_array_equal(np.asarray(short_paddings), 0.0)
  np.testing.assert_array_equal(
      np.asarray(long_frame_paddings[0]), [0] * 4 + [1] * 4
  )
  np.testing.assert_allclose(
      np.asarray(long_features[:, :num_valid]),
      np.asarray(short_features),
      atol=1e-5,
  )
  np.testing.assert_array_equal(np.asarray(long_features[:, num_valid:]), 0.0)


def test_log_floor_applies_to_silence():
  silence = np.zeros((1, 800), np.float32)
  features, _ = _log_mel(silence, np.zeros_like(silence))
  np.testing.assert_allclose(np.asarray(features), np.log(1e-6), rtol=1e-6)


def test_log_mel_rejects_waveform_shorter_than_a_frame():
  with pytest.raises(ValueError, match="shorter than one frame"):
    frontend.log_mel(np.zeros((1, 399), np.float32), np.zeros((1, 399)))
  with pytest.raises(ValueError, match="paddings"):
    frontend.log_mel(np.zeros((1, 800), np.float32), np.zeros((1, 799)))


# ------------------------------------------------------------------ SpecAugment

NUM_TIME = 120
NUM_FREQ = 40
LENGTHS = np.array([120, 100, 37, 0])


@pytest.fixture(scope="module")
def spec_batch():
  rng = np.random.default_rng(3)
  features = (5.0 + rng.standard_normal((4, NUM_TIME, NUM_FREQ))).astype(
      np.float32
  )  # Never 0 by chance, so 0 marks a masked cell.
  paddings = (np.arange(NUM_TIME)[None, :] >= LENGTHS[:, None]).astype(
      np.float32
  )
  return features, paddings


def _augment_many(features, paddings, num_draws, **kwargs):
  """SpecAugment under `num_draws` keys: [num_draws, B, T, F]."""
  keys = jax.random.split(jax.random.key(7), num_draws)
  fn = jax.jit(
      jax.vmap(lambda k: frontend.spec_augment(k, features, paddings, **kwargs))
  )
  return np.asarray(fn(keys))


def _runs(mask_1d):
  """(start, length) of every run of True in a 1-D bool array."""
  padded = np.concatenate([[False], mask_1d, [False]]).astype(int)
  diff = np.diff(padded)
  starts = np.flatnonzero(diff == 1)
  ends = np.flatnonzero(diff == -1)
  return list(zip(starts, ends - starts))


def test_spec_augment_leaves_padded_frames_unchanged(spec_batch):
  features, paddings = spec_batch
  out = _augment_many(features, paddings, 16, max_time_mask_ratio=0.2)
  padded = paddings > 0
  for draw in out:
    np.testing.assert_array_equal(draw[padded], features[padded])
  # Unmasked cells are untouched; masked ones are exactly 0.
  changed = out != features[None]
  assert np.all(out[changed] == 0.0)


def test_single_time_mask_width_bounded_by_ratio_of_true_length(spec_batch):
  features, paddings = spec_batch
  ratio = 0.2
  out = _augment_many(
      features, paddings, 200, num_freq_masks=0, num_time_masks=1,
      max_time_mask_ratio=ratio,
  )
  masked_frames = np.all(out == 0.0, axis=-1)  # [draws, B, T]
  for b, length in enumerate(LENGTHS):
    bound = int(np.floor(ratio * length))
    widths = []
    for draw in masked_frames[:, b]:
      runs = _runs(draw)
      assert len(runs) <= 1
      for start, width in runs:
        assert start + width <= length  # Inside the valid frames.
        widths.append(width)
    if length == 0:
      assert not widths
      continue
    assert max(widths) == bound  # Bound reached over 200 draws, never passed.


def test_single_freq_mask_spans_valid_time_and_is_bounded(spec_batch):
  features, paddings = spec_batch
  out = _augment_many(
      features, paddings, 200, num_freq_masks=1, num_time_masks=0,
      max_freq_mask=9,
  )
  widths = []
  for draw in out:
    for b, length in enumerate(LENGTHS[:3]):
      zeros = draw[b, :length] == 0.0  # [length, F]
      masked_bins = zeros[0]
      # The same bins are masked in every valid frame of the utterance.
      np.testing.assert_array_equal(
          zeros, np.broadcast_to(masked_bins, zeros.shape)
      )
      runs = _runs(masked_bins)
      assert len(runs) <= 1
      widths += [width for _, width in runs]
  assert max(widths) == 9


def test_masked_fraction_within_policy_bounds(spec_batch):
  features, paddings = spec_batch
  out = _augment_many(features, paddings, 32)  # Default policy.
  default_freq_mask = round(27 * NUM_FREQ / 80)  # 14 for 40 bins.
  for b, length in enumerate(LENGTHS[:3]):
    valid = out[:, b, :length]
    time_fraction = np.mean(np.all(valid == 0.0, axis=-1), axis=-1)
    freq_fraction = np.mean(np.all(valid == 0.0, axis=-2), axis=-1)
    assert np.all(time_fraction <= 10 * np.floor(0.05 * length) / length)
    assert np.all(freq_fraction <= 2 * default_freq_mask / NUM_FREQ)
    assert np.mean(valid == 0.0) > 0.05  # Something is masked on average.


def test_spec_augment_depends_only_on_rng(spec_batch):
  features, paddings = spec_batch
  augment = jax.jit(frontend.spec_augment)
  first = augment(jax.random.key(0), features, paddings)
  again = augment(jax.random.key(0), features, paddings)
  other = augment(jax.random.key(1), features, paddings)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  assert np.any(np.asarray(first) != np.asarray(other))
