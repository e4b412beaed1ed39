"""A workdir on GCS: every file the package reads or writes there uses epath.

The fake GCS is etils.epath's own fsspec backend (the one `gs://` paths use
when TensorFlow is absent or EPATH_USE_TF=0) over an in-memory fsspec
filesystem registered for `gs://`. `etils.epath.testing.mock_epath()` cannot
serve here: it swaps the backend table, but with TensorFlow installed epath
sends `gs://` paths to its tf.io.gfile backend without consulting that table,
so the fake also turns that choice off.

Nothing of a `gs://` workdir may reach the local disk. Each test runs in an
empty working directory: builtin `open`, `os.makedirs` or `savefig(path)` on
`gs://bucket/...` would fail (no local `gs:/bucket/` directory) or create one,
which `_assert_nothing_local` rejects; and the file would then be missing from
the fake bucket, which the tests read back.
"""

import json
import os
import struct

from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations import memory
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from conformer_fl import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from conformer_fl.analysis import importance  # pylint: disable=g-import-not-at-top,wrong-import-position
from conformer_fl.analysis import importance_file  # pylint: disable=g-import-not-at-top,wrong-import-position
from conformer_fl.analysis import movement  # pylint: disable=g-import-not-at-top,wrong-import-position
from conformer_fl.analysis import plots  # pylint: disable=g-import-not-at-top,wrong-import-position
from conformer_fl.data import client_sizes  # pylint: disable=g-import-not-at-top,wrong-import-position
from conformer_fl.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from conformer_fl.experiment import figures  # pylint: disable=g-import-not-at-top,wrong-import-position

import importance_fakes  # tests/importance_fakes.py  # pylint: disable=g-import-not-at-top,wrong-import-position

_WORKDIR = "gs://bucket/run"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "a journey of a thousand miles begins with a single step",
    "birds of a feather flock together in the park",
    "every cloud has a silver lining even in the quiet valley",
] * 3


class _InMemoryGcs(memory.MemoryFileSystem):
  """fsspec's in-memory filesystem answering `gs://` URIs."""

  protocol = ("gs", "gcs")

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    if path.startswith("gs://"):
      path = "memory://" + path[len("gs://"):]
    return super()._strip_protocol(path)


class _FakeGcsBackend(epath_backend._FileSystemSpecBackend):  # pylint: disable=protected-access
  """epath's fsspec backend, with the in-memory filesystem for every path."""

  def __init__(self, fs):
    self._fs = fs

  def fs(self, path):
    del path
    return self._fs


@pytest.fixture(name="bucket")
def fixture_bucket(tmp_path, monkeypatch):
  """The in-memory filesystem behind `gs://`; cwd an empty local directory."""
  fs = _InMemoryGcs(global_store=False, skip_instance_cache=True)
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", _FakeGcsBackend(fs))  # pylint: disable=protected-access
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.chdir(tmp_path)
  return fs


def _assert_nothing_local():
  assert os.listdir(".") == [], "a gs:// path was written to the local disk"


def _png_size(data: bytes) -> tuple[int, int]:
  """(width, height) from a PNG's IHDR chunk."""
  assert data[:8] == _PNG_MAGIC
  return struct.unpack(">II", data[16:24])


def _spm_config(vocab_size=40):
  return ml_collections.ConfigDict(
      dict(kind="sentencepiece", vocab_size=vocab_size, model_type="unigram"))


def test_fake_gcs_is_not_the_local_disk(bucket):
  path = epath.Path(_WORKDIR) / "probe.txt"
  path.write_text("hello")
  assert bucket.cat_file(f"{_WORKDIR}/probe.txt") == b"hello"
  assert path.read_text() == "hello"
  assert not os.path.exists(f"{_WORKDIR}/probe.txt")
  with pytest.raises(FileNotFoundError):
    open(f"{_WORKDIR}/probe.txt", encoding="utf-8")  # pylint: disable=consider-using-with
  _assert_nothing_local()


