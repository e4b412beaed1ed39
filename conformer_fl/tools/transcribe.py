r"""Transcribes audio files with a run of `conformer_fl.main` or an exported model.

  python -m conformer_fl.tools.transcribe --workdir=DIR FILE.flac [FILE.wav ...]
  python -m conformer_fl.tools.transcribe --workdir=DIR --step=N FILE.wav ...

DIR is the workdir of a central or federated run of `conformer_fl.main`
(config.json, the tokenizer, checkpoints/), or a model written by
`python -m conformer_fl.export` (config.json, the tokenizer, params.msgpack,
model_card.json). The files are transcribed with the model and tokenizer of
the run's latest checkpoint, or of step N (the round, for a federated run) with
`--step=N`, or with the exported model, by greedy decoding as in evaluation
(`models.greedy_decode`, `evaluation.ids_to_texts`).

Output: one line per file on stdout, in the order of the arguments:

  FILE<TAB>transcript

The transcript is in the normalized alphabet of the training text (see
conformer_fl/text.py), possibly empty. Which model and step were used, and
notes on resampled or overlong files, go to stderr.

Input: mono audio files of any format libsndfile reads, through the
`soundfile` package (setup.py's [data] extra): WAV (integer PCM of 8, 16, 24
or 32 bits per sample, or float), FLAC (as LibriSpeech ships), OGG/Vorbis,
AIFF, ... 16-bit audio at
16 kHz reaches the model exactly as the training data does (int16 / 32768, see
conformer_fl/data/batching.py). Files at another sample rate are resampled to
16 kHz (`scipy.signal.resample_poly`), and a note says so on stderr. A file
with several channels is refused: mix it down to mono first (e.g.
`sox IN.flac -c 1 OUT.flac`).

Errors: every file is read and checked before the model is loaded. A file that
is missing, not audio, multi-channel, empty or truncated gets one line
`error: FILE: problem` on stderr; then nothing is transcribed, nothing is
printed on stdout and the exit status is 1. The same holds for a workdir that
is missing, holds no run or no checkpoint, or lacks the `--step` asked for.

Each file is decoded whole: the model sees it as one utterance, so split long
recordings (a note is printed for files longer than the run's longest training
bucket). Files are decoded `--batch_size` at a time, padded to the longest file
rounded up to a whole second; padding does not change a transcript
(tests/test_padding_invariance.py).

From Python (tests, notebooks):

  texts = transcribe.transcribe_audio(workdir, [audio, ...])  # 16 kHz, [N] each
  transcriber = transcribe.Transcriber(model_dir, step=400)   # load once,
  texts = transcriber([audio, ...])                           # call often
  audio, rate = transcribe.load_audio("x.flac")               # 16 kHz [N]
"""

import os

# TensorFlow (imported by conformer_fl.data, unused here) logs at import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
from collections.abc import Sequence
import functools
import math
import re
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import scipy.signal

from conformer_fl import checkpointing
from conformer_fl import cli
from conformer_fl import evaluation
from conformer_fl import exported
from conformer_fl import models
from conformer_fl import workdir as workdir_lib
from conformer_fl.data import batching
from conformer_fl.data import tokenizer as tokenizer_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

SAMPLE_RATE = batching.SAMPLE_RATE
DEFAULT_BATCH_SIZE = 8


class TranscribeError(Exception):
  """A problem with the workdir or an input file; the message is one line."""


# ----------------------------------------------------------------------------
# Reading audio files.


