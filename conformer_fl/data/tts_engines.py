"""eSpeak NG and Flite as speech synthesizers: text in, 16 kHz int16 audio out.

A `Speaker` is one (engine, voice, accent, rate, pitch) combination with a stable
string id:

  espeak/<accent>+<variant>/s<words per minute>/p<pitch 0..99>
      e.g. 'espeak/en-us+m3/s160/p45'  (`espeak-ng -v en-us+m3 -s 160 -p 45`)
  flite/<voice>/d<duration stretch>[/f<mean pitch Hz>]
      e.g. 'flite/slt/d1.05/f160'      (`flite -voice slt --setf duration_stretch=1.05
                                        --setf int_f0_target_mean=160`)

The engine of a speaker is the first component of its id (`engine_of`), so
every example of the corpus carries its engine in its 'speaker_id'.

Both programs are deterministic: the same text and settings give the same bytes
(checked on eSpeak NG 1.51 and Flite 2.2; `tests/test_synthetic_speech.py` checks the
corpus bytes end to end). eSpeak NG writes 22050 Hz, Flite 8 kHz (kal) or 16 kHz;
everything is resampled to 16 kHz with a polyphase filter (scipy), which is
deterministic too. `synthesize` returns the clean utterance (float);
`to_int16` scales it to a speaker's level (the corpus applies its acoustic
augmentation in between: `conformer_fl/data/augment.py`).
"""

import dataclasses
import io
import math
import os
import shutil
import subprocess
import tempfile

import numpy as np
from scipy import signal
import soundfile

SAMPLE_RATE = 16000
ENGINES = ("espeak", "flite")

# Debian package -> what it provides that the corpus needs.
REQUIRED_DEBIAN_PACKAGES = {
    "espeak-ng": "the `espeak-ng` program",
    "flite": "the `flite` program",
    "fortunes-min": "the text files in /usr/share/games/fortunes",
    "fortunes": "more text files in /usr/share/games/fortunes",
    "bible-kjv": "the `bible` program and the King James Bible text",
}
INSTALL_COMMAND = ("sudo apt-get install espeak-ng flite fortunes-min fortunes"
                   " bible-kjv")


class MissingSystemPackagesError(RuntimeError):
  """The Debian packages that synthesize the corpus are not installed."""


def missing_system_packages(
    fortune_dir: str = "/usr/share/games/fortunes") -> list[str]:
  """The Debian packages of REQUIRED_DEBIAN_PACKAGES that are not installed."""
  missing = []
  if shutil.which("espeak-ng") is None:
    missing.append("espeak-ng")
  if shutil.which("flite") is None:
    missing.append("flite")
  if not os.path.isfile(os.path.join(fortune_dir, "fortunes")):
    missing.append("fortunes-min")
  # 'wisdom' is one of the files that `fortunes` adds to `fortunes-min`.
  if not os.path.isfile(os.path.join(fortune_dir, "wisdom")):
    missing.append("fortunes")
  if shutil.which("bible") is None:
    missing.append("bible-kjv")
  return missing


def check_system_packages(fortune_dir: str = "/usr/share/games/fortunes") -> None:
  """Raises MissingSystemPackagesError naming every missing Debian package."""
  missing = missing_system_packages(fortune_dir)
  if missing:
    details = "; ".join(f"{p} ({REQUIRED_DEBIAN_PACKAGES[p]})" for p in missing)
    raise MissingSystemPackagesError(
        "The synthetic speech corpus needs Debian packages that are not installed:"
        f" {details}. Install them with:\n  {INSTALL_COMMAND}\n(or run `make test`"
        " / `make demo`, which install them)."
    )


@dataclasses.dataclass(frozen=True)
class Speaker:
  """One synthetic speaker (a federated client).

  Attributes:
    engine: 'espeak' or 'flite'.
    voice: eSpeak NG variant ('m3', 'f2', 'klatt') or Flite voice ('slt', 'kal16').
    accent: eSpeak NG language voice ('en-us', 'en-gb-scotland'); '' for Flite.
    rate: eSpeak NG words per minute (-s); 0 for Flite.
    pitch: eSpeak NG pitch 0..99 (-p); 0 for Flite.
    duration_stretch: Flite duration stretch (> 1 is slower); 1.0 for eSpeak NG.
    f0: Flite mean pitch in Hz (int_f0_target_mean); 0 keeps the voice's own
      (and always for eSpeak NG and for Flite's rms, which ignores it).
    peak_dbfs: every utterance of this speaker is scaled to this peak level
      (dB relative to int16 full scale) before noise is added.
  """

  engine: str
  voice: str
  accent: str = ""
  rate: int = 0
  pitch: int = 0
  duration_stretch: float = 1.0
  f0: int = 0
  peak_dbfs: float = -3.0

  @property
  def speaker_id(self) -> str:
    if self.engine == "espeak":
      return f"espeak/{self.accent}+{self.voice}/s{self.rate}/p{self.pitch}"
    pitch = f"/f{self.f0}" if self.f0 else ""
    return f"flite/{self.voice}/d{self.duration_stretch:.2f}{pitch}"

  @property
  def timbre(self) -> str:
    """The voice identity behind the speaker, shared across rate/pitch/accent.

    eSpeak NG variants set the formants (the timbre) whatever the accent; Flite's
    kal and kal16 are the same recorded speaker.
    """
    if self.engine == "espeak":
      return f"espeak/{self.voice}"
    return "flite/" + ("kal" if self.voice.startswith("kal") else self.voice)


