"""The README's results blocks: rendered from summary.json, and in sync."""

import json
import pathlib
import subprocess
import sys

import pytest

from conformer_fl.tools import readme_results

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _summary() -> dict:
  comparison = dict(a="c085/targeted", b="any/full", difference=0.0123,
                    low=-0.004, high=0.0291, num_models=2, num_seeds=5,
                    num_speakers=8, num_utterances=240)
  return dict(
      setup=dict(confidence=0.95, verdict_level=0.85, pretrain_seeds=[0, 1],
                 verdict_seeds=[0, 1, 2, 3, 4]),
      verdict=dict(verdict="inconclusive", margin=0.02,
                   reasons=["targeted - full: [-0.004, +0.029]: crosses the"
                            " margin"]),
      arms=[dict(level=None, arm="full", client_model="full model",
                 params_fraction=1.0, flops_fraction=1.0,
                 step_seconds_fraction=1.0, num_models=2, seeds=[0, 1, 2],
                 wer=0.8321, low=0.7634, high=0.9061),
            dict(level=0.85, arm="targeted", client_model="9 modules thinned",
                 params_fraction=0.8471, flops_fraction=None,
                 step_seconds_fraction=0.912, num_models=2, seeds=[0, 1],
                 wer=0.84449, low=0.8, high=0.9)],
      absent=[dict(level=None, arm="freeze", note="no ambient module")],
      comparisons=[comparison])


def test_render_formats_every_number_of_the_summary():
  text = readme_results.render(_summary())
  lines = text.splitlines()
  assert lines[0] == (
      "**Verdict: INCONCLUSIVE** at client cost 85%, margin delta = 0.02, 95%"
      " intervals over 2 pre-trained model(s) x 5 federated seeds x speakers"
      " x utterances.")
  assert "- targeted - full: [-0.004, +0.029]: crosses the margin" in lines
  assert ("| - | full | full model | 100.0 | 100.0 | 100.0 | 2 x 3 |"
          " 0.832 [0.763, 0.906] |") in lines
  # A cost the run did not measure prints '-', never a number.
  assert ("| 85% | targeted | 9 modules thinned | 84.7 | - | 91.2 | 2 x 2 |"
          " 0.844 [0.800, 0.900] |") in lines
  assert "| - | freeze | absent: no ambient module | | | | | |" in lines
  assert ("| c085/targeted - any/full | +0.012 [-0.004, +0.029] |"
          " 2 x 5 x 8 x 240 |") in lines
  brief = readme_results.render(_summary(), brief=True)
  assert "c085/targeted - any/full" not in brief
  assert brief.splitlines()[:6] == lines[:6]


def _models_summary() -> dict:
  return dict(
      models=[dict(seed=0, dev_eval=dict(wer=0.6608, low=0.5509, high=0.785504,
                                         cer=0.2677, num_examples=192.0),
                   num_ambient=2, num_critical=4, num_undetermined=26),
              dict(seed=3, dev_eval=dict(wer=0.5, low=0.4, high=0.6,
                                         cer=0.2, num_examples=96.0),
                   num_ambient=0, num_critical=30, num_undetermined=2)],
      engines=dict(engine="flite", steps=600, trained_on=["espeak"],
                   held_out=dict(wer=0.9744, wer_low=0.9585, wer_high=0.9918,
                                 cer=0.5586, num_examples=48.0),
                   in_domain=dict(wer=0.7514, wer_low=0.6976, wer_high=0.8108,
                                  cer=0.3113, num_examples=144.0)),
      stage_seconds={"corpus": 69.6, "pretrain/model_0": 507.0,
                     "arms/model_0/any/full/seed_0": 94.2,
                     "arms/model_0/c085/targeted/seed_0": 114.9})


