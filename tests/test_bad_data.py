"""Bad data is skipped and counted, missing data is named, 0 turns a clip off.

- Transcripts and speaker ids whose bytes are not UTF-8, or that are None or
  empty, are skipped and counted by reason through every pipeline function
  (tokenizer, train, eval and client datasets), read from a TFDS stand-in with
  the synthetic corpus's features; the good examples come through unchanged.
- Utterances that CTC cannot align are skipped by the run configs' default;
  `batching.encoder_frames` is checked against the model's own frame count and
  CTC's loss, and the tiny corpus loses no utterance to the check.
- LibriSpeech that is not prepared is never downloaded: the entry point exits
  with one line naming the folder and the command that prepares it.
- `--config.FIELD=0` turns every optional clip and rate off, through the entry
  point's own flag parser.
"""

import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from conformer_fl import config_lib
from conformer_fl import models
from conformer_fl import optimizers
from conformer_fl.data import batching
from conformer_fl.data import federated
from conformer_fl.data import input_pipeline
from conformer_fl.data import librispeech
from conformer_fl.data import tokenizer as tokenizer_lib
from conformer_fl.federated import dropout as federated_dropout
from conformer_fl.models import frontend

import entry_point  # tests/entry_point.py
import stand_ins  # tests/stand_ins.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
_CHAR = tokenizer_lib.CharTokenizer()
_BAD_UTF8 = b"caf\xe9 \xff"  # Latin-1 bytes: not UTF-8.

# (text, speaker id) of the stand-in's train split; every utterance is 1 s.
_GOOD = [("hello there", "s1"), ("good morning", "s1"), ("set a timer", "s2"),
         ("turn it off", "s2"), ("play some music", "s3")]
_BAD = [
    (_BAD_UTF8, "s1"),         # undecodable transcript
    ("call my sister", _BAD_UTF8),  # undecodable speaker id
    ("what time is it", ""),   # empty speaker id
    ("open the door", "   "),  # blank speaker id
]


def _audio(index: int, num_samples: int = 16000) -> np.ndarray:
  audio = np.full((num_samples,), 5, np.int16)
  audio[0] = index + 1
  return audio


def _bad_bytes_examples():
  for i, (text, speaker) in enumerate(_GOOD + _BAD):
    yield f"u{i}", {"audio": _audio(i), "text": text, "speaker_id": speaker,
                    "domain": 1, "duration": 1.0, "id": f"u{i}"}


CflBadBytesStandIn = stand_ins.builder_class(
    "CflBadBytesStandIn",
    "Train: the 5 good utterances of `_GOOD` and the 4 bad ones of `_BAD`.",
    {"train": _bad_bytes_examples})


@pytest.fixture(scope="module")
def bad_bytes_config(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("bad_bytes"))
  # array_record: the clients are read by record index.
  CflBadBytesStandIn(data_dir=data_dir).download_and_prepare(
      file_format="array_record")
  config = input_pipeline.default_data_config()
  config.dataset = "cfl_bad_bytes_stand_in"
  config.builder_config = ""
  config.data_dir = data_dir
  config.train_split = config.eval_split = "train"
  config.bucket_seconds = (1.0,)
  config.batch_size = 1
  config.eval_batch_size = 4
  config.tokenizer.kind = "char"
  return config


def _ids(batches) -> list[str]:
  """The transcripts of the real rows of `batches`, sorted."""
  return sorted(_CHAR.decode(b["labels"][r]) for b in batches
                for r in range(len(b["example_mask"])) if b["example_mask"][r])


def test_bad_bytes_are_skipped_and_counted_for_clients(bad_bytes_config):
  skips = batching.SkipCounter("clients")
  datasets = federated.get_client_datasets(bad_bytes_config, _CHAR,
                                           skips=skips)
  assert dict(skips.counts) == {"undecodable_transcript": 1,
                                "undecodable_speaker_id": 1,
                                "missing_speaker_id": 2}
  # The good clients are exactly those of the good utterances.
  assert datasets.sizes() == {"s1": 2, "s2": 2, "s3": 1}
  assert sorted(_CHAR.decode(e["labels"]) for c in datasets.client_ids
                for e in datasets.read_client(c)) == sorted(
                    text for text, _ in _GOOD)


