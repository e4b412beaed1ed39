"""W/report.md from W/summary.json: checks, verdict, arms, intervals, figures."""

from collections.abc import Mapping
import json
import math
from typing import Any

from etils import epath

from conformer_fl import result_format
from conformer_fl.experiment import evidence
from conformer_fl.experiment import figures
from conformer_fl.experiment import stability_runs


def _fmt(value: float | None, spec: str = ".3f") -> str:
  return "n/a" if value is None or (isinstance(value, float) and
                                    math.isnan(value)) else format(value, spec)


def _pct(value: float | None) -> str:
  return "n/a" if value is None else f"{100 * value:.1f}"


_level = result_format.level
_interval = result_format.difference


def _checks(summary: Mapping[str, Any]) -> list[str]:
  marks = {True: "met", False: "NOT met"}
  return [f"- **{marks[c['met']]}**: {c['check']}: {c['measured']}."
          for c in evidence.checks(summary)] + [""]


def _miniature(summary: Mapping[str, Any]) -> list[str]:
  s = summary["setup"]
  if not s["miniature"]:
    return []
  return [
      "> **This is the miniature of the test** (`make demo`):"
      f" {len(s['pretrain_seeds'])} pre-trained model(s), the verdict's arms"
      f" over {len(s['verdict_seeds'])} federated seed(s), cost level(s)"
      f" {', '.join(_level(x) for x in s['levels'])}. It runs every stage of"
      " the test, but it cannot decide claim 5: the test needs >= 2"
      " pre-trained models and >= 5 seeds before its intervals can fall"
      f" inside the margin of {s['margin']}. Its verdict line is printed by"
      " the same rule and is not evidence either way"
      " (`configs/experiment.py:scale=study` is the test).", ""]


def _not_transcribing(summary: Mapping[str, Any]) -> list[str]:
  """A warning when a pre-trained model misses its dev WER target."""
  bad = [f"model {m} ({model['dev_eval']['wer']:.3f})"
         for m, model in enumerate(summary["models"])
         if model["dev_eval"]["wer"] > evidence.MAX_PRETRAINED_DEV_WER]
  if not bad:
    return []
  return [f"> **The pre-trained model misses its transcription target**: dev"
          f" WER above {evidence.MAX_PRETRAINED_DEV_WER:.2f} for"
          f" {', '.join(bad)}. Its labels, the gate, the arms built from them"
          " and the verdict below describe a partly trained model, not the"
          " claim about a model that transcribes; near a WER of 1 a reset"
          " cannot raise the WER further, and the labels read noise.", ""]


def _verdict(summary: Mapping[str, Any]) -> list[str]:
  v = summary.get("verdict")
  s = summary["setup"]
  if not v:
    return ["## Verdict", "", "No verdict: the targeted or anti_targeted arm"
            f" is absent at the verdict's level {_level(s['verdict_level'])}"
            " (see the absent arms below).", ""]
  return ["## Verdict on claim 5", "",
          f"**{v['verdict'].upper()}** at client cost"
          f" {_level(s['verdict_level'])}, margin delta = {v['margin']},"
          f" {100 * s['confidence']:.0f}% intervals.", "",
          f"Rule (fixed in the config before the runs): {v['rule']}.", "",
          *[f"- {reason}" for reason in v["reasons"]], ""]


def _stages(summary: Mapping[str, Any]) -> list[str]:
  seconds = summary.get("stage_seconds") or {}
  if not seconds:
    return []
  parts = [f"{head} {value:.0f} s" + (f" ({count} runs)" if count > 1 else "")
           for head, (value, count)
           in result_format.stage_totals(seconds).items()]
  return [f"Wall time of each stage on this machine (a reused stage keeps the"
          f" time of the run that computed it): {'; '.join(parts)};"
          f" {sum(seconds.values()) / 60:.1f} min in all.", ""]


def _setup(summary: Mapping[str, Any]) -> list[str]:
  s = summary["setup"]
  return [
      f"Federated adaptation: {s['rounds']} rounds of"
      f" {s['clients_per_round']} clients (speakers) x {s['local_steps']}"
      f" local steps, from each of {len(s['pretrain_seeds'])} pre-trained"
      f" model(s) (seeds {s['pretrain_seeds']}, {s['pretrain_steps']} central"
      f" steps). Seeds: the verdict's arms {s['verdict_seeds']}, other arms at"
      f" the verdict's level {s['control_seeds']}, other levels"
      f" {s['level_seeds']}. Rates solved so the client trains the cost level's"
      f" share of the full model's parameters, no module above rate"
      f" {s['max_rate']}.", ""]


