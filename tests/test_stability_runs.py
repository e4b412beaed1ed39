"""The study's stability stage: which runs are compared, and the report table."""

import pytest

from conformer_fl.experiment import stability_runs

import importance_fakes  # tests/importance_fakes.py


def _run(name, size="4x96", norm="group_norm", seed=0, **rest):
  return dict(name=name, size=size, norm=norm, seed=seed,
              rest={"central.num_steps": 1200, **rest})


def _importance(wer_increases, ambient, num_blocks=1):
  return importance_fakes.importance(
      {u: importance_fakes.unit(w) for u, w in wer_increases.items()},
      num_blocks=num_blocks, ambient=ambient)


def test_a_pair_differs_in_one_thing_only():
  base = _run("a")
  assert stability_runs.group_of(base, _run("b", seed=1)) == "seeds"
  assert stability_runs.group_of(base, _run("b", norm="batch_norm")) == "norms"
  assert stability_runs.group_of(base, _run("b", size="6x96")) == "sizes"
  assert stability_runs.group_of(base, _run("b", seed=1,
                                             norm="batch_norm")) is None
  # Any other field apart: not comparable.
  assert stability_runs.group_of(
      base, _run("b", seed=1, **{"central.num_steps": 600})) is None


def test_groups_by_hand():
  units = ["encoder/block_00/ffn1", "encoder/block_00/conv", "decoder"]
  runs = [_run("pretrain"), _run("seed1", seed=1),
          _run("bn0", norm="batch_norm"), _run("bn1", norm="batch_norm",
                                               seed=1)]
  results = [
      _importance(dict(zip(units, (0.0, 0.2, 0.5))), units[:1]),
      _importance(dict(zip(units, (0.01, 0.3, 0.4))), units[:2]),
      _importance(dict(zip(units, (0.0, 0.1, 0.6))), units[:1]),
      _importance(dict(zip(units, (0.2, 0.1, 0.6))), []),
  ]
  groups = stability_runs.compare(runs, results)
  assert list(groups) == ["seeds", "norms"]
  seeds = groups["seeds"]
  assert [(p["a"], p["b"]) for p in seeds["pairs"]] == [
      ("pretrain", "seed1"), ("bn0", "bn1")]
  # {ffn1} vs {ffn1, conv}: 1/2; {ffn1} vs {}: 0.
  assert [p["jaccard_ambient"] for p in seeds["pairs"]] == [0.5, 0.0]
  assert seeds["jaccard_mean"] == pytest.approx(0.25)
  assert (seeds["jaccard_min"], seeds["jaccard_max"]) == (0.0, 0.5)
  # Ranks (1, 2, 3) vs (1, 2, 3): 1; (1, 2, 3) vs (2, 1, 3):
  # 1 - 6 * (1 + 1) / (3 * (9 - 1)) = 0.5.
  assert (seeds["spearman_min"], seeds["spearman_max"]) == (
      pytest.approx(0.5), pytest.approx(1.0))
  assert seeds["spearman_mean"] == pytest.approx(0.75)
  norms = groups["norms"]
  assert [(p["a"], p["b"]) for p in norms["pairs"]] == [
      ("pretrain", "bn0"), ("seed1", "bn1")]
  assert norms["num_pairs"] == 2
  lines = "\n".join(stability_runs.report_lines(dict(
      runs=[dict(r, workdir=r["name"], steps=1200, baseline_wer=0.2,
                 baseline_wer_interval=[0.18, 0.22], num_examples=160,
                 num_units=3, ambient=list(res.ambient))
            for r, res in zip(runs, results)],
      groups=groups)))
  assert "| seeds (same size and norm) | 2 (0) | 0.25 (0.00-0.50) |" in lines
  assert "| pretrain | 4x96 | group_norm | 0 | 0.200 (0.180-0.220) | 1 / 3 |" in (
      lines)


def test_droppable_only_keeps_the_modules_dropout_can_target():
  result = _importance({"encoder/subsampling": 0.5,
                        "encoder/block_00/ffn1": 0.0,
                        "encoder/block_00/mhsa": 0.1,
                        "encoder/block_00/final_norm": 0.0,
                        "encoder/block_01/conv": 0.3,
                        "encoder/block_01/ffn2": 0.0, "decoder": 0.9},
                       ["encoder/block_00/ffn1", "encoder/block_00/final_norm",
                        "encoder/block_01/ffn2"], num_blocks=2)
  kept = stability_runs.droppable_only(result)
  assert list(kept.units) == ["encoder/block_00/ffn1",
                              "encoder/block_00/mhsa",
                              "encoder/block_01/conv",
                              "encoder/block_01/ffn2"]
  assert kept.ambient == ("encoder/block_00/ffn1", "encoder/block_01/ffn2")
  assert len(result.units) == 7  # The input is left as it was.
  lines = "\n".join(stability_runs.report_lines(dict(
      runs=[], groups={}, groups_droppable={"seeds": dict(
          num_pairs=1, jaccard_mean=0.5, jaccard_min=0.5, jaccard_max=0.5,
          chance_jaccard_mean=0.2, spearman_mean=0.9, spearman_min=0.9,
          spearman_max=0.9)})))
  assert "droppable modules only" in lines
  assert ("| seeds (same size and norm) | 1 (0) | 0.50 (0.50-0.50) | 0.20"
          " (n/a) |") in lines


def test_empty_pairs_are_counted_and_left_out_of_the_means():
  units = ["encoder/block_00/ffn1", "encoder/block_00/conv", "decoder"]
  runs = [_run("pretrain"), _run("seed1", seed=1), _run("seed2", seed=2)]
  results = [_importance(dict(zip(units, (0.0, 0.2, 0.5))), []),
             _importance(dict(zip(units, (0.0, 0.3, 0.4))), []),
             _importance(dict(zip(units, (0.0, 0.1, 0.6))), units[:1])]
  seeds = stability_runs.compare(runs, results)["seeds"]
  assert [p["both_empty"] for p in seeds["pairs"]] == [True, False, False]
  assert (seeds["num_pairs"], seeds["num_empty_pairs"]) == (3, 1)
  # Only the two pairs {} vs {ffn1} count: Jaccard 0 each (not 1/3 with the
  # empty pair's 1.0); chance of two sets of 0 and 1 of 3: 0.
  assert seeds["jaccard_mean"] == 0.0
  assert seeds["chance_jaccard_mean"] == 0.0
  # An intersection of 0 or more: probability 1 under both nulls.
  assert seeds["overlap_pvalue_max"] == 1.0
  assert seeds["overlap_pvalue_within_types_max"] == 1.0