def to_float(audio: np.ndarray) -> np.ndarray:
  """int16 [N] -> float32 [N] exactly as the input pipeline scales it.

  (`batching.fill_padded_rows`: int16 * float32(1 / 32768).) Float audio is
  returned as float32.
  """
  if audio.dtype == np.int16:
    return np.multiply(audio, np.float32(1.0 / batching.INT16_SCALE),
                       dtype=np.float32)
  return np.asarray(audio, np.float32)


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
  """[N] samples at `rate` Hz -> float32 [M] at SAMPLE_RATE, in [-1, 1].

  Polyphase resampling (`scipy.signal.resample_poly`) of `to_float(audio)`;
  the filter's overshoot is clipped to [-1, 1].
  """
  divisor = math.gcd(SAMPLE_RATE, rate)
  resampled = scipy.signal.resample_poly(
      to_float(audio), SAMPLE_RATE // divisor, rate // divisor)
  return np.clip(resampled, -1.0, 1.0).astype(np.float32)


# libsndfile reads a WAV file whose data chunk is cut short without an error
# (the samples present); its log (`info.extra_info`) gives the length the
# header announced, e.g. `data : 3200 (should be 2199)`.
_SHORT_DATA = re.compile(r"^data : (\d+) \(should be \d+\)", re.M)
_BLOCK_ALIGN = re.compile(r"^\s*Block Align\s*: (\d+)", re.M)


def read_audio(path: str) -> tuple[np.ndarray, int]:
  """The samples and sample rate of a mono audio file libsndfile reads.

  Returns:
    (samples, rate): int16 [N] for 8- and 16-bit PCM (unsigned 8-bit WAV
    samples x widened exactly, to (x - 128) * 256), float32 [N] in [-1, 1]
    otherwise (24- and 32-bit PCM: x / 2**23, x / 2**31); rate in Hz.

  Raises:
    TranscribeError: soundfile is not installed, or the file is missing,
      empty, not audio, several channels, without samples or truncated (one
      line naming the file).
  """
  try:
    import soundfile  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise TranscribeError(
        f"{path}: reading audio files needs the soundfile package: pip"
        " install soundfile (or conformer_fl[data])") from None
  if not os.path.exists(path):
    raise TranscribeError(f"{path}: no such file")
  if os.path.isdir(path):
    raise TranscribeError(f"{path}: is a directory, not an audio file")
  if os.path.getsize(path) == 0:
    raise TranscribeError(f"{path}: empty file (0 bytes)")
  try:
    info = soundfile.info(path)
    if info.channels != 1:
      ext = os.path.splitext(path)[1]
      raise TranscribeError(
          f"{path}: {info.channels} channels; only mono (1 channel) files are"
          f" transcribed: mix it down first, e.g. `sox IN{ext} -c 1 OUT{ext}`")
    if info.frames == 0:
      raise TranscribeError(f"{path}: no audio samples")
    short = _SHORT_DATA.search(info.extra_info)
    align = _BLOCK_ALIGN.search(info.extra_info)
    if short and align:
      raise TranscribeError(
          f"{path}: truncated: the header announces"
          f" {int(short.group(1)) // int(align.group(1))} samples, the file"
          f" holds {info.frames}")
    dtype = "int16" if info.subtype in ("PCM_S8", "PCM_U8", "PCM_16") else "float32"
    samples, rate = soundfile.read(path, dtype=dtype, always_2d=False)
  except (soundfile.SoundFileError, RuntimeError) as e:
    raise TranscribeError(
        f"{path}: not an audio file that libsndfile reads"
        f" ({' '.join(str(e).split())})") from None
  if samples.size == 0:
    raise TranscribeError(f"{path}: no audio samples")
  if dtype == "float32":
    samples = np.clip(samples, -1.0, 1.0).astype(np.float32)
  return samples, int(rate)


def load_audio(path: str) -> tuple[np.ndarray, int]:
  """An audio file's samples at SAMPLE_RATE, ready for `Transcriber`.

  Returns:
    (audio, rate): audio [N] at 16 kHz (int16 when the file is 16 or 8-bit at
    16 kHz, float32 in [-1, 1] otherwise); rate is the file's own sample rate
    (the audio was resampled when it differs from SAMPLE_RATE).

  Raises:
    TranscribeError: see `read_audio`.
  """
  audio, rate = read_audio(path)
  if rate != SAMPLE_RATE:
    audio = resample(audio, rate)
  return audio, rate


# ----------------------------------------------------------------------------
# The model of a workdir's checkpoint.


def load_run_config(workdir: epath.Path) -> ml_collections.ConfigDict:
  """The run config saved in `workdir/config.json` by the training loop."""
  if not workdir.exists():
    raise TranscribeError(f"{workdir}: no such workdir")
  run = workdir_lib.Workdir(workdir)
  path = run.config_path
  if (workdir / "experiment_config.json").exists() and not path.exists():
    raise TranscribeError(
        f"{workdir}: an experiment's workdir; give one of its runs, e.g."
        f" {workdir / 'pretrain'} or"
        f" {workdir / 'arms' / 'model_0' / 'any' / 'full' / 'seed_0_lrR'}")
  if not path.exists():
    raise TranscribeError(
        f"{workdir}: no config.json; give the workdir of a central or"
        " federated run of conformer_fl.main")
  try:
    config = run.config()
  except workdir_lib.WorkdirError as e:
    raise TranscribeError(str(e)) from None
  if "model" not in config or "data" not in config:
    raise TranscribeError(
        f"{workdir}: its config.json (mode {config.get('mode')!r}) describes no"
        " model; give the workdir of a central or federated run")
  return config


def load_tokenizer(config: ml_collections.ConfigDict,
                    workdir: epath.Path) -> tokenizer_lib.Tokenizer:
  """The run's own tokenizer; never trains one (ids must match the model)."""
  if (config.data.tokenizer.kind == "sentencepiece" and
      not (workdir / tokenizer_lib.TOKENIZER_FILENAME).exists()):
    raise TranscribeError(
        f"{workdir}: no {tokenizer_lib.TOKENIZER_FILENAME} (the run's"
        " SentencePiece tokenizer)")
  try:
    tokenizer = tokenizer_lib.build_tokenizer(config.data.tokenizer, None,
                                              workdir)
  except ValueError as e:
    raise TranscribeError(f"{workdir}: {e}") from None
  if tokenizer.vocab_size != config.model.vocab_size:
    raise TranscribeError(
        f"{workdir}: the tokenizer has {tokenizer.vocab_size} ids but the"
        f" model outputs {config.model.vocab_size}")
  return tokenizer


def restore_variables(workdir: epath.Path,
                       step: int | None) -> tuple[int, dict[str, Any]]:
  """(step, model variables) of the checkpoint `step` (None = the latest)."""
  if not workdir_lib.Workdir(workdir).checkpoints_dir.exists():
    raise TranscribeError(f"{workdir}: no checkpoints/ directory (no"
                          " checkpoint saved yet?)")
  store = checkpointing.CheckpointStore(str(workdir), read_only=True)
  try:
    steps = store.all_steps()
    if not steps:
      raise TranscribeError(f"{workdir}: no checkpoint in {store.directory}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise TranscribeError(f"{workdir}: no checkpoint for step {step}; saved"
                            f" steps: {steps}")
    try:
      return step, store.restore_variables(step)
    except checkpointing.CheckpointError as e:  # Damaged: named, one line.
      raise TranscribeError(f"{workdir}: {e}") from e
  finally:
    store.close()


def _check_audio(index: int, audio: Any) -> np.ndarray:
  """`audio` as a valid [N] array for the model, or ValueError naming it."""
  audio = np.asarray(audio)
  if audio.ndim != 1:
    raise ValueError(f"audios[{index}] has shape {audio.shape}; expected [N]"
                     " samples (mono)")
  if audio.dtype != np.int16 and not np.issubdtype(audio.dtype, np.floating):
    raise ValueError(f"audios[{index}] has dtype {audio.dtype}; expected int16"
                     " or float in [-1, 1]")
  if audio.size == 0:
    raise ValueError(f"audios[{index}] has no samples")
  if audio.dtype != np.int16:
    if not np.all(np.isfinite(audio)):
      raise ValueError(f"audios[{index}] has non-finite samples")
    if np.max(np.abs(audio)) > 1.0:
      raise ValueError(f"audios[{index}] has samples outside [-1, 1]")
    audio = audio.astype(np.float32, copy=False)
  return audio


class Transcriber:
  """The model, tokenizer and variables of one checkpoint of a run, or of an
  exported model (`conformer_fl.exported`).

  Loading happens once, in the constructor; each call transcribes a list of
  utterances. Decoding is jitted once per batch shape [B, S].

  Attributes:
    workdir: the run's (or exported model's) directory.
    step: the checkpoint's step (round, for a federated run).
    config: the run config (config.json).
    model: the `models.ConformerASR`.
    tokenizer: the run's tokenizer.
    variables: {'params': ..., [model state]} of the checkpoint (host numpy).
    batch_size: utterances decoded together (at most).
    max_train_seconds: the longest training bucket of the run, in seconds.
  """

  def __init__(self, workdir: str | os.PathLike[str], step: int | None = None,
               *, batch_size: int = DEFAULT_BATCH_SIZE):
    """Loads the checkpoint.

    Args:
      workdir: a central or federated run (config.json, tokenizer,
        checkpoints/), or an exported model's directory.
      step: the checkpoint to use; None = the latest (an exported model has
        one: its own, or None).
      batch_size: most utterances decoded at once (>= 1).

    Raises:
      TranscribeError: no such workdir, no run in it, no tokenizer, no
        checkpoint, or no checkpoint of `step`.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.workdir = epath.Path(workdir)
    self.batch_size = batch_size
    if exported.is_exported(self.workdir):
      self.config, self.variables, card = exported.read(self.workdir)
      self.step = card["source"]["step"]
      if step is not None and step != self.step:
        raise TranscribeError(
            f"{self.workdir}: an exported model of {card['source']['step_key']}"
            f" {self.step}; export step {step} of the run to use it")
    else:
      self.config = load_run_config(self.workdir)
    self.tokenizer = load_tokenizer(self.config, self.workdir)
    self.model = models.build_model(self.config.model)
    if not exported.is_exported(self.workdir):
      self.step, self.variables = restore_variables(self.workdir, step)
    self.max_train_seconds = max(self.config.data.bucket_seconds)
    self._device_variables = jax.device_put(self.variables)
    self._decode = jax.jit(functools.partial(models.greedy_decode, self.model))

  def __call__(self, audios: Sequence[np.ndarray]) -> list[str]:
    """Transcripts of `audios`, in order.

    The model decodes batches of audio float32 [B, S] with paddings [B, S]
    (1.0 = padded), B = min(batch_size, len(audios)) and S the longest N
    rounded up to a whole second; the last batch is completed with filler
    rows.

    Args:
      audios: utterances at 16 kHz, each [N] (N >= 1) int16 (scaled by 1/32768,
        as in training) or float in [-1, 1].

    Returns:
      One transcript per utterance (normalized text, possibly empty).

    Raises:
      ValueError: an utterance of the wrong shape, dtype or range (names its
        index).
    """
    audios = [_check_audio(i, a) for i, a in enumerate(audios)]
    if not audios:
      return []
    batch_size = min(self.batch_size, len(audios))
    # One shape for every batch: the longest utterance, rounded up to whole
    # seconds so that calls with similar lengths reuse the compiled program.
    audio_length = SAMPLE_RATE * math.ceil(
        max(a.size for a in audios) / SAMPLE_RATE)
    texts = []
    for start in range(0, len(audios), batch_size):
      group = audios[start:start + batch_size]
      examples = [{"audio": audio, "labels": np.zeros((0,), np.int32),
                   "id": f"audios[{start + i}]"}
                  for i, audio in enumerate(group)]
      # Labels [B, 1], all padding: the decoders do not read them.
      batch = batching.pad_batch(examples, audio_length, 1, batch_size)
      del batch["example_mask"]
      ids, id_paddings = jax.device_get(
          self._decode(self._device_variables, batch))
      texts.extend(evaluation.ids_to_texts(ids, id_paddings,
                                           self.tokenizer.decode)[:len(group)])
    return texts


def transcribe_audio(workdir: str | os.PathLike[str],
                     audios: Sequence[np.ndarray], step: int | None = None,
                     *, batch_size: int = DEFAULT_BATCH_SIZE) -> list[str]:
  """Transcripts of 16 kHz utterances with a run's checkpoint.

  Args:
    workdir: a central or federated run of `conformer_fl.main`, or an
      exported model (`python -m conformer_fl.export`).
    audios: utterances, each [N] int16 or float in [-1, 1] at 16 kHz
      (`load_audio` reads and resamples an audio file).
    step: the checkpoint; None = the latest.
    batch_size: most utterances decoded at once.

  Returns:
    One transcript per utterance, in order.

  Raises:
    TranscribeError: the workdir or checkpoint cannot be used (`Transcriber`).
    ValueError: a bad utterance (`Transcriber.__call__`).
  """
  return Transcriber(workdir, step, batch_size=batch_size)(audios)


# ----------------------------------------------------------------------------
# Command line.


def _error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str]) -> None:
  """The command (module docstring); flags are defined under `__main__`."""
  paths = list(argv[1:])
  if not paths:
    raise app.UsageError("Give the audio files to transcribe.")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs (and warns about read-only stores) at every restore.
    logging.set_verbosity(logging.ERROR)
  # Every file is read before the model is loaded: a bad one fails fast.
  audios, failed = [], False
  for path in paths:
    try:
      audio, rate = load_audio(path)
    except TranscribeError as e:
      _error(str(e))
      failed = True
      continue
    if rate != SAMPLE_RATE:
      print(f"{path}: resampled from {rate} Hz to {SAMPLE_RATE} Hz",
            file=sys.stderr)
    audios.append(audio)
  if failed:
    sys.exit(1)
  try:
    transcriber = Transcriber(flags.FLAGS.workdir, flags.FLAGS.step,
                              batch_size=flags.FLAGS.batch_size)
  except TranscribeError as e:
    _error(str(e))
    sys.exit(1)
  print(f"{transcriber.workdir}: step {transcriber.step}", file=sys.stderr)
  for path, audio in zip(paths, audios):
    seconds = audio.size / SAMPLE_RATE
    if seconds > transcriber.max_train_seconds:
      print(f"{path}: {seconds:.1f} s, longer than the run's longest training"
            f" utterances ({transcriber.max_train_seconds:g} s): split it for"
            " better transcripts", file=sys.stderr)
  sys.stderr.flush()
  for path, text in zip(paths, transcriber(audios)):
    print(f"{path}\t{text}")


if __name__ == "__main__":
  # Defined here rather than at import: conformer_fl/main.py defines --workdir
  # too, and tests and notebooks import this module beside it.
  flags.DEFINE_string("workdir", None,
                      "Directory of a central or federated run, or of an"
                      " exported model (python -m conformer_fl.export).")
  flags.DEFINE_integer("step", None, "Checkpoint step (round) to use; default:"
                       " the latest.")
  flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE,
                       "Files decoded together.", lower_bound=1)
  flags.mark_flag_as_required("workdir")
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, ()))