def arms_table(summary: Mapping[str, Any]) -> list[str]:
  s = summary["setup"]
  lines = ["## Arms", "",
           f"WER on the {s['eval_split']} split (held-out speakers), pooled"
           f" over models and seeds, with its {100 * s['confidence']:.0f}%"
           " hierarchical bootstrap interval (models, seeds, speakers,"
           " utterances). Client cost of one local step as a fraction of the"
           " full model's: trainable parameters, XLA FLOPs, peak memory and"
           " the measured step time (median of turns, same run).", "",
           "| level | arm | client model | params % | FLOPs % | peak mem % |"
           " step time % | client lr | models x seeds | WER [interval] |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for row in summary["arms"]:
    lines.append(
        f"| {_level(row['level'])} | {row['arm']} | {row['client_model']} |"
        f" {_pct(row['params_fraction'])} | {_pct(row['flops_fraction'])} |"
        f" {_pct(row['peak_bytes_fraction'])} |"
        f" {_pct(row['step_seconds_fraction'])} | {row['lr']:g} |"
        f" {row['num_models']} x {len(row['seeds'])} |"
        f" {result_format.wer_interval(row['wer'], row['low'], row['high'])} |")
  for row in summary.get("absent") or []:
    lines.append(f"| {_level(row['level'])} | {row['arm']} | absent:"
                 f" {row['note']} | | | | | | | |")
  return lines + ["", f"![WER against client cost]({figures.COST_FIGURE})", ""]


def _comparisons(summary: Mapping[str, Any]) -> list[str]:
  rows = summary.get("comparisons") or []
  if not rows:
    return []
  margin = summary["setup"]["margin"]
  lines = ["## Paired differences", "",
           f"WER(a) - WER(b) on the seeds both share, interval from the"
           " hierarchical paired bootstrap; the per-seed differences beside"
           f" it (one list per pre-trained model). Against the margin delta ="
           f" {margin}: an upper bound below delta shows non-inferiority; an"
           " interval that holds 0 but reaches past delta shows neither a"
           " difference nor its absence.", "",
           "| a - b | difference [interval] | per seed | models x seeds x"
           " speakers x utterances |", "|---|---|---|---|"]
  for c in rows:
    per_seed = "; ".join(", ".join(f"{x:+.3f}" for x in model)
                         for model in c["per_seed"])
    lines.append(f"| {c['a']} - {c['b']} | {_interval(c)} | {per_seed} |"
                 f" {c['num_models']} x {c['num_seeds']} x {c['num_speakers']}"
                 f" x {c['num_utterances']} |")
  return lines + [""]


def _grid(summary: Mapping[str, Any]) -> list[str]:
  s = summary["setup"]
  if not summary.get("grid"):
    return ["## Client learning rate", "",
            f"One rate for every arm: {s['lr_grid'][0]:g} (no grid at this"
            " scale).", ""]
  lines = ["## Client learning rate, picked per arm on dev", "",
           f"Grid {s['lr_grid']}, each arm at the verdict's level on model 0"
           " with the first seed; the pick is the rate of lowest final dev"
           " WER (random draws use random_0's pick).", "",
           "| arm | lr | final dev WER | picked |", "|---|---|---|---|"]
  for g in summary["grid"]:
    picked = "yes" if s["picks"].get(g["arm"]) == g["lr"] else ""
    lines.append(f"| {g['arm']} | {g['lr']:g} | {g['dev_wer']:.3f} | {picked} |")
  return lines + [""]


def _plateau(summary: Mapping[str, Any]) -> list[str]:
  full = next((r for r in summary["arms"] if r["arm"] == "full"), None)
  if not full or len(full["dev_wer_by_round"]) < 2:
    return []
  curve = full["dev_wer_by_round"]
  half = next(p for p in curve if p[0] >= curve[-1][0] / 2)
  points = ", ".join(f"{wer:.3f} (round {r})" for r, wer in curve)
  return [f"The full arm's dev WER (model 0, first seed): {points}. Over the"
          f" second half of the rounds it moved by {curve[-1][1] - half[1]:+.3f};"
          " a plateau is a change within the noise of the dev WER.", ""]


def _models(summary: Mapping[str, Any]) -> list[str]:
  lines = ["## Pre-trained models, labels and the gate", "",
           f"![Pre-training]({figures.CURVE_FIGURE})", "",
           "| model | seed | dev WER [interval] | not adapted, test WER |"
           " ambient | critical | undetermined | half-width vs reset ranking:"
           " Spearman (p) | least-important quarter shared |",
           "|---|---|---|---|---|---|---|---|---|"]
  for m, model in enumerate(summary["models"]):
    d, n, a = model["dev_eval"], model["not_adapted"], model["halfwidth"][
        "agreement"]
    lines.append(
        f"| {m} | {model['seed']} | {d['wer']:.3f} [{d['low']:.3f},"
        f" {d['high']:.3f}] | {n['wer']:.3f} | {model['num_ambient']} |"
        f" {model['num_critical']} | {model['num_undetermined']} |"
        f" {_fmt(a['spearman'], '.2f')} ({_fmt(a['pvalue'], '.2g')}) |"
        f" {a['same_least_important']} of {a['k']} |")
  gate = summary["gate"]
  lines += ["", f"Gate (>= {gate['min_ambient']} droppable modules ambient in"
                f" every model): **{'passed' if gate['passed'] else 'failed'}**"
                f" ({gate['num_ambient']}). "
                + ("" if gate["passed"] else
                   "The test runs on this model anyway: the targeted arm then"
                   " also thins undetermined modules, and the report says so"
                   " here."), ""]
  model = summary["models"][0]
  lines += ["Model 0's droppable modules, least important first (reset to"
            " the initial value): label, WER increase after the reset, and"
            " after silencing half of its units:", "",
            "| module | label | reset: WER increase | half width: WER"
            " increase |", "|---|---|---|---|"]
  for name in model["ranking"]:
    lines.append(f"| `{name}` | {model['labels'][name]} |"
                 f" {model['wer_increase'][name]:+.3f} |"
                 f" {model['halfwidth']['modules'][name]['wer_increase']:+.3f} |")
  return lines + ["", "The full analysis of model 0:"
                  " [pretrain/analysis/report.md](pretrain/analysis/report.md).",
                  ""]


def _corpus(summary: Mapping[str, Any]) -> list[str]:
  """What the corpus is (its card) and the leave-one-engine-out WERs."""
  card, engines = summary.get("corpus"), summary.get("engines")
  lines = []
  if card:
    sizes = card["sizes"]
    voices = "; ".join(
        f"{engine}: " + ", ".join(f"{split} {len(v['voices'][split])} voices /"
                                  f" {v['speakers'][split]} speakers"
                                  for split in ("train", "dev", "test"))
        for engine, v in card["engines"].items())
    aug = card.get("augmentation") or {}
    oov = card["oov_rate"]
    lines += [
        "## The corpus", "",
        f"`{card['name']}` {card['version']}: {sizes['train']['hours']:.1f} h"
        f" of train speech ({sizes['train']['speakers']} speakers), dev"
        f" {sizes['dev']['speakers']} and test {sizes['test']['speakers']}"
        f" held-out speakers. Engines and voices: {voices}.",
        f"Long form: {card['text']['long']['source']}. Short form:"
        f" {card['text']['short']['source']}.",
        f"Augmentation at build time: speed {aug.get('speed_factors')},"
        f" reverberation p={aug.get('reverb_prob')} (RT60"
        f" {aug.get('rt60_seconds')} s), noise p={aug.get('noise_prob')}"
        f" ({', '.join(aug.get('noise_kinds', []))}; SNR"
        f" {aug.get('noise_snr_db')} dB), channel p={aug.get('channel_prob')}.",
        f"Out-of-vocabulary rate of word tokens against train: dev"
        f" {oov['dev']['all']:.3f}, test {oov['test']['all']:.3f}; transcripts"
        f" shared with train: dev {card['transcript_overlap_with_train']['dev']},"
        f" test {card['transcript_overlap_with_train']['test']}.", ""]
  if engines:
    row = lambda name, e: (f"| {name} | {e['wer']:.3f} [{e['wer_low']:.3f},"
                           f" {e['wer_high']:.3f}] | {_fmt(e['cer'])} |"
                           f" {e['num_examples']:.0f} |")
    lines += [
        f"### Leave one engine out: {engines['engine']}", "",
        f"A model pre-trained as the experiment's ({engines['steps']} steps) on"
        f" {', '.join(engines['trained_on'])} speakers only, evaluated on the"
        " long-form test split:", "",
        "| evaluated on | WER [interval] | CER | utterances |",
        "|---|---|---|---|",
        row(f"{', '.join(engines['trained_on'])} test speakers (in domain)",
            engines["in_domain"]),
        row(f"{engines['engine']} test speakers (engine never heard)",
            engines["held_out"]),
        row(f"{engines['engine']} test speakers, by model 0 (heard"
            f" {engines['engine']} in training)",
            engines["trained_with_engine"]), ""]
  return lines


def _transcripts(summary: Mapping[str, Any]) -> list[str]:
  samples = summary.get("transcripts") or []
  if not samples:
    return []
  lines = ["## Transcripts", "",
           f"The first {len(samples)} utterances of the"
           f" {summary['setup']['eval_split']} split, model 0, first seed.", ""]
  for i, sample in enumerate(samples):
    lines += [f"{i + 1}. reference: `{sample['reference']}`",
              f"   - not adapted: `{sample['not_adapted']}`"]
    lines += [f"   - {key}: `{text}`" for key, text in sample["arms"].items()]
  return lines + [""]


def render_report(summary: Mapping[str, Any]) -> str:
  """report.md (module docstring)."""
  return "\n".join([
      "# Claim 5: Federated Dropout aimed by layer importance, at equal"
      " client cost", "",
      *_checks(summary),
      *_miniature(summary),
      *_not_transcribing(summary),
      *_verdict(summary),
      *_stages(summary),
      *_setup(summary),
      *arms_table(summary),
      *_comparisons(summary),
      *_grid(summary),
      "## Training long enough", "",
      *_plateau(summary),
      f"![Dev WER by round]({figures.ROUNDS_FIGURE})", "",
      *_models(summary),
      *_corpus(summary),
      *(stability_runs.report_lines(summary["stability"])
        if summary.get("stability") else []),
      *_transcripts(summary),
  ])


def write_report(summary: Mapping[str, Any], workdir: Any) -> None:
  """Writes summary.json, the figures and report.md into `workdir`."""
  workdir = epath.Path(workdir)
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  figures.write_figures(summary, str(workdir))
  (workdir / "report.md").write_text(render_report(summary))