def test_bad_bytes_central_batches_keep_examples_without_speaker(
    bad_bytes_config):
  # Central training needs no speaker: only the undecodable transcript goes.
  skips = batching.SkipCounter("eval")
  batches = list(input_pipeline.get_eval_batches(bad_bytes_config, _CHAR,
                                                 skips=skips))
  assert dict(skips.counts) == {"undecodable_transcript": 1}
  expected = sorted([text for text, _ in _GOOD] + [t for t, _ in _BAD[1:]])
  assert _ids(batches) == expected
  skips = batching.SkipCounter("train")
  it = input_pipeline.get_train_batches(bad_bytes_config, _CHAR, seed=0,
                                        skips=skips)
  assert _ids([next(it) for _ in range(8)]) == expected
  assert dict(skips.counts) == {"undecodable_transcript": 1}


def test_bad_bytes_do_not_stop_the_tokenizer(bad_bytes_config, tmp_path):
  config = bad_bytes_config.copy_and_resolve_references()
  config.tokenizer.kind = "sentencepiece"
  config.tokenizer.vocab_size = 30
  tokenizer = input_pipeline.get_tokenizer(config, str(tmp_path))
  assert tokenizer.decode(tokenizer.encode("set a timer")) == "set a timer"
  examples = list(input_pipeline.load_split_from_config(config, "train"))
  # The loader passes the bad fields on undecoded, for batching to name.
  by_id = {e["id"]: e for e in examples}
  assert by_id["u5"]["text"] == _BAD_UTF8
  assert by_id["u6"]["speaker_id"] == _BAD_UTF8
  assert by_id["u0"]["text"] == "hello there"


@pytest.mark.parametrize("field, value, reason", [
    ("text", None, "missing_transcript"),
    ("text", 3.5, "missing_transcript"),
    ("text", _BAD_UTF8, "undecodable_transcript"),
    ("text", np.array(_BAD_UTF8, dtype=object), "undecodable_transcript"),
    ("speaker_id", None, "missing_speaker_id"),
    ("speaker_id", "", "missing_speaker_id"),
    ("speaker_id", _BAD_UTF8, "undecodable_speaker_id"),
])
def test_each_bad_field_has_its_reason(field, value, reason, caplog):
  good = {"audio": _audio(0), "text": "None of these", "speaker_id": "s1",
          "id": b"utt\xff"}
  buckets = batching.make_buckets([1.0], labels_per_second=24)
  skips = batching.SkipCounter("unit")
  bad = dict(good, **{field: value})
  with caplog.at_level(logging.WARNING):
    assert batching.prepare_example(bad, _CHAR, buckets, skips,
                                    require_speaker_id=True) is None
  assert dict(skips.counts) == {reason: 1}
  # The log names the reason and the id, its bad bytes escaped.
  assert reason in caplog.text and repr("utt\\xff") in caplog.text
  # The same example with the good field passes, and its text is its own (a
  # None transcript is never the word "none").
  kept = batching.prepare_example(good, _CHAR, buckets, skips,
                                  require_speaker_id=True)
  assert _CHAR.decode(kept["labels"]) == "none of these"
  assert kept["speaker_id"] == "s1" and kept["id"] == "utt\\xff"
  # Central training does not ask for a speaker id: those examples stay.
  if field == "speaker_id":
    kept = batching.prepare_example(bad, _CHAR, buckets, skips)
    assert kept is not None and kept["speaker_id"] == ""
  assert skips.total == 1


# --------------------------------------------------------------------------
# CTC alignability.


