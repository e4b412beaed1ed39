"""Tokenizers mapping normalized transcripts to label ids and back.

The project's CONTRACT for ids: id 0 is the blank (CTC, RNN-T) and the pad value of
label arrays; a tokenizer emits ids in [1, vocab_size) only, and `vocab_size`
counts the blank. Two tokenizers follow it:

* `SentencePieceTokenizer`: a SentencePiece model (unigram or BPE) trained on the
  training transcripts with pad_id=0 (the blank), unk_id=1 and no BOS/EOS, so the
  model's piece count is the vocab size including id 0. The pad piece is a control
  symbol: SentencePiece never emits it. Saved and loaded through
  `etils.epath`, so the model file may be on GCS (`gs://...`) or local disk.
* `CharTokenizer`: id 0 the blank, then one id per character of
  `conformer_fl.text.ALPHABET` (vocab_size = len(ALPHABET) + 1).

Both expect text normalized with `conformer_fl.text.normalize_text`; then
`decode(encode(text)) == text`.

Config fields read by `build_tokenizer` (an `ml_collections.ConfigDict` or any
object with these attributes):
  kind:        'sentencepiece' or 'char'.
  vocab_size:  int, SentencePiece vocabulary size including the blank id 0.
  model_type:  'unigram' or 'bpe' (SentencePiece only).
"""

from collections.abc import Iterable
import io
import os
import re
from typing import Any, Protocol

from absl import logging
from etils import epath
import sentencepiece as spm

from conformer_fl import text as text_lib

BLANK_ID = 0
UNK_ID = 1
TOKENIZER_FILENAME = "tokenizer.model"
_SPM_MAX_VOCAB = re.compile(r"value <= (\d+)")
_SPM_MIN_VOCAB = re.compile(r"required_chars\. (\d+) vs (\d+)")


class TokenizerFileError(ValueError):
  """A saved tokenizer model file that does not load (truncated, not a model)."""


class Tokenizer(Protocol):
  """What the pipeline and the decoders need from a tokenizer."""

  @property
  def vocab_size(self) -> int:
    """Number of ids including the blank id 0."""

  def encode(self, text: str) -> list[int]:
    """Ids in [1, vocab_size) of normalized `text`."""

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; id 0 (blank/pad) is ignored."""


class CharTokenizer:
  """Character tokenizer over `conformer_fl.text.ALPHABET`; id 0 is the blank."""

  def __init__(self, alphabet: str = text_lib.ALPHABET):
    if len(set(alphabet)) != len(alphabet):
      raise ValueError(f"Alphabet has repeated characters: {alphabet!r}")
    self._alphabet = alphabet
    self._char_to_id = {c: i + 1 for i, c in enumerate(alphabet)}

  @property
  def vocab_size(self) -> int:
    return len(self._alphabet) + 1

  def encode(self, text: str) -> list[int]:
    try:
      return [self._char_to_id[c] for c in text]
    except KeyError as e:
      raise ValueError(
          f"Character {e.args[0]!r} of {text!r} is not in the alphabet"
          f" {self._alphabet!r}; normalize text with"
          " conformer_fl.text.normalize_text first."
      ) from None

  def decode(self, ids: Iterable[int]) -> str:
    chars = []
    for i in ids:
      i = int(i)
      if i == BLANK_ID:
        continue
      if not 0 < i < self.vocab_size:
        raise ValueError(f"Id {i} is outside [0, {self.vocab_size}).")
      chars.append(self._alphabet[i - 1])
    return "".join(chars)


class SentencePieceTokenizer:
  """A SentencePiece model whose id 0 is the pad/blank piece."""

  def __init__(self, model_proto: bytes):
    self._model_proto = model_proto
    self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
    if self._processor.pad_id() != BLANK_ID:
      raise ValueError(
          "SentencePiece model must have pad_id=0 (the blank), has"
          f" pad_id={self._processor.pad_id()}."
      )

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  @property
  def model_proto(self) -> bytes:
    return self._model_proto

  def encode(self, text: str) -> list[int]:
    return list(self._processor.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    return self._processor.decode([int(i) for i in ids if int(i) != BLANK_ID])

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the model to `path`, a local or remote (`gs://`) file.

    The bytes go to a temporary file beside `path`, which is then renamed onto
    it: atomic on a local filesystem; on object stores (GCS) the rename is a
    copy, and the object appears whole or not at all either way.

    Args:
      path: the model file; its parent directory is created if needed.
    """
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp_path.write_bytes(self._model_proto)
    tmp_path.replace(path)


