r"""The README's claim-5 results, generated from a run's summary.json.

  python -m conformer_fl.tools.readme_results [--files=README.md,docs/results.md,docs/demo.md]
  python -m conformer_fl.tools.readme_results --check

A markdown file holds blocks between the lines

  <!-- results: PATH [brief|models] -->
  <!-- end results -->

where PATH is the summary.json (relative to the file) that the block is
rendered from: the verdict with its rule's two intervals and the arms
table, and (without `brief`) every paired difference, numbers formatted as
in the run's report.md
(`conformer_fl.experiment.report`); with `models`, instead, each
pre-trained model's dev WER and labels, the leave-one-engine-out WERs and
the stage times. Without `--check` the block is
rewritten in place; with it, nothing is written and the exit status is 1
when the block differs from what the summary renders (the suite runs the
check, so a README number cannot drift from its run).
"""

from collections.abc import Mapping, Sequence
import json
import pathlib
import re
from typing import Any

from absl import app
from absl import flags

from conformer_fl import cli
from conformer_fl import result_format

# The files of this repository that hold results blocks.
DOCS = ("README.md", "docs/results.md", "docs/demo.md")
BEGIN = "<!-- results: {path} -->"
END = "<!-- end results -->"
_BLOCK = re.compile(r"<!-- results: (?P<path>\S+)(?: (?P<mode>brief|models))?"
                    r" -->\n"
                    r"(?P<body>.*?)" + re.escape(END), re.DOTALL)


_level = result_format.level
_interval = result_format.difference
_wer = result_format.wer_interval


def _pct(value: float | None) -> str:
  """A cost not measured prints '-' (report.md prints 'n/a')."""
  return "-" if value is None else f"{100 * value:.1f}"


def render(summary: Mapping[str, Any], brief: bool = False) -> str:
  """The block's body (markdown, ending in a newline) from a summary.json.

  Args:
    summary: the experiment's summary (`experiment.summary.build_summary`):
      its setup, verdict, arms, absent arms and comparisons.
    brief: leave out the table of paired differences.
  """
  s = summary["setup"]
  v = summary.get("verdict")
  confidence = f"{100 * s['confidence']:.0f}%"
  if v:
    lines = [f"**Verdict: {v['verdict'].upper()}** at client cost"
             f" {_level(s['verdict_level'])}, margin delta = {v['margin']},"
             f" {confidence} intervals over {len(s['pretrain_seeds'])}"
             f" pre-trained model(s) x {len(s['verdict_seeds'])} federated"
             " seeds x speakers x utterances.", "",
             *[f"- {reason}" for reason in v["reasons"]], ""]
  else:
    lines = [f"**No verdict**: the targeted or anti_targeted arm is absent at"
             f" client cost {_level(s['verdict_level'])}.", ""]
  lines += ["| level | arm | client model | params % | FLOPs % | step time %"
            " | models x seeds | test WER [interval] |",
            "|---|---|---|---|---|---|---|---|"]
  for row in summary["arms"]:
    lines.append(
        f"| {_level(row['level'])} | {row['arm']} | {row['client_model']} |"
        f" {_pct(row['params_fraction'])} | {_pct(row['flops_fraction'])} |"
        f" {_pct(row['step_seconds_fraction'])} |"
        f" {row['num_models']} x {len(row['seeds'])} |"
        f" {_wer(row['wer'], row['low'], row['high'])} |")
  for row in summary.get("absent") or []:
    lines.append(f"| {_level(row['level'])} | {row['arm']} | absent:"
                 f" {row['note']} | | | | | |")
  comparisons = [] if brief else summary.get("comparisons") or []
  if comparisons:
    lines += ["", f"| a - b | difference [{confidence} interval] | models x"
              " seeds x speakers x utterances |", "|---|---|---|"]
    for c in comparisons:
      lines.append(f"| {c['a']} - {c['b']} | {_interval(c)} |"
                   f" {c['num_models']} x {c['num_seeds']} x"
                   f" {c['num_speakers']} x {c['num_utterances']} |")
  return "\n".join(lines) + "\n"


