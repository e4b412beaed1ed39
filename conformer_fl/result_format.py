"""Number formats shared by the experiment's report.md and the README blocks.

Pure Python on plain JSON values, so that `conformer_fl.tools.readme_results`
formats a summary.json exactly as `conformer_fl.experiment.report` does
without importing the experiment (and TensorFlow with it).
"""

from collections.abc import Mapping
from typing import Any


def level(value: float | None) -> str:
  """'85%' for a cost level 0.85; '-' for an arm without one (full)."""
  return "-" if value is None else f"{100 * value:.0f}%"


def wer_interval(wer: float, low: float, high: float) -> str:
  """'0.832 [0.763, 0.906]': a WER and its interval."""
  return f"{wer:.3f} [{low:.3f}, {high:.3f}]"


def difference(row: Mapping[str, Any]) -> str:
  """'+0.028 [+0.002, +0.056]' from a paired comparison's difference, low, high."""
  return f"{row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"


def stage_totals(stage_seconds: Mapping[str, float]
                 ) -> dict[str, tuple[float, int]]:
  """{stage kind: (seconds, stages)}, summed over the stages of each kind.

  A stage's kind is its name up to the first '/' ('arms/model_0/...' is
  'arms'); kinds keep the order of their first stage.
  """
  totals: dict[str, tuple[float, int]] = {}
  for name, seconds in stage_seconds.items():
    kind = name.split("/")[0]
    total, count = totals.get(kind, (0.0, 0))
    totals[kind] = (total + seconds, count + 1)
  return totals
