"""The experiment's summary: one row per arm, figures, and `report.md`.

W/summary.json:
{
  "stage_seconds": {stage: float},   wall time of each stage when it ran
                                     ("corpus", "pretrain", "analysis",
                                      "adapt/ARM/seed_S", "summary")
  "paired_differences": {arm: {"difference", "low", "high", "level",
                               "num_seeds", "num_utterances"}},
                                     WER(arm) - WER(full), 95% paired
                                     bootstrap over seeds and utterances
  "transcripts": [{"reference", "pretrained", "arms": {arm: str}}],
                                     the first test utterances, seed seeds[0]
  "rounds": int, "seeds": [int], "clients_per_round": int,
  "eval": {"split": str, "domains": [str]},     the final evaluation
  "pretrain": {"steps": int, "eval_wer": float | null,   on its own eval split
               "eval_domains": [str],
               "dev_eval": {"wer", "cer", "wer_low", "wer_high", "loss",
                            "num_examples", "step", "split"} | null,
                                     the whole dev split of its own domain
               "learning_curve": [{"step", "seconds", "wer", "cer"}]},
  "pretrained_not_adapted": {"wer", "cer", "wer_low", "wer_high", "loss",
                             "num_examples"},      on "eval"
  "analysis": {"baseline_wer", "baseline_wer_interval": [low, high],
               "granularity": str, "num_examples": float,
               "thresholds": {...}, "correlations": {...},
               "ambient": [str], "critical": [str],
               "rule": str, "metric": str, "targeted_units": [str]},
  "arms": [{                                       in config.arms order
    "arm": str, "dropout": {kind, rates, default_rate, unit_kinds, freeze_units},
    "wer": float, "wer_std": float, "wer_per_seed": [float],   mean, sample sd
    "loss": float, "cer": float,
    "client_params", "params_fraction", "client_flops", "flops_fraction",
    "client_peak_bytes", "peak_bytes_fraction": float,   one client step
    "seconds_per_round": float | null,   mean wall time of rounds 2.., all seeds
                                         (a resumed run's first round, which
                                         compiles again, is counted)
    "dev_wer_by_round": {seed: [[round, wer], ...]}}]
}
"""

from collections.abc import Mapping, Sequence
import json
import math
import os
from typing import Any

from etils import epath
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from conformer_fl import metric_logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from conformer_fl.analysis import plots  # pylint: disable=g-import-not-at-top,wrong-import-position
from conformer_fl.experiment import evidence  # pylint: disable=g-import-not-at-top,wrong-import-position
from conformer_fl.experiment import stability_runs  # pylint: disable=g-import-not-at-top,wrong-import-position

WER_FIGURE = "wer_by_round.png"
COST_FIGURE = "client_cost.png"
CURVE_FIGURE = "pretrain_curve.png"


def read_metrics(workdir: epath.Path) -> list[dict[str, Any]]:
  """The metric rows of a run's metrics.jsonl, in order (no torn or stop lines)."""
  return [row for row in metric_logging.read_records(workdir / "metrics.jsonl")
          if metric_logging.STOPPED_KEY not in row]


def _round_seconds(rows: Sequence[Mapping[str, Any]],
                   clients_per_round: int) -> list[float]:
  """Wall seconds of every logged round but the first (which compiles)."""
  return [clients_per_round / row["clients_per_second"] for row in rows
          if row.get("round", 0) > 1 and row.get("clients_per_second")]


