"""Audio front end: log-mel features and SpecAugment, as pure jnp functions.

Both functions take and return paddings (float32, 1.0 = padded, right-padded).

Log-mel choices (all keyword arguments of `log_mel`, so a model config can set
them):
  * Frames of `frame_length_ms` (25 ms = 400 samples at 16 kHz) every
    `frame_step_ms` (10 ms = 160 samples), no centre padding, so a waveform of S
    samples gives T = 1 + (S - frame_length) // frame_step frames, and frame t
    covers samples [t * frame_step, t * frame_step + frame_length).
  * A frame is valid only if it lies fully inside the valid samples: frame t of
    an utterance with n valid samples is valid iff
    t * frame_step + frame_length <= n.
    Padded feature frames are set to 0.0 so padding can never leak downstream.
  * Periodic Hann window, zero-padded to `fft_length` (default: the next power
    of two >= frame_length, 512 at 16 kHz), power spectrum |X|^2 (`power=2.0`;
    `power=1.0` gives the magnitude spectrum). No pre-emphasis, no dither.
  * HTK mel scale, mel(f) = 1127 * ln(1 + f / 700). `num_mel_bins` triangular
    filters whose edges are equally spaced in mel between `lower_hz` (125 Hz)
    and `upper_hz` (7600 Hz), the usual choice of Lingvo/Praxis ASR front
    ends; each triangle is linear in mel, peak weight 1 (no area
    normalization).
  * log(max(mel_energy, `log_floor`)) with log_floor = 1e-6 (audio in [-1, 1]),
    so digital silence maps to log(1e-6) ~= -13.8.

SpecAugment (Park et al. 2019, LibriSpeech policy as used by Conformer):
`num_freq_masks` = 2 frequency masks of width up to `max_freq_mask` (27 for 80
bins, scaled with the number of bins) and `num_time_masks` = 10 time masks of
width up to `max_time_mask_ratio` (0.05) times each utterance's true length.
Masked values are set to `mask_value` (0.0). No time warping.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PRNGKey = jax.Array

# SpecAugment frequency-mask width for 80 mel bins (Park et al. 2019); scaled
# proportionally for other numbers of bins.
_FREQ_MASK_FOR_80_BINS = 27


def hertz_to_mel(frequencies_hz: np.ndarray) -> np.ndarray:
  """HTK mel scale: 1127 * ln(1 + f / 700)."""
  return 1127.0 * np.log1p(np.asarray(frequencies_hz, np.float64) / 700.0)


@functools.lru_cache(maxsize=16)
def mel_filterbank(
    num_mel_bins: int,
    fft_length: int,
    sample_rate: int,
    lower_hz: float,
    upper_hz: float,
) -> np.ndarray:
  """Triangular mel filters, float32 [fft_length // 2 + 1, num_mel_bins].

  Filter m rises linearly in mel from edge m to edge m + 1 and falls back to
  zero at edge m + 2, where the num_mel_bins + 2 edges are equally spaced in mel
  between `lower_hz` and `upper_hz`. Returned read-only (it is cached).
  """
  if not 0.0 <= lower_hz < upper_hz <= sample_rate / 2:
    raise ValueError(
        "Mel band edges must satisfy 0 <= lower_hz < upper_hz <="
        f" sample_rate / 2; got lower_hz={lower_hz}, upper_hz={upper_hz},"
        f" sample_rate={sample_rate}."
    )
  num_bins = fft_length // 2 + 1
  bin_mel = hertz_to_mel(np.arange(num_bins) * sample_rate / fft_length)
  edges = np.linspace(
      hertz_to_mel(lower_hz), hertz_to_mel(upper_hz), num_mel_bins + 2
  )
  left, center, right = edges[:-2], edges[1:-1], edges[2:]
  rising = (bin_mel[:, None] - left) / (center - left)
  falling = (right - bin_mel[:, None]) / (right - center)
  weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
  weights.setflags(write=False)
  return weights


def periodic_hann_window(length: int) -> np.ndarray:
  """Periodic Hann window, float32 [length]: 0.5 - 0.5 cos(2 pi n / length)."""
  n = np.arange(length, dtype=np.float64)
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)).astype(np.float32)


def frame_sizes(
    sample_rate: int, frame_length_ms: float, frame_step_ms: float
) -> tuple[int, int]:
  """(frame_length, frame_step) in samples, rounded to the nearest sample."""
  frame_length = int(round(sample_rate * frame_length_ms / 1000.0))
  frame_step = int(round(sample_rate * frame_step_ms / 1000.0))
  if frame_length <= 0 or frame_step <= 0:
    raise ValueError(
        f"Frame length ({frame_length}) and step ({frame_step}) in samples must"
        " be positive."
    )
  return frame_length, frame_step


def num_frames(
    num_samples: int,
    *,
    sample_rate: int = 16000,
    frame_length_ms: float = 25.0,
    frame_step_ms: float = 10.0,
) -> int:
  """Frames `log_mel` returns for S samples: 1 + (S - L) // H, or 0 if S < L."""
  frame_length, frame_step = frame_sizes(
      sample_rate, frame_length_ms, frame_step_ms
  )
  if num_samples < frame_length:
    return 0
  return 1 + (num_samples - frame_length) // frame_step


def log_mel(
    waveform: Array,
    paddings: Array,
    *,
    sample_rate: int = 16000,
    num_mel_bins: int = 80,
    frame_length_ms: float = 25.0,
    frame_step_ms: float = 10.0,
    fft_length: int | None = None,
    lower_hz: float = 125.0,
    upper_hz: float = 7600.0,
    power: float = 2.0,
    log_floor: float = 1e-6,
) -> tuple[Array, Array]:
  """Log-mel filterbank features of a padded batch of waveforms.

  See the module docstring for every choice made here.

  Args:
    waveform: float [B, S] audio in [-1, 1].
    paddings: float [B, S], 1.0 at padded samples (right-padded).
    sample_rate: samples per second of `waveform`.
    num_mel_bins: number of mel filters F.
    frame_length_ms: analysis window length in milliseconds.
    frame_step_ms: hop between frames in milliseconds.
    fft_length: DFT size; None means the next power of two >= frame length.
    lower_hz: lower edge of the lowest mel filter.
    upper_hz: upper edge of the highest mel filter.
    power: exponent of the spectrum magnitude (2.0 = power, 1.0 = magnitude).
    log_floor: energies below this are clamped before the log.

  Returns:
    (features float32 [B, T, F], frame paddings float32 [B, T]) with
    T = 1 + (S - frame_length) // frame_step; padded frames are all zeros.

  Raises:
    ValueError: on bad shapes or a waveform shorter than one frame.
  """
  if waveform.ndim != 2 or paddings.shape != waveform.shape:
    raise ValueError(
        "log_mel expects waveform [B, S] and paddings of the same shape; got"
        f" waveform {waveform.shape} and paddings {paddings.shape}."
    )
  frame_length, frame_step = frame_sizes(
      sample_rate, frame_length_ms, frame_step_ms
  )
  if fft_length is None:
    fft_length = 1 << (frame_length - 1).bit_length()
  if fft_length < frame_length:
    raise ValueError(
        f"fft_length={fft_length} is shorter than the frame ({frame_length}"
        " samples)."
    )
  num_samples = waveform.shape[1]
  if num_samples < frame_length:
    raise ValueError(
        f"Waveforms of {num_samples} samples are shorter than one frame of"
        f" {frame_length} samples."
    )
  num_out = 1 + (num_samples - frame_length) // frame_step

  # [T, L] sample index of every frame position.
  frame_starts = np.arange(num_out) * frame_step
  sample_index = frame_starts[:, None] + np.arange(frame_length)[None, :]
  frames = jnp.asarray(waveform, jnp.float32)[:, sample_index]  # [B, T, L]
  frames = frames * periodic_hann_window(frame_length)
  dft = jnp.fft.rfft(frames, n=fft_length, axis=-1)  # [B, T, K] complex.
  if power == 2.0:
    spectrum = jnp.real(dft) ** 2 + jnp.imag(dft) ** 2  # No sqrt then square.
  else:
    spectrum = jnp.abs(dft) ** power
  filters = mel_filterbank(
      num_mel_bins, fft_length, sample_rate, float(lower_hz), float(upper_hz)
  )
  mel_energy = jnp.einsum(
      "btk,km->btm", spectrum, filters, precision=jax.lax.Precision.HIGHEST
  )
  features = jnp.log(jnp.maximum(mel_energy, log_floor))

  valid_samples = jnp.sum(1.0 - jnp.asarray(paddings, jnp.float32), axis=-1)
  frame_ends = jnp.asarray(frame_starts + frame_length, jnp.float32)
  frame_paddings = (frame_ends[None, :] > valid_samples[:, None]).astype(
      jnp.float32
  )  # [B, T]
  features = jnp.where(frame_paddings[..., None] > 0, 0.0, features)
  return features, frame_paddings


def _uniform_int(
    rng: PRNGKey, shape: tuple[int, ...], maxval_inclusive: Array
) -> Array:
  """Integers uniform in [0, maxval_inclusive] (broadcast against `shape`)."""
  u = jax.random.uniform(rng, shape)
  value = jnp.floor(u * (maxval_inclusive + 1.0))
  return jnp.minimum(value, maxval_inclusive)  # guards u == 1 - eps rounding.


def _band_mask(
    starts: Array, widths: Array, size: int
) -> Array:
  """True inside any band [start, start + width): [..., N] -> [..., size]."""
  positions = jnp.arange(size, dtype=jnp.float32)
  inside = (positions >= starts[..., None]) & (
      positions < (starts + widths)[..., None]
  )
  return jnp.any(inside, axis=-2)


def spec_augment(
    rng: PRNGKey,
    features: Array,
    paddings: Array,
    *,
    num_freq_masks: int = 2,
    max_freq_mask: int | None = None,
    num_time_masks: int = 10,
    max_time_mask_ratio: float = 0.05,
    mask_value: float = 0.0,
) -> Array:
  """SpecAugment frequency and time masking of a padded batch.

  Each utterance draws its own masks. A frequency mask has width w ~ U{0..W}
  (W = `max_freq_mask`) and start ~ U{0..F-w}. A time mask has width
  w ~ U{0..floor(max_time_mask_ratio * n)} and start ~ U{0..n-w}, where n is the
  utterance's number of valid frames, so time masks always lie inside the valid
  frames. Masks may overlap. Padded frames are returned exactly as given.

  Args:
    rng: PRNG key; the only source of randomness (same key, same masks).
    features: float [B, T, F].
    paddings: float [B, T], 1.0 at padded frames (right-padded).
    num_freq_masks: frequency masks per utterance.
    max_freq_mask: widest frequency mask in bins; None means
      round(27 * F / 80) (27 for 80 bins). Clipped to F.
    num_time_masks: time masks per utterance.
    max_time_mask_ratio: widest time mask as a fraction of the true length.
    mask_value: value written into masked cells.

  Returns:
    float [B, T, F], the masked features (same dtype as `features`).
  """
  if features.ndim != 3 or paddings.shape != features.shape[:2]:
    raise ValueError(
        "spec_augment expects features [B, T, F] and paddings [B, T]; got"
        f" features {features.shape} and paddings {paddings.shape}."
    )
  if num_freq_masks < 0 or num_time_masks < 0:
    raise ValueError("Numbers of masks must be non-negative.")
  if not 0.0 <= max_time_mask_ratio <= 1.0:
    raise ValueError(
        f"max_time_mask_ratio must lie in [0, 1]; got {max_time_mask_ratio}."
    )
  batch_size, num_time, num_freq = features.shape
  if max_freq_mask is None:
    max_freq_mask = int(round(_FREQ_MASK_FOR_80_BINS * num_freq / 80))
  max_freq_mask = min(max(int(max_freq_mask), 0), num_freq)

  freq_width_rng, freq_start_rng, time_width_rng, time_start_rng = (
      jax.random.split(rng, 4)
  )
  # Frequency masks: [B, num_freq_masks].
  freq_shape = (batch_size, num_freq_masks)
  freq_widths = _uniform_int(
      freq_width_rng, freq_shape, jnp.float32(max_freq_mask)
  )
  freq_starts = _uniform_int(freq_start_rng, freq_shape, num_freq - freq_widths)
  freq_mask = _band_mask(freq_starts, freq_widths, num_freq)  # [B, F]

  # Time masks: [B, num_time_masks], within each utterance's valid frames.
  valid = 1.0 - jnp.asarray(paddings, jnp.float32)
  lengths = jnp.sum(valid, axis=-1, keepdims=True)  # [B, 1]
  max_time_widths = jnp.floor(max_time_mask_ratio * lengths)
  time_shape = (batch_size, num_time_masks)
  time_widths = _uniform_int(time_width_rng, time_shape, max_time_widths)
  time_starts = _uniform_int(time_start_rng, time_shape, lengths - time_widths)
  time_mask = _band_mask(time_starts, time_widths, num_time)  # [B, T]

  masked = freq_mask[:, None, :] | time_mask[:, :, None]  # [B, T, F]
  masked = masked & (valid[:, :, None] > 0)
  return jnp.where(masked, jnp.asarray(mask_value, features.dtype), features)
