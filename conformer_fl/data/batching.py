"""Turning common examples into padded batches with static shapes (host numpy).

Steps:
1. `prepare_example` validates one common example (see `input_pipeline`), tokenizes
   its transcript and assigns it the smallest bucket that fits both its audio and
   its labels. Bad examples return None and are counted by reason in a
   `SkipCounter` (logged with absl), never raised: a corrupt utterance must not stop
   a training run. Reasons: see `SKIP_REASONS`. A transcript or speaker id
   whose bytes are not UTF-8, or that is missing (None), is such an example too:
   the corpus loaders pass those fields through undecoded (`decode_text`).
   CTC alignment (`skip_ctc_unalignable`): CTC emits one label per encoder
   frame and needs a blank frame between two equal consecutive labels, so an
   utterance with more labels plus repeats than encoder frames
   (`ctc_frames_needed` > `encoder_frames`) cannot be aligned at all; its loss
   is ~1e5 (optax's log(0)) and it would swamp a batch's gradient.
2. `bucket_by_length` groups prepared examples of one bucket into batches, shuffling
   within buckets with a seeded buffer (deterministic given the input order and
   the seed); `eval_batches` groups every example exactly once, in input order per
   bucket, and pads the last batch of each bucket with masked examples.
3. `pad_batch` makes the batch dict of the CONTRACT:
     'audio':          float32 [B, S]  int16 / 32768, in [-1, 1]
     'audio_paddings': float32 [B, S]  1.0 = padded sample
     'labels':         int32   [B, U]  0 at padded positions
     'label_paddings': float32 [B, U]  1.0 = padded position
     'example_mask':   float32 [B]     1.0 = real example, 0.0 = filler row
   and, in eval batches only (`eval_batches`),
     'speaker':        int32   [B]     speaker index, -1 = filler row
   where S and U are the bucket's audio length (samples) and label length. A filler
   row is all padding (zero audio, paddings 1.0, labels 0); multiply per-example
   losses and error counts by 'example_mask'.

Buckets: a few audio lengths, e.g. [2 s, 4 s, 8 s, 16 s] as samples, each with a
label length: given explicitly, or derived as ceil(seconds * labels_per_second)
rounded up to a multiple of 8 (`make_buckets`). Fewer distinct shapes means fewer
compilations; more buckets means less padding.

Prepared examples keep int16 audio as int16 (half the memory of float32; the
central train split may be cached in memory) and scale it when a batch is padded.
"""

import collections
from collections.abc import Iterable, Iterator, Sequence
import dataclasses
import math
from typing import Any

from absl import logging
import numpy as np

from conformer_fl import text as text_lib

SAMPLE_RATE = 16000
INT16_SCALE = 32768.0

Example = dict[str, Any]
Batch = dict[str, np.ndarray]

# The encoder's time axis (conformer_fl/models): log-mel frames of 25 ms (400
# samples) every 10 ms (160 samples), then 4x convolutional subsampling
# (models.conformer.ConvSubsampling): 25 encoder frames per second of audio.
FRAME_LENGTH_SAMPLES = 400
FRAME_STEP_SAMPLES = 160
TIME_SUBSAMPLING = 4

SKIP_REASONS = (
    "bad_audio_dtype",     # audio missing, not 1-D, or neither int16 nor float
    "empty_audio",         # zero samples
    "silent_audio",        # every sample is exactly zero
    "nonfinite_audio",     # NaN or inf samples (float audio)
    "audio_out_of_range",  # float audio outside [-1, 1]
    "missing_transcript",  # the transcript is None or not text
    "undecodable_transcript",  # transcript bytes that are not UTF-8
    "empty_transcript",    # nothing left after normalization / tokenization
    "untokenizable_transcript",  # the tokenizer rejected the text
    "missing_speaker_id",  # (federated clients only) speaker id None or empty
    "undecodable_speaker_id",  # (clients only) speaker id bytes not UTF-8
    "audio_too_long",      # longer than the longest bucket
    "labels_too_long",     # more labels than the label length of any bucket
                           # long enough for the audio
    "labels_too_dense",    # more labels per second of audio than max_label_rate
    "ctc_unalignable",     # more labels (+ repeats) than encoder frames
)