def test_encoder_frames_are_the_models_frames():
  """`encoder_frames` counts the valid frames of the model's logits."""
  config = models.get_model_config("tiny", decoder="ctc",
                                   conv_norm="group_norm", conv_norm_groups=4)
  model = models.build_model(config)
  lengths = [399, 400, 559, 560, 1040, 1041, 4800, 7999, 16000]
  audio = jnp.ones((len(lengths), 16000), jnp.float32) * 0.1
  paddings = (jnp.arange(16000)[None, :] >= jnp.asarray(lengths)[:, None]
              ).astype(jnp.float32)
  labels = jnp.ones((len(lengths), 4), jnp.int32)

  @jax.jit
  def frames(rng):
    variables = model.init(rng, audio, paddings, labels, jnp.zeros(labels.shape),
                           train=False)
    out = model.apply(variables, audio, paddings, labels,
                      jnp.zeros(labels.shape), train=False)
    return jnp.sum(1.0 - out["logit_paddings"], axis=1)

  counted = np.asarray(frames(jax.random.key(0))).astype(int).tolist()
  assert counted == [batching.encoder_frames(n) for n in lengths]
  assert counted == [0, 1, 1, 1, 2, 2, 7, 12, 25]


def test_ctc_frames_needed_is_exactly_where_ctc_fails():
  """One frame fewer than `ctc_frames_needed` gives CTC's ~1e5 (log 0) loss."""
  cases = ([3, 4, 5], [3, 3, 4], [7, 7, 7, 7], [1, 2, 1, 2, 2])
  rows, frames = [], []
  for labels in cases:
    needed = batching.ctc_frames_needed(np.array(labels))
    assert needed == len(labels) + sum(
        a == b for a, b in zip(labels, labels[1:]))
    rows += [labels, labels]
    frames += [needed, needed - 1]
  width = max(map(len, rows))
  labels = jnp.asarray([r + [0] * (width - len(r)) for r in rows], jnp.int32)
  label_paddings = jnp.asarray([[0.0] * len(r) + [1.0] * (width - len(r))
                                for r in rows])
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(len(rows), 30, 10)),
                       jnp.float32)
  logit_paddings = (jnp.arange(30)[None, :] >= jnp.asarray(frames)[:, None]
                    ).astype(jnp.float32)
  losses = np.asarray(models.ctc_loss(logits, logit_paddings, labels,
                                      label_paddings))
  assert (losses[0::2] < 100.0).all(), losses  # needed frames: aligned
  assert (losses[1::2] > 1e4).all(), losses     # one fewer: log(0)


def test_run_configs_skip_ctc_unalignable_utterances():
  ctc = config_lib.central_run_config(size="tiny", corpus="tiny", decoder="ctc")
  rnnt = config_lib.central_run_config(size="tiny", corpus="tiny",
                                       decoder="rnnt")
  fed = config_lib.federated_run_config(size="tiny", corpus="tiny")
  assert ctc.data.skip_ctc_unalignable and fed.data.skip_ctc_unalignable
  assert not rnnt.data.skip_ctc_unalignable
  assert ctc.data.max_label_rate == 0.0
  buckets = batching.make_buckets([1.0, 4.0], labels_per_second=200)
  # The case: 52 labels in 0.3 s (7 encoder frames).
  dense = {"audio": _audio(0, 4800), "text": "ab" * 26, "id": "dense"}
  fits = {"audio": _audio(1, 4800), "text": "abcdefg", "id": "fits"}
  repeats = {"audio": _audio(2, 4800), "text": "aabbcdd", "id": "repeats"}
  skips = batching.SkipCounter("ctc")
  kept = list(batching.prepare_examples(
      [dense, fits, repeats], _CHAR, buckets, skips,
      **input_pipeline.prepare_options(ctc.data)))
  assert [e["id"] for e in kept] == ["fits"]  # 7 labels, 7 frames.
  assert dict(skips.counts) == {"ctc_unalignable": 2}
  skips = batching.SkipCounter("rnnt")
  kept = list(batching.prepare_examples(
      [dense, fits, repeats], _CHAR, buckets, skips,
      **input_pipeline.prepare_options(rnnt.data)))
  assert len(kept) == 3 and skips.total == 0


