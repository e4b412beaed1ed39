"""Analysis statistics: correlations, Jaccard, movement, thresholds, taus."""

import dataclasses
import json
import math

import ml_collections
import numpy as np
import pytest
from scipy import stats

from conformer_fl.analysis import importance
from conformer_fl.analysis import importance_file
from conformer_fl.analysis import movement
from conformer_fl.analysis import report
from conformer_fl.analysis import resets
from conformer_fl.analysis import stability

import importance_fakes  # tests/importance_fakes.py


def test_rank_correlations_match_scipy_and_hand_values():
  x = [1.0, 2.0, 3.0, 4.0]
  y = [1.0, 3.0, 2.0, 4.0]
  result = movement.rank_correlations(x, y)
  # One swapped pair: rho = 1 - 6 * (1 + 1) / (4 * 15) = 0.8; tau = (5 - 1) / 6.
  assert result["num_units"] == 4
  assert result["spearman"]["statistic"] == pytest.approx(0.8)
  assert result["kendall"]["statistic"] == pytest.approx(4 / 6)
  assert result["spearman"]["pvalue"] == pytest.approx(
      stats.spearmanr(x, y).pvalue)
  xs = [0.3, 1.7, 0.2, 5.0, 2.2, 2.2, 0.9]
  ys = [0.01, 0.4, 0.0, 0.9, 0.35, 0.5, 0.02]
  result = movement.rank_correlations(xs, ys)
  assert result["spearman"]["statistic"] == pytest.approx(
      stats.spearmanr(xs, ys).statistic)
  assert result["kendall"]["statistic"] == pytest.approx(
      stats.kendalltau(xs, ys).statistic)
  assert result["kendall"]["pvalue"] == pytest.approx(
      stats.kendalltau(xs, ys).pvalue)


def test_rank_correlations_drop_missing_and_undefined_values():
  result = movement.rank_correlations([1.0, None, 3.0, 2.0], [2.0, 5.0, 6.0, None])
  assert result["num_units"] == 2
  assert result["spearman"]["statistic"] == pytest.approx(1.0)
  constant = movement.rank_correlations([1.0, 2.0, 3.0], [0.5, 0.5, 0.5])
  assert constant["spearman"] == {"statistic": None, "pvalue": None}
  assert constant["kendall"] == {"statistic": None, "pvalue": None}
  with pytest.raises(ValueError, match="x values"):
    movement.rank_correlations([1.0], [1.0, 2.0])


def test_jaccard_by_hand():
  assert stability.jaccard(["a", "b", "c"], ["b", "c", "d"]) == pytest.approx(2 / 4)
  assert stability.jaccard(["a"], ["b"]) == 0.0
  assert stability.jaccard([], []) is None
  assert stability.jaccard(["a", "a", "b"], ["a", "b"]) == 1.0


def test_relative_depth():
  assert stability.relative_depth("encoder/block_03/conv", 16) == 3.5 / 16
  assert stability.relative_depth("encoder/block_00", 4) == 0.125
  assert stability.relative_depth("encoder/subsampling", 4) is None
  assert stability.relative_depth("decoder", 4) is None


def _result(units, ambient, num_blocks):
  return importance_fakes.importance(
      {u: importance_fakes.unit(w, loss_increase=10 * w)
       for u, w in units.items()}, num_blocks=num_blocks, ambient=ambient)


def test_compare_runs_of_one_depth_pairs_units_by_name():
  a = _result({"encoder/block_00": 0.0, "encoder/block_01": 0.5,
               "decoder": 0.9}, ["encoder/block_00"], 2)
  b = _result({"encoder/block_00": 0.01, "encoder/block_01": 0.3,
               "decoder": 0.2}, ["encoder/block_00", "decoder"], 2)
  (pair,) = stability.compare_runs([a, b], ["a", "b"])["pairs"]
  assert pair["matching"] == "name" and pair["num_common_units"] == 3
  # Ambient {block_00} vs {block_00, decoder}: 1 / 2.
  assert pair["jaccard_ambient"] == pytest.approx(0.5)
  # Two random sets of 1 and 2 of 3 units: they meet with probability 2/3,
  # and then overlap 1/2.
  assert pair["chance_jaccard_ambient"] == pytest.approx(1 / 3)
  assert pair["wer_increase"]["spearman"]["statistic"] == pytest.approx(
      stats.spearmanr([0, .5, .9], [.01, .3, .2]).statistic)