def engine_of(speaker_id: str) -> str:
  """The engine of a corpus speaker id ('espeak/en-us+m3/...' -> 'espeak').

  '' for a speaker id of another corpus (no known engine before the first '/').
  """
  engine = speaker_id.split("/", 1)[0]
  return engine if engine in ENGINES else ""


def timbre_of(speaker_id: str) -> str:
  """`Speaker.timbre` of a speaker id ('espeak/en-us+m3/s160/p45' -> 'espeak/m3').

  '' for a speaker id of another corpus.
  """
  engine = engine_of(speaker_id)
  if not engine:
    return ""
  voice = speaker_id.split("/")[1]
  if engine == "espeak":
    return "espeak/" + voice.split("+", 1)[1]
  return "flite/" + ("kal" if voice.startswith("kal") else voice)


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
  """Decodes mono 16-bit PCM WAV bytes to (int16 samples [N], sample rate).

  eSpeak NG's --stdout header has a placeholder length: libsndfile reads the
  samples that are there.
  """
  info = soundfile.info(io.BytesIO(data))
  if info.subtype != "PCM_16" or info.channels != 1:
    raise ValueError(
        "Expected mono 16-bit WAV from the synthesizer, got"
        f" {info.channels} channels of {info.subtype_info}.")
  samples, rate = soundfile.read(io.BytesIO(data), dtype="int16")
  return samples, rate


def resample_to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
  """Resamples float or int audio [N] from `rate` Hz to 16 kHz; float64 [M]."""
  audio = np.asarray(audio, dtype=np.float64)
  if rate == SAMPLE_RATE:
    return audio
  g = math.gcd(SAMPLE_RATE, rate)
  return signal.resample_poly(audio, SAMPLE_RATE // g, rate // g)


def _run(cmd: list[str]) -> bytes:
  result = subprocess.run(cmd, capture_output=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(
        f"Speech synthesis failed ({' '.join(cmd)}): exit {result.returncode},"
        f" {result.stderr.decode(errors='replace').strip()}"
    )
  return result.stdout


def synthesize_raw(speaker: Speaker, text: str) -> tuple[np.ndarray, int]:
  """Runs the speaker's engine on `text`; returns (int16 audio [N], sample rate)."""
  if not text or text.startswith("-"):
    raise ValueError(f"Text to synthesize must be non-empty normalized text: {text!r}")
  if speaker.engine == "espeak":
    cmd = ["espeak-ng", "-v", f"{speaker.accent}+{speaker.voice}",
           "-s", str(speaker.rate), "-p", str(speaker.pitch), "--stdout", text]
    return _read_wav(_run(cmd))
  if speaker.engine == "flite":
    with tempfile.TemporaryDirectory(prefix="flite_") as tmp:
      path = os.path.join(tmp, "out.wav")
      pitch = (["--setf", f"int_f0_target_mean={speaker.f0}"] if speaker.f0
               else [])
      _run(["flite", "-voice", speaker.voice, "--setf",
            f"duration_stretch={speaker.duration_stretch:.2f}", *pitch,
            "-t", text, "-o", path])
      with open(path, "rb") as f:
        return _read_wav(f.read())
  raise ValueError(
      f"Unknown speech engine {speaker.engine!r}; expected espeak or flite.")


def trim_silence(audio: np.ndarray, threshold: float = 0.01,
                 margin_seconds: float = 0.1) -> np.ndarray:
  """Cuts leading/trailing silence of float audio [N] in [-1, 1], keeping a margin."""
  loud = np.flatnonzero(np.abs(audio) > threshold)
  if loud.size == 0:
    return audio
  margin = int(margin_seconds * SAMPLE_RATE)
  return audio[max(0, loud[0] - margin): loud[-1] + 1 + margin]


def synthesize(speaker: Speaker, text: str) -> np.ndarray:
  """Speaks `text` as `speaker`: clean float64 audio [N] at 16 kHz in [-1, 1].

  The engine output is resampled to 16 kHz and trimmed of leading and trailing
  silence (0.1 s kept); its level is the engine's.
  """
  raw, rate = synthesize_raw(speaker, text)
  return trim_silence(resample_to_16k(raw, rate) / 32768.0)


def to_int16(audio: np.ndarray, peak_dbfs: float) -> np.ndarray:
  """Scales float audio [N] to a peak of `peak_dbfs` (dB full scale); int16 [N].

  Silence (all zeros) stays silence.
  """
  audio = np.asarray(audio, dtype=np.float64)
  peak = float(np.max(np.abs(audio))) if audio.size else 0.0
  if peak > 0.0:
    audio = audio * (10.0 ** (peak_dbfs / 20.0) / peak)
  return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)