def build_summary(config: ml_collections.ConfigDict, workdir: epath.Path,
                  importance: Mapping[str, Any], targets: Sequence[str],
                  arm_dropouts: Mapping[str, ml_collections.ConfigDict],
                  costs: Mapping[str, Mapping[str, float]],
                  results: Mapping[tuple[str, int], Mapping[str, Any]],
                  pretrained_eval: Mapping[str, Any],
                  pretrain_dev_eval: Mapping[str, Any] | None = None,
                  stage_seconds: Mapping[str, float] | None = None,
                  stability: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
  """The summary (module docstring) from the stages' outputs.

  Args:
    config: the experiment config.
    workdir: the experiment's workdir W.
    importance: W/pretrain/analysis/importance.json.
    targets: the targeted units.
    arm_dropouts: {arm: federated.dropout config}.
    costs: {arm: client cost}.
    results: {(arm, seed): final evaluation (`evidence` module docstring)}.
    pretrained_eval: the pre-trained model's final evaluation on the
      adaptation domain's eval split.
    pretrain_dev_eval: the pre-trained model on the dev split of its own
      domain (None: not measured).
    stage_seconds: {stage: wall seconds of the run that computed it}.
    stability: W/stability.json (`stability_runs`; None: no stability stage).
  """
  f = config.adapt.federated
  pretrain_metrics = read_metrics(workdir / "pretrain")
  pretrain_rows = [r for r in pretrain_metrics if "eval/wer" in r]
  arms = []
  for arm, dropout_config in arm_dropouts.items():
    wers = [results[(arm, seed)]["wer"] for seed in config.seeds]
    cers = [results[(arm, seed)].get("cer") for seed in config.seeds]
    losses = [results[(arm, seed)]["loss"] for seed in config.seeds]
    seconds, by_round = [], {}
    for seed in config.seeds:
      rows = read_metrics(workdir / "arms" / arm / f"seed_{seed}")
      seconds += _round_seconds(rows, f.clients_per_round)
      by_round[str(seed)] = [[r["round"], r["eval/wer"]] for r in rows
                             if "eval/wer" in r]
    cost = costs[arm]
    arms.append(dict(
        arm=arm, dropout=dropout_config.to_dict(),
        wer=float(np.mean(wers)),
        wer_std=float(np.std(wers, ddof=1)) if len(wers) > 1 else 0.0,
        wer_per_seed=wers, loss=float(np.mean(losses)),
        cer=float(np.mean(cers)) if None not in cers else None,
        client_params=cost["params"], params_fraction=cost["params_fraction"],
        client_flops=cost["flops"], flops_fraction=cost["flops_fraction"],
        client_peak_bytes=cost["peak_bytes"],
        peak_bytes_fraction=cost["peak_bytes_fraction"],
        seconds_per_round=float(np.mean(seconds)) if seconds else None,
        dev_wer_by_round=by_round))
  seeds = list(config.seeds)
  arm_names = [row["arm"] for row in arms]
  return dict(
      stage_seconds=dict(stage_seconds or {}),
      paired_differences=evidence.paired_differences(results, arm_names,
                                                     seeds),
      transcripts=evidence.transcript_samples(pretrained_eval, results,
                                              arm_names, seeds[0]),
      rounds=f.rounds, seeds=seeds,
      clients_per_round=f.clients_per_round,
      eval=dict(split=config.final_eval_split,
                domains=list(config.adapt.data.eval_domains)),
      pretrain=dict(
          steps=config.pretrain.central.num_steps,
          eval_wer=pretrain_rows[-1]["eval/wer"] if pretrain_rows else None,
          eval_domains=list(config.pretrain.data.eval_domains),
          dev_eval=({k: v for k, v in pretrain_dev_eval.items()
                     if k not in ("references", "hypotheses")}
                    if pretrain_dev_eval else None),
          learning_curve=evidence.learning_curve(pretrain_metrics)),
      pretrained_not_adapted={k: pretrained_eval.get(k) for k in (
          "wer", "cer", "wer_low", "wer_high", "loss", "num_examples")},
      analysis=dict(baseline_wer=importance["baseline"]["wer"],
                    baseline_wer_interval=importance["baseline"].get(
                        "wer_interval"),
                    granularity=importance.get("granularity"),
                    num_examples=importance["eval"]["num_examples"],
                    thresholds=importance.get("thresholds"),
                    correlations=importance.get("correlations"),
                    ambient=list(importance["ambient"]),
                    critical=list(importance["critical"]),
                    rule=config.targeting.rule,
                    metric=config.targeting.metric,
                    targeted_units=list(targets)),
      arms=arms, stability=stability)


def _describe(dropout: Mapping[str, Any]) -> str:
  """The arm's client model in words, e.g. 'rate 0.5 on 2 units'."""
  if dropout["freeze_units"]:
    return f"freeze {len(dropout['freeze_units'])} units"
  if dropout["kind"] == "uniform":
    return f"rate {dropout['default_rate']:g} everywhere"
  if dropout["kind"] == "targeted":
    rates = sorted(set(dropout["rates"].values()))
    text = (f"rate {', '.join(f'{r:g}' for r in rates)} on"
            f" {len(dropout['rates'])} units")
    if dropout["default_rate"]:
      text += f", {dropout['default_rate']:g} elsewhere"
    return text
  return "full model"


def summary_table(summary: Mapping[str, Any]) -> str:
  """The markdown table: WER and client cost of each arm."""
  ev = summary["eval"]
  seeds = len(summary["seeds"])
  wer_head = f"WER ({ev['split']}, {'+'.join(ev['domains']) or 'all'})"
  if seeds > 1:
    wer_head += f", mean ± sd of {seeds} seeds"
  lines = [
      f"| arm | client model | {wer_head} | loss | client params | % |"
      " client step GFLOP | % | client peak MiB | % | s/round |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  base = summary["pretrained_not_adapted"]
  lines.append(f"| pre-trained, not adapted | full model | {base['wer']:.3f} |"
               f" {base['loss']:.2f} | | | | | | | |")
  for row in summary["arms"]:
    wer = f"{row['wer']:.3f}"
    if seeds > 1:
      wer += f" ± {row['wer_std']:.3f}"
    secs = row["seconds_per_round"]
    lines.append(
        f"| {row['arm']} | {_describe(row['dropout'])} | {wer} |"
        f" {row['loss']:.2f} | {row['client_params']:,.0f} |"
        f" {100 * row['params_fraction']:.1f} |"
        f" {row['client_flops'] / 1e9:.3f} | {100 * row['flops_fraction']:.1f} |"
        f" {row['client_peak_bytes'] / 2**20:.1f} |"
        f" {100 * row['peak_bytes_fraction']:.1f} |"
        f" {'' if secs is None else f'{secs:.2f}'} |")
  return "\n".join(lines)


def plot_wer_by_round(summary: Mapping[str, Any],
                      path: str | os.PathLike[str]) -> None:
  """Dev WER of each arm against the round (one line per arm and seed)."""
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  for row in summary["arms"]:
    for seed, points in row["dev_wer_by_round"].items():
      if points:
        x, y = zip(*points)
        label = row["arm"] if len(summary["seeds"]) == 1 else (
            f"{row['arm']} seed {seed}")
        ax.plot(x, y, marker="o", label=label)
  ax.set_xlabel("round")
  ax.set_ylabel("WER on the dev split (held-out speakers)")
  ax.set_title("Federated adaptation to the short-form domain")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  plots.save_png(fig, path)


def plot_client_cost(summary: Mapping[str, Any],
                     path: str | os.PathLike[str]) -> None:
  """Client parameters, step FLOPs and peak memory of each arm, % of full."""
  names = [row["arm"] for row in summary["arms"]]
  fields = (("params_fraction", "parameters"), ("flops_fraction", "step FLOPs"),
            ("peak_bytes_fraction", "peak memory"))
  x = np.arange(len(names))
  width = 0.8 / len(fields)
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  for i, (key, label) in enumerate(fields):
    ax.bar(x + (i - (len(fields) - 1) / 2) * width, [100 * row[key] for row in summary["arms"]],
           width, label=label)
  ax.set_xticks(x, names)
  ax.set_ylabel("% of the full model's client step")
  ax.set_ylim(0, 125)
  ax.legend(loc="upper center", ncol=len(fields))
  fig.tight_layout()
  plots.save_png(fig, path)


def _fmt(value: float | None) -> str:
  return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _checks_lines(summary: Mapping[str, Any]) -> list[str]:
  marks = {True: "met", False: "NOT met"}
  return [f"- **{marks[c['met']]}**: {c['check']}: {c['measured']}."
          for c in evidence.checks(summary)]


def _stage_lines(summary: Mapping[str, Any]) -> list[str]:
  seconds = summary.get("stage_seconds") or {}
  if not seconds:
    return []
  adapt = sum(v for k, v in seconds.items() if k.startswith("adapt/"))
  runs = sum(k.startswith("adapt/") for k in seconds)
  parts = [f"{name} {seconds[name]:.0f} s" for name in
           ("corpus", "pretrain", "analysis") if name in seconds]
  if runs:
    parts.append(f"federated arms {adapt:.0f} s ({runs} runs)")
  stability = sum(v for k, v in seconds.items() if k.startswith("stability/"))
  if stability:
    pretrained = sum(k.startswith("stability/") and k.endswith("/pretrain")
                     for k in seconds)
    parts.append(f"stability runs {stability:.0f} s ({pretrained}"
                 " pre-trained and analysed)")
  if "summary" in seconds:
    parts.append(f"costs, final evaluations and summary"
                 f" {seconds['summary']:.0f} s")
  total = sum(seconds.values())
  return [f"Wall time of each stage on this machine (when it ran; a reused"
          f" stage keeps its first time): {'; '.join(parts)};"
          f" {total / 60:.1f} min in all.", ""]


def _differences_lines(summary: Mapping[str, Any]) -> list[str]:
  differences = summary.get("paired_differences") or {}
  if not differences:
    return []
  lines = ["| comparison | WER difference | 95% interval | seeds x utterances |",
           "|---|---|---|---|"]
  for arm, d in differences.items():
    lines.append(f"| {arm} - full | {d['difference']:+.3f} |"
                 f" {d['low']:+.3f} to {d['high']:+.3f} |"
                 f" {d['num_seeds']} x {d['num_utterances']} |")
  return ["## Paired differences against the full model", "",
          "Each arm against the full arm on the same test utterances and the"
          " same federated seeds: WER pooled over the seeds, interval from a"
          " paired bootstrap that resamples both the seeds and the utterances"
          " (`conformer_fl.wer.paired_bootstrap_difference`)."
          f" {_non_inferiority_sentence(summary)}", ""
          ] + lines + [""]


def _non_inferiority_sentence(summary: Mapping[str, Any]) -> str:
  """How to read a difference's interval: non-inferiority with a margin (the
  analysis' absolute WER threshold, when the summary has it)."""
  thresholds = (summary.get("analysis") or {}).get("thresholds") or {}
  margin = thresholds.get("max_abs_wer_increase")
  named = (f"the margin, +{margin:.3f} WER (the analysis' absolute"
           " threshold)" if margin is not None
           else "a margin declared beforehand")
  return ("An arm is shown no worse than full (non-inferior) only when the"
          f" interval's upper bound lies below {named}; an interval that"
          " holds 0 but reaches past the margin means no difference was"
          " detected, not that there is none.")


def _transcript_lines(summary: Mapping[str, Any]) -> list[str]:
  samples = summary.get("transcripts") or []
  if not samples:
    return []
  lines = ["## Transcripts", "",
           f"The first {len(samples)} utterances of the"
           f" {summary['eval']['split']} split, federated seed"
           f" {summary['seeds'][0]}.", ""]
  for i, sample in enumerate(samples):
    lines += [f"{i + 1}. reference: `{sample['reference']}`",
              f"   - pre-trained, not adapted: `{sample['pretrained']}`"]
    lines += [f"   - {arm}: `{text}`" for arm, text in sample["arms"].items()]
  return lines + [""]


def _learning_curve_lines(summary: Mapping[str, Any]) -> list[str]:
  curve = summary["pretrain"].get("learning_curve") or []
  if not curve:
    return []
  rows = ["| step | training s | dev WER | dev CER |", "|---|---|---|---|"]
  rows += [f"| {c['step']} | {c['seconds']:.0f} | {c['wer']:.3f} |"
           f" {_fmt(c['cer'])} |" for c in curve]
  return (["## Pre-training", "",
           f"![Dev WER against step and training time]({CURVE_FIGURE})", ""]
          + rows + [""])


def render_report(summary: Mapping[str, Any]) -> str:
  """report.md: the table, the analysis that chose the targets, the figures."""
  a = summary["analysis"]
  p = summary["pretrain"]
  targets = ", ".join(f"`{u}`" for u in a["targeted_units"]) or "none"
  interval = a.get("baseline_wer_interval")
  noise = (f" (95% bootstrap interval {interval[0]:.3f}-{interval[1]:.3f},"
           f" {a['num_examples']:.0f} utterances)" if interval else "")
  no_ambient = [] if a["ambient"] else [
      "", "No unit is ambient at these thresholds: every reset to the"
      " initial value raises the WER by more than the thresholds allow (the"
      " per-unit increases are in the full analysis). The targeted and"
      " freeze arms then take the least important units by the ranking"
      " instead (`targeting.rule=rank`)."]
  return "\n".join([
      "# Federated Dropout targeted by layer importance",
      "",
      *_checks_lines(summary),
      "",
      *_stage_lines(summary),
      f"Federated adaptation: {summary['rounds']} rounds of"
      f" {summary['clients_per_round']} clients (speakers), seeds"
      f" {summary['seeds']}, from a model pre-trained for {p['steps']} central"
      f" steps (WER {_fmt(p['eval_wer'])} on its own eval domain"
      f" {'+'.join(p['eval_domains']) or 'all'}).",
      "",
      summary_table(summary),
      "",
      "Client cost is one local step of one client (XLA cost and memory"
      " analysis); s/round is the measured wall time of a round on this"
      " machine, without the first (compiling) round.",
      "",
      "## Which layers were targeted",
      "",
      f"Baseline WER of the pre-trained model in the analysis:"
      f" {_fmt(a['baseline_wer'])}{noise}. Ambient: {a['ambient'] or 'none'};"
      f" critical: {a['critical'] or 'none'}.",
      *no_ambient,
      f"Targeting rule `{a['rule']}`"
      f"{' by ' + a['metric'] if a['rule'] == 'rank' else ''} chose: {targets}.",
      "",
      "![WER after resetting each unit](pretrain/analysis/heatmap_wer.png)",
      "",
      "![Importance against weight movement]"
      "(pretrain/analysis/movement_scatter.png)",
      "",
      "The full analysis: [pretrain/analysis/report.md]"
      "(pretrain/analysis/report.md).",
      "",
      *_correlation_lines(a),
      "## Adaptation",
      "",
      f"![Dev WER by round]({WER_FIGURE})",
      "",
      f"![Client cost]({COST_FIGURE})",
      "",
      *_differences_lines(summary),
      *_learning_curve_lines(summary),
      *(stability_runs.report_lines(summary["stability"])
        if summary.get("stability") else []),
      *_transcript_lines(summary),
  ])


def _correlation_lines(analysis: Mapping[str, Any]) -> list[str]:
  correlations = analysis.get("correlations") or {}
  rows = []
  for measure, by_target in correlations.items():
    c = by_target.get("wer_increase")
    if c:
      rows.append(
          f"| {measure} | {c['num_units']} |"
          f" {_fmt(c['spearman']['statistic'])} ({_fmt(c['spearman']['pvalue'])})"
          f" | {_fmt(c['kendall']['statistic'])} ({_fmt(c['kendall']['pvalue'])})"
          " |")
  if not rows:
    return []
  return ["Weight movement against importance (WER increase after the reset"
          f" to the initial value), over the {analysis.get('granularity')}"
          " units of the analysis:", "",
          "| movement | units | Spearman (p) | Kendall (p) |",
          "|---|---|---|---|", *rows, ""]


def plot_learning_curve(summary: Mapping[str, Any],
                        path: str | os.PathLike[str]) -> None:
  """Pre-training dev WER against step (left) and training seconds (right)."""
  curve = summary["pretrain"]["learning_curve"]
  fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.5), sharey=True)
  for ax, key, label in ((axes[0], "step", "step"),
                         (axes[1], "seconds", "training seconds")):
    ax.plot([c[key] for c in curve], [c["wer"] for c in curve], marker="o",
            label="WER")
    if all(c["cer"] is not None for c in curve):
      ax.plot([c[key] for c in curve], [c["cer"] for c in curve], marker="s",
              label="CER")
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("dev split, own domain")
  axes[0].legend()
  fig.suptitle("Central pre-training")
  fig.tight_layout()
  plots.save_png(fig, path)


def write_report(summary: Mapping[str, Any], workdir: epath.Path) -> None:
  """Writes summary.json, the figures and report.md into `workdir`."""
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  if summary["pretrain"].get("learning_curve"):
    plot_learning_curve(summary, str(workdir / CURVE_FIGURE))
  plot_wer_by_round(summary, str(workdir / WER_FIGURE))
  plot_client_cost(summary, str(workdir / COST_FIGURE))
  (workdir / "report.md").write_text(render_report(summary))
