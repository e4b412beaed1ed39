"""The experiment's summary (W/summary.json), computed from what the stages wrote.

Every WER and interval here is pooled over pre-trained models and federated
seeds on the same test utterances, with the hierarchical paired bootstrap of
`conformer_fl.stats` (models, then seeds, then speakers, then utterances
within speakers). Arms are compared on the seeds they share.

W/summary.json:
{
  "stage_seconds": {stage: float},
  "setup": {"levels", "verdict_level", "margin", "confidence", "max_rate",
            "lr_grid", "picks": {arm: lr}, "rounds", "clients_per_round",
            "local_steps", "pretrain_seeds", "verdict_seeds",
            "control_seeds", "level_seeds", "miniature": bool},
  "models": [{"seed", "dir", "dev_eval": {wer, low, high, cer, num_examples},
              "not_adapted": {wer, low, high}, "learning_curve": [...],
              "labels": {module: label}, "num_ambient", "num_critical",
              "num_undetermined", "ranking": [module, least important first],
              "halfwidth": {"agreement": {...}, "modules": {...}}}],
  "gate": {"min_ambient", "num_ambient": [per model], "passed": bool},
  "arms": [{"key", "arm", "level", "client_model", "params_fraction",
            "flops_fraction", "peak_bytes_fraction", "step_seconds_fraction",
            "kept": {module: units}, "lr", "num_models", "seeds", "wer", "low",
            "high", "per_seed": [[wer per seed] per model],
            "dev_wer_by_round": [[round, wer], ...] of model 0, first seed}],
  "absent": [{"arm", "level", "note"}],
  "comparisons": [{"cost_level", "a", "b", "difference", "low", "high",
                   "per_seed", "num_models", "num_seeds", "num_speakers",
                   "num_utterances"}],       WER(a) - WER(b)
  "verdict": {"verdict", "reasons", "margin", "rule"} | null,
  "grid": [{"arm", "lr", "dev_wer"}],
  "transcripts": [{"reference", "not_adapted", "arms": {key: str}}],
  "stability": W/stability.json | null,
  "engines": {"engine", "steps", "trained_on", "held_out", "in_domain",
              "trained_with_engine"} | null,   leave one engine out
  "corpus": the corpus card (corpus_card.json) | null
}
"""

from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath
import ml_collections
import numpy as np

from conformer_fl import metric_logging
from conformer_fl import stats
from conformer_fl import workdir as workdir_lib
from conformer_fl.analysis import importance_file
from conformer_fl.experiment import arms as arms_lib
from conformer_fl.experiment import design
from conformer_fl.experiment import evidence
from conformer_fl.experiment import halfwidth as halfwidth_lib
from conformer_fl.experiment import verdict as verdict_lib


def read_metrics(workdir: epath.Path) -> list[dict[str, Any]]:
  """The metric rows of a run's metrics.jsonl, in order (no torn or stop lines)."""
  return [row for row in workdir_lib.Workdir(workdir).metrics()
          if metric_logging.STOPPED_KEY not in row]


def arm_key(arm: str, level: float | None) -> str:
  """'c070/targeted', 'any/full'."""
  return f"{design.level_name(level)}/{arm}"


