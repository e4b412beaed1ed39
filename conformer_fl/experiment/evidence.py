"""The experiment's evidence: noise, paired comparisons, transcripts, checks.

Everything here is computed from what the stages wrote (final evaluations with
their per-utterance transcripts, the pre-training metrics), so the report's
numbers can be recomputed from the workdir alone.

A final evaluation (`run.evaluate_checkpoint`, cached as final_eval.json) is
{'wer', 'cer', 'wer_low', 'wer_high', 'loss', 'num_examples', 'step', 'split',
 'references': [str] * N, 'hypotheses': [str] * N}; every arm and seed is
scored on the same N utterances in the same order, which is what pairs them.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from conformer_fl import wer as wer_lib

# The targets the demo is held to (its report states each, measured).
MAX_PRETRAINED_DEV_WER = 0.30
MAX_FULL_ARM_WER = 0.30
MIN_RELATIVE_ADAPTATION_GAIN = 0.30


def word_errors(evaluation: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(errors int[N], reference words int[N]) of a final evaluation."""
  return wer_lib.utterance_errors(evaluation["references"],
                                  evaluation["hypotheses"], "word")


def paired_differences(
    results: Mapping[tuple[str, int], Mapping[str, Any]],
    arms: Sequence[str], seeds: Sequence[int], reference_arm: str = "full",
    seed: int = 0) -> dict[str, dict[str, float]]:
  """WER(arm) - WER(reference_arm) of every other arm, with 95% intervals.

  Seeds are paired (seed s of an arm against seed s of the reference) and
  utterances are paired; `wer.paired_bootstrap_difference` resamples both.

  Args:
    results: {(arm, seed): final evaluation}.
    arms: the arms, reference_arm among them.
    seeds: the federated seeds.
    reference_arm: the arm the others are compared with.
    seed: the bootstrap's seed.

  Returns:
    {arm: {'difference', 'low', 'high', 'level', 'num_seeds',
           'num_utterances'}} for every arm but reference_arm.

  Raises:
    ValueError: two evaluations of different utterances.
  """
  if reference_arm not in arms:
    return {}
  base = [word_errors(results[(reference_arm, s)]) for s in seeds]
  references = results[(reference_arm, seeds[0])]["references"]
  lengths = base[0][1]
  differences = {}
  for arm in arms:
    if arm == reference_arm:
      continue
    for s in seeds:
      if results[(arm, s)]["references"] != references:
        raise ValueError(f"Arm {arm} seed {s} was scored on other utterances"
                         f" than {reference_arm}: they cannot be paired.")
    errors = np.stack([word_errors(results[(arm, s)])[0] for s in seeds])
    differences[arm] = wer_lib.paired_bootstrap_difference(
        errors, np.stack([e for e, _ in base]), lengths, seed=seed)
  return differences


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


def transcript_samples(pretrained: Mapping[str, Any],
                       results: Mapping[tuple[str, int], Mapping[str, Any]],
                       arms: Sequence[str], seed: int,
                       count: int = 6) -> list[dict[str, Any]]:
  """The first `count` test utterances: reference, pre-trained and arm outputs.

  Returns:
    [{'reference': str, 'pretrained': str, 'arms': {arm: hypothesis}}], the
    arms' hypotheses of federated seed `seed`.
  """
  samples = []
  for i, reference in enumerate(pretrained["references"][:count]):
    samples.append(dict(
        reference=reference, pretrained=pretrained["hypotheses"][i],
        arms={arm: results[(arm, seed)]["hypotheses"][i] for arm in arms}))
  return samples


def checks(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The demo's targets, each with its measured value and whether it is met.

  Returns:
    [{'check': str, 'measured': str, 'met': bool}]; a check whose input the
    summary lacks (no 'full' arm, no dev evaluation) is left out.
  """
  out = []
  own = summary["pretrain"].get("dev_eval")
  if own:
    out.append(dict(
        check=(f"pre-trained model transcribes its own domain: dev WER <="
               f" {MAX_PRETRAINED_DEV_WER:.2f}"),
        measured=(f"WER {own['wer']:.3f} (95% CI {own['wer_low']:.3f}-"
                  f"{own['wer_high']:.3f}), CER {own['cer']:.3f},"
                  f" {own['num_examples']:.0f} utterances"),
        met=own["wer"] <= MAX_PRETRAINED_DEV_WER))
  a = summary["analysis"]
  out.append(dict(
      check="analysis names ambient and critical units by WER at the default"
            " thresholds",
      measured=(f"{len(a['ambient'])} ambient, {len(a['critical'])} critical"
                f" of {len(a['ambient']) + len(a['critical'])} units"),
      met=bool(a["ambient"]) and bool(a["critical"])))
  full = next((r for r in summary["arms"] if r["arm"] == "full"), None)
  base = summary["pretrained_not_adapted"]["wer"]
  if full is not None:
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
