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
])
def test_bad_input_names_the_problem(tmp_path, text, message):
  (tmp_path / "s.json").write_text(json.dumps(_summary()))
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
