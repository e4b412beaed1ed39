"""The study's stability stage: more pre-training runs, analysed and compared.

Claims 2 and 3: which units are ambient, and how important each unit is, is
the same across pre-training seeds and model sizes, and with group norm in
place of batch norm in the conv modules. `configs/experiment.py:scale=study`
names the runs in `config.stability.runs` ({name: configs/central.py-style
config}); each is pre-trained in W/stability/NAME and analysed there (the
experiment's analysis config, resetting to `config.stability.analysis_taus`).
With W/pretrain they make the set of runs, and every pair of runs that differs
in exactly one of (seed, conv norm, size) is compared
(`conformer_fl.analysis.stability.compare_pair`: Jaccard overlap of the
ambient sets beside two chance levels, random sets and random within module
type, with the tail probability of each; rank correlation of the WER
increases; units of different depths matched one to one by relative depth).
A pair of runs with no ambient unit in either has no overlap to measure: it
is counted ('num_empty_pairs') and left out of the means.

W/stability.json:
  {"runs": [{"name", "workdir" (relative to W), "size" ('4x96': blocks x
             width), "norm", "seed", "steps", "baseline_wer",
             "baseline_wer_interval", "num_examples", "num_units",
             "ambient": [unit]}],
   "groups": {"seeds" | "norms" | "sizes": {
       "pairs": [{"a", "b", ...compare_pair}],
       "num_pairs", "num_empty_pairs", "jaccard_mean", "jaccard_min",
       "jaccard_max", "chance_jaccard_mean",
       "chance_jaccard_within_types_mean", "overlap_pvalue_max",
       "overlap_pvalue_within_types_max", "spearman_mean",
       "spearman_min", "spearman_max"}},
   "groups_droppable": the same over the droppable modules only
       (`droppable_only`: no final norms, front end or decoder),
   "ambient_frequency": {unit: {"runs", "ambient", "frequency"}} over the
       runs that have the unit (`stability.ambient_frequency`)}
A group with no pair (e.g. one size only) is left out.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import json
import os
import re
from typing import Any

from etils import epath
import ml_collections
import numpy as np

from conformer_fl import checkpointing
from conformer_fl import models
from conformer_fl import multihost
from conformer_fl import workdir as workdir_lib
from conformer_fl.analysis import importance as importance_lib
from conformer_fl.analysis import importance_file
from conformer_fl.analysis import stability as stability_lib

STABILITY_DIR = "stability"
STABILITY_FILE = "stability.json"
PRETRAIN_NAME = "pretrain"
# What one pair of runs differs in, in the order of the report.
GROUPS = ("seeds", "norms", "sizes")


# The fields a pair of compared runs may differ in: the seed, the conv norm
# (with its groups), the size's fields, and where the corpus is.
_VARYING_FIELDS = ("seed", "model.conv_norm", "model.conv_norm_groups",
                   "data.data_dir",
                   *(f"model.{field}" for field in models.SIZE_FIELDS))


def _identity(run_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'size', 'norm', 'seed', 'steps', 'rest'}: rest = every other field."""
  model = run_config.model
  flat = workdir_lib.flatten(workdir_lib.config_as_json(run_config))
  return dict(size=f"{model.num_blocks}x{model.model_dim}",
              norm=model.conv_norm, seed=int(run_config.seed),
              steps=int(run_config.central.num_steps),
              rest={k: v for k, v in flat.items()
                    if k not in _VARYING_FIELDS})


