"""The analysis pass: reset units of a trained run, evaluate, classify, report.

`run_analysis(config, workdir)` reads the run in `workdir` (its config.json,
tokenizer.model, checkpoints/ and metrics.jsonl), evaluates the trained model
and every reset variant (`resets`) with one vmapped compiled function
(`variant_eval`), and writes `workdir/analysis/` (schema: the package
docstring). On several hosts every process runs it: the variants of each
vectorized call are split over all devices of all hosts, their metrics
gathered once, and process 0 alone writes the files (the others wait for
them). Every file of the workdir is read and written through `etils.epath`,
so the workdir may be on GCS (`gs://...`).
"""

from collections.abc import Mapping
import dataclasses
import itertools
import os
import time
from typing import Any

from absl import logging
from etils import epath
import flax
import jax
import ml_collections
import numpy as np

from conformer_fl import checkpointing
from conformer_fl import models
from conformer_fl import multihost
from conformer_fl import stats
from conformer_fl import tree_paths
from conformer_fl import workdir as workdir_lib
from conformer_fl.analysis import importance_file
from conformer_fl.analysis import movement
from conformer_fl.analysis import movement_test
from conformer_fl.analysis import plots
from conformer_fl.analysis import report
from conformer_fl.analysis import resets
from conformer_fl.analysis import stability
from conformer_fl.analysis import variant_eval
from conformer_fl.data import input_pipeline
from conformer_fl.data import tokenizer as tokenizer_lib
from conformer_fl.federated import mesh as mesh_lib

THRESHOLD_RULES = ("either", "both")
LABELS = ("ambient", "critical", "undetermined")


# ----------------------------------------------------------------------------
# Pure pieces.


def wer_threshold(baseline_wer: float, max_abs: float, max_rel: float,
                  rule: str = "either") -> float:
  """The WER increase that separates ambient from critical units.

  Absolute test: increase <= max_abs. Relative test: increase <= max_rel *
  baseline_wer. rule 'either' passes a unit that meets one test, so its
  threshold is the larger of the two; 'both' needs both, the smaller.
  """
  if rule not in THRESHOLD_RULES:
    raise ValueError(f"threshold_rule must be one of {THRESHOLD_RULES}, got "
                     f"{rule!r}.")
  bounds = (max_abs, max_rel * baseline_wer)
  return float(max(bounds) if rule == "either" else min(bounds))


def label_unit(low: float, high: float, threshold: float) -> str:
  """'ambient', 'critical' or 'undetermined' from a WER-increase interval.

  Ambient: the interval's upper bound is below the threshold (the reset
  costs less than the threshold, at the interval's confidence). Critical:
  its lower bound is above it. Undetermined: the interval holds the
  threshold.
  """
  if high < threshold:
    return "ambient"
  if low > threshold:
    return "critical"
  return "undetermined"


def parse_taus(taus: Any, saved_steps: list[int], trained_step: int) -> list[int]:
  """The re-initialization checkpoints: 'all' or a list / 'a,b,c' of saved steps.

  'all' is every saved step <= trained_step. Step 0 is always included.

  Raises:
    ValueError: a requested step that was not saved.
  """
  if isinstance(taus, str) and taus.strip() == "all":
    chosen = [s for s in saved_steps if s <= trained_step]
  else:
    if isinstance(taus, str):
      try:
        chosen = [int(t) for t in taus.split(",") if t.strip()]
      except ValueError:
        raise ValueError(f"analysis.taus must be 'all' or comma-separated "
                         f"checkpoint steps, got {taus!r}.") from None
    else:
      chosen = [int(t) for t in taus]
    missing = sorted(set(chosen) - set(saved_steps))
    if missing:
      raise ValueError(f"analysis.taus asks for unsaved checkpoint(s) {missing};"
                       f" saved: {saved_steps}.")
  return sorted(set(chosen) | {0})