def test_compare_runs_of_two_depths_pairs_units_by_relative_depth():
  a = _result({"encoder/block_00": 0.0, "encoder/block_01": 0.5,
               "encoder/block_02": 0.1, "decoder": 0.9},
              ["encoder/block_00", "encoder/block_02"], 3)
  b = _result({"encoder/block_00": 0.01, "encoder/block_01": 0.3,
               "decoder": 0.2}, ["encoder/block_00", "decoder"], 2)
  # Block centres: a at 1/6, 1/2, 5/6; b at 1/4, 3/4. b's block_00 is
  # nearest a's block_00, b's block_01 a's block_02; a's block_01 (as near
  # to both) stays unpaired: no block of b is used twice.
  assert stability.matched_units(a, b) == [
      ("encoder/block_00", "encoder/block_00"),
      ("encoder/block_02", "encoder/block_01"), ("decoder", "decoder")]
  assert stability.matched_units(b, a) == [
      (v, u) for u, v in stability.matched_units(a, b)]
  # 6 blocks against 4: centres 1/12, 3/12, ..., 11/12 against 1/8, 3/8,
  # 5/8, 7/8 pair 0-0, 2-1, 3-2, 5-3.
  deep = _result({f"encoder/block_{i:02d}/conv": 0.0 for i in range(6)}, [], 6)
  shallow = _result({f"encoder/block_{i:02d}/conv": 0.0 for i in range(4)},
                    [], 4)
  assert [(int(u[14:16]), int(v[14:16]))
          for u, v in stability.matched_units(deep, shallow)] == [
              (0, 0), (2, 1), (3, 2), (5, 3)]
  # 15 against 10: one to one, ten pairs, each block of 10 once.
  deep = _result({f"encoder/block_{i:02d}": 0.0 for i in range(15)}, [], 15)
  shallow = _result({f"encoder/block_{i:02d}": 0.0 for i in range(10)}, [],
                    10)
  pairs = stability.matched_units(deep, shallow)
  assert sorted(v for _, v in pairs) == sorted(shallow.units)
  assert pairs[0] == ("encoder/block_00", "encoder/block_00")
  assert pairs[-1] == ("encoder/block_14", "encoder/block_09")
  comparison = stability.compare_runs([a, b], ["a", "b"])
  (pair,) = comparison["pairs"]
  assert pair["matching"] == "relative_depth"
  assert pair["num_common_units"] == 3
  # Ambient pairs: a's side {0, 1}, b's side {0, 2}: overlap 1 / 3.
  assert pair["jaccard_ambient"] == pytest.approx(1 / 3)
  assert pair["wer_increase"]["spearman"]["statistic"] == pytest.approx(
      stats.spearmanr([0, .1, .9], [.01, .3, .2]).statistic)
  depth_a = comparison["depth"]["a"]
  assert [p["relative_depth"] for p in depth_a["points"]] == [
      pytest.approx(x) for x in (1 / 6, 1 / 2, 5 / 6)]
  assert depth_a["wer_increase_vs_depth"]["spearman"]["statistic"] == (
      pytest.approx(0.5))


def test_chance_jaccard_by_hand():
  # Two random units of 4 are the same one with probability 1/4.
  assert stability.chance_jaccard(4, 1, 1) == pytest.approx(0.25)
  # 2 and 3 of 4 share 1 (probability 1/2, overlap 1/4) or 2 (1/2, 2/3).
  assert stability.chance_jaccard(4, 2, 3) == pytest.approx(
      0.5 * 0.25 + 0.5 * 2 / 3)
  assert stability.chance_jaccard(5, 0, 0) is None
  assert stability.chance_jaccard(5, 0, 2) == 0.0
  assert stability.chance_jaccard(3, 3, 3) == 1.0
  with pytest.raises(ValueError, match="Subset sizes"):
    stability.chance_jaccard(3, 4, 1)