def test_tokenizer_saved_to_gs_round_trips(bucket):
  trained = tokenizer_lib.build_tokenizer(_spm_config(), _CORPUS, _WORKDIR)
  model_path = f"{_WORKDIR}/{tokenizer_lib.TOKENIZER_FILENAME}"
  assert bucket.cat_file(model_path) == trained.model_proto
  # The temporary file was renamed onto the model, not left beside it.
  assert bucket.ls(_WORKDIR, detail=False) == ["/bucket/run/tokenizer.model"]

  sentence = "the lazy fox flocks in the quiet park"
  loaded = tokenizer_lib.load_tokenizer(model_path)
  assert loaded.vocab_size == 40
  assert loaded.encode(sentence) == trained.encode(sentence)
  assert loaded.decode(loaded.encode(sentence)) == sentence
  # A resumed run loads the saved model without transcripts.
  again = tokenizer_lib.build_tokenizer(_spm_config(), None, _WORKDIR)
  assert again.model_proto == trained.model_proto
  assert again.encode(sentence) == trained.encode(sentence)
  # Saving over an existing model replaces it.
  tokenizer_lib.SentencePieceTokenizer(trained.model_proto).save(model_path)
  assert bucket.ls(_WORKDIR, detail=False) == ["/bucket/run/tokenizer.model"]

  with pytest.raises(ValueError, match=(
      f"The saved tokenizer {model_path} has vocab_size=40 but the config asks"
      " for 50")):
    tokenizer_lib.build_tokenizer(_spm_config(50), None, _WORKDIR)
  with pytest.raises(FileNotFoundError,
                     match="No tokenizer model at gs://bucket/none/x.model."):
    tokenizer_lib.load_tokenizer("gs://bucket/none/x.model")
  with pytest.raises(ValueError, match="No saved tokenizer at gs://bucket/new"):
    tokenizer_lib.build_tokenizer(_spm_config(), None, "gs://bucket/new")
  _assert_nothing_local()


def test_analysis_finds_the_tokenizer_in_a_gs_workdir(bucket):
  run_config = ml_collections.ConfigDict(
      dict(data=dict(tokenizer=_spm_config().to_dict())))
  with pytest.raises(FileNotFoundError,
                     match=f"No tokenizer.model in {_WORKDIR}: the analysis"):
    importance._tokenizer(run_config, _WORKDIR)  # pylint: disable=protected-access
  trained = tokenizer_lib.train_sentencepiece(_CORPUS, 40)
  trained.save(f"{_WORKDIR}/tokenizer.model")
  loaded = importance._tokenizer(run_config, _WORKDIR)  # pylint: disable=protected-access
  assert loaded.model_proto == trained.model_proto
  assert bucket.exists(f"{_WORKDIR}/tokenizer.model")
  # The workdir recorded in importance.json stays a gs:// URI.
  assert importance._absolute(_WORKDIR) == _WORKDIR  # pylint: disable=protected-access
  assert importance._absolute("run") == os.path.join(os.getcwd(), "run")  # pylint: disable=protected-access
  _assert_nothing_local()


def test_workdir_reads_its_config_and_metrics_on_gs(bucket):
  run = workdir_lib.Workdir(_WORKDIR)
  assert os.fspath(run.config_path) == f"{_WORKDIR}/config.json"
  assert os.fspath(run.metrics_path) == f"{_WORKDIR}/metrics.jsonl"
  assert os.fspath(run.checkpoints_dir) == f"{_WORKDIR}/checkpoints"
  assert os.fspath(run.final_eval_path) == f"{_WORKDIR}/final_eval.json"
  assert os.fspath(run.analysis_dir) == f"{_WORKDIR}/analysis"
  with pytest.raises(workdir_lib.NoRunError, match=(
      f"No {_WORKDIR}/config.json: {_WORKDIR} holds no trained run")):
    run.config()
  assert run.metrics() == []
  bucket.pipe_file(f"{_WORKDIR}/config.json",
                   json.dumps({"seed": 3, "model": {"num_blocks": 4}}).encode())
  config = run.config()
  assert (config.seed, config.model.num_blocks) == (3, 4)
  # A torn last line (a write cut short) is skipped.
  bucket.pipe_file(f"{_WORKDIR}/metrics.jsonl",
                   b'{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 1.25}\n{"st')
  assert run.metrics() == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.25}]
  bucket.pipe_file(f"{_WORKDIR}/config.json", b'{"seed": ')
  with pytest.raises(workdir_lib.WorkdirError, match="is not valid JSON"):
    run.config()
  _assert_nothing_local()


