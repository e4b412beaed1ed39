"""analysis/report.md: the importance results as tables, with the figures."""

import posixpath
from typing import Any

from conformer_fl.analysis import importance_file


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.{digits}g}"
  return str(value)


def _correlation_rows(correlations: dict[str, Any]) -> list[str]:
  rows = ["| movement measure | vs | n | Spearman rho (p) | Kendall tau (p) |",
          "|---|---|---|---|---|"]
  for measure, by_target in correlations.items():
    for target, c in by_target.items():
      rows.append(
          f"| {measure} | {target} | {c['num_units']} | "
          f"{_fmt(c['spearman']['statistic'], 3)} "
          f"({_fmt(c['spearman']['pvalue'], 2)}) | "
          f"{_fmt(c['kendall']['statistic'], 3)} "
          f"({_fmt(c['kendall']['pvalue'], 2)}) |")
  return rows


def _primary_test_lines(test: dict[str, Any] | None) -> list[str]:
  """The primary movement test (`movement_test.primary_movement_test`)."""
  if not test:
    return []
  strata = ", ".join(f"{t} {c}" for t, c in test["strata"].items())
  return [
      f"Primary test: `{test['measure']}` against the WER increase over the"
      f" {test['num_units']} droppable modules ({strata or 'none'}): Spearman"
      f" {_fmt(test['spearman'], 3)}, p = {_fmt(test['pvalue'], 2)} from"
      f" {test['num_permutations']} permutations within module types;"
      " partial Spearman given log parameter count"
      f" {_fmt(test['partial_spearman_log_params'], 3)}, p ="
      f" {_fmt(test['partial_pvalue'], 2)}.", ""]


def render_report(results: importance_file.Importance) -> str:
  """Markdown of an importance.json; figures linked by file name."""
  t = results.thresholds
  base = results.baseline
  # The run's folder name, not its absolute path: the report sits in
  # <run>/analysis/ and stays readable when the workdir is moved or shared.
  run_name = posixpath.basename(posixpath.normpath(str(results.workdir)))
  lines = [
      f"# Layer importance of the run `{run_name}` (the folder above this"
      " report's)",
      "",
      f"Trained checkpoint: {results.step_key} {results.trained_step}; "
      f"units at granularity `{results.granularity}`; re-initialization "
      f"taus {list(results.taus)}; re-randomization seeds "
      f"{list(results.rerandomize_seeds)}.",
      f"Eval split `{results.eval.split}` (domains "
      f"{list(results.eval.domains) or 'all'}), "
      f"{results.eval.num_examples:.0f} utterances.",
      "",
      f"Baseline (no reset): WER {base.wer:.4f}"
      + (f" (95% bootstrap interval over speakers, then utterances within"
         f" them, {base.wer_interval[0]:.4f}-{base.wer_interval[1]:.4f})"
         if base.wer_interval else "")
      + (f", CER {base.cer:.4f}" if base.cer is not None else "")
      + f", loss {base.loss:.4f}.",
      "",
      f"Threshold: a WER increase after the reset to tau = 0 of "
      f"{t.max_abs_wer_increase} (absolute) "
      f"{'or' if t.rule == 'either' else 'and'} "
      f"{t.max_rel_wer_increase} x the baseline WER (relative), here "
      f"{t.wer_increase:.4f}. Each unit's increase has a paired "
      f"{t.confidence:.0%} interval (the reset and the baseline on the same "
      "utterances; speakers, then utterances within them, resampled). A unit "
      "is **ambient** when the interval's upper bound lies below the "
      "threshold, **critical** when its lower bound lies above it, and "
      "**undetermined** when the interval holds the threshold.",
      "",
      f"Ambient ({len(results.ambient)}): "
      f"{', '.join(results.ambient) or 'none'}.",
      f"Critical ({len(results.critical)}): "
      f"{', '.join(results.critical) or 'none'}.",
      f"Undetermined ({len(results.undetermined)}): "
      f"{', '.join(results.undetermined) or 'none'}.",
      "",
      "## Per unit",
      "",
      f"| unit | params | WER tau=0 | WER increase ({t.confidence:.0%}"
      " interval) | loss increase | "
      "re-rand. WER (mean) | distance from init | relative distance | update norm sum | class |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, u in results.units.items():
    rerand = u.rerandomize_wer
    m = u.movement
    lines.append(
        f"| {name} | {u.num_params} | {_fmt(u.reinit_wer[0])} | "
        f"{_fmt(u.wer_increase)} ({_fmt(u.wer_increase_low)} to "
        f"{_fmt(u.wer_increase_high)}) | {_fmt(u.loss_increase)} | "
        f"{_fmt(sum(rerand) / len(rerand) if rerand else None)} | "
        f"{_fmt(m.distance)} | {_fmt(m.relative_distance)} | "
        f"{_fmt(m.update_norm_sum)} | "
        f"{u.label} |")
  figures = results.figures
  lines += ["", "## Re-initialization robustness (units x tau)", "",
            f"![WER heatmap]({figures['heatmap_wer'].file})", "",
            f"![loss heatmap]({figures['heatmap_loss'].file})", "",
            "## Re-randomization robustness", "",
            f"![re-randomization]({figures['rerandomization'].file})", "",
            "## Weight movement vs importance", "",
            f"![movement scatter]({figures['movement_scatter'].file})", ""]
  lines += _primary_test_lines(results.movement_test)
  lines += ["Secondary: every measure over all units, with scipy's p-values"
            " (they treat the units as independent draws, and the absolute"
            " distance grows with a unit's size).", ""]
  lines += _correlation_rows(results.correlations)
  stability = results.stability
  if stability:
    lines += ["", "## Stability across runs", "",
              "Jaccard: overlap of the ambient sets ('-' when neither run has"
              " an ambient unit); chance: its expected value for random sets"
              " of the same sizes, and for sets random within each unit type;"
              " p: the probability of an overlap at least as large under"
              " each.", "",
              "| run A | run B | matched units | Jaccard (ambient) | chance (p)"
              " | chance within types (p) | Spearman (WER incr.) |"
              " Kendall (WER incr.) |",
              "|---|---|---|---|---|---|---|---|"]
    for p in stability["pairs"]:
      c = p["wer_increase"]
      lines.append(
          f"| {p['a']} | {p['b']} | {p['num_common_units']} | "
          f"{_fmt(p['jaccard_ambient'], 3)} | "
          f"{_fmt(p['chance_jaccard_ambient'], 3)}"
          f" ({_fmt(p.get('overlap_pvalue'), 2)}) | "
          f"{_fmt(p.get('chance_jaccard_within_types'), 3)}"
          f" ({_fmt(p.get('overlap_pvalue_within_types'), 2)}) | "
          f"{_fmt(c['spearman']['statistic'], 3)} | "
          f"{_fmt(c['kendall']['statistic'], 3)} |")
    if "stability_depth" in figures:
      lines += ["", "![importance vs depth]"
                f"({figures['stability_depth'].file})"]
  lines.append("")
  return "\n".join(lines)
