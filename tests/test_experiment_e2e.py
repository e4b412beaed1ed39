"""`make demo`'s pipeline at tiny scale, through the real entry point.

`configs/experiment.py:scale=tiny` runs every stage (corpus, pre-training,
analysis, four federated arms, client costs, report) on the tiny corpus in a
subprocess; a second run must reuse all of it and give the same summary.
"""

import json

import matplotlib.image
import numpy as np
import pytest

from conformer_fl import checkpointing
from conformer_fl.experiment import arms as arms_lib

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def experiment(tiny_experiment, tiny_corpus_dir, run_tiny_experiment):
  """The session's tiny experiment, then a second run on the same workdir."""
  workdir, first = tiny_experiment
  summary = json.loads((workdir / "summary.json").read_text())
  second = run_tiny_experiment(workdir, tiny_corpus_dir)
  return workdir, first, second, summary


def test_stages_run_then_are_reused(experiment):
  workdir, first, second, summary = experiment
  for stage in range(1, 6):
    assert f"[{stage}/5]" in first
  assert f"Report: {workdir / 'report.md'}" in first
  assert "pre-training: 6 central steps" in first
  assert "pre-training: done (6 steps), reused" in second
  assert "pre-training: 6 central steps" not in second
  assert "federated rounds" not in second and "resetting" not in second
  assert "analysis: done, reused" in second
  for arm in arms_lib.ARMS:
    assert f"adapt {arm} seed 0: done, reused" in second
  assert json.loads((workdir / "summary.json").read_text()) == summary


def test_targeted_units_are_the_least_important(experiment):
  workdir, _, _, summary = experiment
  importance = json.loads(
      (workdir / "pretrain" / "analysis" / "importance.json").read_text())
  blocks = [u for u in importance["units"] if "/block_" in u]
  # configs/experiment.py:scale=tiny ranks the units by the loss increase.
  least = min(blocks, key=lambda u: importance["units"][u]["loss_increase"])
  assert summary["analysis"]["targeted_units"] == [least]
  by_arm = {row["arm"]: row for row in summary["arms"]}
  assert list(by_arm) == list(arms_lib.ARMS)
  assert by_arm["targeted"]["dropout"]["rates"] == {least: 0.5}
  assert by_arm["freeze"]["dropout"]["freeze_units"] == [least]
  assert by_arm["full"]["dropout"]["kind"] == "none"


def test_client_cost_falls_with_the_sub_model(experiment):
  _, _, _, summary = experiment
  by_arm = {row["arm"]: row for row in summary["arms"]}
  full = by_arm["full"]
  assert full["params_fraction"] == full["flops_fraction"] == 1.0
  for arm in ("uniform", "targeted", "freeze"):
    assert by_arm[arm]["params_fraction"] < 1.0
    assert by_arm[arm]["flops_fraction"] < 1.0
  # The control trains about as many parameters as the targeted arm.
  assert abs(by_arm["uniform"]["params_fraction"] -
             by_arm["targeted"]["params_fraction"]) < 0.05


def test_final_evaluation_on_held_out_short_utterances(experiment):
  workdir, _, _, summary = experiment
  # The tiny corpus's test split: 2 speakers x 3 short utterances.
  assert summary["eval"] == {"split": "test", "domains": ["short"]}
  assert summary["pretrained_not_adapted"]["num_examples"] == 6
  for row in summary["arms"]:
    final = json.loads((workdir / "arms" / row["arm"] / "seed_0" /
                        "final_eval.json").read_text())["value"]
    assert final["num_examples"] == 6 and final["split"] == "test"
    assert row["wer"] == final["wer"] and row["loss"] == final["loss"]
    assert np.isfinite(row["loss"]) and row["loss"] > 0
    assert [r for r, _ in row["dev_wer_by_round"]["0"]][-1] == 2


def test_freeze_arm_leaves_the_targeted_block_at_its_pretrained_value(
    experiment):
  workdir, _, _, summary = experiment
  (block,) = summary["analysis"]["targeted_units"]
  name = block.split("/")[1]
  pretrained = checkpointing.CheckpointStore(
      str(workdir / "pretrain"), read_only=True).restore_variables(6)["params"]

  def adapted(arm):
    return checkpointing.CheckpointStore(
        str(workdir / "arms" / arm / "seed_0"),
        read_only=True).restore_variables(2)["params"]

  def flat(tree):
    out = []
    for key in sorted(tree):
      out += flat(tree[key]) if isinstance(tree[key], dict) else [tree[key]]
    return out

  frozen, full = adapted("freeze"), adapted("full")
  for a, b in zip(flat(frozen["encoder"][name]),
                  flat(pretrained["encoder"][name])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(
      flat(full["encoder"][name]), flat(pretrained["encoder"][name])))


def test_report_has_the_table_and_figures(experiment):
  workdir, _, _, _ = experiment
  report = (workdir / "report.md").read_text()
  assert "| arm | client model |" in report
  for row in ("pre-trained, not adapted", *arms_lib.ARMS):
    assert f"| {row} |" in report
  for figure in ("wer_by_round.png", "client_cost.png"):
    assert f"({figure})" in report
    assert matplotlib.image.imread(workdir / figure).shape[:2] == (400, 600)
  assert (workdir / "pretrain" / "analysis" / "heatmap_wer.png").exists()
