"""`python -m conformer_fl.tools.transcribe`: audio files -> transcripts of a
run, and `python -m conformer_fl.export`: the run as a self-contained model.

The workdir is what `train.train_central` writes (config.json, tokenizer.model,
the step-0 checkpoint; zero steps keep it cheap) plus a step-3 checkpoint of
perturbed weights, so that the latest and the step-0 checkpoints transcribe
differently. The expected transcripts come from the evaluation path: corpus
examples prepared with their labels by the input pipeline, padded to the run's
8 s bucket in batches of 8, decoded by `evaluation.make_eval_step` and
detokenized by `evaluation.evaluate` (the tool reads WAV files, pads to 4 s in
batches of 2 and calls `models.greedy_decode` itself). FLAC and OGG files are
written with soundfile, the library the tool reads them with.
"""

import itertools
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import wave

import jax
import ml_collections
import numpy as np
import pytest
import scipy.signal
import soundfile

from conformer_fl import checkpointing
from conformer_fl import config_lib
from conformer_fl import evaluation
from conformer_fl import export
from conformer_fl import exported
from conformer_fl import models
from conformer_fl import train
from conformer_fl.data import batching
from conformer_fl.data import input_pipeline
from conformer_fl.tools import transcribe

import xla_env  # tests/xla_env.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
LATEST_STEP = 3
NUM_UTTERANCES = 3
# Decoded batches [2, 64000] (the longest utterance is 3.9 s): every decoding
# of these tests has that shape, compiled once (and cached on disk).
BATCH_SIZE = 2


def _write_wav(path, samples: np.ndarray, rate: int = 16000,
               channels: int = 1, width: int = 2) -> str:
  """Writes raw little-endian `samples` (already of `width` bytes) as a WAV."""
  with wave.open(os.fspath(path), "wb") as w:
    w.setnchannels(channels)
    w.setsampwidth(width)
    w.setframerate(rate)
    w.writeframes(np.ascontiguousarray(samples).tobytes())
  return os.fspath(path)


def _eval_path_transcripts(workdir, examples,
                           steps: tuple[int, ...]) -> dict[int, list[str]]:
  """{step: `evaluation.evaluate` hypotheses of `examples` (common dicts)}."""
  run_config = ml_collections.ConfigDict(
      json.loads((workdir / "config.json").read_text()))
  tokenizer = input_pipeline.get_tokenizer(run_config.data, os.fspath(workdir))
  model = models.build_model(run_config.model)
  buckets = input_pipeline.buckets_from_config(run_config.data)
  skips = batching.SkipCounter("test")
  prepared = list(batching.prepare_examples(examples, tokenizer, buckets,
                                            skips))
  assert len(prepared) == len(examples) and buckets.audio_lengths == (128000,)
  eval_step = jax.jit(evaluation.make_eval_step(model))
  store = checkpointing.CheckpointStore(os.fspath(workdir), read_only=True)
  transcripts = {}
  for step in steps:
    batches = batching.eval_batches(prepared, buckets,
                                    run_config.data.eval_batch_size)
    _, pairs = evaluation.evaluate(eval_step, store.restore_variables(step),
                                   batches, tokenizer.decode)
    assert [r for r, _ in pairs] == [e["text"] for e in examples]
    transcripts[step] = [h for _, h in pairs]
  store.close()
  return transcripts


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_corpus_dir):
  """(workdir, dev examples, {step: evaluation-path transcripts})."""
  workdir = tmp_path_factory.mktemp("transcribe_run")
  config = config_lib.central_run_config(size="tiny", corpus="tiny",
                                         domain="all", steps=0)
  config.data.data_dir = tiny_corpus_dir
  config.data.tokenizer.vocab_size = 48
  config.data.bucket_seconds = (8.0,)
  train.train_central(config, os.fspath(workdir))
  # Other weights at a later step, as training would leave them.
  store = checkpointing.CheckpointStore(os.fspath(workdir))
  state = store.restore(0)
  rng = np.random.default_rng(0)
  state["params"] = jax.tree.map(
      lambda x: np.asarray(x) + rng.normal(0.0, 0.1, x.shape).astype(x.dtype),
      state["params"])
  store.save(LATEST_STEP, state)
  store.close()
  run_config = ml_collections.ConfigDict(
      json.loads((workdir / "config.json").read_text()))
  examples = list(itertools.islice(
      input_pipeline.load_split_from_config(run_config.data, "dev"),
      NUM_UTTERANCES))
  expected = _eval_path_transcripts(workdir, examples, (0, LATEST_STEP))
  return workdir, examples, expected


