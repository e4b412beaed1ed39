"""Tests of the corpus's acoustic augmentation (conformer_fl/data/augment.py)."""

import numpy as np
import pytest

from conformer_fl.data import augment

SR = 16000


def _tone(seconds=1.0, hz=440.0):
  t = np.arange(int(seconds * SR)) / SR
  return 0.5 * np.sin(2 * np.pi * hz * t)


def _band_power(x, lo, hi):
  spectrum = np.abs(np.fft.rfft(x)) ** 2
  freqs = np.fft.rfftfreq(x.size, 1 / SR)
  return spectrum[(freqs >= lo) & (freqs < hi)].sum()


def test_speed_perturbation_resamples_kaldi_style():
  tone = _tone()
  for factor in (0.9, 1.1):
    out = augment.speed_perturb(tone, factor)
    assert out.size == pytest.approx(SR / factor, abs=1)
    # Played faster: the tone's frequency is multiplied by the factor.
    spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
    assert np.argmax(spectrum) * SR / out.size == pytest.approx(440 * factor,
                                                                abs=2)
  assert augment.speed_perturb(tone, 1.0) is tone


def test_room_impulse_response_decays_60_db_in_rt60():
  rir = augment.room_impulse_response(np.random.default_rng(0), 0.5, 6.0)
  assert rir.size == SR // 2 and rir[0] == 1.0
  assert 10 * np.log10(1 / np.sum(rir[1:] ** 2)) == pytest.approx(6.0)
  early = np.mean(rir[1:801] ** 2)          # first 50 ms
  late = np.mean(rir[int(0.2 * SR):int(0.25 * SR)] ** 2)  # 200-250 ms
  # 60 dB per 0.5 s: the window 200 ms later is 24 dB lower.
  assert 10 * np.log10(early / late) == pytest.approx(24.0, abs=3.0)


def test_noise_colours_have_their_spectral_slopes():
  rng = np.random.default_rng(0)
  n = 4 * SR
  for kind, slope in (("white", 0.0), ("pink", -3.0), ("brown", -6.0)):
    noise = augment.colored_noise(rng, n, kind)
    assert np.mean(noise ** 2) == pytest.approx(1.0)
    # dB per octave between the 250-500 Hz and 1-2 kHz bands (2 octaves).
    low = _band_power(noise, 250, 500) / 250
    high = _band_power(noise, 1000, 2000) / 1000
    assert 10 * np.log10(high / low) / 2 == pytest.approx(slope, abs=1.0)


def test_noise_is_added_at_the_drawn_snr():
  tone = _tone()
  for kind in ("white", "babble"):
    effects = augment.Effects(speed=1.0, rt60_seconds=None,
                              direct_to_reverb_db=0.0, noise_kind=kind,
                              snr_db=10.0, channel=None, cutoff_hz=0.0, seed=3)
    babble = augment.babble_clip(
        [_tone(0.7, 200.0), _tone(0.4, 300.0)], np.random.default_rng(1))
    out = augment.apply(tone, effects, augment.Augmentation(), babble)
    noise = out - tone
    assert 10 * np.log10(np.mean(tone ** 2) / np.mean(noise ** 2)) == (
        pytest.approx(10.0, abs=0.3))
  with pytest.raises(ValueError, match="no babble clip"):
    augment.apply(tone, effects, augment.Augmentation(), None)


def test_channels_remove_high_frequencies():
  noise = augment.colored_noise(np.random.default_rng(0), SR, "white")
  settings = augment.Augmentation()
  for channel, cutoff in (("telephone", 3400.0), ("lowpass", 3000.0)):
    effects = augment.Effects(speed=1.0, rt60_seconds=None,
                              direct_to_reverb_db=0.0, noise_kind=None,
                              snr_db=0.0, channel=channel, cutoff_hz=3000.0,
                              seed=0)
    out = augment.apply(noise, effects, settings)
    assert out.size == noise.size
    inside = _band_power(out, 1000, 2500) / _band_power(noise, 1000, 2500)
    outside = _band_power(out, cutoff + 1000, 8000) / _band_power(
        noise, cutoff + 1000, 8000)
    assert inside > 0.5 and outside < 0.01


def test_draw_is_seeded_and_follows_the_probabilities():
  settings = augment.Augmentation()
  draws = [augment.draw(np.random.default_rng([0, i]), settings, True)
           for i in range(2000)]
  again = [augment.draw(np.random.default_rng([0, i]), settings, True)
           for i in range(2000)]
  assert draws == again
  share = lambda pred: np.mean([pred(d) for d in draws])
  assert share(lambda d: d.rt60_seconds is not None) == pytest.approx(0.3, abs=0.04)
  assert share(lambda d: d.noise_kind is not None) == pytest.approx(0.5, abs=0.04)
  assert share(lambda d: d.channel is not None) == pytest.approx(0.2, abs=0.04)
  assert {d.speed for d in draws} == {0.9, 1.0, 1.1}
  assert {d.noise_kind for d in draws} == {None, *augment.NOISE_KINDS}
  for d in draws:
    assert 10 <= d.snr_db <= 30 and 3000 <= d.cutoff_hz <= 6000
  no_babble = [augment.draw(np.random.default_rng(i), settings, False)
               for i in range(200)]
  assert "babble" not in {d.noise_kind for d in no_babble}
  clean = augment.draw(np.random.default_rng(0), augment.CLEAN, True)
  assert (clean.speed, clean.rt60_seconds, clean.noise_kind, clean.channel) == (
      1.0, None, None, None)
  with pytest.raises(ValueError, match="noise_kinds"):
    augment.Augmentation(noise_kinds=("violet",))