class SkipCounter:
  """Counts skipped examples by reason and logs them (absl) without raising.

  The first `log_first` skips of each reason are logged with the example id; after
  that, every `log_every`-th. `counts` maps reason -> number skipped.
  """

  def __init__(self, name: str = "data", log_first: int = 5,
               log_every: int = 1000):
    self.name = name
    self.counts: collections.Counter[str] = collections.Counter()
    self._log_first = log_first
    self._log_every = log_every

  def skip(self, reason: str, example_id: str = "", detail: str = "") -> None:
    """Records one skipped example."""
    if reason not in SKIP_REASONS:
      raise ValueError(f"Unknown skip reason {reason!r}; known: {SKIP_REASONS}.")
    self.counts[reason] += 1
    n = self.counts[reason]
    if n <= self._log_first or n % self._log_every == 0:
      logging.warning("[%s] skipped example %r (%s%s); %d skipped for this reason"
                      " so far.", self.name, example_id, reason,
                      f": {detail}" if detail else "", n)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def log_summary(self) -> None:
    if self.total:
      logging.warning("[%s] skipped %d examples: %s", self.name, self.total,
                      dict(sorted(self.counts.items())))
    else:
      logging.info("[%s] skipped no examples.", self.name)


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Static batch shapes: bucket i pads audio to audio_lengths[i] samples and
  labels to label_lengths[i] ids. Both tuples increase strictly."""

  audio_lengths: tuple[int, ...]
  label_lengths: tuple[int, ...]

  def __post_init__(self):
    if not self.audio_lengths or len(self.audio_lengths) != len(self.label_lengths):
      raise ValueError(
          "Buckets need as many label lengths as audio lengths (at least one):"
          f" {self.audio_lengths} vs {self.label_lengths}.")
    for name, lengths in (("audio", self.audio_lengths),
                          ("label", self.label_lengths)):
      if any(b <= a for a, b in zip(lengths, lengths[1:])) or lengths[0] <= 0:
        raise ValueError(f"Bucket {name} lengths must be positive and strictly"
                         f" increasing, got {lengths}.")

  def __len__(self) -> int:
    return len(self.audio_lengths)

  def find(self, num_samples: int, num_labels: int) -> int | None:
    """Index of the smallest bucket fitting both lengths, or None."""
    for i, (s, u) in enumerate(zip(self.audio_lengths, self.label_lengths)):
      if num_samples <= s and num_labels <= u:
        return i
    return None


def make_buckets(
    bucket_seconds: Sequence[float],
    label_lengths: Sequence[int] | None = None,
    labels_per_second: float | None = None,
    sample_rate: int = SAMPLE_RATE,
    label_multiple: int = 8,
) -> Buckets:
  """Buckets from durations in seconds.

  Args:
    bucket_seconds: increasing bucket durations, e.g. [2, 4, 8, 16].
    label_lengths: explicit label length per bucket; or None to derive them.
    labels_per_second: with label_lengths None, the label length of a bucket is
      ceil(seconds * labels_per_second) rounded up to `label_multiple`. Choose it
      above the fastest speech of the corpus in tokens per second (about 20 for
      characters of read English; a few for a large SentencePiece vocabulary).
    sample_rate: samples per second.
    label_multiple: derived label lengths are rounded up to a multiple of this.
  """
  audio_lengths = tuple(int(round(s * sample_rate)) for s in bucket_seconds)
  if label_lengths is None:
    if labels_per_second is None or labels_per_second <= 0:
      raise ValueError("Give label_lengths or a positive labels_per_second.")
    label_lengths = [
        label_multiple * math.ceil(math.ceil(s * labels_per_second) / label_multiple)
        for s in bucket_seconds]
  return Buckets(audio_lengths, tuple(int(u) for u in label_lengths))


def encoder_frames(num_samples: int) -> int:
  """Valid encoder frames of an utterance of `num_samples` 16 kHz samples.

  ceil(T / 4) of the T = 1 + (S - 400) // 160 log-mel frames (0 when S < 400),
  as the model's `logit_paddings` count them (tests/test_bad_data.py checks
  this against the model).
  """
  if num_samples < FRAME_LENGTH_SAMPLES:
    return 0
  frames = 1 + (num_samples - FRAME_LENGTH_SAMPLES) // FRAME_STEP_SAMPLES
  return -(-frames // TIME_SUBSAMPLING)


def ctc_frames_needed(labels: np.ndarray) -> int:
  """Frames CTC needs for `labels` [U]: one per label, plus one blank between
  each two equal consecutive labels."""
  labels = np.asarray(labels)
  return int(labels.size + np.count_nonzero(labels[1:] == labels[:-1]))


def decode_text(value: Any) -> Any:
  """A text field as str when it is text, else the value unchanged.

  str stays str; bytes (or a 0-d array of them) that are UTF-8 become str;
  bytes that are not, None and other types are returned as they are, so that
  `prepare_example` can skip them by name (`undecodable_*`, `missing_*`).
  """
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      return value
  return value


def audio_problem(audio: Any) -> tuple[str, str] | None:
  """Why `audio` cannot be trained on, as (skip reason, detail), or None if fine.

  The audio checks of `prepare_example` (reasons 'bad_audio_dtype',
  'nonfinite_audio', 'audio_out_of_range', 'empty_audio', 'silent_audio'),
  apart so that an index of a corpus can record them once per utterance
  (conformer_fl/data/record_source.py).

  Args:
    audio: the example's 'audio', expected int16 [N] or float [N] in [-1, 1].
  """
  if not isinstance(audio, np.ndarray) or audio.ndim != 1:
    return ("bad_audio_dtype", f"audio is {type(audio).__name__} of shape"
            f" {getattr(audio, 'shape', None)}")
  if np.issubdtype(audio.dtype, np.floating):
    if not np.all(np.isfinite(audio)):
      return ("nonfinite_audio", "")
    if audio.size and np.max(np.abs(audio)) > 1.0:
      return ("audio_out_of_range", f"max |x| = {np.max(np.abs(audio)):.3g}")
  elif audio.dtype != np.int16:
    return ("bad_audio_dtype", f"dtype {audio.dtype}")
  if audio.size == 0:
    return ("empty_audio", "")
  if not np.any(audio):
    return ("silent_audio", "")
  return None


def prepare_example(
    example: Example, tokenizer: Any, buckets: Buckets, skips: SkipCounter,
    max_label_rate: float = 0.0, *, skip_ctc_unalignable: bool = False,
    require_speaker_id: bool = False,
) -> Example | None:
  """Validates and tokenizes one common example; None (and counted) if bad.

  `audio_problem`, then `prepare_metadata` on the audio's length.

  Args:
    example: a common example dict ('audio' [N] int16 or float in [-1, 1], 'text',
      optional 'id', 'speaker_id', 'domain', 'duration').
    tokenizer: has `encode(text) -> list[int]`.
    buckets: the static shapes.
    skips: receives the reason of a skip.
    max_label_rate: skip examples with more than this many labels per second of
      audio; 0 = no limit.
    skip_ctc_unalignable: skip examples that CTC cannot align, whose labels
      plus repeats outnumber the encoder frames (`ctc_frames_needed` >
      `encoder_frames`).
    require_speaker_id: skip examples without a usable speaker id (None, empty
      or not UTF-8); federated clients are speakers.

  Returns:
    {'audio': [N] int16 or float32, 'labels': int32 [U], 'bucket': int,
     'id', 'speaker_id', 'domain', 'duration'} or None.
  """
  audio = example.get("audio")
  problem = audio_problem(audio)
  if problem is not None:
    skips.skip(problem[0], _as_str(example.get("id", "")), problem[1])
    return None
  prepared = prepare_metadata(
      example, audio.size, tokenizer, buckets, skips, max_label_rate,
      skip_ctc_unalignable=skip_ctc_unalignable,
      require_speaker_id=require_speaker_id)
  if prepared is None:
    return None
  if audio.dtype != np.int16:
    audio = audio.astype(np.float32, copy=False)
  return {"audio": audio, **prepared}


def prepare_metadata(
    example: Example, num_samples: int, tokenizer: Any, buckets: Buckets,
    skips: SkipCounter, max_label_rate: float = 0.0, *,
    skip_ctc_unalignable: bool = False, require_speaker_id: bool = False,
) -> Example | None:
  """The checks of `prepare_example` that need the audio's length only.

  For an example whose audio passed `audio_problem`: the transcript, speaker
  id, label and bucket checks, on `num_samples` samples of audio (the
  example's 'audio' is not read). Arguments as in `prepare_example`.

  Returns:
    {'labels': int32 [U], 'bucket': int, 'id', 'speaker_id', 'domain',
     'duration'} or None (the reason counted in `skips`).
  """
  example_id = _as_str(example.get("id", ""))
  text = decode_text(example.get("text"))
  if isinstance(text, bytes):
    skips.skip("undecodable_transcript", example_id,
               f"{len(text)} bytes that are not UTF-8")
    return None
  if not isinstance(text, str):
    skips.skip("missing_transcript", example_id,
               f"transcript is {type(text).__name__}")
    return None
  speaker_id = decode_text(example.get("speaker_id", ""))
  if isinstance(speaker_id, (int, np.integer)) and not isinstance(
      speaker_id, bool):
    speaker_id = str(speaker_id)  # LibriSpeech's speaker ids are integers.
  if require_speaker_id:
    if isinstance(speaker_id, bytes):
      skips.skip("undecodable_speaker_id", example_id,
                 f"{len(speaker_id)} bytes that are not UTF-8")
      return None
    if not isinstance(speaker_id, str) or not speaker_id.strip():
      skips.skip("missing_speaker_id", example_id,
                 f"speaker id {speaker_id!r}")
      return None
  text = text_lib.normalize_text(text)
  if not text:
    skips.skip("empty_transcript", example_id)
    return None
  try:
    labels = np.asarray(tokenizer.encode(text), dtype=np.int32)
  except ValueError as e:
    skips.skip("untokenizable_transcript", example_id, str(e))
    return None
  if labels.size == 0:
    skips.skip("empty_transcript", example_id)
    return None
  seconds = num_samples / SAMPLE_RATE
  if (max_label_rate > 0
      and labels.size > max_label_rate * num_samples / SAMPLE_RATE):
    skips.skip("labels_too_dense", example_id,
               f"{labels.size} labels in {seconds:.2f} s")
    return None
  if skip_ctc_unalignable:
    needed, frames = ctc_frames_needed(labels), encoder_frames(num_samples)
    if needed > frames:
      skips.skip("ctc_unalignable", example_id,
                 f"{labels.size} labels need {needed} frames, the"
                 f" {seconds:.2f} s of audio give {frames}")
      return None
  bucket = buckets.find(num_samples, labels.size)
  if bucket is None:
    if num_samples > buckets.audio_lengths[-1]:
      skips.skip("audio_too_long", example_id,
                 f"{num_samples} samples > {buckets.audio_lengths[-1]}")
    else:
      skips.skip("labels_too_long", example_id,
                 f"{labels.size} labels for {num_samples} samples;"
                 f" label lengths {buckets.label_lengths}")
    return None
  return {
      "labels": labels,
      "bucket": bucket,
      "id": example_id,
      "speaker_id": speaker_id if isinstance(speaker_id, str) else "",
      "domain": _as_str(example.get("domain", "")),
      "duration": float(num_samples) / SAMPLE_RATE,
  }


def prepare_examples(
    examples: Iterable[Example], tokenizer: Any, buckets: Buckets,
    skips: SkipCounter, max_label_rate: float = 0.0, *,
    skip_ctc_unalignable: bool = False, require_speaker_id: bool = False,
) -> Iterator[Example]:
  """`prepare_example` over a stream, dropping (and counting) bad examples."""
  for example in examples:
    prepared = prepare_example(
        example, tokenizer, buckets, skips, max_label_rate,
        skip_ctc_unalignable=skip_ctc_unalignable,
        require_speaker_id=require_speaker_id)
    if prepared is not None:
      yield prepared


def pad_batch(
    examples: Sequence[Example], audio_length: int, label_length: int,
    batch_size: int
) -> Batch:
  """Pads up to `batch_size` prepared examples to [B, S] audio and [B, U] labels.

  Rows past len(examples) are filler rows with 'example_mask' 0 (module docstring).

  Raises:
    ValueError: more examples than batch_size, or an example longer than S or U.
  """
  batch = {
      "audio": np.zeros((batch_size, audio_length), np.float32),
      "audio_paddings": np.ones((batch_size, audio_length), np.float32),
      "labels": np.zeros((batch_size, label_length), np.int32),
      "label_paddings": np.ones((batch_size, label_length), np.float32),
      "example_mask": np.zeros((batch_size,), np.float32),
  }
  fill_padded_rows(examples, batch)
  return batch


def fill_padded_rows(examples: Sequence[Example], batch: Batch) -> None:
  """Writes `examples` into the first rows of an all-padding batch, in place.

  Args:
    examples: prepared examples, at most B.
    batch: the keys of `pad_batch` (arrays [B, S], [B, U], [B], or views of a
      larger array), holding padding values: zero audio, labels and mask, and
      paddings of 1.0.

  Raises:
    ValueError: more examples than rows, or an example longer than S or U.
  """
  audio, audio_paddings = batch["audio"], batch["audio_paddings"]
  labels, label_paddings = batch["labels"], batch["label_paddings"]
  batch_size, audio_length = audio.shape
  label_length = labels.shape[1]
  if len(examples) > batch_size:
    raise ValueError(f"{len(examples)} examples do not fit a batch of {batch_size}.")
  for row, example in enumerate(examples):
    wave, ids = example["audio"], example["labels"]
    if wave.size > audio_length or ids.size > label_length:
      raise ValueError(
          f"Example {example.get('id')!r} ({wave.size} samples, {ids.size} labels)"
          f" does not fit [{audio_length}] audio / [{label_length}] labels.")
    if wave.dtype == np.int16:
      np.multiply(wave, np.float32(1.0 / INT16_SCALE), out=audio[row, :wave.size])
    else:
      audio[row, :wave.size] = wave
    audio_paddings[row, :wave.size] = 0.0
    labels[row, :ids.size] = ids
    label_paddings[row, :ids.size] = 0.0
    batch["example_mask"][row] = 1.0


def bucket_by_length(
    examples: Iterable[Example],
    num_buckets: int,
    batch_size: int,
    seed: int | Sequence[int],
    shuffle_buffer: int = 0,
    drop_remainder: bool = True,
) -> Iterator[tuple[int, list[Example]]]:
  """Groups prepared examples into same-bucket batches, shuffled within buckets.

  Each bucket keeps a buffer of up to max(batch_size, shuffle_buffer) examples;
  when it is full, `batch_size` examples drawn at random (seeded) leave it as a
  batch. At the end of the input, each bucket's remaining examples are shuffled
  and batched; a last partial batch is dropped when `drop_remainder`. The output
  is a deterministic function of the input order and `seed`.

  Args:
    examples: prepared examples (with 'bucket').
    num_buckets: number of buckets.
    batch_size: examples per batch.
    seed: numpy seed (an int or a sequence such as (seed, epoch)).
    shuffle_buffer: per-bucket buffer size; 0 gives batch_size (batches follow
      the input order, as when the input is already shuffled).
    drop_remainder: drop the last partial batch of each bucket.

  Yields:
    (bucket index, list of <= batch_size examples).
  """
  # Hand-written, not grain's window shuffle: that buffer is not per bucket
  # and draws another order, so every reported run would change.
  rng = np.random.default_rng(seed)
  capacity = max(batch_size, shuffle_buffer)
  buffers: list[list[Example]] = [[] for _ in range(num_buckets)]
  for example in examples:
    bucket = example["bucket"]
    buffer = buffers[bucket]
    buffer.append(example)
    if len(buffer) >= capacity:
      yield bucket, _take_random(buffer, batch_size, rng)
  for bucket, buffer in enumerate(buffers):
    order = rng.permutation(len(buffer))
    rest = [buffer[i] for i in order]
    for start in range(0, len(rest), batch_size):
      group = rest[start:start + batch_size]
      if len(group) == batch_size or not drop_remainder:
        yield bucket, group


def eval_batches(
    examples: Iterable[Example], buckets: Buckets, batch_size: int
) -> Iterator[Batch]:
  """Padded batches holding every prepared example exactly once.

  Examples are grouped per bucket in input order; each bucket's last batch is
  completed with filler rows ('example_mask' 0). Memory: at most one partial
  batch per bucket.

  Besides the keys of `pad_batch`, each batch holds 'speaker' int32 [B]: the
  example's speaker as an index, speakers numbered 0, 1, ... in the order the
  input first shows them (so one split in one order always numbers them the
  same), -1 in filler rows. Examples with an empty 'speaker_id' share one
  index. The evaluation resamples speakers by it (`conformer_fl.stats`).
  """
  speaker_index: dict[str, int] = {}

  def batch_of(group: list[Example], bucket: int) -> Batch:
    batch = pad_batch(group, buckets.audio_lengths[bucket],
                      buckets.label_lengths[bucket], batch_size)
    speakers = np.full((batch_size,), -1, np.int32)
    speakers[:len(group)] = [speaker_index[e.get("speaker_id", "")]
                             for e in group]
    batch["speaker"] = speakers
    return batch

  pending: list[list[Example]] = [[] for _ in range(len(buckets))]
  for example in examples:
    speaker_index.setdefault(example.get("speaker_id", ""), len(speaker_index))
    group = pending[example["bucket"]]
    group.append(example)
    if len(group) == batch_size:
      yield batch_of(group, example["bucket"])
      pending[example["bucket"]] = []
  for bucket, group in enumerate(pending):
    if group:
      yield batch_of(group, bucket)


def pad_groups(
    groups: Iterable[tuple[int, list[Example]]], buckets: Buckets, batch_size: int
) -> Iterator[Batch]:
  """`pad_batch` over the (bucket, examples) groups of `bucket_by_length`."""
  for bucket, group in groups:
    yield pad_batch(group, buckets.audio_lengths[bucket],
                    buckets.label_lengths[bucket], batch_size)


def _take_random(buffer: list[Example], count: int,
                 rng: np.random.Generator) -> list[Example]:
  """Removes `count` random elements of `buffer` (swap-with-last) and returns them."""
  taken = []
  for _ in range(count):
    i = int(rng.integers(len(buffer)))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    taken.append(buffer.pop())
  return taken


def _as_str(value: Any) -> str:
  """An id or domain as str, for logs: bytes that are not UTF-8 escaped."""
  if value is None:
    return ""
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="backslashreplace")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _as_str(value.item())
  return str(value)
