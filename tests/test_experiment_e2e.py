"""`make demo`'s pipeline at tiny scale, through the real entry point.

`configs/experiment.py:scale=tiny` runs every stage (corpus, pre-training,
analysis and half-width ranking, four federated arms at one cost level,
client costs, verdict, report) on the tiny corpus in a
subprocess; a second run must reuse all of it and give the same summary, and
so must notebook 3 (colabs/03_targeted_federated_dropout.ipynb), which runs the
same config on the same workdir; the same command in a new workdir must give
the same numbers.

Two processes of two devices (`launch/local_multiprocess.py`) run every stage
(pre-training and the arms over both processes' devices, the analysis'
variants split over them, evaluations split over the processes) and must give
the summary of the first run, one process of four devices: the same WERs and
intervals, module labels, half-width ranking, arms and client costs.
Pre-training's gradient all-reduce runs over two processes there (gloo) and
sums in another order, so parameters differ in their last bits and losses are
compared to a relative 1e-4. That run has two of the four arms (the baseline
and the targeted one) and no leave-one-engine-out stage, to keep the suite
short; every arm is trained on its own, so the first run's summary, less the
other arms, the comparisons with them, the verdict and the engine check, is
the summary of that config in one process (`tiny_experiment.restricted`).
"""

import json
import re
import shutil

import matplotlib.image
import numpy as np
import pytest

from conformer_fl.analysis import stability
from conformer_fl.experiment import verdict

import notebooks  # tests/notebooks.py
import tiny_experiment  # tests/tiny_experiment.py

pytestmark = pytest.mark.slow

# The two-process run: two of the four arms, no leave-one-engine-out stage.
TWO_PROCESS_ARMS = ("any/full", "c070/targeted")
TWO_PROCESS_OVERRIDES = ("--config.arms=('full','targeted')",
                         "--config.engine_check.leave_out=")


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


def _final(workdir, key, seed=0, model=0):
  """The final evaluation of model `model`'s run of arm key 'LEVEL/ARM'."""
  level, arm = key.split("/")
  (path,) = (workdir / "arms" / f"model_{model}" / level / arm).glob(
      f"seed_{seed}_lr*")
  return json.loads((path / "final_eval.json").read_text())["value"]


def test_stages_run_then_are_reused(experiment):
  workdir, first, second, summary = experiment
  for stage in (1, 2, 3, 4, 5, 7):
    assert f"[{stage}/7]" in first
  assert f"Report: {workdir / 'report.md'}" in first
  assert "pre-training model 0 (seed 0): 6 central steps" in first
  assert "pre-training model 0 (seed 0): done (6 steps), reused" in second
  assert "central steps" not in second and "resetting" not in second
  assert " rounds -> " not in second
  for arm in ("full any", "targeted c070", "anti_targeted c070",
              "uniform c070"):
    assert f"adapt {arm} model 0 seed 0 lr 0.05: done, reused" in second
  assert json.loads((workdir / "summary.json").read_text()) == summary


def test_arms_match_the_cost_level_as_the_compiled_step_counts_it(experiment):
  workdir, _, _, summary = experiment
  costs = json.loads((workdir / "client_costs.json").read_text())["value"]
  by_key = {row["key"]: row for row in summary["arms"]}
  assert set(by_key) == {"any/full", "c070/targeted", "c070/anti_targeted",
                         "c070/uniform"}
  full = costs["any/full"]
  assert full["params_fraction"] == full["flops_fraction"] == 1.0
  for key, row in by_key.items():
    # The cost model's count is the compiled client step's trainable
    # parameters, counted independently.
    assert row["params_fraction"] == pytest.approx(
        costs[key]["params_fraction"], abs=1e-12)
    if key != "any/full":
      # The tiny model's 2 heads make the steps coarse: within 0.05.
      assert abs(row["params_fraction"] - 0.70) < 0.05, key
      assert row["flops_fraction"] < 1.0
      assert row["step_seconds_fraction"] > 0
  importance = json.loads(
      (workdir / "pretrain" / "analysis" / "importance.json").read_text())
  labels = summary["models"][0]["labels"]
  assert labels == {m: importance["units"][m]["label"] for m in labels}
  assert len(labels) == 8  # 4 droppable modules x 2 blocks.