def test_overlap_nulls_by_hand():
  # 4 pairs; A = {0, 1}, B = {1, 2}: intersection 1.
  types = ["x", "x", "y", "y"]
  nulls = stability.overlap_nulls(types, [1, 1, 0, 0], [0, 1, 1, 0])
  assert nulls["intersection"] == 1
  # Random sets of 2 and 2 of 4: P(K=0) = 1/6, P(K=1) = 4/6, P(K=2) = 1/6.
  assert nulls["overlap_pvalue"] == pytest.approx(5 / 6)
  assert nulls["chance_jaccard"] == pytest.approx(4 / 6 * 1 / 3 + 1 / 6)
  # Within types: A holds both x, B one x and one y: K = 1 surely.
  assert nulls["overlap_pvalue_within_types"] == pytest.approx(1.0)
  assert nulls["chance_jaccard_within_types"] == pytest.approx(1 / 3)
  # A norm type ambient in both runs by construction: the within-type null
  # expects that overlap, the random-sets null does not.
  types = ["norm"] * 3 + ["conv"] * 5
  in_a = [1, 1, 1, 1, 0, 0, 0, 0]
  in_b = [1, 1, 1, 0, 1, 0, 0, 0]
  nulls = stability.overlap_nulls(types, in_a, in_b)
  law = stats.hypergeom(8, 4, 4)
  assert nulls["overlap_pvalue"] == pytest.approx(law.sf(2))
  assert nulls["overlap_pvalue_within_types"] == pytest.approx(1.0)
  assert nulls["chance_jaccard_within_types"] == pytest.approx(
      0.8 * 3 / 5 + 0.2 * 4 / 4)
  empty = stability.overlap_nulls(types, [0] * 8, [0] * 8)
  assert empty["chance_jaccard"] is None and empty["overlap_pvalue"] is None
  law = stability.intersection_law([4, 5], [2, 1], [3, 2])
  assert law.sum() == pytest.approx(1.0) and len(law) == 4


def test_ambient_frequency_and_empty_pairs():
  a = _result({"encoder/block_00": 0.0, "decoder": 0.9}, ["encoder/block_00"],
              1)
  b = _result({"encoder/block_00": 0.5, "decoder": 0.9}, [], 1)
  c = _result({"encoder/block_00": 0.5, "decoder": 0.9}, [], 1)
  comparison = stability.compare_runs([a, b, c], ["a", "b", "c"])
  assert comparison["ambient_frequency"] == {
      "encoder/block_00": dict(runs=3, ambient=1, frequency=pytest.approx(1 / 3)),
      "decoder": dict(runs=3, ambient=0, frequency=0.0)}
  both_empty = comparison["pairs"][2]
  assert (both_empty["a"], both_empty["b"]) == ("b", "c")
  assert both_empty["both_empty"]
  assert both_empty["jaccard_ambient"] is None
  assert both_empty["chance_jaccard_ambient"] is None
  assert not comparison["pairs"][0]["both_empty"]
  assert comparison["pairs"][0]["jaccard_ambient"] == 0.0


def test_unit_movement_by_hand():
  initial = {"a": {"w": np.array([3.0, 0.0])}, "b": {"w": np.zeros(2)}}
  trained = {"a": {"w": np.array([3.0, 4.0])}, "b": {"w": np.ones(2)}}
  moved = movement.unit_movement(trained, initial, {"a": ("a",), "b": ("b",)})
  assert moved["a"] == dict(distance=4.0, initial_norm=3.0,
                            relative_distance=pytest.approx(4 / 3),
                            rms_movement=pytest.approx(4 / math.sqrt(2)))
  assert moved["b"]["distance"] == pytest.approx(math.sqrt(2))
  assert moved["b"]["relative_distance"] is None


