"""The arms table over several pre-trained models: an arm absent from one."""

import numpy as np
import pytest

from conformer_fl.experiment import arms
from conformer_fl.experiment import design
from conformer_fl.experiment import summary

_MODULE = arms.Module("encoder/block_00/ffn1", "ffn", 8, 1, 10)
_COST = arms.CostModel(total=100, modules=(_MODULE,),
                       module_params={_MODULE.name: 80})


def _spec(arm: str, note: str = "", frozen: tuple[str, ...] = ()) -> arms.ArmSpec:
  dropout = dict(kind="none", rates={}, default_rate=0.0, unit_kinds=["ffn"],
                 freeze_units=list(frozen), rescale=False, policy="random")
  return arms.ArmSpec(arm, None, dropout, {}, 0.2 if frozen else 1.0, note)


def _evaluation(errors: list[float]) -> dict:
  return dict(utterance_errors=errors, utterance_words=[4.0, 4.0, 2.0],
              utterance_speakers=[0, 0, 1])


def test_an_arm_that_ran_on_model_1_only_is_a_row_naming_model_0(tmp_path):
  specs_by_model = [
      [_spec("full"), _spec("freeze", note="no ambient module to freeze")],
      [_spec("full"), _spec("freeze", frozen=(_MODULE.name,))]]
  results = {
      design.Run("full", None, 0, 0, 0.2): _evaluation([1.0, 0.0, 1.0]),
      design.Run("full", None, 1, 0, 0.2): _evaluation([2.0, 1.0, 0.0]),
      design.Run("freeze", None, 1, 0, 0.2): _evaluation([2.0, 2.0, 1.0]),
  }
  pool = summary._Pool(results)  # pylint: disable=protected-access
  rows, absent = summary._arm_rows(  # pylint: disable=protected-access
      tmp_path, specs_by_model, [_COST, _COST],
      {"any/full": {"flops_fraction": 1.0}, "any/freeze": {"flops_fraction": 0.5}},
      results, pool, confidence=0.95)
  assert absent == []
  full, freeze = rows
  # full: both models pooled, 5 errors over 20 words; model 0's measured cost.
  assert (full["num_models"], full["seeds"]) == (2, [0])
  assert full["wer"] == pytest.approx(5 / 20)
  assert full["client_model"] == "full model"
  assert full["flops_fraction"] == 1.0
  # freeze: model 1 alone, its own spec, no cost of model 0's step.
  assert freeze["num_models"] == 1
  assert freeze["wer"] == pytest.approx(5 / 10)
  assert freeze["params_fraction"] == 0.2
  assert freeze["client_model"] == (
      "model 1: 1 ambient modules frozen (absent from model 0: no ambient"
      " module to freeze)")
  assert freeze["flops_fraction"] is None


def test_an_arm_no_model_ran_is_absent_with_model_0s_note(tmp_path):
  note = "out of reach: 9 modules at rate <= 0.75 cannot cut the client to 70%"
  specs_by_model = [[_spec("full"), _spec("targeted", note=note)],
                    [_spec("full"), _spec("targeted", note="other")]]
  results = {design.Run("full", None, 0, 0, 0.2): _evaluation([1.0, 0.0, 1.0])}
  rows, absent = summary._arm_rows(  # pylint: disable=protected-access
      tmp_path, specs_by_model, [_COST, _COST], {}, results,
      summary._Pool(results), confidence=0.95)  # pylint: disable=protected-access
  assert [r["arm"] for r in rows] == ["full"]
  assert absent == [dict(arm="targeted", level=None, note=note)]
  assert np.isclose(rows[0]["wer"], 2 / 10)


def test_an_arm_absent_from_model_1_keeps_model_0s_row_and_names_model_1(
    tmp_path):
  specs_by_model = [
      [_spec("full"), _spec("freeze", frozen=(_MODULE.name,))],
      [_spec("full"), _spec("freeze", note="no ambient module to freeze")]]
  results = {
      design.Run("full", None, 0, 0, 0.2): _evaluation([1.0, 0.0, 1.0]),
      design.Run("freeze", None, 0, 0, 0.2): _evaluation([1.0, 1.0, 1.0]),
  }
  rows, _ = summary._arm_rows(  # pylint: disable=protected-access
      tmp_path, specs_by_model, [_COST, _COST],
      {"any/freeze": {"flops_fraction": 0.5}}, results,
      summary._Pool(results), confidence=0.95)  # pylint: disable=protected-access
  freeze = rows[1]
  assert freeze["client_model"] == (
      "1 ambient modules frozen (absent from model 1: no ambient module to"
      " freeze)")
  # Model 0's measured cost stays with the row it describes.
  assert freeze["flops_fraction"] == 0.5
  assert freeze["wer"] == pytest.approx(3 / 10)