def train_sentencepiece(
    transcripts: Iterable[str], vocab_size: int, model_type: str = "unigram"
) -> SentencePieceTokenizer:
  """Trains SentencePiece on normalized transcripts.

  Args:
    transcripts: training transcripts; normalized here, empty ones dropped.
    vocab_size: number of pieces including the blank/pad id 0 and unk id 1.
    model_type: 'unigram' or 'bpe'.

  Returns:
    The trained tokenizer.

  Raises:
    ValueError: no text, an unknown model type, or a vocab size that the
      transcripts cannot support (too small for their characters, or larger
      than the number of distinct pieces they contain).
  """
  if model_type not in ("unigram", "bpe"):
    raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}.")
  sentences = [s for s in (text_lib.normalize_text(t) for t in transcripts) if s]
  if not sentences:
    raise ValueError("Cannot train SentencePiece: no non-empty transcripts.")
  num_chars = len(set("".join(sentences)))
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=BLANK_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        eos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
  except RuntimeError as e:
    message = str(e)
    too_high = _SPM_MAX_VOCAB.search(message)
    too_low = _SPM_MIN_VOCAB.search(message)
    summary = f"{len(sentences)} transcripts with {num_chars} distinct characters"
    if too_high:
      raise ValueError(
          f"tokenizer vocab_size={vocab_size} is too large for the training"
          f" text ({summary}): SentencePiece ({model_type}) can make at most"
          f" {too_high.group(1)} pieces from it. Lower the vocab size to"
          f" <= {too_high.group(1)} or train on more text."
      ) from e
    if too_low:
      raise ValueError(
          f"tokenizer vocab_size={vocab_size} is too small for the training"
          f" text ({summary}): it needs at least {too_low.group(2)} ids (every"
          " character, the word-boundary piece, pad and unk)."
      ) from e
    raise ValueError(
        f"SentencePiece training failed for vocab_size={vocab_size},"
        f" model_type={model_type!r} on {summary}: {message}"
    ) from e
  return SentencePieceTokenizer(model.getvalue())


def load_tokenizer(path: str | os.PathLike[str]) -> SentencePieceTokenizer:
  """Loads a SentencePiece tokenizer saved by `SentencePieceTokenizer.save`.

  Args:
    path: the model file, local or remote (`gs://`).

  Raises:
    FileNotFoundError: no file at `path`.
    TokenizerFileError: the file is not a whole SentencePiece model (the one
      line names it and the fix).
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No tokenizer model at {path}.")
  data = path.read_bytes()
  try:
    return SentencePieceTokenizer(data)
  except RuntimeError as e:  # SentencePiece's parse error of a damaged file.
    first_line = (str(e).strip().splitlines() or [""])[0]
    raise TokenizerFileError(
        f"{path} is not a valid SentencePiece model ({len(data)} bytes,"
        f" truncated or damaged: {first_line[:160]}); restore it from a copy"
        " of this run, or use a new workdir (a run's checkpoints need the"
        " tokenizer that trained them).") from e


def build_tokenizer(
    config: Any,
    transcripts: Iterable[str] | None,
    save_dir: str | os.PathLike[str] | None,
) -> Tokenizer:
  """Returns the tokenizer described by `config` (fields: module docstring).

  A SentencePiece model is loaded from `save_dir/tokenizer.model` when that file
  exists (so a resumed run keeps its ids), otherwise trained on `transcripts` and
  saved there. With several processes, let one process build it first.

  Args:
    config: tokenizer config (kind, vocab_size, model_type).
    transcripts: training transcripts; only read when a model must be trained.
    save_dir: directory of `tokenizer.model` (local or `gs://`); None trains
      without saving.

  Raises:
    ValueError: unknown kind, or a saved model whose vocab size differs from
      `config.vocab_size`.
  """
  kind = config.kind
  if kind == "char":
    return CharTokenizer()
  if kind != "sentencepiece":
    raise ValueError(f"tokenizer kind must be 'sentencepiece' or 'char', got {kind!r}.")
  path = epath.Path(save_dir) / TOKENIZER_FILENAME if save_dir else None
  if path and path.exists():
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size != config.vocab_size:
      raise ValueError(
          f"The saved tokenizer {path} has vocab_size={tokenizer.vocab_size} but"
          f" the config asks for {config.vocab_size}; delete the file or fix the"
          " config."
      )
    logging.info("Loaded tokenizer %s (vocab %d).", path, tokenizer.vocab_size)
    return tokenizer
  if transcripts is None:
    raise ValueError(f"No saved tokenizer at {path} and no transcripts to train one.")
  tokenizer = train_sentencepiece(transcripts, config.vocab_size, config.model_type)
  if path:
    tokenizer.save(path)
    logging.info("Trained and saved tokenizer %s (vocab %d).", path,
                 tokenizer.vocab_size)
  return tokenizer
