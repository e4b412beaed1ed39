"""`make demo`'s pipeline at tiny scale, through the real entry point.

`configs/experiment.py:scale=tiny` runs every stage (corpus, pre-training,
analysis, four federated arms, client costs, report) on the tiny corpus in a
subprocess; a second run must reuse all of it and give the same summary, and
so must notebook 3 (colabs/03_targeted_federated_dropout.ipynb), which runs the
same config on the same workdir; the same command in a new workdir must give
the same numbers (two processes: test_experiment_multihost.py).
"""

import json
import shutil

import matplotlib.image
import numpy as np
import pytest

from conformer_fl import checkpointing
from conformer_fl import tree_paths
from conformer_fl.analysis import stability
from conformer_fl.experiment import arms as arms_lib

import notebooks  # tests/notebooks.py
import tiny_experiment  # tests/tiny_experiment.py

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def experiment(tiny_corpus_dir, tmp_path_factory):
  """The tiny experiment, run once and then again on the same workdir.

  Returns:
    (workdir, stdout of the first run, stdout of the second, summary.json of
    the first).
  """
  workdir = tmp_path_factory.mktemp("tiny_experiment")
  first = tiny_experiment.run(workdir, tiny_corpus_dir)
  summary = json.loads((workdir / "summary.json").read_text())
  second = tiny_experiment.run(workdir, tiny_corpus_dir)
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
  # configs/experiment.py:scale=tiny ranks the droppable modules (ffn1,
  # mhsa, conv, ffn2 of every block) by the loss increase.
  assert importance["granularity"] == "module"
  modules = arms_lib.droppable_units(list(importance["units"]),
                                     ("ffn", "conv", "mhsa"))
  assert len(modules) == 4 * 2  # The tiny model has 2 blocks.
  least = min(modules, key=lambda u: importance["units"][u]["loss_increase"])
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


def test_freeze_arm_leaves_the_targeted_unit_at_its_pretrained_value(
    experiment):
  workdir, _, _, summary = experiment
  (unit,) = summary["analysis"]["targeted_units"]
  path = tuple(unit.split("/"))
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
  unit_of = lambda params: flat(tree_paths.get(params, path))
  for a, b in zip(unit_of(frozen), unit_of(pretrained)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b)
             for a, b in zip(unit_of(full), unit_of(pretrained)))


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


def test_report_states_the_checks_noise_and_transcripts(experiment):
  workdir, _, _, summary = experiment
  report = (workdir / "report.md").read_text()
  lines = report.splitlines()
  # The checks come first, each measured.
  assert lines[0] == "# Federated Dropout targeted by layer importance"
  checks = [line for line in lines[:8] if line.startswith("- **")]
  assert len(checks) == 3
  assert "dev WER <= 0.30" in checks[0] and "utterances" in checks[0]
  assert "Wall time of each stage" in report
  assert set(summary["stage_seconds"]) >= {"pretrain", "analysis", "summary"}
  # Paired differences of every arm against full, on the 6 test utterances.
  assert set(summary["paired_differences"]) == {"uniform", "targeted",
                                                "freeze"}
  for d in summary["paired_differences"].values():
    assert d["low"] <= d["difference"] <= d["high"]
    assert (d["num_seeds"], d["num_utterances"]) == (1, 6)
    assert f"{d['difference']:+.3f}" in report
  # Transcripts: the references of the test split, each arm's hypothesis.
  samples = summary["transcripts"]
  final = json.loads((workdir / "arms" / "targeted" / "seed_0" /
                      "final_eval.json").read_text())["value"]
  assert [s["reference"] for s in samples] == final["references"][:6]
  assert [s["arms"]["targeted"] for s in samples] == final["hypotheses"][:6]
  assert f"reference: `{samples[0]['reference']}`" in report
  # The pre-trained model on its own dev domain, with CER and an interval.
  dev = summary["pretrain"]["dev_eval"]
  assert dev["wer_low"] <= dev["wer"] <= dev["wer_high"] and 0 <= dev["cer"]
  curve = summary["pretrain"]["learning_curve"]
  assert [c["step"] for c in curve] == [1, 2, 3, 4, 5, 6]
  assert matplotlib.image.imread(workdir / "pretrain_curve.png").ndim == 3
  # Links in the report are relative to the workdir.
  assert str(workdir) not in report


def test_same_command_in_a_new_workdir_gives_the_same_numbers(
    experiment, tiny_corpus_dir, tmp_path):
  _, _, _, summary = experiment
  tiny_experiment.run(tmp_path, tiny_corpus_dir)
  again = json.loads((tmp_path / "summary.json").read_text())
  assert (tiny_experiment.without_timings(again) ==
          tiny_experiment.without_timings(summary))