def group_of(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
  """The group of two runs' identities: what alone differs, else None.

  Two runs that differ in any other field (steps, learning rate, decoder...)
  are in no group.
  """
  if a.get("rest") != b.get("rest"):
    return None
  differs = [key for key in ("seed", "norm", "size") if a[key] != b[key]]
  if len(differs) != 1:
    return None
  return {"seed": "seeds", "norm": "norms", "size": "sizes"}[differs[0]]


def _mean(values: Sequence[float | None]) -> float | None:
  kept = [v for v in values if v is not None]
  return float(np.mean(kept)) if kept else None


def _max(values: Sequence[float | None]) -> float | None:
  kept = [v for v in values if v is not None]
  return max(kept) if kept else None


def _range(values: Sequence[float | None], name: str) -> dict[str, float | None]:
  kept = [v for v in values if v is not None]
  if not kept:
    return {f"{name}_mean": None, f"{name}_min": None, f"{name}_max": None}
  return {f"{name}_mean": float(np.mean(kept)), f"{name}_min": min(kept),
          f"{name}_max": max(kept)}


def droppable_only(
    result: importance_file.Importance) -> importance_file.Importance:
  """An importance.json restricted to the droppable modules.

  Keeps the units that a declared droppable module (`models.droppable_modules`:
  ffn1, mhsa, conv, ffn2 of every block) fully matches; the final norms, the
  front end and the decoder are left out.
  """
  patterns = [re.compile(m.module) for m in models.droppable_modules()]
  keep = {u: v for u, v in result.units.items()
          if any(p.fullmatch(u) for p in patterns)}
  return dataclasses.replace(
      result, units=keep, ambient=tuple(u for u in result.ambient if u in keep))


def compare(runs: Sequence[Mapping[str, Any]],
            results: Sequence[importance_file.Importance]) -> dict[str, Any]:
  """The "groups" of W/stability.json (module docstring).

  Args:
    runs: per run, its identity {'name', 'size', 'norm', 'seed', ...}.
    results: per run, its importance.json.
  """
  groups: dict[str, Any] = {}
  for i in range(len(runs)):
    for j in range(i + 1, len(runs)):
      group = group_of(runs[i], runs[j])
      if group is None:
        continue
      pair = stability_lib.compare_pair(results[i], results[j])
      groups.setdefault(group, {"pairs": []})["pairs"].append(
          dict(a=runs[i]["name"], b=runs[j]["name"], **pair))
  for group in groups.values():
    pairs = group["pairs"]
    group.update(
        num_pairs=len(pairs),
        num_empty_pairs=sum(p["both_empty"] for p in pairs),
        **_range([p["jaccard_ambient"] for p in pairs], "jaccard"),
        chance_jaccard_mean=_mean([p["chance_jaccard_ambient"] for p in pairs]),
        chance_jaccard_within_types_mean=_mean(
            [p["chance_jaccard_within_types"] for p in pairs]),
        overlap_pvalue_max=_max([p["overlap_pvalue"] for p in pairs]),
        overlap_pvalue_within_types_max=_max(
            [p["overlap_pvalue_within_types"] for p in pairs]),
        **_range([p["wer_increase"]["spearman"]["statistic"] for p in pairs],
                 "spearman"))
  return {g: groups[g] for g in GROUPS if g in groups}


def run_stage(config: ml_collections.ConfigDict, workdir: epath.Path, *,
              train_central: Callable[[ml_collections.ConfigDict, str], Any],
              timed: Callable[[str], Any],
              announce: Callable[[str], None]) -> dict[str, Any]:
  """Pre-trains and analyses every run of config.stability.runs, compares all.

  A run whose last checkpoint and analysis are there is reused.

  Args:
    config: the experiment config (its pretrain, analysis and stability).
    workdir: the experiment's W (W/pretrain analysed already).
    train_central: the central loop (`train.train_central`).
    timed: `timed(stage_name)`, a context manager that records the stage's
      wall time.
    announce: prints one progress line.

  Returns:
    The W/stability.json dict (module docstring), also written there.
  """
  analysis = config.analysis.copy_and_resolve_references()
  with analysis.unlocked():
    analysis.analysis.taus = config.stability.analysis_taus
  names = [PRETRAIN_NAME]
  dirs = [workdir / PRETRAIN_NAME]
  configs = [config.pretrain]
  for name, run_config in config.stability.runs.items():
    names.append(name)
    dirs.append(workdir / STABILITY_DIR / name)
    configs.append(run_config)
  for name, run_dir, run_config in list(zip(names, dirs, configs))[1:]:
    steps = run_config.central.num_steps
    if multihost.chief_decides(
        checkpointing.latest_saved_step(run_dir) == steps, "stage_done"):
      announce(f"stability {name}: pre-training done, reused")
    else:
      announce(f"stability {name}: {steps} central steps -> {run_dir}")
      with timed(f"stability/{name}/pretrain"):
        train_central(run_config, os.fspath(run_dir))
    if multihost.chief_decides(_analysed(run_dir, steps), "stage_done"):
      announce(f"stability {name}: analysis done, reused")
    else:
      announce(f"stability {name}: analysis")
      with timed(f"stability/{name}/analysis"):
        importance_lib.run_analysis(analysis, os.fspath(run_dir))
  results = [importance_file.Importance.read(d) for d in dirs]
  runs = []
  for name, run_dir, run_config, result in zip(names, dirs, configs, results):
    interval = result.baseline.wer_interval
    runs.append(dict(
        name=name, workdir=os.path.relpath(run_dir, workdir),
        **_identity(run_config), baseline_wer=result.baseline.wer,
        baseline_wer_interval=list(interval) if interval else interval,
        num_examples=result.eval.num_examples,
        num_units=len(result.units), ambient=list(result.ambient)))
  summary = dict(
      runs=[{k: v for k, v in r.items() if k != "rest"} for r in runs],
      groups=compare(runs, results),
      groups_droppable=compare(runs, [droppable_only(r) for r in results]),
      ambient_frequency=stability_lib.ambient_frequency(results))
  if multihost.is_chief():
    workdir_lib.write_atomically(workdir / STABILITY_FILE,
                                 json.dumps(summary, indent=2))
  return summary


def _analysed(run_dir: epath.Path, steps: int) -> bool:
  return (importance_file.Importance.exists(run_dir) and
          importance_file.Importance.read(run_dir).trained_step == steps)


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.2f}"