def _utterances(evaluation: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
  return (np.asarray(evaluation["utterance_errors"]),
          np.asarray(evaluation["utterance_words"]),
          np.asarray(evaluation["utterance_speakers"]))


class _Pool:
  """Per-utterance errors of each (arm, level), by model and seed."""

  def __init__(self, results: Mapping[design.Run, Mapping[str, Any]]):
    self.errors: dict[str, dict[tuple[int, int], np.ndarray]] = {}
    self.words = self.speakers = None
    for run, evaluation in results.items():
      errors, words, speakers = _utterances(evaluation)
      if self.words is None:
        self.words, self.speakers = words, speakers
      elif len(words) != len(self.words):
        raise ValueError(f"{run} was scored on {len(words)} utterances, other"
                         f" runs on {len(self.words)}: the pairing needs one"
                         " test set.")
      self.errors.setdefault(arm_key(run.arm, run.level), {})[
          (run.model, run.seed)] = errors

  def stack(self, keys: Sequence[str]) -> tuple[np.ndarray, ...] | None:
    """[M, S, N] errors of each key over the (model, seed)s they all share."""
    shared = set.intersection(*(set(self.errors[k]) for k in keys))
    models = sorted({m for m, _ in shared})
    seeds = sorted({s for _, s in shared})
    if not all((m, s) in shared for m in models for s in seeds):
      seeds = sorted(set.intersection(*({s for mm, s in shared if mm == m}
                                         for m in models)))
    if not models or not seeds:
      return None
    return tuple(np.stack([np.stack([self.errors[k][(m, s)] for s in seeds])
                           for m in models]) for k in keys)


def _interval(pool: _Pool, key: str, confidence: float) -> dict[str, Any]:
  (errors,) = pool.stack([key])
  result = stats.rate_interval(errors, pool.words, pool.speakers,
                               confidence=confidence)
  per_seed = (errors.sum(-1) / max(pool.words.sum(), 1)).tolist()
  return dict(wer=result["rate"], low=result["low"], high=result["high"],
              per_seed=per_seed)


def _compare(pool: _Pool, a: str, b: str, confidence: float
             ) -> dict[str, Any] | None:
  stacked = pool.stack([a, b])
  if stacked is None:
    return None
  return stats.difference_interval(stacked[0], stacked[1], pool.words,
                                   pool.speakers, confidence=confidence)


def build_summary(config: ml_collections.ConfigDict, workdir: epath.Path, *,
                  specs_by_model: Sequence[Sequence[arms_lib.ArmSpec]],
                  cost_models: Sequence[arms_lib.CostModel],
                  analyses: Sequence[importance_file.Importance],
                  halfwidths: Sequence[Mapping[str, Any]],
                  costs: Mapping[str, Mapping[str, float]],
                  results: Mapping[design.Run, Mapping[str, Any]],
                  grid_dev_wer: Mapping[design.Run, float],
                  picks: Mapping[str, float],
                  not_adapted: Sequence[Mapping[str, Any]],
                  dev_evals: Sequence[Mapping[str, Any]],
                  stage_seconds: Mapping[str, float] | None = None,
                  stability: Mapping[str, Any] | None = None,
                  engines: Mapping[str, Any] | None = None,
                  corpus: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
  """The summary (module docstring) from the stages' outputs.

  Args:
    config: the experiment config.
    workdir: W.
    specs_by_model: each pre-trained model's ArmSpecs (`arms.arm_specs`).
    cost_models: each model's `arms.CostModel`.
    analyses: each model's importance.json.
    halfwidths: each model's `halfwidth.evaluate_half_width` result.
    costs: {arm key: measured client step cost} of model 0's arms.
    results: {Run: final evaluation} of every final run.
    grid_dev_wer: {tuning Run: final dev WER}.
    picks: {tuning arm: picked client learning rate}.
    not_adapted: each model's evaluation on the adaptation test split.
    dev_evals: each model's evaluation on its own dev split.
    stage_seconds: wall seconds of each stage.
    stability: W/stability.json or None.
    engines: the leave-one-engine-out stage's result (`engines.run_stage`)
      or None.
    corpus: the corpus card (corpus_card.json) or None.
  """
  c = config.comparison
  pool = _Pool(results)
  models = [_model_row(config, workdir, m, importance, cost_models[m],
                       halfwidths[m], not_adapted[m], dev_evals[m])
            for m, importance in enumerate(analyses)]
  num_ambient = [model["num_ambient"] for model in models]
  arms, absent = _arm_rows(workdir, specs_by_model, cost_models, costs,
                           results, pool, c.confidence)
  comparisons = _comparisons(pool, {row["key"] for row in arms}, c)
  return dict(
      stage_seconds=dict(stage_seconds or {}),
      setup=_setup(config, picks),
      models=models,
      gate=dict(min_ambient=c.gate_min_ambient, num_ambient=num_ambient,
                passed=all(n >= c.gate_min_ambient for n in num_ambient)),
      arms=arms, absent=absent, comparisons=comparisons,
      verdict=_verdict(comparisons, c),
      grid=[dict(arm=run.arm, lr=run.lr, dev_wer=wer)
            for run, wer in grid_dev_wer.items()],
      transcripts=_transcripts(results, not_adapted[0]), stability=stability,
      engines=dict(engines) if engines else None,
      corpus=dict(corpus) if corpus else None)


def _model_row(config: ml_collections.ConfigDict, workdir: epath.Path, m: int,
               importance: importance_file.Importance,
               cost_model: arms_lib.CostModel, halfwidth: Mapping[str, Any],
               not_adapted: Mapping[str, Any],
               dev: Mapping[str, Any]) -> dict[str, Any]:
  """The "models" entry of pre-trained model `m` (module docstring).

  Args:
    config: the experiment config.
    workdir: W.
    m: the model's index in config.pretrain_seeds.
    importance: its importance.json.
    cost_model: its `arms.CostModel`.
    halfwidth: its `halfwidth.evaluate_half_width` result.
    not_adapted: its evaluation on the adaptation test split.
    dev: its evaluation on its own dev split.

  Returns:
    {"seed", "dir", "dev_eval", "not_adapted", "learning_curve", "labels",
     "num_<label>" of each label, "wer_increase", "ranking", "halfwidth"}.
  """
  confidence = config.comparison.confidence
  names = [x.name for x in cost_model.modules]
  labels = arms_lib.unit_labels(importance, names)
  counts = {label: sum(v == label for v in labels.values())
            for label in arms_lib.LABELS}
  dev_words = _utterances(dev)
  dev_interval = stats.rate_interval(dev_words[0], dev_words[1],
                                     dev_words[2], confidence=confidence)
  base = _utterances(not_adapted)
  base_interval = stats.rate_interval(base[0], base[1], base[2],
                                      confidence=confidence)
  return dict(
      seed=int(config.pretrain_seeds[m]),
      dir=str(design.pretrain_dir(epath.Path("."), m)),
      dev_eval=dict(wer=dev["wer"], low=dev_interval["low"],
                    high=dev_interval["high"], cer=dev.get("cer"),
                    num_examples=dev["num_examples"]),
      not_adapted=dict(wer=not_adapted["wer"], low=base_interval["low"],
                       high=base_interval["high"]),
      learning_curve=evidence.learning_curve(
          read_metrics(design.pretrain_dir(workdir, m))),
      labels=labels, **{f"num_{k}": v for k, v in counts.items()},
      wer_increase={n: importance.units[n].wer_increase for n in names},
      ranking=arms_lib.module_ranking(importance, names),
      halfwidth=dict(agreement=halfwidth_lib.agreement(
          halfwidth, importance, names), modules=halfwidth["modules"]))


def _arm_rows(workdir: epath.Path,
              specs_by_model: Sequence[Sequence[arms_lib.ArmSpec]],
              cost_models: Sequence[arms_lib.CostModel],
              costs: Mapping[str, Mapping[str, float]],
              results: Mapping[design.Run, Mapping[str, Any]], pool: _Pool,
              confidence: float
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """The "arms" and "absent" entries (module docstring).

  An arm is a row when it ran on any pre-trained model; its client model and
  parameter share are those of the first model it ran on, and the models it
  is absent from are named in `client_model`. It is "absent" only when no
  model ran it (with model 0's note).

  Args:
    workdir: W.
    specs_by_model: each pre-trained model's ArmSpecs.
    cost_models: each model's `arms.CostModel`.
    costs: {arm key: measured client step cost} of model 0's arms.
    results: {Run: final evaluation} of every final run.
    pool: the per-utterance errors of `results`.
    confidence: of the pooled WER intervals.

  Returns:
    (a row per arm that ran, in the order of model 0's specs; {"arm",
    "level", "note"} of each arm that did not).
  """
  runs_by_key: dict[str, list[design.Run]] = {}
  for run in results:
    runs_by_key.setdefault(arm_key(run.arm, run.level), []).append(run)
  arms, absent = [], []
  for spec in specs_by_model[0]:
    key = arm_key(spec.arm, spec.level)
    runs = runs_by_key.get(key, [])
    ran_on = sorted({r.model for r in runs})
    if not ran_on:
      absent.append(dict(arm=spec.arm, level=spec.level, note=spec.note))
      continue
    m = ran_on[0]
    spec_m = next((x for x in specs_by_model[m]
                   if arm_key(x.arm, x.level) == key), None)
    if spec_m is None:
      raise ValueError(f"{key} ran on model {m}, whose arms do not include it:"
                       " the workdir holds runs of another config.")
    description = arms_lib.describe(spec_m, cost_models[m])
    missing = [f"model {other}: {x.note or 'not run'}"
               for other, specs in enumerate(specs_by_model)
               if other not in ran_on
               for x in specs if arm_key(x.arm, x.level) == key]
    if m:
      description = f"model {m}: {description}"
    if missing:
      description += f" (absent from {'; '.join(missing)})"
    first = min(runs, key=lambda r: (r.model, r.seed))
    cost = costs.get(key, {}) if m == 0 else {}
    arms.append(dict(
        key=key, arm=spec.arm, level=spec.level,
        client_model=description,
        params_fraction=spec_m.params_fraction,
        flops_fraction=cost.get("flops_fraction"),
        peak_bytes_fraction=cost.get("peak_bytes_fraction"),
        step_seconds_fraction=cost.get("step_seconds_fraction"),
        kept=dict(spec_m.kept), lr=first.lr,
        num_models=len(ran_on),
        seeds=sorted({r.seed for r in runs}),
        dev_wer_by_round=[[r["round"], r["eval/wer"]] for r in read_metrics(
            first.path(workdir)) if "eval/wer" in r],
        **_interval(pool, key, confidence)))
  return arms, absent


def _comparison_pairs(level: float, random_draws: int) -> list[tuple[str, str]]:
  """The (a, b) arm keys compared at cost `level`, WER(a) - WER(b)."""
  pairs = [(arm_key(a, level), arm_key("full", None)) for a in (
      "targeted", "anti_targeted", "uniform", "targeted_rescaled",
      *[f"random_{d}" for d in range(random_draws)])]
  pairs += [(arm_key(a, level), arm_key("targeted", level))
            for a in ("anti_targeted", "uniform")]
  pairs += [(arm_key(f"random_{d}", level), arm_key("targeted", level))
            for d in range(random_draws)]
  pairs += [(arm_key("targeted_rescaled", level),
             arm_key("targeted", level))]
  # Each sub-model policy against full and against uniform ('random').
  pairs += [(arm_key(a, level), arm_key("full", None))
            for a in arms_lib.POLICY_ARMS]
  pairs += [(arm_key(a, level), arm_key("uniform", level))
            for a in arms_lib.POLICY_ARMS]
  return pairs


def _comparisons(pool: _Pool, keys: set[str],
                 c: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The "comparisons" entries (module docstring).

  Args:
    pool: the per-utterance errors of the final runs.
    keys: the arm keys that ran.
    c: config.comparison (levels, random_draws, confidence).

  Returns:
    A paired difference interval per pair of `_comparison_pairs` of each
    level whose arms both ran, then freeze against full.
  """
  comparisons = []
  for level in c.levels:
    for a, b in _comparison_pairs(level, c.random_draws):
      if a in keys and b in keys:
        result = _compare(pool, a, b, c.confidence)
        if result is not None:
          comparisons.append(dict(cost_level=level, a=a, b=b, **result))
  if arm_key("freeze", None) in keys:
    result = _compare(pool, arm_key("freeze", None), arm_key("full", None),
                      c.confidence)
    if result is not None:
      comparisons.append(dict(cost_level=None, a=arm_key("freeze", None),
                              b=arm_key("full", None), **result))
  return comparisons


def _verdict(comparisons: Sequence[Mapping[str, Any]],
             c: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """`verdict.decide` on targeted-vs-full and anti-targeted-vs-targeted.

  Args:
    comparisons: the "comparisons" entries.
    c: config.comparison (verdict_level, margin).

  Returns:
    The verdict at c.verdict_level, or None when either comparison is absent.
  """

  def find(a, b):
    return next((x for x in comparisons if x["a"] == a and x["b"] == b), None)

  tf = find(arm_key("targeted", c.verdict_level), arm_key("full", None))
  at = find(arm_key("anti_targeted", c.verdict_level),
            arm_key("targeted", c.verdict_level))
  if tf and at:
    return verdict_lib.decide(tf, at, c.margin)
  return None


def _transcripts(results: Mapping[design.Run, Mapping[str, Any]],
                 not_adapted: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The "transcripts" entries: the first 6 test utterances.

  Args:
    results: {Run: final evaluation} of every final run.
    not_adapted: model 0's evaluation, not adapted, on the same split.

  Returns:
    [{"reference", "not_adapted", "arms": {arm key: hypothesis of model 0's
    first seed}}].
  """
  transcripts = []
  first_runs = {}
  for run in sorted(results, key=lambda r: (r.model, r.seed)):
    if run.model == 0:
      first_runs.setdefault(arm_key(run.arm, run.level), run)
  for i, reference in enumerate(not_adapted["references"][:6]):
    transcripts.append(dict(
        reference=reference, not_adapted=not_adapted["hypotheses"][i],
        arms={key: results[run]["hypotheses"][i]
              for key, run in first_runs.items()}))
  return transcripts


def _setup(config: ml_collections.ConfigDict,
           picks: Mapping[str, float]) -> dict[str, Any]:
  """The "setup" entry (module docstring): the design and the picked rates."""
  c = config.comparison
  f = config.adapt.federated
  return dict(
      levels=list(c.levels), verdict_level=c.verdict_level,
      margin=c.margin, confidence=c.confidence, max_rate=c.max_rate,
      lr_grid=list(c.lr_grid), picks=dict(picks), rounds=f.rounds,
      clients_per_round=f.clients_per_round, local_steps=f.local_steps,
      pretrain_steps=config.pretrain.central.num_steps,
      pretrain_seeds=list(config.pretrain_seeds),
      verdict_seeds=list(c.verdict_seeds),
      control_seeds=list(c.control_seeds),
      level_seeds=list(c.level_seeds),
      eval_split=config.final_eval_split,
      miniature=(len(config.pretrain_seeds) < 2 or
                 len(c.verdict_seeds) < 5))
