"""Claim 5's verdict, by a rule fixed before the runs.

Two paired differences at the verdict's cost level, each with the
hierarchical bootstrap interval of `conformer_fl.stats` (pre-trained models,
federated seeds, speakers, utterances), and a non-inferiority margin delta
(`config.comparison.margin`, absolute WER):

  confirmed     upper bound of (targeted - full) < delta   (no WER loss
                beyond the margin) and lower bound of (anti_targeted -
                targeted) > 0 (the importance ranking matters);
  refuted       lower bound of (targeted - full) > delta   (a loss beyond the
                margin), or (anti_targeted - targeted) lies inside
                (-delta, +delta)   (the ranking makes no difference);
  inconclusive  otherwise.
"""

from collections.abc import Mapping
from typing import Any

VERDICTS = ("confirmed", "refuted", "inconclusive")
RULE = (
    "confirmed: upper bound of (targeted - full) < delta and lower bound of"
    " (anti_targeted - targeted) > 0; refuted: lower bound of (targeted -"
    " full) > delta, or the interval of (anti_targeted - targeted) inside"
    " (-delta, +delta); otherwise inconclusive")


def decide(targeted_vs_full: Mapping[str, float],
           anti_vs_targeted: Mapping[str, float],
           margin: float) -> dict[str, Any]:
  """The verdict (module docstring) from two intervals {'low', 'high', ...}.

  Returns:
    {'verdict', 'reasons': [str], 'margin', 'rule'}.
  """
  tf_low, tf_high = targeted_vs_full["low"], targeted_vs_full["high"]
  at_low, at_high = anti_vs_targeted["low"], anti_vs_targeted["high"]
  reasons = []
  non_inferior = tf_high < margin
  ranking_matters = at_low > 0
  inferior = tf_low > margin
  ranking_void = -margin < at_low and at_high < margin
  reasons.append(
      f"targeted - full: [{tf_low:+.3f}, {tf_high:+.3f}]: "
      + ("upper bound below the margin (non-inferior)" if non_inferior else
         "lower bound above the margin (inferior)" if inferior else
         "crosses the margin"))
  reasons.append(
      f"anti_targeted - targeted: [{at_low:+.3f}, {at_high:+.3f}]: "
      + ("lower bound above 0 (the ranking matters)" if ranking_matters else
         "inside +-margin (the ranking makes no difference)" if ranking_void
         else "undecided"))
  if inferior or ranking_void:
    verdict = "refuted"
  elif non_inferior and ranking_matters:
    verdict = "confirmed"
  else:
    verdict = "inconclusive"
  return dict(verdict=verdict, reasons=reasons, margin=margin, rule=RULE)