def test_update_norm_sums_aggregate_modules_into_blocks(tmp_path):
  path = tmp_path / "metrics.jsonl"
  records = [
      {"round": 1, "loss": 1.0, "update_norm/encoder/block_00/ffn1": 3.0,
       "update_norm/encoder/block_00/conv": 4.0, "update_norm/decoder": 1.0},
      {"round": 2, "update_norm/encoder/block_00/ffn1": 1.0,
       "update_norm/encoder/block_00/conv": 0.0, "update_norm/decoder": 2.0},
      {"round": 3, "update_norm/encoder/block_00/ffn1": 100.0,
       "update_norm/decoder": 100.0},
  ]
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  sums = movement.read_update_norm_sums(
      str(path), ["encoder/block_00", "encoder/block_01", "decoder"],
      last_round=2)
  # Block norm per round = sqrt(3^2 + 4^2) = 5, then sqrt(1) = 1; round 3 > T.
  assert sums == {"encoder/block_00": 6.0, "encoder/block_01": None,
                  "decoder": 3.0}
  central = tmp_path / "central.jsonl"
  central.write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")
  assert movement.read_update_norm_sums(str(central), ["decoder"], 10) is None


@pytest.mark.parametrize("increase, baseline, rule, expected", [
    (0.0, 0.0, "both", True),
    (0.009, 0.1, "either", True),    # absolute test passes
    (0.04, 0.9, "either", True),     # relative: 0.04 <= 0.05 * 0.9
    (0.04, 0.9, "both", False),      # absolute fails
    (0.02, 0.1, "either", False),    # both fail
])
def test_wer_threshold(increase, baseline, rule, expected):
  threshold = importance.wer_threshold(baseline, 0.01, 0.05, rule)
  assert (increase <= threshold) is expected
  assert importance.wer_threshold(0.9, 0.01, 0.05, "either") == pytest.approx(
      0.045)
  assert importance.wer_threshold(0.9, 0.01, 0.05, "both") == 0.01


def test_wer_threshold_rejects_unknown_rule():
  with pytest.raises(ValueError, match="threshold_rule"):
    importance.wer_threshold(0.1, 0.01, 0.05, "any")


@pytest.mark.parametrize("low, high, label", [
    (-0.01, 0.009, "ambient"),
    (0.0, 0.0, "ambient"),
    (0.011, 0.05, "critical"),
    (0.005, 0.02, "undetermined"),
    (0.0, 0.01, "undetermined"),     # upper bound on the threshold
    (0.01, 0.03, "undetermined"),    # lower bound on the threshold
])
def test_label_unit(low, high, label):
  assert importance.label_unit(low, high, 0.01) == label


def _metrics(errors, words, speakers):
  errors = np.asarray(errors)
  return dict(wer=errors.sum() / np.sum(words), loss=1.0, cer=0.0,
              wer_low=0.0, wer_high=1.0, num_examples=float(len(errors)),
              num_speakers=len(set(speakers)),
              utterance_errors=[int(x) for x in errors],
              utterance_words=list(words), utterance_speakers=list(speakers))


def test_summarize_labels_units_from_paired_intervals():
  # 12 utterances of 10 words, 4 speakers. Unit 'same' changes nothing
  # (interval [0, 0]); 'broken' adds 5 errors to every utterance (interval
  # [0.5, 0.5]); 'noisy' adds 2 errors to each utterance of two speakers of
  # the four: +0.1 on average, with an interval that holds the threshold 0.08.
  words = [10] * 12
  speakers = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
  base = np.array([1, 2, 0, 1, 3, 1, 2, 2, 1, 0, 1, 2])
  noisy = base + np.array([0, 0, 0, 2, 2, 2, 0, 0, 0, 2, 2, 2])
  per_unit = {"same": base, "broken": base + 5, "noisy": noisy}
  variants = [resets.Variant(resets.BASELINE)]
  metrics = [_metrics(base, words, speakers)]
  for name, errors in per_unit.items():
    variants.append(resets.Variant(resets.REINIT, name, 0))
    metrics.append(_metrics(errors, words, speakers))
  analysis = ml_collections.ConfigDict(dict(
      max_abs_wer_increase=0.08, max_rel_wer_increase=0.0,
      threshold_rule="either", label_confidence=0.95, bootstrap_samples=500))
  params = {n: {"w": np.zeros(3)} for n in per_unit}
  summary = importance.summarize(metrics, variants,
                                 {n: (n,) for n in per_unit}, params, [0], [],
                                 analysis)
  units = summary["units"]
  assert summary["wer_threshold"] == 0.08
  assert (units["same"]["wer_increase_low"],
          units["same"]["wer_increase_high"]) == (0.0, 0.0)
  assert units["same"]["label"] == "ambient" and units["same"]["ambient"]
  assert units["broken"]["wer_increase"] == pytest.approx(0.5)
  assert units["broken"]["wer_increase_low"] == pytest.approx(0.5)
  assert units["broken"]["label"] == "critical"
  assert not units["broken"]["ambient"]
  # Resampling the 4 speakers: between 0 (no +2 speaker drawn) and 0.2.
  assert units["noisy"]["wer_increase"] == pytest.approx(0.1)
  assert units["noisy"]["wer_increase_low"] < 0.08
  assert units["noisy"]["wer_increase_high"] > 0.08
  assert units["noisy"]["label"] == "undetermined"
  assert (summary["ambient"], summary["critical"], summary["undetermined"]) == (
      ["same"], ["broken"], ["noisy"])


