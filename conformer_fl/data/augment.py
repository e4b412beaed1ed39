"""Acoustic variety of the synthetic corpus, applied to each utterance as it is built.

The effects of ASR training recipes, each drawn per utterance from a seeded
generator (so the same seed gives the same audio), in this order:

1. Speed perturbation, Kaldi style: the waveform is resampled as if played
   `factor` times faster (tempo and pitch change together; 1.1 shortens an
   utterance by 1/1.1), the factor drawn from `speed_factors`.
2. Reverberation, with probability `reverb_prob`: convolution with a synthetic
   room impulse response, a direct-path impulse followed by Gaussian noise that
   decays by 60 dB over RT60 seconds (uniform in `rt60_seconds`), at a
   direct-to-reverberant energy ratio uniform in `direct_to_reverb_db`; the
   result keeps the utterance's length.
3. Additive noise, with probability `noise_prob`, of a kind drawn from
   `noise_kinds` at an SNR (to the utterance's mean power) uniform in
   `noise_snr_db`: 'white', 'pink' (power 1/f), 'brown' (power 1/f^2), or
   'babble', a stretch of a mixture of other speakers of the same split
   (`babble_clip`; a speaker with no babble of others gets another kind).
4. A channel, with probability `channel_prob`, either (even odds) a
   telephone line (band-pass `telephone_band_hz`, 8 kHz sampling, 8-bit
   mu-law) or a low-pass filter at a cutoff uniform in `lowpass_hz`.

The level is set afterwards (`tts_engines.to_int16`, the speaker's peak level).
"""

import dataclasses
import fractions
import math
from collections.abc import Sequence

import numpy as np
from scipy import signal

from conformer_fl.data import tts_engines

SAMPLE_RATE = tts_engines.SAMPLE_RATE
NOISE_KINDS = ("white", "pink", "brown", "babble")


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The ranges the per-utterance effects are drawn from (module docstring).

  Attributes:
    speed_factors: speed perturbation factors, one drawn per utterance.
    reverb_prob: share of utterances reverberated.
    rt60_seconds: (min, max) reverberation time of the synthetic rooms.
    direct_to_reverb_db: (min, max) direct-to-reverberant energy ratio.
    noise_prob: share of utterances with additive noise.
    noise_kinds: kinds drawn from (a subset of NOISE_KINDS).
    noise_snr_db: (min, max) signal-to-noise ratio in dB.
    babble_talkers: speakers mixed into one babble clip.
    channel_prob: share of utterances passed through a channel.
    telephone_band_hz: (low, high) pass band of the telephone channel.
    lowpass_hz: (min, max) cutoff of the low-pass channel.
  """

  speed_factors: tuple[float, ...] = (0.9, 1.0, 1.1)
  reverb_prob: float = 0.3
  rt60_seconds: tuple[float, float] = (0.2, 0.7)
  direct_to_reverb_db: tuple[float, float] = (3.0, 15.0)
  noise_prob: float = 0.5
  noise_kinds: tuple[str, ...] = NOISE_KINDS
  noise_snr_db: tuple[float, float] = (10.0, 30.0)
  babble_talkers: int = 4
  channel_prob: float = 0.2
  telephone_band_hz: tuple[float, float] = (300.0, 3400.0)
  lowpass_hz: tuple[float, float] = (3000.0, 6000.0)

  def __post_init__(self):
    unknown = set(self.noise_kinds) - set(NOISE_KINDS)
    if unknown:
      raise ValueError(f"Augmentation.noise_kinds has {sorted(unknown)}; expected"
                       f" a subset of {NOISE_KINDS}.")
    if not self.speed_factors or min(self.speed_factors) <= 0:
      raise ValueError("Augmentation.speed_factors must be positive factors,"
                       f" got {self.speed_factors}; use (1.0,) for none.")

  @property
  def uses_babble(self) -> bool:
    return self.noise_prob > 0 and "babble" in self.noise_kinds


# No effect at all: the clean synthesized utterance.
CLEAN = Augmentation(speed_factors=(1.0,), reverb_prob=0.0, noise_prob=0.0,
                     channel_prob=0.0)


@dataclasses.dataclass(frozen=True)
class Effects:
  """What was drawn for one utterance (None: the effect is not applied)."""

  speed: float
  rt60_seconds: float | None
  direct_to_reverb_db: float
  noise_kind: str | None
  snr_db: float
  channel: str | None  # 'telephone' | 'lowpass'
  cutoff_hz: float
  seed: int


def draw(rng: np.random.Generator, settings: Augmentation,
         babble_available: bool) -> Effects:
  """Draws one utterance's effects; always the same number of draws from `rng`."""
  u = rng.random(10)
  seed = int(rng.integers(2**31))
  kinds = [k for k in settings.noise_kinds if k != "babble" or babble_available]
  speed = settings.speed_factors[int(u[0] * len(settings.speed_factors))]
  reverb = u[1] < settings.reverb_prob
  noisy = u[3] < settings.noise_prob and bool(kinds)
  channel = None
  if u[5] < settings.channel_prob:
    channel = "telephone" if u[6] < 0.5 else "lowpass"
  lerp = lambda r, t: r[0] + (r[1] - r[0]) * t
  return Effects(
      speed=speed,
      rt60_seconds=lerp(settings.rt60_seconds, u[2]) if reverb else None,
      direct_to_reverb_db=lerp(settings.direct_to_reverb_db, u[8]),
      noise_kind=kinds[int(u[4] * len(kinds))] if noisy else None,
      snr_db=lerp(settings.noise_snr_db, u[7]),
      channel=channel,
      cutoff_hz=lerp(settings.lowpass_hz, u[9]),
      seed=seed)


