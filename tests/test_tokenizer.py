"""Tests of conformer_fl.data.tokenizer: SentencePiece and character tokenizers."""

import os

import ml_collections
import pytest

from conformer_fl import text as text_lib
from conformer_fl.data import tokenizer as tokenizer_lib

_RAW_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore!",
    "Don't count your chickens before they hatch.",
    "A journey of a thousand miles begins with a single step.",
    "Where there's smoke, there's fire.",
    "Actions speak louder than words; words are cheap.",
    "The early bird catches the worm, but the second mouse gets the cheese.",
    "It's never too late to learn something new.",
    "Birds of a feather flock together in the park.",
    "Every cloud has a silver lining, even in the quiet valley.",
] * 3
_CORPUS = [text_lib.normalize_text(t) for t in _RAW_CORPUS]
_HELD_OUT = ["the fox and the mouse learn words", "zebras quiz jovial keepers",
             "x", "a a a a"]


def _config(kind="sentencepiece", vocab_size=60, model_type="unigram"):
  return ml_collections.ConfigDict(
      dict(kind=kind, vocab_size=vocab_size, model_type=model_type))


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def spm_tokenizer(request, tmp_path_factory):
  save_dir = str(tmp_path_factory.mktemp(f"spm_{request.param}"))
  tokenizer = tokenizer_lib.build_tokenizer(
      _config(model_type=request.param), _RAW_CORPUS, save_dir)
  return tokenizer, save_dir


def test_spm_vocab_size_includes_blank_and_ids_are_in_range(spm_tokenizer):
  tokenizer, _ = spm_tokenizer
  assert tokenizer.vocab_size == 60
  for text in _CORPUS + _HELD_OUT:
    ids = tokenizer.encode(text)
    assert ids, text
    assert min(ids) >= 1 and max(ids) < tokenizer.vocab_size
    assert tokenizer_lib.BLANK_ID not in ids


def test_spm_round_trip_on_normalized_text(spm_tokenizer):
  tokenizer, _ = spm_tokenizer
  for text in _CORPUS + _HELD_OUT:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_spm_decode_ignores_blanks(spm_tokenizer):
  tokenizer, _ = spm_tokenizer
  ids = tokenizer.encode("the quick brown fox")
  padded = [0, 0] + ids[:2] + [0] + ids[2:] + [0, 0, 0]
  assert tokenizer.decode(padded) == "the quick brown fox"
  assert tokenizer.decode([0, 0]) == ""


def test_spm_saved_model_reloads_with_identical_ids(spm_tokenizer):
  tokenizer, save_dir = spm_tokenizer
  path = os.path.join(save_dir, tokenizer_lib.TOKENIZER_FILENAME)
  assert os.path.exists(path)
  reloaded = tokenizer_lib.load_tokenizer(path)
  assert reloaded.vocab_size == tokenizer.vocab_size
  for text in _CORPUS + _HELD_OUT:
    assert reloaded.encode(text) == tokenizer.encode(text)


def test_build_tokenizer_reuses_saved_model_without_transcripts(spm_tokenizer):
  tokenizer, save_dir = spm_tokenizer
  path = os.path.join(save_dir, tokenizer_lib.TOKENIZER_FILENAME)
  mtime = os.path.getmtime(path)
  model_type = "bpe" if "bpe" in save_dir else "unigram"
  again = tokenizer_lib.build_tokenizer(_config(model_type=model_type), None,
                                        save_dir)
  assert again.model_proto == tokenizer.model_proto
  assert os.path.getmtime(path) == mtime


def test_build_tokenizer_rejects_saved_model_of_other_vocab_size(spm_tokenizer):
  _, save_dir = spm_tokenizer
  with pytest.raises(ValueError, match="vocab_size=60 but the config asks for 50"):
    tokenizer_lib.build_tokenizer(_config(vocab_size=50), None, save_dir)


def test_spm_training_is_deterministic():
  a = tokenizer_lib.train_sentencepiece(_CORPUS, 50, "unigram")
  b = tokenizer_lib.train_sentencepiece(_CORPUS, 50, "unigram")
  assert a.model_proto == b.model_proto


def test_spm_too_large_vocab_gives_clear_error():
  with pytest.raises(ValueError, match=r"vocab_size=5000 is too large.*at most \d+"):
    tokenizer_lib.train_sentencepiece(_CORPUS[:3], 5000, "unigram")


def test_spm_too_small_vocab_gives_clear_error():
  with pytest.raises(ValueError, match=r"vocab_size=10 is too small.*at least \d+"):
    tokenizer_lib.train_sentencepiece(_CORPUS, 10, "unigram")


def test_spm_rejects_empty_training_text():
  with pytest.raises(ValueError, match="no non-empty transcripts"):
    tokenizer_lib.train_sentencepiece(["", "?!", "  "], 40, "unigram")


def test_char_tokenizer_ids_by_hand():
  tokenizer = tokenizer_lib.build_tokenizer(_config(kind="char"), None, None)
  assert tokenizer.vocab_size == len(text_lib.ALPHABET) + 1 == 29
  # ALPHABET = " '" + a..z: ' ' -> 1, "'" -> 2, 'a' -> 3, 'z' -> 28.
  assert tokenizer.encode("a z'") == [3, 1, 28, 2]
  assert tokenizer.decode([0, 3, 0, 1, 28, 2, 0]) == "a z'"


def test_char_tokenizer_round_trip_and_range():
  tokenizer = tokenizer_lib.CharTokenizer()
  for text in _CORPUS + _HELD_OUT:
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)
    assert min(ids) >= 1 and max(ids) < tokenizer.vocab_size
    assert tokenizer.decode(ids) == text


def test_char_tokenizer_names_unnormalized_character():
  with pytest.raises(ValueError, match="'!'.*normalize_text"):
    tokenizer_lib.CharTokenizer().encode("hi!")
  with pytest.raises(ValueError, match="outside"):
    tokenizer_lib.CharTokenizer().decode([29])


def test_unknown_kind_is_rejected():
  with pytest.raises(ValueError, match="kind must be"):
    tokenizer_lib.build_tokenizer(_config(kind="wordpiece"), _CORPUS, None)