def test_wers_and_intervals_come_from_the_final_evaluations(experiment):
  workdir, _, _, summary = experiment
  for row in summary["arms"]:
    final = _final(workdir, row["key"])
    # The tiny corpus's test split: 2 speakers x 3 short utterances.
    assert final["num_examples"] == 6 and final["split"] == "test"
    errors = np.array(final["utterance_errors"])
    words = np.array(final["utterance_words"])
    assert row["wer"] == pytest.approx(errors.sum() / words.sum())
    assert row["low"] <= row["wer"] <= row["high"]
    assert row["per_seed"] == [[pytest.approx(row["wer"])]]
    assert [r for r, _ in row["dev_wer_by_round"]][-1] == 2
  for c in summary["comparisons"]:
    a, b = _final(workdir, c["a"]), _final(workdir, c["b"])
    difference = (np.sum(a["utterance_errors"]) - np.sum(b["utterance_errors"])
                  ) / np.sum(a["utterance_words"])
    assert c["difference"] == pytest.approx(difference)
    assert c["low"] <= c["difference"] <= c["high"]
    assert (c["num_models"], c["num_seeds"], c["num_speakers"],
            c["num_utterances"]) == (1, 1, 2, 6)


def test_verdict_follows_the_rule_from_the_intervals(experiment):
  _, _, _, summary = experiment
  find = lambda a, b: next(c for c in summary["comparisons"]
                           if (c["a"], c["b"]) == (a, b))
  expected = verdict.decide(find("c070/targeted", "any/full"),
                            find("c070/anti_targeted", "c070/targeted"),
                            margin=0.02)
  assert summary["verdict"] == expected
  assert summary["setup"]["miniature"]


def test_report_has_checks_verdict_tables_and_figures(experiment):
  workdir, _, _, summary = experiment
  report = (workdir / "report.md").read_text()
  lines = report.splitlines()
  assert lines[0].startswith("# Claim 5")
  checks = [line for line in lines[:10] if line.startswith("- **")]
  assert len(checks) == 4
  assert "dev WER <= 0.30" in checks[0] and "utterances" in checks[0]
  assert "This is the miniature of the test" in report
  assert f"**{summary['verdict']['verdict'].upper()}** at client cost 70%" in (
      report)
  assert verdict.RULE in report
  for row in summary["arms"]:
    assert (f"{row['wer']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"
            in report)
  for c in summary["comparisons"]:
    assert f"| {c['a']} - {c['b']} | {c['difference']:+.3f}" in report
  assert "Wall time of each stage" in report
  for figure in ("wer_vs_cost.png", "wer_by_round.png", "pretrain_curve.png"):
    assert f"({figure})" in report
    assert matplotlib.image.imread(workdir / figure).ndim == 3
  assert "Gate (>= 4 droppable modules ambient" in report
  # Transcripts: the references of the test split, each arm's hypothesis.
  samples = summary["transcripts"]
  final = _final(workdir, "c070/targeted")
  assert [s["reference"] for s in samples] == final["references"][:6]
  assert [s["arms"]["c070/targeted"] for s in samples] == (
      final["hypotheses"][:6])
  # Links in the report are relative to the workdir.
  assert str(workdir) not in report