def _count_params(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def summarize(metrics: list[dict[str, Any]], variants: list[resets.Variant],
              units: Mapping[str, tuple[str, ...]], trained_params: Any,
              taus: list[int], seeds: list[int], analysis: Any) -> dict[str, Any]:
  """Per-unit results, labels and baseline from the evaluated variants.

  Each unit's WER increase (its reset to tau = 0 against the baseline, on the
  same utterances) gets a paired interval (`stats.difference_interval`,
  speakers then utterances resampled, `analysis.label_confidence`,
  `analysis.bootstrap_samples` resamples), and its label (`label_unit`)
  compares that interval with the threshold (`wer_threshold`).

  Args:
    metrics: per variant, `evaluation.EvalAccumulator.result` (with the
      per-utterance 'utterance_errors', 'utterance_words',
      'utterance_speakers').
    variants: the variants, aligned with `metrics`.
    units: unit name -> path.
    trained_params: the trained model's params (for parameter counts).
    taus: re-initialization steps (taus[0] = 0).
    seeds: re-randomization seeds.
    analysis: the analysis config.
  """
  by_variant = dict(zip(variants, metrics))
  base = by_variant[resets.Variant(resets.BASELINE)]
  threshold = wer_threshold(base["wer"], analysis.max_abs_wer_increase,
                            analysis.max_rel_wer_increase,
                            analysis.threshold_rule)
  unit_results = {}
  for name, path in units.items():
    reinit = [by_variant[resets.Variant(resets.REINIT, name, t)] for t in taus]
    rerand = [by_variant[resets.Variant(resets.RERANDOMIZE, name, s)]
              for s in seeds]
    wer_increase = reinit[0]["wer"] - base["wer"]
    interval = stats.difference_interval(
        reinit[0]["utterance_errors"], base["utterance_errors"],
        base["utterance_words"], base["utterance_speakers"],
        confidence=analysis.label_confidence,
        num_samples=analysis.bootstrap_samples)
    label = label_unit(interval["low"], interval["high"], threshold)
    rerand_wers = [m["wer"] for m in rerand]
    unit_results[name] = dict(
        path=list(path),
        num_params=_count_params(tree_paths.get(trained_params, path)),
        reinit_wer=[m["wer"] for m in reinit],
        reinit_loss=[m["loss"] for m in reinit],
        rerandomize_wer=rerand_wers,
        rerandomize_loss=[m["loss"] for m in rerand],
        wer_increase=wer_increase,
        wer_increase_low=interval["low"],
        wer_increase_high=interval["high"],
        relative_wer_increase=(wer_increase / base["wer"] if base["wer"] > 0
                               else None),
        loss_increase=reinit[0]["loss"] - base["loss"],
        rerandomize_wer_increase=(float(np.mean(rerand_wers)) - base["wer"]
                                  if rerand_wers else None),
        label=label,
        ambient=label == "ambient")
  return dict(
      baseline=dict(wer=base["wer"], loss=base["loss"], cer=base.get("cer"),
                    wer_interval=[base["wer_low"], base["wer_high"]],
                    num_speakers=base["num_speakers"]),
      num_examples=base["num_examples"],
      wer_threshold=threshold,
      units=unit_results,
      **{label: [n for n, u in unit_results.items() if u["label"] == label]
         for label in LABELS})


def movement_correlations(
    unit_results: Mapping[str, importance_file.Unit]) -> dict[str, Any]:
  """{measure: {'wer_increase': corr, 'loss_increase': corr}} over all units.

  Secondary: scipy's p-values treat the units as independent draws, and the
  absolute distance grows with a unit's size. The primary test is
  `movement_test.primary_movement_test`.
  """
  units = list(unit_results.values())
  measures = ["distance", "relative_distance", "rms_movement"]
  if any(u.movement.update_norm_sum is not None for u in units):
    measures.append("update_norm_sum")
  return {
      measure: {
          target: movement.rank_correlations(
              [getattr(u.movement, measure) for u in units],
              [getattr(u, target) for u in units])
          for target in stability.IMPORTANCE_KEYS
      } for measure in measures
  }


def fresh_initializations(model: models.ConformerASR,
                          seeds: list[int]) -> dict[int, dict[str, Any]]:
  """{seed: host variables of `models.init_variables(model, seed)`}.

  The init function is vmapped over the seeds, so it compiles once (calling
  `init_variables` per seed would compile once per seed). Same values: the
  same init function of the same key.
  """
  if not seeds:
    return {}
  audio = np.zeros((1, 16000), np.float32)
  labels = np.ones((1, 8), np.int32)
  init = jax.jit(jax.vmap(lambda rng: model.init(
      rng, audio, np.zeros_like(audio), labels,
      np.zeros(labels.shape, np.float32), train=False)))
  stacked = jax.device_get(init(jax.vmap(jax.random.key)(np.array(seeds))))
  return {seed: jax.tree.map(lambda x, i=i: np.asarray(x[i]),
                             flax.core.unfreeze(stacked))
          for i, seed in enumerate(seeds)}


# ----------------------------------------------------------------------------
# Reading a run.


def data_config_of(run_config, analysis) -> ml_collections.ConfigDict:
  """The run's data config with the analysis's data_dir, split and domains."""
  data = run_config.data.copy_and_resolve_references()
  if analysis.data_dir:
    data.data_dir = analysis.data_dir
  if analysis.eval_split:
    data.eval_split = analysis.eval_split
  if analysis.eval_domains is not None:
    data.eval_domains = tuple(analysis.eval_domains)
  return data


def _tokenizer(run_config,
               workdir: str | os.PathLike[str]) -> tokenizer_lib.Tokenizer:
  kind = run_config.data.tokenizer.kind
  if kind == "sentencepiece" and not (
      epath.Path(workdir) / tokenizer_lib.TOKENIZER_FILENAME).exists():
    raise FileNotFoundError(
        f"No {tokenizer_lib.TOKENIZER_FILENAME} in {workdir}: the analysis "
        "needs the tokenizer the run was trained with.")
  return tokenizer_lib.build_tokenizer(run_config.data.tokenizer, None, workdir)


def _validate(analysis) -> None:
  if analysis.granularity not in models.units.GRANULARITIES:
    raise ValueError(f"analysis.granularity must be one of "
                     f"{models.units.GRANULARITIES}, got "
                     f"{analysis.granularity!r}.")
  if analysis.threshold_rule not in THRESHOLD_RULES:
    raise ValueError(f"analysis.threshold_rule must be one of "
                     f"{THRESHOLD_RULES}, got {analysis.threshold_rule!r}.")
  for field in ("max_abs_wer_increase", "max_rel_wer_increase"):
    if analysis[field] < 0:
      raise ValueError(f"analysis.{field} must be >= 0, got {analysis[field]}.")
  if analysis.num_rerandomize_seeds < 0:
    raise ValueError("analysis.num_rerandomize_seeds must be >= 0.")
  if analysis.rerandomize_seed_offset < 1:
    raise ValueError("analysis.rerandomize_seed_offset must be >= 1 (offset 0 "
                     'would redraw the run\'s own initialization).')
  if analysis.variants_per_call < 1:
    raise ValueError("analysis.variants_per_call must be >= 1.")
  if not 0.0 < analysis.label_confidence < 1.0:
    raise ValueError("analysis.label_confidence must lie in (0, 1), got "
                     f"{analysis.label_confidence}.")
  if analysis.bootstrap_samples < 1:
    raise ValueError("analysis.bootstrap_samples must be >= 1.")
  if analysis.movement_measure not in movement_test.MEASURES:
    raise ValueError(f"analysis.movement_measure must be one of "
                     f"{movement_test.MEASURES}, got "
                     f"{analysis.movement_measure!r}.")
  if analysis.movement_permutations < 1:
    raise ValueError("analysis.movement_permutations must be >= 1.")


def _absolute(workdir: str | os.PathLike[str]) -> str:
  """`workdir` made absolute; a `gs://`-style URI is already absolute."""
  path = os.fspath(workdir)
  return path if "://" in path else os.path.abspath(path)


# ----------------------------------------------------------------------------
# The pass.


def _write_figures(results: importance_file.Importance,
                   out_dir: epath.Path) -> dict[str, importance_file.Figure]:
  names = list(results.units)
  units = list(results.units.values())
  figures = {}

  def add(key, filename, size):
    figures[key] = importance_file.Figure(filename, size[0], size[1])

  for metric in ("wer", "loss"):
    filename = f"heatmap_{metric}.png"
    add(f"heatmap_{metric}", filename, plots.heatmap(
        np.array([getattr(u, f"reinit_{metric}") for u in units]), names,
        list(results.taus), getattr(results.baseline, metric),
        metric.upper() if metric == "wer" else metric, results.step_key,
        out_dir / filename))
  add("rerandomization", "rerandomization.png", plots.rerandomization_bars(
      {n: list(u.rerandomize_wer) for n, u in results.units.items()},
      {n: u.reinit_wer[0] for n, u in results.units.items()},
      results.baseline.wer, out_dir / "rerandomization.png"))
  panels = [(measure, [getattr(u.movement, measure) for u in units])
            for measure in results.correlations]
  add("movement_scatter", "movement_scatter.png", plots.movement_scatter(
      panels, [u.wer_increase for u in units], names,
      out_dir / "movement_scatter.png"))
  if results.stability:
    add("stability_depth", "stability_depth.png", plots.depth_plot(
        results.stability["depth"], "wer_increase",
        out_dir / "stability_depth.png"))
  return figures


def run_analysis(config: ml_collections.ConfigDict,
                 workdir: str | os.PathLike[str]) -> importance_file.Importance:
  """The analysis pass over the run in `workdir` (module docstring).

  Returns:
    The results (also written to workdir/analysis/importance.json).
  """
  analysis = config.analysis
  _validate(analysis)
  run_config = workdir_lib.Workdir(workdir).config()
  model = models.build_model(run_config.model)
  tokenizer = _tokenizer(run_config, workdir)
  saved_steps, trained_step, taus, trained, checkpoints = _read_checkpoints(
      analysis, workdir)
  seeds = [int(run_config.seed) + analysis.rerandomize_seed_offset + i
           for i in range(analysis.num_rerandomize_seeds)]
  fresh_inits = fresh_initializations(model, seeds)
  units = models.list_units(trained["params"], analysis.granularity)
  data_config = data_config_of(run_config, analysis)
  batches = _eval_batches(data_config, analysis, tokenizer)
  variants = resets.make_variants(list(units), taus, seeds)
  get_variables = lambda i: resets.variant_variables(
      variants[i], trained, checkpoints, fresh_inits, units)
  logging.info("Evaluating %d variants (%d units, taus %s, seeds %s) on %d "
               "batches.", len(variants), len(units), taus, seeds, len(batches))
  metrics, seconds = _evaluate_variants(
      model, analysis, tokenizer, batches, variants, units, get_variables)
  summary = summarize(metrics, variants, units, trained["params"], taus, seeds,
                      analysis)
  results = _importance(
      workdir, run_config, analysis, saved_steps=saved_steps,
      trained_step=trained_step, taus=taus, seeds=seeds,
      trained_params=trained["params"], data_config=data_config,
      num_batches=len(batches), summary=summary,
      unit_results=_unit_results(workdir, summary, trained, checkpoints[0],
                                 units, trained_step),
      timing=dict(evaluation_seconds=seconds, num_variants=len(variants),
                  variants_per_call=analysis.variants_per_call,
                  vectorized=bool(analysis.vectorized)))
  results = _with_stability(results, analysis)
  results = _write_and_share(results, workdir)
  logging.info("Analysis of %s: baseline WER %.4f; ambient %s; critical %s;"
               " undetermined %s.", workdir, results.baseline.wer,
               list(results.ambient), list(results.critical),
               list(results.undetermined))
  return results


def _read_checkpoints(analysis: ml_collections.ConfigDict,
                      workdir: str | os.PathLike[str]
                      ) -> tuple[list[int], int, list[int], Any,
                                 dict[int, Any]]:
  """The run's saved steps and the variables of each one the pass needs.

  Args:
    analysis: the analysis config (trained_step, taus).
    workdir: the run.

  Returns:
    (every saved step, the analysed trained step, the re-initialization
    steps taus, the trained variables, {tau: variables}).

  Raises:
    ValueError: step 0, the trained step or a tau was not saved.
  """
  store = checkpointing.CheckpointStore(workdir, read_only=True)
  saved_steps = store.all_steps()
  if 0 not in saved_steps:
    raise ValueError(f"{store.directory} has no step 0 (the initial state); "
                     f"saved: {saved_steps}.")
  trained_step = (saved_steps[-1] if analysis.trained_step < 0
                  else int(analysis.trained_step))
  if trained_step not in saved_steps:
    raise ValueError(f"analysis.trained_step={trained_step} was not saved; "
                     f"saved: {saved_steps}.")
  taus = parse_taus(analysis.taus, saved_steps, trained_step)
  trained = store.restore_variables(trained_step)
  checkpoints = {tau: trained if tau == trained_step
                 else store.restore_variables(tau) for tau in taus}
  return saved_steps, trained_step, taus, trained, checkpoints


def _eval_batches(data_config: ml_collections.ConfigDict,
                  analysis: ml_collections.ConfigDict,
                  tokenizer: tokenizer_lib.Tokenizer) -> list[Any]:
  """The eval batches of `data_config`, the first analysis.eval_max_batches."""
  batches = input_pipeline.get_eval_batches(data_config, tokenizer)
  if analysis.eval_max_batches:
    batches = itertools.islice(batches, analysis.eval_max_batches)
  return list(batches)


def _evaluate_variants(
    model: models.ConformerASR, analysis: ml_collections.ConfigDict,
    tokenizer: tokenizer_lib.Tokenizer, batches: list[Any],
    variants: list[resets.Variant], units: Mapping[str, tuple[str, ...]],
    get_variables: Any) -> tuple[list[dict[str, Any]], float]:
  """Evaluates every variant on `batches` (`variant_eval`).

  Args:
    model: the run's model.
    analysis: the analysis config (vectorized, variants_per_call).
    tokenizer: the run's tokenizer (decodes hypotheses).
    batches: the eval batches.
    variants: the reset variants.
    units: unit name -> path.
    get_variables: i -> the variables of variants[i].

  Returns:
    (the metrics of each variant, aligned with `variants`; wall seconds).

  Raises:
    ValueError: analysis.vectorized=False on several processes.
  """
  tic = time.perf_counter()
  if analysis.vectorized:
    # Variants that reset the front end go in chunks of their own, so that
    # the others share it unbatched (variant_eval.SHAREABLE_PATHS).
    groups = variant_eval.shareable_groups([units.get(v.unit)
                                            for v in variants])
    mesh = mesh_lib.make_client_mesh()
    metrics = variant_eval.evaluate_vectorized(
        variant_eval.make_vectorized_eval_fn(model, mesh), get_variables,
        len(variants), batches, tokenizer.decode, analysis.variants_per_call,
        groups=groups, mesh=mesh)
  else:
    if jax.process_count() > 1:
      raise ValueError("analysis.vectorized=False evaluates on one device of"
                       " one process: run it with one process, or set"
                       " analysis.vectorized=True.")
    metrics = variant_eval.evaluate_one_at_a_time(
        variant_eval.make_single_eval_fn(model), get_variables, len(variants),
        batches, tokenizer.decode)
  return metrics, time.perf_counter() - tic


def _unit_results(workdir: str | os.PathLike[str], summary: dict[str, Any],
                  trained: Any, initial: Any,
                  units: Mapping[str, tuple[str, ...]],
                  trained_step: int) -> dict[str, importance_file.Unit]:
  """Each unit's results: `summary`'s entry and how far the unit moved.

  Args:
    workdir: the run (its metrics.jsonl holds the update norms).
    summary: `summarize`'s result.
    trained: the trained variables.
    initial: the variables of step 0.
    units: unit name -> path.
    trained_step: the analysed step.

  Returns:
    {unit name: importance_file.Unit}.
  """
  moved = movement.unit_movement(trained["params"], initial["params"], units)
  update_sums = movement.read_update_norm_sums(
      workdir_lib.Workdir(workdir).metrics_path, list(units), trained_step)
  return {
      name: importance_file.Unit.from_json(dict(entry, movement=dict(
          moved[name],
          update_norm_sum=update_sums[name] if update_sums else None)))
      for name, entry in summary["units"].items()}


def _importance(workdir: str | os.PathLike[str],
                run_config: ml_collections.ConfigDict,
                analysis: ml_collections.ConfigDict, *,
                saved_steps: list[int], trained_step: int, taus: list[int],
                seeds: list[int], trained_params: Any,
                data_config: ml_collections.ConfigDict, num_batches: int,
                summary: dict[str, Any],
                unit_results: dict[str, importance_file.Unit],
                timing: dict[str, Any]) -> importance_file.Importance:
  """The pass's results (importance.json), without stability or figures.

  The arguments are what `run_analysis` read and measured: `summary` is
  `summarize`'s result, `unit_results` `_unit_results`'s, and `timing` the
  evaluation's wall seconds and how it ran.
  """
  return importance_file.Importance(
      schema_version=importance_file.SCHEMA_VERSION,
      workdir=_absolute(workdir),
      step_key="round" if run_config.mode == "federated" else "step",
      granularity=analysis.granularity,
      trained_step=trained_step,
      checkpoint_steps=tuple(saved_steps),
      taus=tuple(taus),
      rerandomize_seeds=tuple(seeds),
      model=importance_file.ModelInfo(
          num_blocks=run_config.model.num_blocks,
          model_dim=run_config.model.model_dim,
          conv_norm=run_config.model.conv_norm,
          decoder=run_config.model.decoder,
          num_params=_count_params(trained_params)),
      eval=importance_file.EvalInfo(
          split=data_config.eval_split,
          domains=tuple(data_config.eval_domains),
          num_batches=num_batches,
          num_examples=summary["num_examples"]),
      thresholds=importance_file.Thresholds(
          max_abs_wer_increase=analysis.max_abs_wer_increase,
          max_rel_wer_increase=analysis.max_rel_wer_increase,
          rule=analysis.threshold_rule,
          wer_increase=summary["wer_threshold"],
          confidence=analysis.label_confidence,
          bootstrap_samples=analysis.bootstrap_samples),
      baseline=importance_file.Baseline.from_json(summary["baseline"]),
      units=unit_results,
      ambient=tuple(summary["ambient"]),
      critical=tuple(summary["critical"]),
      undetermined=tuple(summary["undetermined"]),
      movement_test=movement_test.primary_movement_test(
          unit_results, analysis.movement_measure,
          num_permutations=analysis.movement_permutations),
      correlations=movement_correlations(unit_results),
      stability=None,
      timing=timing,
  )


def _with_stability(results: importance_file.Importance,
                    analysis: ml_collections.ConfigDict
                    ) -> importance_file.Importance:
  """`results` with its stability across analysis.compare_workdirs, if any."""
  if not analysis.compare_workdirs:
    return results
  others = [importance_file.Importance.read(w)
            for w in analysis.compare_workdirs]
  return dataclasses.replace(results, stability=stability.compare_runs(
      [results] + others,
      [results.workdir] + [_absolute(w) for w in analysis.compare_workdirs]))


def _write_and_share(results: importance_file.Importance,
                     workdir: str | os.PathLike[str]
                     ) -> importance_file.Importance:
  """Process 0 writes workdir/analysis/; every process gets its results.

  Process 0 draws the figures and writes importance.json and report.md; the
  other processes return process 0's results (figures included) once its
  files are written.
  """
  if multihost.is_chief():
    out_dir = workdir_lib.Workdir(workdir).analysis_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results = dataclasses.replace(
        results, figures=_write_figures(results, out_dir))
    results.write(workdir)
    (out_dir / "report.md").write_text(report.render_report(results))
  return importance_file.Importance.from_json(multihost.chief_decides(
      results.to_json() if multihost.is_chief() else None,
      "analysis_results"))