@pytest.fixture(scope="module")
def wavs(run, tmp_path_factory):
  """{name: path}: the dev utterances at 16 kHz, one at 8 kHz, bad files."""
  _, examples, _ = run
  directory = tmp_path_factory.mktemp("wavs")
  paths = {f"u{i}": _write_wav(directory / f"u{i}.wav", e["audio"])
           for i, e in enumerate(examples)}
  audio_8k = scipy.signal.resample_poly(
      examples[1]["audio"].astype(np.float64), 1, 2)
  paths["u1_8k"] = _write_wav(
      directory / "u1_8k.wav",
      np.clip(np.round(audio_8k), -32768, 32767).astype("<i2"), rate=8000)
  paths["stereo"] = _write_wav(directory / "stereo.wav",
                               np.repeat(examples[0]["audio"], 2), channels=2)
  corrupt = directory / "corrupt.wav"
  corrupt.write_bytes(pathlib.Path(paths["u0"]).read_bytes()[:300])
  paths["corrupt"] = os.fspath(corrupt)
  return paths


def _cli(workdir, files: list[str], *flags: str):
  env = xla_env.subprocess_env(1, TF_CPP_MIN_LOG_LEVEL="2")
  command = [sys.executable, "-m", "conformer_fl.tools.transcribe",
             f"--workdir={workdir}", *flags, *files]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False)


@pytest.mark.slow
def test_cli_prints_one_line_per_file_in_order(run, wavs):
  workdir, _, expected = run
  files = [wavs["u0"], wavs["u1"], wavs["u1_8k"], wavs["u2"], wavs["u0"]]
  # Three batches of two, the last with a filler row.
  result = _cli(workdir, files, f"--batch_size={BATCH_SIZE}")
  assert result.returncode == 0, result.stderr[-4000:]
  lines = result.stdout.splitlines()
  assert len(lines) == len(files)
  names, texts = zip(*(line.split("\t") for line in lines))
  assert list(names) == files
  # The 16 kHz files: as evaluation decodes them with the latest checkpoint.
  latest = expected[LATEST_STEP]
  assert [texts[0], texts[1], texts[3], texts[4]] == [
      latest[0], latest[1], latest[2], latest[0]]
  assert any(latest) and len(set(latest)) > 1
  assert f"{workdir}: step {LATEST_STEP}" in result.stderr
  # The 8 kHz file: resampled (said on stderr), then the same model; the
  # Python API gives what the command prints.
  assert f"{wavs['u1_8k']}: resampled from 8000 Hz to 16000 Hz" in result.stderr
  audios, rates = zip(*(transcribe.load_audio(f) for f in files))
  assert rates == (16000, 16000, 8000, 16000, 16000)
  assert audios[2].dtype == np.float32
  with wave.open(files[2]) as w:
    assert audios[2].size == 2 * w.getnframes()
  assert transcribe.transcribe_audio(
      workdir, audios, batch_size=BATCH_SIZE) == list(texts)
  assert texts[2]


@pytest.mark.slow
def test_cli_refuses_bad_files_before_decoding(run, wavs):
  workdir, examples, _ = run
  result = _cli(workdir, [wavs["u0"], wavs["stereo"], wavs["corrupt"]])
  assert result.returncode == 1
  assert result.stdout == ""
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert errors == [
      f"error: {wavs['stereo']}: 2 channels; only mono (1 channel) files are"
      " transcribed: mix it down first, e.g. `sox IN.wav -c 1 OUT.wav`",
      f"error: {wavs['corrupt']}: truncated: the header announces"
      f" {examples[0]['audio'].size} samples, the file holds 128",
  ]
  assert f"{workdir}: step" not in result.stderr  # No model was loaded.


@pytest.mark.slow
def test_step_selects_the_checkpoint(run):
  workdir, examples, expected = run
  assert transcribe.Transcriber(workdir).step == LATEST_STEP
  first = transcribe.Transcriber(workdir, step=0, batch_size=BATCH_SIZE)
  assert first.step == 0
  audios = [e["audio"] for e in examples]
  assert first(audios) == expected[0]
  assert expected[0] != expected[LATEST_STEP]
  # int16 audio is scaled as the input pipeline scales it.
  floats = [a.astype(np.float32) / 32768.0 for a in audios]
  assert first(floats) == expected[0]


