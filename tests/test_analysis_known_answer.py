"""End to end on the tiny corpus: a frozen unit is ambient; tau = 0 is the init.

A tiny (one-block) batch-norm Conformer is trained centrally for a few steps
with one unit frozen (`config.central.frozen_units`), then the analysis pass
runs through `main.run` (config.mode 'analysis') on its
workdir.
"""

import importlib.util
import json
import os
import struct

import jax
import numpy as np
import pytest

from conformer_fl import checkpointing
from conformer_fl import evaluation
from conformer_fl import main
from conformer_fl import models
from conformer_fl import workdir as workdir_lib
from conformer_fl.analysis import importance
from conformer_fl.analysis import importance_file
from conformer_fl.analysis import plots
from conformer_fl.analysis import resets
from conformer_fl.data import input_pipeline
from conformer_fl.data import tokenizer as tokenizer_lib

_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _config_module(name):
  """configs/NAME.py, loaded by path (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      f"_config_{name}", os.path.join(_CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


analysis_config = _config_module("analysis")
central_config = _config_module("central")

FROZEN = "encoder/block_00/ffn2"  # No batch norm inside: nothing moves.
STEPS = 4
NUM_VARIANTS = 1 + 7 * (3 + 1)
TOP_LEVEL_KEYS = {
    "schema_version", "workdir", "step_key", "granularity", "trained_step",
    "checkpoint_steps", "taus", "rerandomize_seeds", "model", "eval",
    "thresholds", "baseline", "units", "ambient", "critical", "undetermined",
    "correlations", "movement_test",
    "stability", "timing", "figures"}
UNIT_KEYS = {
    "path", "num_params", "reinit_wer", "reinit_loss", "rerandomize_wer",
    "rerandomize_loss", "wer_increase", "relative_wer_increase",
    "loss_increase", "rerandomize_wer_increase", "movement", "ambient",
    "wer_increase_low", "wer_increase_high", "label"}
MOVEMENT_KEYS = {"distance", "initial_norm", "relative_distance", "rms_movement",
                 "update_norm_sum"}


@pytest.fixture(scope="module")
def workdir(tiny_corpus_dir, tmp_path_factory):
  """A finished tiny central run with FROZEN never updated."""
  config = central_config.get_config(
      f"size=tiny,corpus=tiny,norm=batch_norm,steps={STEPS},domain=all")
  config.data.data_dir = tiny_corpus_dir
  config.data.tokenizer.vocab_size = 64
  config.data.bucket_seconds = (8.0,)  # One shape: compile once.
  config.model.num_blocks = 1
  config.central.peak_learning_rate = 1e-2
  config.central.warmup_steps = 2
  config.central.log_every = 2
  config.central.eval_every = STEPS
  config.central.checkpoint_every = 2
  config.central.frozen_units = (FROZEN,)
  workdir = str(tmp_path_factory.mktemp("analysis_run"))
  main.run(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def results(workdir):
  # 1 + 7 units x (3 taus + 1 seed) variants, 4 per call: the 4 front-end
  # resets in one chunk, the others in 7 chunks sharing the front end.
  config = analysis_config.get_config("granularity=module,seeds=1,variants=4")
  return main.run(config, workdir)


@pytest.fixture(scope="module")
def saved(workdir):
  """Host variables of the initial and the trained checkpoints."""
  store = checkpointing.CheckpointStore(workdir, read_only=True)
  return {step: store.restore_variables(step) for step in (0, STEPS)}


def test_frozen_unit_reset_changes_nothing_and_is_ambient(results):
  frozen = results.units[FROZEN]
  baseline = results.baseline
  assert frozen.reinit_wer == (baseline.wer,) * len(results.taus)
  assert frozen.reinit_loss == (baseline.loss,) * len(results.taus)
  assert frozen.wer_increase == 0.0 and frozen.loss_increase == 0.0
  assert frozen.ambient and FROZEN in results.ambient
  # Its reset changes no utterance: the paired interval is [0, 0].
  assert frozen.label == "ambient"
  assert frozen.wer_increase_low == frozen.wer_increase_high == 0.0
  labels = {u.label for u in results.units.values()}
  assert labels <= set(importance.LABELS)
  for name, unit in results.units.items():
    assert unit.wer_increase_low <= unit.wer_increase <= unit.wer_increase_high
    assert name in getattr(results, unit.label)
  assert frozen.movement.distance == 0.0
  # Units that trained did move, and resetting them changes the loss.
  trained_units = [u for n, u in results.units.items() if n != FROZEN]
  assert all(u.movement.distance > 0 for u in trained_units)
  assert any(u.loss_increase != 0.0 for u in trained_units)


def test_reset_to_the_trained_step_is_the_baseline(results):
  assert results.taus == (0, 2, STEPS) == results.checkpoint_steps
  for unit in results.units.values():
    assert unit.reinit_wer[-1] == results.baseline.wer
    assert unit.reinit_loss[-1] == pytest.approx(results.baseline.loss,
                                                 rel=1e-6)


def test_every_unit_reset_to_tau0_reproduces_the_initial_model(
    workdir, saved, results):
  del results  # Only for the fixture order: the run's outputs exist.
  initial, trained = saved[0], saved[STEPS]
  # Batch statistics moved in training, so their reset is tested too.
  assert not all(jax.tree.leaves(jax.tree.map(
      np.array_equal, initial["batch_stats"], trained["batch_stats"])))
  units = models.list_units(trained["params"], "module")
  reset = trained
  for path in units.values():
    reset = resets.reset_unit(reset, initial, path)
  jax.tree.map(np.testing.assert_array_equal, reset, initial)

  run_config = workdir_lib.Workdir(workdir).config()
  model = models.build_model(run_config.model)
  tokenizer = tokenizer_lib.load_tokenizer(
      os.path.join(workdir, tokenizer_lib.TOKENIZER_FILENAME))
  batches = list(input_pipeline.get_eval_batches(run_config.data, tokenizer))
  eval_step = jax.jit(evaluation.make_eval_step(model))
  from_resets, _ = evaluation.evaluate(eval_step, reset, batches,
                                       tokenizer.decode)
  from_checkpoint, _ = evaluation.evaluate(eval_step, initial, batches,
                                           tokenizer.decode)
  assert from_resets == from_checkpoint
  from_trained, _ = evaluation.evaluate(eval_step, trained, batches,
                                        tokenizer.decode)
  assert from_trained["loss"] != from_checkpoint["loss"]


def test_importance_json_has_every_field(workdir, results):
  with open(os.path.join(workdir, "analysis", "importance.json")) as f:
    written = json.load(f)
  assert written == results.to_json()
  assert importance_file.Importance.from_json(written) == results
  assert set(written) == TOP_LEVEL_KEYS
  assert written["granularity"] == "module" and written["step_key"] == "step"
  assert written["trained_step"] == STEPS
  assert list(written["units"]) == [
      "encoder/subsampling"] + [f"encoder/block_00/{m}" for m in (
          "ffn1", "mhsa", "conv", "ffn2", "final_norm")] + ["decoder"]
  for unit in written["units"].values():
    assert set(unit) == UNIT_KEYS
    assert set(unit["movement"]) == MOVEMENT_KEYS
    assert len(unit["reinit_wer"]) == len(unit["reinit_loss"]) == 3
    assert len(unit["rerandomize_wer"]) == len(written["rerandomize_seeds"]) == 1
    assert unit["movement"]["update_norm_sum"] is None  # A central run.
  assert sorted(written["ambient"] + written["critical"]
                + written["undetermined"]) == sorted(written["units"])
  assert sum(u["num_params"] for u in written["units"].values()) == (
      written["model"]["num_params"])
  assert set(written["correlations"]) == {"distance", "relative_distance",
                                          "rms_movement"}
  primary = written["movement_test"]
  assert primary["measure"] == "relative_distance"
  assert primary["units"] == [f"encoder/block_00/{m}"
                              for m in ("ffn1", "mhsa", "conv", "ffn2")]
  assert primary["strata"] == {"conv": 1, "ffn": 2, "mhsa": 1}
  assert written["eval"]["num_examples"] == 10.0
  assert written["timing"]["num_variants"] == NUM_VARIANTS


def _png_size(path):
  with open(path, "rb") as f:
    header = f.read(24)
  assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
  return struct.unpack(">II", header[16:24])


def test_figures_are_pngs_of_the_expected_size(workdir, results):
  out = os.path.join(workdir, "analysis")
  num_units, num_taus = len(results.units), len(results.taus)
  expected = {
      "heatmap_wer": plots.heatmap_size_inches(num_units, num_taus),
      "heatmap_loss": plots.heatmap_size_inches(num_units, num_taus),
      "rerandomization": plots.bars_size_inches(num_units),
      # Three movement panels for a central run: distance, relative
      # distance, RMS movement.
      "movement_scatter": (3 * plots.SCATTER_SIZE_INCHES[0],
                           plots.SCATTER_SIZE_INCHES[1]),
  }
  assert set(results.figures) == set(expected)
  with open(os.path.join(out, "report.md")) as f:
    report_text = f.read()
  for key, (width, height) in expected.items():
    figure = results.figures[key]
    size = (round(width * plots.DPI), round(height * plots.DPI))
    assert (figure.width, figure.height) == size
    assert _png_size(os.path.join(out, figure.file)) == size
    assert f"]({figure.file})" in report_text
  assert FROZEN in report_text
  # The title names the run's folder, not where it lies on this machine.
  assert report_text.splitlines()[0] == (
      f"# Layer importance of the run `{os.path.basename(workdir)}` (the"
      " folder above this report's)")
  assert str(workdir) not in report_text