def test_notebook_3_reuses_the_run_and_shows_its_table(
    experiment, tiny_corpus_dir, tmp_path):
  workdir, _, _, summary = experiment
  nb = notebooks.execute(
      notebooks.COLABS / "03_targeted_federated_dropout.ipynb", tmp_path,
      CONFORMER_FL_WORKDIR=str(workdir), CONFORMER_FL_DATA_DIR=tiny_corpus_dir)
  text = notebooks.all_text(nb)
  assert "pre-training: done (6 steps), reused" in text
  assert "analysis: done, reused" in text
  for arm in arms_lib.ARMS:
    assert f"adapt {arm} seed 0: done, reused" in text
  assert f"targeted: {summary['analysis']['targeted_units']}" in text
  table = notebooks.cell_printing(nb, "of the parameters")
  markdown = [o.data["text/markdown"] for o in table.outputs
              if o.output_type == "display_data" and "text/markdown" in o.data]
  assert len(markdown) == 1 and "| arm | client model |" in markdown[0]
  for row in summary["arms"]:
    assert (f"{row['arm']:>9}: {row['params_fraction']:.1%} of the parameters,"
            f" {row['flops_fraction']:.1%} of the FLOPs, WER {row['wer']:.3f}"
            ) in text
    assert f"| {row['arm']} |" in markdown[0]
  # The heatmap, the WER-by-round and the client-cost figures.
  pngs = notebooks.pngs(nb)
  assert len(pngs) == 3
  assert all(png[:8] == notebooks.PNG_MAGIC for png in pngs)


def test_the_stability_stage_grows_the_run_into_the_study(
    experiment, tiny_corpus_dir, tmp_path):
  """scale=study's stage 5 at tiny scale, on a copy of the finished run."""
  workdir, _, _, summary = experiment
  study = tmp_path / "study"
  shutil.copytree(workdir, study)
  arg = (",stability_seeds=0+1,stability_norms=group_norm+batch_norm")
  first = tiny_experiment.run(study, tiny_corpus_dir, arg)
  # The demo's stages are reused; three runs are added to `pretrain`.
  assert "pre-training: done (6 steps), reused" in first
  names = ["tiny_batch_norm_seed0", "tiny_batch_norm_seed1",
           "tiny_group_norm_seed1"]
  for name in names:
    assert f"[5/6] stability {name}: 6 central steps" in first
    assert f"[5/6] stability {name}: analysis" in first
  again = tiny_experiment.run(study, tiny_corpus_dir, arg)
  for name in names:
    assert f"stability {name}: pre-training done, reused" in again
    assert f"stability {name}: analysis done, reused" in again

  result = json.loads((study / "stability.json").read_text())
  runs = {r["name"]: r for r in result["runs"]}
  assert list(runs) == ["pretrain", *names]
  assert {(r["norm"], r["seed"]) for r in runs.values()} == {
      (norm, seed) for norm in ("group_norm", "batch_norm") for seed in (0, 1)}
  for name in names:
    config = json.loads((study / "stability" / name / "config.json"
                         ).read_text())
    assert (config["model"]["conv_norm"], config["seed"]) == (
        runs[name]["norm"], runs[name]["seed"])
  importance = {name: json.loads(
      (study / runs[name]["workdir"] / "analysis" / "importance.json"
       ).read_text()) for name in runs}
  for name, r in runs.items():
    assert r["ambient"] == importance[name]["ambient"]
    assert r["baseline_wer"] == importance[name]["baseline"]["wer"]
  # Seeds: same norm, seeds 0 and 1; norms: same seed. Never both.
  pairs = {g: {(p["a"], p["b"]) for p in result["groups"][g]["pairs"]}
           for g in result["groups"]}
  assert pairs == {
      "seeds": {("pretrain", "tiny_group_norm_seed1"),
                ("tiny_batch_norm_seed0", "tiny_batch_norm_seed1")},
      "norms": {("pretrain", "tiny_batch_norm_seed0"),
                ("tiny_batch_norm_seed1", "tiny_group_norm_seed1")}}
  # The same pairs over the droppable modules only (4 per block).
  assert {g: {(p["a"], p["b"]) for p in result["groups_droppable"][g]["pairs"]}
          for g in result["groups_droppable"]} == pairs
  assert {p["num_common_units"] for g in result["groups_droppable"].values()
          for p in g["pairs"]} == {8}
  for group in result["groups"].values():
    for p in group["pairs"]:
      assert p["matching"] == "name"
      assert p["jaccard_ambient"] == pytest.approx(stability.jaccard(
          importance[p["a"]]["ambient"], importance[p["b"]]["ambient"]))
    # Pairs with no ambient unit in either run are left out of the mean.
    overlaps = [p["jaccard_ambient"] for p in group["pairs"]
                if p["jaccard_ambient"] is not None]
    assert group["num_empty_pairs"] == len(group["pairs"]) - len(overlaps)
    assert group["jaccard_mean"] == (pytest.approx(np.mean(overlaps))
                                     if overlaps else None)
  report = (study / "report.md").read_text()
  assert "## Claims 2 and 3: the stability of layer importance" in report
  seconds = json.loads((study / "stage_seconds.json").read_text())
  stability_seconds = sum(v for k, v in seconds.items()
                          if k.startswith("stability/"))
  assert (f"stability runs {stability_seconds:.0f} s (3 pre-trained and"
          " analysed)") in report
  assert "| seeds (same size and norm) | 2 (" in report
  # The demo's numbers are untouched.
  assert json.loads((study / "summary.json").read_text())["arms"] == (
      summary["arms"])