def render_models(summary: Mapping[str, Any]) -> str:
  """The `models` block's body (markdown) from a summary.json.

  One bullet per pre-trained model (dev WER with its interval, CER, the
  droppable modules' labels), one for the leave-one-engine-out model where
  the run has one, and one for the stage times the run recorded
  (`stage_seconds`, summed per stage kind).

  Args:
    summary: the experiment's summary: its models, engines (optional) and
      stage_seconds (optional).

  Returns:
    The bullets, one per line, ending in a newline.
  """
  lines = []
  for index, m in enumerate(summary["models"]):
    d = m["dev_eval"]
    lines.append(
        f"- Model {index} (pre-training seed"
        f" {m['seed']}): dev WER {_wer(d['wer'], d['low'], d['high'])}, CER"
        f" {d['cer']:.3f}, {d['num_examples']:.0f} utterances; droppable"
        f" modules: {m['num_ambient']} ambient, {m['num_critical']} critical,"
        f" {m['num_undetermined']} undetermined.")
  e = summary.get("engines")
  if e:
    held, own = e["held_out"], e["in_domain"]
    lines.append(
        f"- Leave {e['engine']} out ({e['steps']} steps on"
        f" {', '.join(e['trained_on'])} speakers only), long-form test split:"
        f" {e['engine']} speakers (never heard) WER"
        f" {_wer(held['wer'], held['wer_low'], held['wer_high'])}, CER"
        f" {held['cer']:.3f}, {held['num_examples']:.0f} utterances;"
        f" {', '.join(e['trained_on'])} speakers WER"
        f" {_wer(own['wer'], own['wer_low'], own['wer_high'])},"
        f" CER {own['cer']:.3f}, {own['num_examples']:.0f} utterances.")
  totals = result_format.stage_totals(summary.get("stage_seconds", {}))
  if totals:
    lines.append(
        f"- Recorded stage time"
        f" {sum(t for t, _ in totals.values()) / 60:.1f} min: "
        + ", ".join(f"{kind} {seconds:.0f} s"
                    for kind, (seconds, _) in totals.items()) + ".")
  return "\n".join(lines) + "\n"


class ReadmeError(ValueError):
  """The README has no results block, or its summary cannot be read."""


def update(text: str, readme_dir: pathlib.Path) -> str:
  """`text` with every results block rendered from its summary.

  Raises:
    ReadmeError: no block, a malformed block (a marker line that does not
      parse, or a block without its own end line), or a block's summary
      file is missing or not JSON.
  """
  blocks = list(_BLOCK.finditer(text))
  if not blocks:
    raise ReadmeError("no results block: add the lines"
                      f" {BEGIN.format(path='PATH')} and {END}")
  markers = text.count("<!-- results:")
  if markers != len(blocks) or any("<!-- results:" in b["body"]
                                   for b in blocks):
    raise ReadmeError(f"{markers} '<!-- results:' lines but {len(blocks)}"
                      f" well-formed blocks: each needs 'PATH', 'PATH brief' or"
                      " 'PATH models'"
                      f" and its own {END} line")

  def replace(match: re.Match[str]) -> str:
    path = readme_dir / match["path"]
    try:
      summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ReadmeError(f"{path}: not a readable summary.json ({e})") from e
    head = match.group(0).split("\n", 1)[0]
    try:
      body = (render_models(summary) if match["mode"] == "models" else
              render(summary, match["mode"] == "brief"))
    except KeyError as e:
      raise ReadmeError(f"{path}: not a summary.json of the experiment"
                        f" (missing {e})") from e
    except (AttributeError, TypeError) as e:
      raise ReadmeError(f"{path}: not a summary.json of the experiment"
                        f" ({type(e).__name__}: {e})") from e
    return head + "\n" + body + END

  return _BLOCK.sub(replace, text)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {list(argv[1:])}: give --files")
  stale = []
  for name in flags.FLAGS.files:
    path = pathlib.Path(name)
    try:
      text = path.read_text()
      new = update(text, path.parent)
    except (OSError, ReadmeError) as e:
      cli.fail(f"{path}: {e}")
    if new != text:
      stale.append(name)
      if not flags.FLAGS.check:
        path.write_text(new)
  if stale and flags.FLAGS.check:
    cli.fail(f"{', '.join(stale)}: a results block differs from its"
             " summary.json; run python -m conformer_fl.tools.readme_results"
             " without --check")


if __name__ == "__main__":
  flags.DEFINE_list("files", list(DOCS),
                    "The markdown files whose results blocks to render.")
  flags.DEFINE_bool("check", False, "Only check that the blocks are current.")
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, ()))