def speed_perturb(audio: np.ndarray, factor: float) -> np.ndarray:
  """Plays float audio [N] `factor` times faster by resampling: [~N / factor]."""
  if factor == 1.0:
    return audio
  ratio = fractions.Fraction(1.0 / factor).limit_denominator(100)
  return signal.resample_poly(audio, ratio.numerator, ratio.denominator)


def room_impulse_response(rng: np.random.Generator, rt60_seconds: float,
                          direct_to_reverb_db: float) -> np.ndarray:
  """A synthetic RIR [L]: 1 at t=0, then noise decaying 60 dB in RT60 seconds."""
  length = max(2, int(rt60_seconds * SAMPLE_RATE))
  t = np.arange(1, length) / SAMPLE_RATE
  tail = rng.standard_normal(length - 1) * np.exp(-3.0 * math.log(10.0) * t
                                                  / rt60_seconds)
  tail *= math.sqrt(10.0 ** (-direct_to_reverb_db / 10.0) / np.sum(tail**2))
  return np.concatenate([[1.0], tail])


def colored_noise(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
  """Unit-power noise [n]: 'white', 'pink' (power ~ 1/f) or 'brown' (~ 1/f^2)."""
  white = rng.standard_normal(n)
  if kind != "white":
    exponent = {"pink": 0.5, "brown": 1.0}[kind]
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    freqs[0] = freqs[1] if n > 1 else 1.0
    white = np.fft.irfft(np.fft.rfft(white) / freqs**exponent, n)
  return white / math.sqrt(max(np.mean(white**2), 1e-20))


def babble_clip(utterances: Sequence[np.ndarray], rng: np.random.Generator
                ) -> np.ndarray:
  """Mixes talkers' float utterances at equal power, each looped and shifted.

  Returns:
    float [N] of unit power, N the longest utterance's length.
  """
  length = max(u.size for u in utterances)
  mix = np.zeros(length)
  for u in utterances:
    looped = np.resize(u / math.sqrt(max(np.mean(u**2), 1e-20)), length)
    mix += np.roll(looped, int(rng.integers(length)))
  return mix / math.sqrt(max(np.mean(mix**2), 1e-20))


def telephone(audio: np.ndarray, band_hz: tuple[float, float]) -> np.ndarray:
  """Band-pass, 8 kHz sampling and 8-bit mu-law of float audio [N]; [N]."""
  sos = signal.butter(4, band_hz, btype="bandpass", fs=SAMPLE_RATE, output="sos")
  narrow = signal.resample_poly(signal.sosfilt(sos, audio), 1, 2)
  scale = max(float(np.max(np.abs(narrow))), 1e-12) / 0.9
  mu = 255.0
  x = narrow / scale
  coded = np.round(np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu) * 127)
  decoded = np.sign(coded) * np.expm1(np.abs(coded) / 127 * math.log1p(mu)) / mu
  return signal.resample_poly(decoded * scale, 2, 1)[:audio.size]


def apply(audio: np.ndarray, effects: Effects, settings: Augmentation,
          babble: np.ndarray | None = None) -> np.ndarray:
  """Applies drawn `effects` to clean float audio [N]; float [M] (M = N / speed).

  Args:
    audio: the clean utterance.
    effects: from `draw`.
    settings: the ranges (for the telephone band).
    babble: a babble clip (`babble_clip`), needed when effects.noise_kind is
      'babble'.
  """
  rng = np.random.default_rng(effects.seed)
  audio = speed_perturb(audio, effects.speed)
  n = audio.size
  if effects.rt60_seconds is not None:
    rir = room_impulse_response(rng, effects.rt60_seconds,
                                effects.direct_to_reverb_db)
    audio = signal.fftconvolve(audio, rir)[:n]
  if effects.noise_kind is not None:
    if effects.noise_kind == "babble":
      if babble is None:
        raise ValueError("Babble noise was drawn but no babble clip was given.")
      start = int(rng.integers(babble.size))
      noise = np.resize(np.roll(babble, -start), n)
    else:
      noise = colored_noise(rng, n, effects.noise_kind)
    power = float(np.mean(audio**2)) if n else 0.0
    audio = audio + noise * math.sqrt(power / 10.0 ** (effects.snr_db / 10.0))
  if effects.channel == "telephone":
    audio = telephone(audio, settings.telephone_band_hz)
  elif effects.channel == "lowpass":
    sos = signal.butter(8, effects.cutoff_hz, btype="lowpass", fs=SAMPLE_RATE,
                        output="sos")
    audio = signal.sosfilt(sos, audio)
  return audio