@pytest.mark.slow
def test_workdir_errors_name_the_problem(run, tmp_path):
  workdir, examples, _ = run
  audio = [examples[0]["audio"]]
  with pytest.raises(transcribe.TranscribeError,
                     match=r"no checkpoint for step 7; saved steps: \[0, 3\]"):
    transcribe.transcribe_audio(workdir, audio, step=7)
  with pytest.raises(transcribe.TranscribeError, match="no such workdir"):
    transcribe.transcribe_audio(tmp_path / "missing", audio)
  with pytest.raises(transcribe.TranscribeError, match="no config.json"):
    transcribe.transcribe_audio(tmp_path, audio)
  (tmp_path / "experiment").mkdir()
  (tmp_path / "experiment" / "experiment_config.json").write_text("{}")
  with pytest.raises(transcribe.TranscribeError,
                     match="an experiment's workdir; give one of its runs"):
    transcribe.transcribe_audio(tmp_path / "experiment", audio)
  # A run whose training has not saved a checkpoint yet.
  for name in ("config.json", "tokenizer.model"):
    (tmp_path / name).write_bytes((workdir / name).read_bytes())
  with pytest.raises(transcribe.TranscribeError, match="no checkpoints/"):
    transcribe.transcribe_audio(tmp_path, audio)
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(transcribe.TranscribeError, match="no checkpoint in"):
    transcribe.transcribe_audio(tmp_path, audio)
  (tmp_path / "tokenizer.model").unlink()
  with pytest.raises(transcribe.TranscribeError, match="no tokenizer.model"):
    transcribe.transcribe_audio(tmp_path, audio)


# Reading and resampling: no model.


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_audio_scales_each_wav_pcm_width(tmp_path, width):
  values = np.array([-1.0, -0.5, 0.0, 0.25, 0.5 - 2.0**-7], np.float64)
  full_scale = 2 ** (8 * width - 1)
  ints = np.round(values * full_scale).astype(np.int64)
  if width == 1:
    raw = (ints + 128).astype(np.uint8)
  elif width == 3:
    raw = np.stack([(ints >> s) & 0xFF for s in (0, 8, 16)], 1).astype(np.uint8)
  else:
    raw = ints.astype(f"<i{width}")
  samples, rate = transcribe.read_audio(
      _write_wav(tmp_path / "x.wav", raw, rate=22050, width=width))
  assert rate == 22050
  if width <= 2:  # int16, as the corpus stores audio.
    assert samples.dtype == np.int16
    np.testing.assert_array_equal(samples, np.round(values * 32768))
  else:
    assert samples.dtype == np.float32
    np.testing.assert_allclose(samples, values, rtol=0, atol=1e-7)


def test_read_audio_refuses_bad_wav_files(tmp_path):
  def error(path) -> str:
    with pytest.raises(transcribe.TranscribeError) as e:
      transcribe.read_audio(os.fspath(path))
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message

  tone = (1000 * np.sin(np.arange(1600) / 5)).astype("<i2")
  assert "no such file" in error(tmp_path / "missing.wav")
  (tmp_path / "empty.wav").write_bytes(b"")
  assert "empty file" in error(tmp_path / "empty.wav")
  (tmp_path / "text.wav").write_text("hello, this is not audio\n")
  assert "not an audio file that libsndfile reads" in error(
      tmp_path / "text.wav")
  assert "3 channels" in error(
      _write_wav(tmp_path / "three.wav", np.repeat(tone, 3), channels=3))
  assert "no audio samples" in error(
      _write_wav(tmp_path / "none.wav", tone[:0]))
  good = _write_wav(tmp_path / "good.wav", tone)
  data = pathlib.Path(good).read_bytes()
  (tmp_path / "header.wav").write_bytes(data[:20])
  assert "not an audio file that libsndfile reads" in error(
      tmp_path / "header.wav")
  (tmp_path / "short.wav").write_bytes(data[:-1001])
  assert error(tmp_path / "short.wav").endswith(
      "truncated: the header announces 1600 samples, the file holds 1099")