def test_the_tiny_corpus_loses_no_utterance_to_the_ctc_check(tiny_corpus_dir):
  config = config_lib.central_run_config(size="tiny", corpus="tiny",
                                         domain="all").data
  config.data_dir = tiny_corpus_dir
  config.tokenizer.kind = "char"
  config.bucket_seconds = (16.0,)
  for split, count in (("train", 40), ("dev", 10), ("test", 10)):
    skips = batching.SkipCounter(split)
    examples = list(input_pipeline.load_split_from_config(config, split))
    kept = list(batching.prepare_examples(
        examples, _CHAR, input_pipeline.buckets_from_config(config), skips,
        **input_pipeline.prepare_options(config)))
    assert len(examples) == len(kept) == count and skips.total == 0, split


# --------------------------------------------------------------------------
# LibriSpeech that is not prepared.


def test_librispeech_is_never_downloaded(tmp_path, monkeypatch):
  def no_download(*args, **kwargs):
    raise AssertionError(f"a download was started: {args}")

  for name in ("download", "download_and_extract", "extract"):
    monkeypatch.setattr(tfds.download.DownloadManager, name, no_download)
  config = config_lib.data_config_for_corpus("librispeech")
  config.data_dir = str(tmp_path / "tfds")
  with pytest.raises(librispeech.LibriSpeechNotPrepared) as raised:
    input_pipeline.get_tokenizer(config, str(tmp_path / "run"))
  message = str(raised.value)
  assert message == librispeech.not_prepared_message(config.data_dir)
  assert "\n" not in message
  assert (f"LibriSpeech is not prepared in {tmp_path / 'tfds'}: expected the"
          f" TFDS dataset 'librispeech' ") in message
  assert str(tmp_path / "tfds" / "librispeech") in message
  assert "tfds build librispeech --data_dir=DIR" in message
  assert "$TFDS_DATA_DIR" in message
  assert not (tmp_path / "tfds").exists()  # Nothing written, nothing fetched.


def test_entry_point_names_missing_librispeech_in_one_line(tmp_path):
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir))
  result = subprocess.run(
      [sys.executable, "-m", "conformer_fl.main",
       "--config=configs/central.py:size=tiny,corpus=librispeech,steps=1",
       f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last == "error: " + librispeech.not_prepared_message(str(data_dir))
  assert "Traceback" not in result.stderr
  assert list(data_dir.iterdir()) == []  # No download folder.


# --------------------------------------------------------------------------
# 0 = off, through the entry point's flag parser.


def _parse(config: str, *overrides: str):
  return entry_point.parse_config(str(ROOT / config), *overrides)


_CENTRAL_OFF = (
    "--config.central.clip_grad_norm=0",
    "--config.data.max_label_rate=0",
    "--config.data.skip_ctc_unalignable=False",
    "--config.model.dropout_rate=0",
    "--config.model.attention_dropout_rate=0",
    "--config.model.specaug_num_freq_masks=0",
    "--config.model.specaug_max_freq_mask=0",
    "--config.model.specaug_num_time_masks=0",
    "--config.model.specaug_max_time_mask_ratio=0",
)
_FEDERATED_OFF = (
    "--config.federated.client_optimizer.clip_grad_norm=0",
    "--config.federated.clip_update_norm=0",
    "--config.federated.dropout.kind=uniform",
    "--config.federated.dropout.default_rate=0",
)


def _updates(optimizer, grads_sequence, params):
  state = optimizer.init(params)
  out = []
  for grads in grads_sequence:
    updates, state = optimizer.update(grads, state, params)
    out.append(updates)
  return out


def test_zero_turns_the_client_clip_off():
  config = _parse("configs/federated.py:size=tiny,corpus=tiny", *_FEDERATED_OFF)
  c = config.federated.client_optimizer
  assert c.clip_grad_norm == 0.0 and config.federated.clip_update_norm == 0.0
  params = {"w": jnp.zeros((3,))}
  grads = [{"w": jnp.array([300.0, -400.0, 0.0])}]
  off = optimizers.client_optimizer_from_config(c)
  plain = optax.sgd(c.learning_rate)
  np.testing.assert_array_equal(_updates(off, grads, params)[0]["w"],
                                _updates(plain, grads, params)[0]["w"])
  # The default (5.0) clips the same gradient (norm 500) to norm 5.
  clipped = optimizers.client_optimizer_from_config(
      _parse("configs/federated.py:size=tiny").federated.client_optimizer)
  np.testing.assert_allclose(
      optax.global_norm(_updates(clipped, grads, params)[0]),
      5.0 * c.learning_rate, rtol=1e-6)
  with pytest.raises(ValueError, match=r"clip_grad_norm=-1.0 must be >= 0"):
    optimizers.make_client_optimizer("sgd", learning_rate=0.1,
                                     clip_grad_norm=-1.0)
  model_config = config_lib.model_config("tiny", conv_norm="group_norm",
                                         decoder="ctc")
  model = models.build_model(model_config)
  audio = jnp.zeros((1, 16000))
  labels = jnp.ones((1, 4), jnp.int32)
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), audio, audio, labels, jnp.zeros(labels.shape),
      train=False))["params"]
  assert federated_dropout.dropout_spec_from_config(
      config.federated.dropout, params, {},
      models.droppable_modules_from_config(model_config)) is None


