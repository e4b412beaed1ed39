"""The tiny experiment as two processes of two devices against one process of 4.

Every stage runs under `launch/local_multiprocess.py` (pre-training and the
arms over both processes' devices, the analysis' variants split over them,
evaluations split over the processes) and must give the summary of one
process of four devices: the same WERs and intervals, module labels,
half-width ranking, arms and client costs. Pre-training's gradient all-reduce runs over two
processes there (gloo) and sums in another order, so parameters differ in
their last bits and losses are compared to a relative 1e-4.

Two of the four arms (the baseline and the targeted one), to keep the suite
short; in a module of its own, so that it runs beside test_experiment_e2e.
"""

import json
import re

import pytest

import tiny_experiment  # tests/tiny_experiment.py

pytestmark = pytest.mark.slow

ARMS = "--config.arms=('full','targeted')"
# The leave-one-engine-out stage is one more central run (tested in
# test_experiment_e2e); left out here to keep the suite short.
NO_ENGINE_CHECK = "--config.engine_check.leave_out="


@pytest.fixture(scope="module")
def runs(tiny_corpus_dir, tmp_path_factory):
  """{'one': (workdir, stdout), 'two': (workdir, stdout)}."""
  runs = {}
  for name, launcher in (("one", ()), ("two", tiny_experiment.TWO_PROCESSES)):
    workdir = tmp_path_factory.mktemp(f"{name}_process_experiment")
    runs[name] = (workdir, tiny_experiment.run(
        workdir, tiny_corpus_dir, overrides=[ARMS, NO_ENGINE_CHECK],
        launcher=launcher))
  return runs


def _summary(workdir):
  return tiny_experiment.without_timings(
      json.loads((workdir / "summary.json").read_text()))


def test_process_0_alone_reports(runs):
  two_dir, stdout = runs["two"]
  assert "[p0] [7/7] summary" in stdout
  assert not re.search(r"^\[p1\] \[\d/7\]", stdout, re.MULTILINE)
  assert f"[p0] Report: {two_dir / 'report.md'}" in stdout


def test_two_processes_give_the_summary_of_one(runs):
  one, two = _summary(runs["one"][0]), _summary(runs["two"][0])
  assert [row["key"] for row in two["arms"]] == ["any/full", "c070/targeted"]
  assert two["models"][0]["labels"] == one["models"][0]["labels"]
  assert two["arms"][1]["kept"] == one["arms"][1]["kept"]
  tiny_experiment.assert_close(two, one)


def test_the_analysis_split_over_hosts_gives_every_units_wers(runs):
  one, two = [json.loads((runs[name][0] / "pretrain" / "analysis" /
                          "importance.json").read_text())
              for name in ("one", "two")]
  assert list(two["units"]) == list(one["units"])
  for name, unit in one["units"].items():
    assert two["units"][name]["reinit_wer"] == unit["reinit_wer"], name
    assert two["units"][name]["rerandomize_wer"] == unit["rerandomize_wer"]
    assert two["units"][name]["reinit_loss"] == pytest.approx(
        unit["reinit_loss"], rel=1e-4)