def test_read_audio_reads_float_wav(tmp_path):
  # IEEE float (format tag 3).
  floats = np.array([0.0, 0.5, -0.25, 1.0], "<f4").tobytes()
  fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
  body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data"
          + struct.pack("<I", len(floats)) + floats)
  (tmp_path / "float.wav").write_bytes(
      b"RIFF" + struct.pack("<I", len(body)) + body)
  samples, rate = transcribe.read_audio(os.fspath(tmp_path / "float.wav"))
  assert rate == 16000 and samples.dtype == np.float32
  np.testing.assert_array_equal(samples, [0.0, 0.5, -0.25, 1.0])


def test_resample_to_16khz():
  # A 440 Hz tone at 8 kHz and at 16 kHz: the same signal, twice the samples.
  seconds = 0.5
  tone = lambda rate: 0.5 * np.sin(2 * np.pi * 440 * np.arange(
      int(seconds * rate)) / rate)
  audio_8k = np.round(tone(8000) * 32768).astype(np.int16)
  resampled = transcribe.resample(audio_8k, 8000)
  assert resampled.dtype == np.float32
  assert resampled.shape == (int(16000 * seconds),)
  inner = slice(400, -400)  # Away from the filter's edge effects.
  np.testing.assert_allclose(resampled[inner], tone(16000)[inner], atol=2e-3)
  # 44.1 kHz -> 16 kHz (ratio 160/441).
  assert transcribe.resample(np.zeros(44100, np.int16), 44100).shape == (16000,)
  # 16-bit 16 kHz audio is scaled exactly as the input pipeline scales it.
  ints = np.array([-32768, -1, 0, 1, 32767], np.int16)
  batch = batching.pad_batch([{"audio": ints, "labels": np.ones(1, np.int32)}],
                             5, 1, 1)
  np.testing.assert_array_equal(transcribe.to_float(ints), batch["audio"][0])


# Other formats (soundfile) and the exported model.


