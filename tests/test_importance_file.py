"""analysis/importance.json as `Importance`: read, written, missing fields."""

import copy
import dataclasses
import json

import pytest

from conformer_fl.analysis import importance_file

# An importance.json as the analysis pass writes it (two units, one stability
# pair), every key in the file's order.
_FILE = {
    "schema_version": 1,
    "workdir": "/runs/a",
    "step_key": "round",
    "granularity": "module",
    "trained_step": 8,
    "checkpoint_steps": [0, 4, 8],
    "taus": [0, 4],
    "rerandomize_seeds": [1001],
    "model": {"num_blocks": 2, "model_dim": 64, "conv_norm": "group_norm",
              "decoder": "ctc", "num_params": 5000},
    "eval": {"split": "dev", "domains": ["news"], "num_batches": 3,
             "num_examples": 24.0},
    "thresholds": {"max_abs_wer_increase": 0.01, "max_rel_wer_increase": 0.05,
                   "rule": "either", "wer_increase": 0.02, "confidence": 0.95,
                   "bootstrap_samples": 1000},
    "baseline": {"wer": 0.4, "loss": 2.5, "cer": 0.21,
                 "wer_interval": [0.35, 0.45], "num_speakers": 6},
    "units": {
        "encoder/block_00/conv": {
            "path": ["encoder", "block_00", "conv"], "num_params": 1200,
            "reinit_wer": [0.43, 0.41], "reinit_loss": [2.75, 2.5],
            "rerandomize_wer": [0.5], "rerandomize_loss": [3.0],
            "wer_increase": 0.03, "wer_increase_low": 0.025,
            "wer_increase_high": 0.035, "relative_wer_increase": 0.075,
            "loss_increase": 0.25, "rerandomize_wer_increase": 0.1,
            "label": "critical", "ambient": False,
            "movement": {"distance": 1.5, "initial_norm": 3.0,
                         "relative_distance": 0.5, "rms_movement": 0.0625,
                         "update_norm_sum": 7.25}},
        "decoder": {
            "path": ["decoder"], "num_params": 650,
            "reinit_wer": [0.4, 0.4], "reinit_loss": [2.5, 2.5],
            "rerandomize_wer": [0.4], "rerandomize_loss": [2.5],
            "wer_increase": 0.0, "wer_increase_low": 0.0,
            "wer_increase_high": 0.0, "relative_wer_increase": 0.0,
            "loss_increase": 0.0, "rerandomize_wer_increase": 0.0,
            "label": "ambient", "ambient": True,
            "movement": {"distance": 0.0, "initial_norm": 2.0,
                         "relative_distance": 0.0, "rms_movement": 0.0,
                         "update_norm_sum": None}},
    },
    "ambient": ["decoder"],
    "critical": ["encoder/block_00/conv"],
    "undetermined": [],
    "movement_test": {"measure": "relative_distance",
                      "units": ["encoder/block_00/conv"], "num_units": 1,
                      "strata": {"conv": 1}, "spearman": None,
                      "pvalue": None},
    "correlations": {"distance": {"wer_increase": {
        "num_units": 2, "spearman": {"statistic": 1.0, "pvalue": None},
        "kendall": {"statistic": 1.0, "pvalue": None}}}},
    "stability": None,
    "timing": {"evaluation_seconds": 1.5, "num_variants": 7,
               "variants_per_call": 4, "vectorized": True},
    "figures": {"heatmap_wer": {"file": "heatmap_wer.png", "width": 640,
                                "height": 480}},
}


def test_a_written_file_reads_back_as_its_typed_fields(tmp_path):
  result = importance_file.Importance.from_json(_FILE)
  assert result.to_json() == _FILE
  assert json.dumps(result.to_json()) == json.dumps(_FILE)  # Key order too.
  conv = result.units["encoder/block_00/conv"]
  assert (conv.wer_increase, conv.wer_increase_low, conv.wer_increase_high) == (
      0.03, 0.025, 0.035)
  assert conv.label == "critical" and not conv.ambient
  assert conv.path == ("encoder", "block_00", "conv")
  assert conv.reinit_wer == (0.43, 0.41)
  assert conv.movement.update_norm_sum == 7.25
  assert result.units["decoder"].ambient
  assert result.baseline.wer_interval == (0.35, 0.45)
  assert result.model.num_blocks == 2 and result.eval.domains == ("news",)
  assert result.thresholds.wer_increase == 0.02
  assert result.taus == (0, 4) and result.ambient == ("decoder",)
  assert result.figures["heatmap_wer"] == importance_file.Figure(
      "heatmap_wer.png", 640, 480)

  changed = dataclasses.replace(
      result, trained_step=4, stability={"runs": ["/runs/a", "/runs/b"]})
  path = changed.write(tmp_path / "run")
  assert path == tmp_path / "run" / "analysis" / "importance.json"
  assert importance_file.Importance.exists(tmp_path / "run")
  read = importance_file.Importance.read(tmp_path / "run")
  assert read == changed
  assert read.trained_step == 4 and read.stability["runs"][1] == "/runs/b"
  assert json.loads(path.read_text()) == dict(
      _FILE, trained_step=4, stability={"runs": ["/runs/a", "/runs/b"]})


def test_missing_fields_are_named_or_optional():
  broken = copy.deepcopy(_FILE)
  del broken["units"]["decoder"]["wer_increase"]
  with pytest.raises(importance_file.ImportanceFileError, match=(
      r"importance.json lacks units.decoder.wer_increase: analyse the run"
      r" again")):
    importance_file.Importance.from_json(broken)
  with pytest.raises(importance_file.ImportanceFileError,
                     match="lacks baseline.wer:"):
    importance_file.Importance.from_json(
        dict(_FILE, baseline={"loss": 1.0}))
  # Fields that files written before them lack read as None.
  old = copy.deepcopy(_FILE)
  for key in ("label", "wer_increase_low", "wer_increase_high"):
    del old["units"]["decoder"][key]
  for key in ("cer", "wer_interval", "num_speakers"):
    del old["baseline"][key]
  del old["movement_test"], old["figures"]
  result = importance_file.Importance.from_json(old)
  decoder = result.units["decoder"]
  assert decoder.label is None and not decoder.ambient
  assert decoder.wer_increase_low is None and decoder.wer_increase == 0.0
  assert result.baseline.wer_interval is None and result.baseline.wer == 0.4
  assert result.movement_test is None and result.figures == {}


def test_nan_is_refused_when_written(tmp_path):
  result = importance_file.Importance.from_json(_FILE)
  bad = dataclasses.replace(result, baseline=dataclasses.replace(
      result.baseline, wer=float("nan")))
  with pytest.raises(ValueError, match="Out of range float"):
    bad.write(tmp_path)