def test_importance_and_update_norms_read_and_write_gs(bucket):
  results = importance_fakes.importance(
      {"decoder": importance_fakes.unit(0.0, label="ambient")})
  assert results.write(_WORKDIR) == epath.Path(
      f"{_WORKDIR}/analysis/importance.json")
  assert json.loads(bucket.cat_file(
      f"{_WORKDIR}/analysis/importance.json")) == results.to_json()
  assert importance_file.Importance.read(_WORKDIR) == results
  assert importance_file.Importance.read(epath.Path(_WORKDIR)) == results
  assert importance_file.Importance.exists(_WORKDIR)
  assert not importance_file.Importance.exists("gs://bucket/other")
  with pytest.raises(FileNotFoundError, match=(
      "No gs://bucket/other/analysis/importance.json: run the analysis pass"
      " on gs://bucket/other first")):
    importance_file.Importance.read("gs://bucket/other")

  records = [{"round": 1, "update_norm/decoder": 3.0},
             {"round": 2, "update_norm/decoder": 4.0},
             {"round": 3, "update_norm/decoder": 100.0}]
  bucket.pipe_file(f"{_WORKDIR}/metrics.jsonl", "".join(
      json.dumps(r) + "\n" for r in records).encode())
  assert movement.read_update_norm_sums(
      f"{_WORKDIR}/metrics.jsonl", ["decoder"], last_round=2) == {
          "decoder": 7.0}
  assert movement.read_update_norm_sums(
      "gs://bucket/other/metrics.jsonl", ["decoder"], last_round=2) is None
  _assert_nothing_local()


def test_plots_write_pngs_to_gs(bucket):
  fig = plt.figure(figsize=(2.0, 1.5))
  out = epath.Path(_WORKDIR) / "analysis"
  out.mkdir(parents=True, exist_ok=True)
  assert plots.save_png(fig, out / "blank.png") == (200, 150)
  assert _png_size(bucket.cat_file(f"{_WORKDIR}/analysis/blank.png")) == (
      200, 150)

  size = plots.heatmap([[0.1, 0.2], [0.3, 0.4]], ["a", "b"], [0, 5], 0.05,
                       "WER", "round", f"{_WORKDIR}/analysis/heatmap_wer.png")
  assert size == tuple(round(x * plots.DPI)
                       for x in plots.heatmap_size_inches(2, 2))
  assert _png_size(bucket.cat_file(f"{_WORKDIR}/analysis/heatmap_wer.png")) == (
      size)
  _assert_nothing_local()


def test_client_size_report_writes_to_gs(bucket):
  table, png = client_sizes.client_size_report(
      {"a": 1, "b": 4, "c": 4, "d": 11}, f"{_WORKDIR}/clients")
  assert table.splitlines()[2] == "| 4 | 20 | 1 | 4.0 | 5.0 | 11 |"
  assert png == f"{_WORKDIR}/clients/client_sizes.png"
  assert _png_size(bucket.cat_file(png)) == (500, 320)
  _assert_nothing_local()


def test_experiment_figures_write_to_gs(bucket):
  summary = dict(
      setup=dict(eval_split="test", confidence=0.95),
      models=[dict(seed=0, learning_curve=[dict(step=1, wer=0.9)])],
      arms=[dict(key="any/full", arm="full", wer=0.3, low=0.25, high=0.35,
                 params_fraction=1.0, step_seconds_fraction=1.0,
                 dev_wer_by_round=[[1, 0.5]]),
            dict(key="c070/targeted", arm="targeted", wer=0.32, low=0.27,
                 high=0.37, params_fraction=0.7, step_seconds_fraction=0.8,
                 dev_wer_by_round=[[1, 0.4]])])
  figures.write_figures(summary, _WORKDIR)
  for name in (figures.COST_FIGURE, figures.ROUNDS_FIGURE,
               figures.CURVE_FIGURE):
    assert _png_size(bucket.cat_file(f"{_WORKDIR}/{name}"))[0] > 0
  _assert_nothing_local()