def test_read_audio_reads_flac_and_ogg_as_wav(tmp_path):
  tone = np.round(8000 * np.sin(np.arange(4000) / 7)).astype(np.int16)
  soundfile.write(tmp_path / "x.flac", tone, 16000, subtype="PCM_16")
  samples, rate = transcribe.read_audio(os.fspath(tmp_path / "x.flac"))
  assert rate == 16000 and samples.dtype == np.int16
  np.testing.assert_array_equal(samples, tone)  # Lossless: the same int16.
  # 24-bit FLAC at 22.05 kHz: float32, resampled to 16 kHz by load_audio.
  values = tone / 32768.0
  soundfile.write(tmp_path / "x24.flac", values, 22050, subtype="PCM_24")
  samples, rate = transcribe.read_audio(os.fspath(tmp_path / "x24.flac"))
  assert rate == 22050 and samples.dtype == np.float32
  np.testing.assert_allclose(samples, values, rtol=0, atol=2.0**-23)
  audio, rate = transcribe.load_audio(os.fspath(tmp_path / "x24.flac"))
  # resample_poly: ceil(N * 320 / 441) samples.
  assert rate == 22050 and audio.shape == (-(-4000 * 320 // 441),)
  soundfile.write(tmp_path / "x.ogg", values.astype(np.float32), 44100,
                  format="OGG", subtype="VORBIS")
  audio, rate = transcribe.load_audio(os.fspath(tmp_path / "x.ogg"))
  assert rate == 44100 and audio.dtype == np.float32
  assert audio.size == -(-4000 * 160 // 441)


def test_read_audio_refuses_bad_files_in_one_line(tmp_path):
  def error(path) -> str:
    with pytest.raises(transcribe.TranscribeError) as e:
      transcribe.read_audio(os.fspath(path))
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message

  (tmp_path / "text.flac").write_text("hello, this is not audio\n")
  assert "not an audio file that libsndfile reads" in error(
      tmp_path / "text.flac")
  stereo = np.zeros((100, 2), np.int16)
  soundfile.write(tmp_path / "stereo.flac", stereo, 16000)
  assert "2 channels; only mono" in error(tmp_path / "stereo.flac")
  assert "no such file" in error(tmp_path / "missing.flac")
  (tmp_path / "empty.flac").write_bytes(b"")
  assert "empty file" in error(tmp_path / "empty.flac")


@pytest.fixture(scope="module")
def exported_run(run, tmp_path_factory):
  """(source workdir, exported dir): the run with two evaluations logged."""
  workdir, _, _ = run
  source = tmp_path_factory.mktemp("export_source") / "run"
  shutil.copytree(workdir, source)
  with open(source / "metrics.jsonl", "a") as f:
    for step, wer in ((LATEST_STEP, 0.625), (LATEST_STEP + 2, 0.5)):
      f.write(json.dumps({"step": step, "loss": 9.0, "eval/loss": 8.0,
                          "eval/wer": wer, "eval/cer": wer / 2,
                          "eval/wer_low": wer - 0.25,
                          "eval/wer_high": wer + 0.25,
                          "eval/num_examples": 4.0}) + "\n")
  out = tmp_path_factory.mktemp("exports") / "model"
  result = subprocess.run(
      [sys.executable, "-m", "conformer_fl.export", f"--workdir={source}",
       f"--out={out}"], cwd=ROOT, env=xla_env.subprocess_env(1),
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.strip() == (
      f"{out}: step {LATEST_STEP} of {source}, WER 0.625")
  return source, out


@pytest.mark.slow
def test_the_exported_model_transcribes_as_the_workdir(run, wavs, exported_run,
                                                       tmp_path):
  workdir, examples, expected = run
  _, out = exported_run
  assert sorted(p.name for p in out.iterdir()) == [
      "MODEL_CARD.md", "config.json", "model_card.json", "params.msgpack",
      "tokenizer.model"]
  flac = os.fspath(tmp_path / "u1.flac")
  soundfile.write(flac, examples[1]["audio"], 16000, subtype="PCM_16")
  files = [wavs["u0"], flac, wavs["u2"]]
  result = _cli(out, files, f"--batch_size={BATCH_SIZE}")
  assert result.returncode == 0, result.stderr[-4000:]
  texts = [line.split("\t")[1] for line in result.stdout.splitlines()]
  assert texts == expected[LATEST_STEP]
  assert f"{out}: step {LATEST_STEP}" in result.stderr
  # The Python API: the same transcripts, the same variables as the checkpoint.
  audios = [e["audio"] for e in examples]
  assert transcribe.Transcriber(out, batch_size=BATCH_SIZE)(audios) == (
      expected[LATEST_STEP])
  loaded = exported.load_model(out)
  store = checkpointing.CheckpointStore(os.fspath(workdir), read_only=True)
  saved = store.restore_variables(LATEST_STEP)
  store.close()
  for a, b in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert loaded.tokenizer.vocab_size == loaded.config.model.vocab_size
  with pytest.raises(transcribe.TranscribeError,
                     match=f"an exported model of step {LATEST_STEP}"):
    transcribe.Transcriber(out, step=0)


def test_the_model_card_holds_the_measured_wers(exported_run):
  source, out = exported_run
  card = json.loads((out / "model_card.json").read_text())
  assert card["source"] == {"workdir": os.fspath(source.resolve()),
                            "step_key": "step", "step": LATEST_STEP,
                            "mode": "central"}
  # The evaluation after the exported step is left out.
  assert card["evaluations"] == [{
      "step": LATEST_STEP, "wer": 0.625, "cer": 0.3125, "wer_low": 0.375,
      "wer_high": 0.875, "loss": 8.0, "num_examples": 4.0}]
  assert card["wer"] == 0.625 and card["final_eval"] is None
  assert card["model"]["num_params"] == sum(
      np.size(x) for x in jax.tree.leaves(exported.load_model(out).variables[
          "params"]))
  assert card["audio"] == {"sample_rate": 16000, "channels": 1}
  markdown = (out / "MODEL_CARD.md").read_text()
  assert f"| {LATEST_STEP} | 0.625 | 0.375 - 0.875 | 0.312 | 4 |" in markdown


def test_export_refuses_in_one_line(exported_run, tmp_path):
  source, out = exported_run
  with pytest.raises(export.ExportError,
                     match="exists and is not an empty directory"):
    export.export(source, out)
  with pytest.raises(export.ExportError, match="no such workdir"):
    export.export(tmp_path / "missing", tmp_path / "new")
  with pytest.raises(export.ExportError,
                     match=r"no checkpoint for step 7; saved steps: \[0, 3\]"):
    export.export(source, tmp_path / "new", step=7)
  assert not (tmp_path / "new").exists()
