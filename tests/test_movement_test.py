"""Claim 4's primary test (analysis/movement_test.py): strata, size, calibration."""

import numpy as np
import pytest
from scipy import stats

from conformer_fl.analysis import movement_test

import importance_fakes  # tests/importance_fakes.py


def test_droppable_module_types():
  names = ["encoder/subsampling", "encoder/block_00/ffn1",
           "encoder/block_00/mhsa", "encoder/block_00/conv",
           "encoder/block_00/ffn2", "encoder/block_00/final_norm",
           "encoder/block_01", "decoder"]
  assert movement_test.droppable_module_types(names) == {
      "encoder/block_00/ffn1": "ffn", "encoder/block_00/mhsa": "mhsa",
      "encoder/block_00/conv": "conv", "encoder/block_00/ffn2": "ffn",
      "encoder/block_01": "block"}


def test_permutations_stay_within_strata():
  strata = ["a", "b", "a", "c", "b", "a"]
  perms = movement_test.within_strata_permutations(strata, 500, seed=1)
  assert perms.shape == (500, 6)
  for row in perms:
    assert sorted(row) == list(range(6))
    assert all(strata[j] == strata[i] for i, j in enumerate(row))
  # The lone 'c' never moves; the three 'a' take all 3! orders.
  assert np.all(perms[:, 3] == 3)
  assert len({tuple(row[[0, 2, 5]]) for row in perms}) == 6


def test_statistics_match_scipy_and_the_residual_partial():
  rng = np.random.default_rng(0)
  x, y = rng.random(12), rng.random(12)
  size = rng.integers(100, 10000, 12)
  types = ["ffn", "conv", "mhsa"] * 4
  result = movement_test.movement_test(x, y, size, types, num_permutations=200)
  assert result["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
  rx, ry, rz = (stats.rankdata(v) for v in (x, y, np.log(size)))
  design = np.stack([np.ones(12), rz], 1)
  residual = lambda v: v - design @ np.linalg.lstsq(design, v, rcond=None)[0]
  expected = np.corrcoef(residual(rx), residual(ry))[0, 1]
  assert result["partial_spearman_log_params"] == pytest.approx(expected)
  assert result["strata"] == {"conv": 4, "ffn": 4, "mhsa": 4}
  assert 1 / 201 <= result["pvalue"] <= 1.0
  constant = movement_test.movement_test(x, np.ones(12), size, types)
  assert constant["spearman"] is None and constant["pvalue"] is None


def _confounded(rng, within=0.0):
  """16 units, 4 of each of 4 module types; type shifts both movement and
  importance (and size); `within` plants an association inside types."""
  types = np.repeat(["ffn", "mhsa", "conv", "norm"], 4)
  shift = np.repeat([0.0, 1.0, 2.0, 3.0], 4)
  noise = rng.normal(size=16)
  x = shift + rng.normal(size=16)
  y = shift + within * x + (1 - within) * noise
  size = np.repeat([4096, 1024, 2048, 64], 4)
  return x, y, size, list(types)


def test_stratified_null_rejects_at_the_nominal_rate():
  # Movement and importance share a module-type effect but are independent
  # within types: the stratified test rejects at ~5% (measured: 5.3%),
  # scipy's iid p-value most of the time (measured: 74%).
  rng = np.random.default_rng(0)
  stratified, iid = 0, 0
  for i in range(300):
    x, y, size, types = _confounded(rng)
    result = movement_test.movement_test(x, y, size, types,
                                         num_permutations=999, seed=i)
    stratified += result["pvalue"] <= 0.05
    iid += stats.spearmanr(x, y).pvalue <= 0.05
  assert 0.02 <= stratified / 300 <= 0.085
  assert iid / 300 > 0.5


def test_association_within_types_is_found():
  # Measured: 100 of 100 data sets rejected at 5%.
  rng = np.random.default_rng(1)
  found = 0
  for i in range(100):
    x, y, size, types = _confounded(rng, within=0.8)
    found += movement_test.movement_test(
        x, y, size, types, num_permutations=999, seed=i)["pvalue"] <= 0.05
  assert found / 100 > 0.8


def test_primary_test_reads_importance_units():
  units = {}
  for b in range(3):
    for m, size in (("ffn1", 400), ("mhsa", 300), ("conv", 200),
                    ("ffn2", 400), ("final_norm", 8)):
      units[f"encoder/block_{b:02d}/{m}"] = importance_fakes.unit(
          0.01 * b + (m == "conv") * 0.1, num_params=size,
          relative_distance=0.1 * b + 0.05 * (m == "conv"),
          rms_movement=None if m == "mhsa" else 0.2)
  units["decoder"] = importance_fakes.unit(1.0, num_params=10,
                                           relative_distance=5.0)
  result = movement_test.primary_movement_test(units, "relative_distance",
                                               num_permutations=99)
  assert result["measure"] == "relative_distance"
  assert len(result["units"]) == 12 and result["num_units"] == 12
  assert "decoder" not in result["units"]
  assert result["strata"] == {"conv": 3, "ffn": 6, "mhsa": 3}
  assert result["spearman"] == pytest.approx(stats.spearmanr(
      [units[n].movement.relative_distance for n in result["units"]],
      [units[n].wer_increase for n in result["units"]]).statistic)
  rms = movement_test.primary_movement_test(units, "rms_movement",
                                            num_permutations=99)
  assert rms["num_units"] == 9 and rms["spearman"] is None  # constant
  with pytest.raises(ValueError, match="movement_measure"):
    movement_test.primary_movement_test(units, "distance")