GROUP_TITLES = {"seeds": "seeds (same size and norm)",
                "norms": "conv norms (same size and seed)",
                "sizes": "sizes, matched by relative depth (same norm, seed)"}


def report_lines(stability: Mapping[str, Any]) -> list[str]:
  """The report's section on claims 2 and 3."""
  lines = ["## Claims 2 and 3: the stability of layer importance", "",
           "Each run pre-trained centrally and analysed as above (reset to"
           " the initial value; WER thresholds of the analysis), on the same"
           " dev utterances:", "",
           "| run | size | conv norm | seed | dev WER (95% interval) |"
           " ambient / units | ambient units |",
           "|---|---|---|---|---|---|---|"]
  for r in stability["runs"]:
    interval = r.get("baseline_wer_interval")
    noise = f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval else ""
    ambient = ", ".join(f"`{u.removeprefix('encoder/')}`"
                        for u in r["ambient"]) or "none"
    lines.append(
        f"| {r['name']} | {r['size']} | {r['norm']} | {r['seed']} |"
        f" {r['baseline_wer']:.3f}{noise} | {len(r['ambient'])} /"
        f" {r['num_units']} | {ambient} |")
  lines += ["", "Pairs of runs that differ in one thing only. Jaccard: the"
            " overlap of the two ambient sets (1 = the same units), beside"
            " its chance level for two random sets of the same sizes, and"
            " for sets random within each module type (as many ambient"
            " units of each type as each run has: norms ambient in both"
            " runs overlap under it too); p: the largest over the pairs of"
            " the probability of an overlap at least as large under each"
            " null (hypergeometric). Pairs where neither run has an ambient"
            " unit have no overlap and are left out of the means (counted"
            " as 'empty'). Spearman: rank correlation of the units' WER"
            " increase.", "",
            *_group_table(stability["groups"])]
  if stability.get("groups_droppable"):
    lines += ["", "The same over the droppable modules only (ffn1, mhsa, conv"
              " and ffn2 of every block, what Federated Dropout can target):"
              " the final norms, ambient in most runs, are left out, and"
              " with them much of the overlap above.", "",
              *_group_table(stability["groups_droppable"])]
  frequency = stability.get("ambient_frequency")
  if frequency:
    lines += ["", "Ambient in how many of the runs that have the unit: "
              + ", ".join(f"`{u.removeprefix('encoder/')}` {f['ambient']}/"
                          f"{f['runs']}" for u, f in frequency.items()) + "."]
  lines += ["", f"Every pair: [{STABILITY_FILE}]({STABILITY_FILE}).", ""]
  return lines


def _fmt_p(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.2g}"


def _group_table(groups: Mapping[str, Any]) -> list[str]:
  lines = ["| runs differ in | pairs (empty) | Jaccard mean (min-max) |"
           " chance: random sets (max p) | chance: within types (max p) |"
           " Spearman mean (min-max) |",
           "|---|---|---|---|---|---|"]
  for name, g in groups.items():
    lines.append(
        f"| {GROUP_TITLES[name]} | {g['num_pairs']}"
        f" ({g.get('num_empty_pairs', 0)}) |"
        f" {_fmt(g['jaccard_mean'])} ({_fmt(g['jaccard_min'])}-"
        f"{_fmt(g['jaccard_max'])}) | {_fmt(g['chance_jaccard_mean'])}"
        f" ({_fmt_p(g.get('overlap_pvalue_max'))}) |"
        f" {_fmt(g.get('chance_jaccard_within_types_mean'))}"
        f" ({_fmt_p(g.get('overlap_pvalue_within_types_max'))}) |"
        f" {_fmt(g['spearman_mean'])} ({_fmt(g['spearman_min'])}-"
        f"{_fmt(g['spearman_max'])}) |")
  return lines