def test_parse_taus():
  saved = [0, 100, 200, 300]
  assert importance.parse_taus("all", saved, 200) == [0, 100, 200]
  assert importance.parse_taus("300,100", saved, 300) == [0, 100, 300]
  assert importance.parse_taus((200,), saved, 300) == [0, 200]
  with pytest.raises(ValueError, match=r"unsaved checkpoint\(s\) \[150\]"):
    importance.parse_taus("150", saved, 300)
  with pytest.raises(ValueError, match="comma-separated"):
    importance.parse_taus("last", saved, 300)


def test_report_shows_labels_intervals_primary_test_and_nulls():
  unit = dataclasses.replace(
      importance_fakes.unit(0.05, loss_increase=0.2), num_params=10,
      reinit_wer=(0.3,), wer_increase_low=0.01, wer_increase_high=0.09)
  figures = {k: importance_file.Figure(f"{k}.png", 10, 10) for k in (
      "heatmap_wer", "heatmap_loss", "rerandomization", "movement_scatter")}
  results = dataclasses.replace(
      importance_fakes.importance({"encoder/block_00/conv": unit}),
      workdir="/x/run", trained_step=4, taus=(0, 4),
      eval=importance_file.EvalInfo(split="dev", domains=(), num_batches=1,
                                    num_examples=10.0),
      baseline=importance_file.Baseline(wer=0.25, loss=1.0, cer=0.1,
                                        wer_interval=(0.2, 0.3),
                                        num_speakers=2),
      thresholds=importance_file.Thresholds(
          max_abs_wer_increase=0.01, max_rel_wer_increase=0.05, rule="either",
          wer_increase=0.0125, confidence=0.95, bootstrap_samples=100),
      movement_test=dict(measure="relative_distance", num_units=16,
                         strata={"conv": 4, "ffn": 8, "mhsa": 4},
                         spearman=0.5, pvalue=0.04, num_permutations=10000,
                         partial_spearman_log_params=0.45, partial_pvalue=0.07),
      correlations={}, figures=figures,
      stability=dict(pairs=[dict(
          a="a", b="b", num_common_units=8, jaccard_ambient=None,
          chance_jaccard_ambient=None, overlap_pvalue=None,
          chance_jaccard_within_types=None, overlap_pvalue_within_types=None,
          wer_increase=dict(spearman=dict(statistic=0.9),
                            kendall=dict(statistic=0.8)))]))
  text = report.render_report(results)
  assert "here 0.0125" in text and "**undetermined**" in text
  assert "Undetermined (1): encoder/block_00/conv." in text
  assert "| 0.05 (0.01 to 0.09) |" in text
  assert text.count("| undetermined |") == 1
  assert ("Primary test: `relative_distance` against the WER increase over"
          " the 16 droppable modules (conv 4, ffn 8, mhsa 4): Spearman 0.5,"
          " p = 0.04 from 10000 permutations") in text
  assert "partial Spearman given log parameter count 0.45, p = 0.07" in text
  assert "Secondary:" in text
  assert "| a | b | 8 | - | - (-) | - (-) | 0.9 | 0.8 |" in text
