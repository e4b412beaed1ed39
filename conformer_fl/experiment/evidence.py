"""The demo's targets, each checked against the summary, and the learning curve.

Computed from what the stages wrote, so the report's numbers can be
recomputed from the workdir alone.
"""

from collections.abc import Mapping, Sequence
from typing import Any

# The targets the demo is held to (its report states each, measured).
MAX_PRETRAINED_DEV_WER = 0.30
MAX_FULL_ARM_WER = 0.30
MIN_RELATIVE_ADAPTATION_GAIN = 0.30


def learning_curve(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
  """Dev WER (and CER) of a central run against its step and training time.

  Training seconds are summed from the logged steps_per_second of every
  logged row (evaluation time excluded, as the loop measures it).

  Args:
    rows: the run's metrics.jsonl rows, in order.

  Returns:
    [{'step', 'seconds', 'wer', 'cer'}] at every evaluation.
  """
  curve, seconds, previous = [], 0.0, 0
  for row in rows:
    if row.get("steps_per_second"):
      seconds += (row["step"] - previous) / row["steps_per_second"]
      previous = row["step"]
    if "eval/wer" in row:
      curve.append(dict(step=row["step"], seconds=seconds,
                        wer=row["eval/wer"], cer=row.get("eval/cer")))
  return curve


def checks(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The demo's targets, each with its measured value and whether it is met.

  Returns:
    [{'check': str, 'measured': str, 'met': bool}]: per pre-trained model
    its dev WER and its labels, the gate, and the full arm's adaptation.
  """
  out = []
  for m, model in enumerate(summary["models"]):
    dev = model["dev_eval"]
    out.append(dict(
        check=(f"pre-trained model {m} transcribes its own domain: dev WER <="
               f" {MAX_PRETRAINED_DEV_WER:.2f}"),
        measured=(f"WER {dev['wer']:.3f} ({100 * summary['setup']['confidence']:.0f}%"
                  f" interval {dev['low']:.3f}-{dev['high']:.3f}), CER"
                  f" {dev['cer']:.3f}, {dev['num_examples']:.0f} utterances"),
        met=dev["wer"] <= MAX_PRETRAINED_DEV_WER))
    out.append(dict(
        check=f"analysis of model {m} names ambient and critical modules",
        measured=(f"{model['num_ambient']} ambient, {model['num_critical']}"
                  f" critical, {model['num_undetermined']} undetermined of"
                  f" {len(model['labels'])} droppable modules"),
        met=model["num_ambient"] > 0 and model["num_critical"] > 0))
  gate = summary["gate"]
  out.append(dict(
      check=(f"model gate: >= {gate['min_ambient']} droppable modules ambient"
             " in every pre-trained model"),
      measured=f"ambient per model: {gate['num_ambient']}",
      met=gate["passed"]))
  full = next((r for r in summary["arms"] if r["arm"] == "full"), None)
  if full is not None:
    base = sum(m["not_adapted"]["wer"] for m in summary["models"]) / len(
        summary["models"])
    gain = (base - full["wer"]) / base if base > 0 else 0.0
    out.append(dict(
        check=(f"adaptation works: full arm WER <= {MAX_FULL_ARM_WER:.2f} and"
               f" >= {100 * MIN_RELATIVE_ADAPTATION_GAIN:.0f}% (relative)"
               f" below the not-adapted model"),
        measured=(f"full {full['wer']:.3f} against not adapted {base:.3f}"
                  f" ({100 * gain:.0f}% lower)"),
        met=(full["wer"] <= MAX_FULL_ARM_WER and
             gain >= MIN_RELATIVE_ADAPTATION_GAIN)))
  return out
