"""The claim-5 run plan, the learning-rate pick and the verdict rule, by hand."""

import ml_collections
import pytest

from conformer_fl.experiment import arms as arms_lib
from conformer_fl.experiment import design
from conformer_fl.experiment import verdict

SPECS = [("full", None), ("targeted", 0.7), ("anti_targeted", 0.7),
         ("uniform", 0.7), ("random_0", 0.7), ("random_1", 0.7),
         ("targeted", 0.55), ("freeze", None)]


def test_run_directories():
  run = design.Run("targeted", 0.7, 1, 3, 0.2)
  assert str(run.path("W")) == "W/arms/model_1/c070/targeted/seed_3_lr0.2"
  assert str(design.Run("full", None, 0, 0, 0.05).path("W")) == (
      "W/arms/model_0/any/full/seed_0_lr0.05")
  assert str(design.pretrain_dir("W", 0)) == "W/pretrain"
  assert str(design.pretrain_dir("W", 2)) == "W/pretrain_model2"


def test_tuning_runs_each_base_arm_at_the_verdict_level_once_per_rate():
  runs = design.tuning_runs(SPECS, 0.7, (0.1, 0.2), seed=0)
  arms = [(r.arm, r.level, r.lr) for r in runs]
  assert arms == [(arm, level, lr) for arm, level in (
      ("full", None), ("targeted", 0.7), ("anti_targeted", 0.7),
      ("uniform", 0.7), ("random_0", 0.7), ("freeze", None))
                  for lr in (0.1, 0.2)]
  assert all(r.model == 0 and r.seed == 0 for r in runs)
  assert design.tuning_runs(SPECS, 0.7, (0.1,), seed=0) == []


def test_pick_takes_the_lowest_dev_wer_and_the_first_rate_on_ties():
  grid = (0.1, 0.2, 0.4)
  dev = {design.Run("full", None, 0, 0, 0.1): 0.30,
         design.Run("full", None, 0, 0, 0.2): 0.25,
         design.Run("full", None, 0, 0, 0.4): 0.27,
         design.Run("targeted", 0.7, 0, 0, 0.1): 0.3,
         design.Run("targeted", 0.7, 0, 0, 0.2): 0.3,
         design.Run("targeted", 0.7, 0, 0, 0.4): 0.4}
  assert design.pick_learning_rates(dev, grid) == {"full": 0.2,
                                                   "targeted": 0.1}


def test_final_runs_give_the_verdict_arms_every_verdict_seed():
  picks = {"full": 0.2, "targeted": 0.4, "random_0": 0.1}
  runs = design.final_runs([SPECS, SPECS], 0.7, (0, 1, 2, 3, 4), (0, 1),
                           (0,), (0.1, 0.2, 0.4), picks)
  count = {}
  for r in runs:
    count[(r.model, r.arm, r.level)] = count.get((r.model, r.arm, r.level),
                                                 0) + 1
  for model in (0, 1):
    assert count[(model, "full", None)] == 5
    assert count[(model, "targeted", 0.7)] == 5
    assert count[(model, "anti_targeted", 0.7)] == 5
    assert count[(model, "uniform", 0.7)] == 2
    assert count[(model, "freeze", None)] == 2
    assert count[(model, "targeted", 0.55)] == 1
  lr = {(r.arm, r.level): r.lr for r in runs}
  assert lr[("random_1", 0.7)] == 0.1  # random_0's pick.
  assert lr[("targeted", 0.55)] == 0.4
  assert lr[("uniform", 0.7)] == 0.1  # No pick: the grid's first rate.
  assert len(runs) == len(set(runs))


def test_policy_arms_are_run_as_the_other_controls():
  """uniform_ordered / _static / _rolling: tuned once each at the verdict
  level, then the control seeds there and the level seeds elsewhere, as
  uniform."""
  arms = ("uniform", *arms_lib.POLICY_ARMS)
  specs = [("full", None), ("targeted", 0.7), ("anti_targeted", 0.7),
           *[(arm, level) for level in (0.85, 0.7) for arm in arms]]
  tuning = design.tuning_runs(specs, 0.7, (0.1, 0.2), seed=0)
  assert [(r.arm, r.level) for r in tuning if r.arm in arms] == [
      (arm, 0.7) for arm in arms for _ in (0.1, 0.2)]
  picks = {"uniform": 0.1, "uniform_ordered": 0.2, "uniform_static": 0.1,
           "uniform_rolling": 0.2}
  runs = design.final_runs([specs], 0.7, (0, 1, 2, 3, 4), (0, 1), (0,),
                           (0.1, 0.2), picks)
  seeds = {}
  for r in runs:
    seeds.setdefault((r.arm, r.level), []).append(r.seed)
    assert r.lr == picks.get(r.arm, 0.1)
  for arm in arms:
    assert seeds[(arm, 0.7)] == [0, 1] and seeds[(arm, 0.85)] == [0]
  assert seeds[("targeted", 0.7)] == [0, 1, 2, 3, 4]
  assert str(runs[-1].path("W")) == (
      "W/arms/model_0/c070/uniform_rolling/seed_1_lr0.2")


def _comparison(**fields):
  base = dict(levels=(0.85, 0.7), verdict_level=0.7, margin=0.02,
              confidence=0.95, max_rate=0.75, random_draws=1,
              verdict_seeds=(0, 1), control_seeds=(0,), level_seeds=(0,),
              lr_grid=(0.1,), halfwidth_draws=1, gate_min_ambient=4)
  return ml_collections.ConfigDict({**base, **fields})


@pytest.mark.parametrize("fields, message", [
    (dict(levels=(1.2,), verdict_level=1.2), r"comparison.levels"),
    (dict(verdict_level=0.5), r"verdict_level=0.5 is not one of"),
    (dict(control_seeds=(7,)), r"control_seeds=\(7,\) must be"),
    (dict(lr_grid=(0.0,)), r"lr_grid"),
    (dict(margin=0.0), r"margin=0.0"),
    (dict(max_rate=1.0), r"max_rate=1.0"),
])
def test_bad_comparison_fields_are_named(fields, message):
  with pytest.raises(ValueError, match=message):
    design.validate(_comparison(**fields), (0,))
  design.validate(_comparison(), (0,))


@pytest.mark.parametrize("tf, at, expected", [
    ((-0.01, 0.015), (0.01, 0.05), "confirmed"),
    ((0.025, 0.06), (0.01, 0.05), "refuted"),       # Inferior beyond delta.
    ((-0.01, 0.015), (-0.01, 0.015), "refuted"),    # Ranking makes no odds.
    ((-0.01, 0.03), (0.01, 0.05), "inconclusive"),  # Crosses the margin.
    ((-0.01, 0.015), (-0.01, 0.05), "inconclusive"),
])
def test_verdict_rule_by_hand(tf, at, expected):
  result = verdict.decide(dict(low=tf[0], high=tf[1]),
                          dict(low=at[0], high=at[1]), margin=0.02)
  assert result["verdict"] == expected
  assert len(result["reasons"]) == 2 and result["rule"] == verdict.RULE