def test_leave_one_engine_out_splits_the_test_speakers_by_engine(experiment):
  workdir, first, _, summary = experiment
  engines = summary["engines"]
  assert (engines["engine"], engines["trained_on"]) == ("flite", ["espeak"])
  assert "leave out flite: 6 central steps without flite" in first
  card = summary["corpus"]
  long_test = card["sizes"]["test"]["by_domain"]["long"]["utterances"]
  held_out, in_domain = engines["held_out"], engines["in_domain"]
  assert held_out["num_examples"] > 0 and in_domain["num_examples"] > 0
  assert held_out["num_examples"] + in_domain["num_examples"] == long_test
  assert (engines["trained_with_engine"]["num_examples"] ==
          held_out["num_examples"])
  config = json.loads((workdir / "leave_out_flite" / "config.json").read_text())
  assert config["data"]["train_engines"] == ["espeak"]
  report = (workdir / "report.md").read_text()
  assert "### Leave one engine out: flite" in report
  assert f"test {card['oov_rate']['test']['all']:.3f}" in report


def test_half_width_ranking_covers_every_droppable_module(experiment):
  workdir, _, _, summary = experiment
  half = json.loads((workdir / "pretrain" / "analysis" / "halfwidth.json"
                     ).read_text())["value"]
  model = summary["models"][0]
  assert set(half["modules"]) == set(model["labels"])
  for m in half["modules"].values():
    assert m["wer_increase"] == pytest.approx(m["wer"] - half["baseline_wer"])
  assert model["halfwidth"]["agreement"]["num_modules"] == 8


def test_a_new_workdir_gives_the_same_numbers(
    experiment, tiny_corpus_dir, tmp_path):
  """Bit for bit: the config again, with two of its arms and no engine check."""
  _, _, _, summary = experiment
  tiny_experiment.run(tmp_path, tiny_corpus_dir,
                      overrides=TWO_PROCESS_OVERRIDES)
  again = json.loads((tmp_path / "summary.json").read_text())
  assert [row["key"] for row in again["arms"]] == list(TWO_PROCESS_ARMS)
  assert tiny_experiment.without_timings(again) == tiny_experiment.restricted(
      tiny_experiment.without_timings(summary), TWO_PROCESS_ARMS)


def test_notebook_3_reuses_the_run_and_shows_its_table(
    experiment, tiny_corpus_dir, tmp_path):
  workdir, _, _, summary = experiment
  nb = notebooks.execute(
      notebooks.COLABS / "03_targeted_federated_dropout.ipynb", tmp_path,
      CONFORMER_FL_WORKDIR=str(workdir), CONFORMER_FL_DATA_DIR=tiny_corpus_dir)
  text = notebooks.all_text(nb)
  assert "pre-training model 0 (seed 0): done (6 steps), reused" in text
  assert "analysis model 0 (seed 0): done, reused" in text
  assert "adapt targeted c070 model 0 seed 0 lr 0.05: done, reused" in text
  assert f"least important first: {summary['models'][0]['ranking'][:4]}" in text
  assert f"verdict: {summary['verdict']['verdict']}" in text
  table = notebooks.cell_printing(nb, "of the parameters")
  markdown = [o.data["text/markdown"] for o in table.outputs
              if o.output_type == "display_data" and "text/markdown" in o.data]
  assert len(markdown) == 1 and "| level | arm | client model |" in markdown[0]
  for row in summary["arms"]:
    assert (f"{row['key']:>18}: {row['params_fraction']:.1%} of the"
            f" parameters, {row['flops_fraction']:.1%} of the FLOPs, WER"
            f" {row['wer']:.3f}") in text
    assert f"| {row['arm']} |" in markdown[0]
  # The heatmap, the WER-against-cost and the WER-by-round figures.
  pngs = notebooks.pngs(nb)
  assert len(pngs) == 3
  assert all(png[:8] == notebooks.PNG_MAGIC for png in pngs)