def test_zero_turns_central_clip_dropout_and_specaugment_off():
  config = _parse("configs/central.py:size=tiny,corpus=tiny", *_CENTRAL_OFF)
  default = _parse("configs/central.py:size=tiny,corpus=tiny")
  assert config.central.clip_grad_norm == 0.0
  assert config.data.max_label_rate == 0.0
  assert not config.data.skip_ctc_unalignable
  # The optimizer: exactly Adam with its schedule, no clip.
  params = {"w": jnp.zeros((3,))}
  # Step 1 is clipped by the default (norm 500 > 5), step 2 is not (norm 5):
  # with the clip, step 2 outweighs step 1 in Adam's moments, without it not.
  grads = [{"w": jnp.array([300.0, -400.0, 0.0])},
           {"w": jnp.array([-3.0, 4.0, 0.0])}]
  c = config.central
  plain = optax.adam(optimizers.learning_rate_schedule(c.peak_learning_rate,
                                                       c.warmup_steps),
                     b1=c.b1, b2=c.b2, eps=c.eps)
  off = _updates(optimizers.make_central_optimizer(c, params), grads, params)
  np.testing.assert_array_equal(off[1]["w"], _updates(plain, grads, params)[1]["w"])
  clipped = _updates(optimizers.make_central_optimizer(default.central, params),
                     grads, params)
  assert np.all(np.sign(clipped[1]["w"][:2]) == -np.sign(off[1]["w"][:2]))
  # The model: with dropout and SpecAugment off, a training step draws no
  # random numbers at all (the default draws them for both).
  batch = {"audio": jnp.zeros((2, 8000)), "audio_paddings": jnp.zeros((2, 8000)),
           "labels": jnp.array([[3, 4, 5], [6, 7, 0]], jnp.int32),
           "label_paddings": jnp.array([[0, 0, 0], [0, 0, 1]], jnp.float32)}

  def random_draws(model_config) -> int:
    model = models.build_model(model_config)
    variables = jax.eval_shape(lambda rng: model.init(
        rng, batch["audio"], batch["audio_paddings"], batch["labels"],
        batch["label_paddings"], train=False), jax.random.key(0))
    jaxpr = jax.make_jaxpr(lambda variables, rng: models.per_example_loss(
        model, variables, batch, train=True, rng=rng)[0])(
            variables, jax.random.key(1))
    return str(jaxpr).count("random_bits")

  assert random_draws(config.model) == 0
  assert random_draws(default.model) > 0
  # Masks of width 0 mask nothing, whatever their number.
  features = jnp.asarray(np.random.default_rng(0).normal(size=(2, 50, 80)),
                         jnp.float32)
  masked = frontend.spec_augment(
      jax.random.key(0), features, jnp.zeros((2, 50)),
      num_freq_masks=default.model.specaug_num_freq_masks,
      max_freq_mask=config.model.specaug_max_freq_mask,
      num_time_masks=default.model.specaug_num_time_masks,
      max_time_mask_ratio=config.model.specaug_max_time_mask_ratio)
  np.testing.assert_array_equal(masked, features)