def test_models_block_states_each_model_the_engine_check_and_stage_times():
  lines = readme_results.render_models(_models_summary()).splitlines()
  assert lines == [
      "- Model 0 (pre-training seed 0): dev WER 0.661 [0.551, 0.786], CER"
      " 0.268, 192 utterances; droppable modules: 2 ambient, 4 critical, 26"
      " undetermined.",
      "- Model 1 (pre-training seed 3): dev WER 0.500 [0.400, 0.600], CER"
      " 0.200, 96 utterances; droppable modules: 0 ambient, 30 critical, 2"
      " undetermined.",
      "- Leave flite out (600 steps on espeak speakers only), long-form test"
      " split: flite speakers (never heard) WER 0.974 [0.959, 0.992], CER"
      " 0.559, 48 utterances; espeak speakers WER 0.751 [0.698, 0.811], CER"
      " 0.311, 144 utterances.",
      # 69.6 + 507.0 + 94.2 + 114.9 = 785.7 s; the arms summed.
      "- Recorded stage time 13.1 min: corpus 70 s, pretrain 507 s, arms"
      " 209 s."]
  summary = _models_summary()
  del summary["engines"], summary["stage_seconds"]
  assert len(readme_results.render_models(summary).splitlines()) == 2


def test_no_verdict_says_which_level(tmp_path):
  summary = _summary()
  summary["verdict"] = None
  assert readme_results.render(summary).startswith(
      "**No verdict**: the targeted or anti_targeted arm is absent at client"
      " cost 85%.")


def test_update_rewrites_only_the_blocks_and_is_idempotent(tmp_path):
  (tmp_path / "s.json").write_text(json.dumps(_summary()))
  text = ("# Title\n\nbefore\n<!-- results: s.json brief -->\nstale 0.999\n"
          "<!-- end results -->\nafter\n<!-- results: s.json -->\n"
          "<!-- end results -->\n")
  new = readme_results.update(text, tmp_path)
  assert new.startswith("# Title\n\nbefore\n<!-- results: s.json brief -->\n")
  first, second = new.split("after\n")
  assert first.endswith("<!-- end results -->\n")
  assert "0.999" not in new and "0.832 [0.763, 0.906]" in first
  # The brief block leaves out the paired differences; the full one has them.
  assert "c085/targeted - any/full" not in first
  assert "c085/targeted - any/full" in second
  assert readme_results.update(new, tmp_path) == new


@pytest.mark.parametrize("text, message", [
    ("no block here\n", "no results block"),
    ("<!-- results: missing.json -->\n<!-- end results -->\n",
     "not a readable summary.json"),
    # A marker that does not parse beside one that does.
    ("<!-- results: s.json -->\n<!-- end results -->\n"
     "<!-- results: s.json  brief -->\nold\n<!-- end results -->\n",
     "2 '<!-- results:' lines but 1 well-formed"),
    # A block without its end line would swallow the next block.
    ("<!-- results: s.json -->\nold\n"
     "<!-- results: s.json brief -->\nold\n<!-- end results -->\n",
     "its own <!-- end results --> line"),
    # A models block over a summary without models.
    ("<!-- results: s.json models -->\n<!-- end results -->\n",
     "not a summary.json of the experiment \\(missing 'models'\\)"),
    # stage_seconds of the wrong type.
    ("<!-- results: bad.json models -->\n<!-- end results -->\n",
     "not a summary.json of the experiment \\(AttributeError"),
])
def test_bad_input_names_the_problem(tmp_path, text, message):
  (tmp_path / "s.json").write_text(json.dumps(_summary()))
  (tmp_path / "bad.json").write_text(json.dumps(
      dict(_models_summary(), stage_seconds=[1.0])))
  with pytest.raises(readme_results.ReadmeError, match=message):
    readme_results.update(text, tmp_path)


def test_check_fails_in_one_line_on_a_stale_block(tmp_path):
  (tmp_path / "s.json").write_text(json.dumps(_summary()))
  readme = tmp_path / "R.md"
  readme.write_text("<!-- results: s.json -->\nstale\n<!-- end results -->\n")
  command = [sys.executable, "-m", "conformer_fl.tools.readme_results",
             f"--files={readme}"]
  result = subprocess.run([*command, "--check"], capture_output=True,
                          text=True, check=False, cwd=ROOT)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"error: {readme}: a results block differs from its summary.json; run"
      " python -m conformer_fl.tools.readme_results without --check"]
  assert "stale" in readme.read_text()
  subprocess.run(command, check=True, cwd=ROOT)
  assert subprocess.run([*command, "--check"], check=False,
                        cwd=ROOT).returncode == 0


def test_the_repository_docs_match_their_runs():
  """Every results block of the repository's docs is current."""
  for name in readme_results.DOCS:
    path = ROOT / name
    text = path.read_text()
    assert readme_results.update(text, path.parent) == text, (
        f"{name} is stale: run python -m conformer_fl.tools.readme_results")