def test_the_stability_stage_grows_the_run_into_the_study(
    experiment, tiny_corpus_dir, tmp_path):
  """The optional stability stage at tiny scale, on a copy of the finished run."""
  workdir, _, _, summary = experiment
  study = tmp_path / "study"
  shutil.copytree(workdir, study)
  # Seed 1 with either norm: with `pretrain` (group norm, seed 0), one pair
  # differs in the seed only, one in the norm only and one in both.
  arg = ",stability_seeds=1,stability_norms=group_norm+batch_norm"
  first = tiny_experiment.run(study, tiny_corpus_dir, arg)
  # The demo's stages are reused; two runs are added to `pretrain`.
  assert "pre-training model 0 (seed 0): done (6 steps), reused" in first
  names = ["tiny_batch_norm_seed1", "tiny_group_norm_seed1"]
  for name in names:
    assert f"[6/7] stability {name}: 6 central steps" in first
    assert f"[6/7] stability {name}: analysis" in first
  again = tiny_experiment.run(study, tiny_corpus_dir, arg)
  for name in names:
    assert f"stability {name}: pre-training done, reused" in again
    assert f"stability {name}: analysis done, reused" in again

  result = json.loads((study / "stability.json").read_text())
  runs = {r["name"]: r for r in result["runs"]}
  assert list(runs) == ["pretrain", *names]
  assert [(r["norm"], r["seed"]) for r in runs.values()] == [
      ("group_norm", 0), ("batch_norm", 1), ("group_norm", 1)]
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
  # Seeds: same norm, seeds 0 and 1; norms: same seed. Never both (pretrain
  # and tiny_batch_norm_seed1 are no pair).
  pairs = {g: {(p["a"], p["b"]) for p in result["groups"][g]["pairs"]}
           for g in result["groups"]}
  assert pairs == {
      "seeds": {("pretrain", "tiny_group_norm_seed1")},
      "norms": {("tiny_batch_norm_seed1", "tiny_group_norm_seed1")}}
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
  assert f"stability {stability_seconds:.0f} s (4 runs)" in report
  assert "| seeds (same size and norm) | 1 (" in report
  assert "| conv norms (same size and seed) | 1 (" in report
  # The demo's numbers are untouched.
  assert json.loads((study / "summary.json").read_text())["arms"] == (
      summary["arms"])


@pytest.fixture(scope="module")
def two_processes(tiny_corpus_dir, tmp_path_factory):
  """The tiny experiment as 2 processes x 2 devices: (workdir, stdout)."""
  workdir = tmp_path_factory.mktemp("two_process_experiment")
  stdout = tiny_experiment.run(workdir, tiny_corpus_dir,
                               overrides=TWO_PROCESS_OVERRIDES,
                               launcher=tiny_experiment.TWO_PROCESSES)
  return workdir, stdout


def test_process_0_alone_reports(two_processes):
  two_dir, stdout = two_processes
  assert "[p0] [7/7] summary" in stdout
  assert not re.search(r"^\[p1\] \[\d/7\]", stdout, re.MULTILINE)
  assert f"[p0] Report: {two_dir / 'report.md'}" in stdout


def test_two_processes_give_the_summary_of_one(experiment, two_processes):
  one = tiny_experiment.restricted(
      tiny_experiment.without_timings(experiment[3]), TWO_PROCESS_ARMS)
  two = tiny_experiment.without_timings(
      json.loads((two_processes[0] / "summary.json").read_text()))
  assert [row["key"] for row in two["arms"]] == list(TWO_PROCESS_ARMS)
  assert two["models"][0]["labels"] == one["models"][0]["labels"]
  assert two["arms"][1]["kept"] == one["arms"][1]["kept"]
  tiny_experiment.assert_close(two, one)


def test_the_analysis_split_over_hosts_gives_every_units_wers(
    experiment, two_processes):
  one, two = [json.loads((workdir / "pretrain" / "analysis" /
                          "importance.json").read_text())
              for workdir in (experiment[0], two_processes[0])]
  assert list(two["units"]) == list(one["units"])
  for name, unit in one["units"].items():
    assert two["units"][name]["reinit_wer"] == unit["reinit_wer"], name
    assert two["units"][name]["rerandomize_wer"] == unit["rerandomize_wer"]
    assert two["units"][name]["reinit_loss"] == pytest.approx(
        unit["reinit_loss"], rel=1e-4)
