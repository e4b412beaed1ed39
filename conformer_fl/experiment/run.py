"""Runs the experiment's stages; see `conformer_fl.experiment`."""

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any

from etils import epath
import ml_collections

from conformer_fl import checkpointing
from conformer_fl import evaluation
from conformer_fl import models
from conformer_fl import multihost
from conformer_fl.training import run_setup
from conformer_fl import workdir as workdir_lib
from conformer_fl.analysis import importance as importance_lib
from conformer_fl.analysis import importance_file
from conformer_fl.data import corpus as corpus_lib
from conformer_fl.data import input_pipeline
from conformer_fl.experiment import arms as arms_lib
from conformer_fl.experiment import costs as costs_lib
from conformer_fl.experiment import design
from conformer_fl.experiment import engines as engines_lib
from conformer_fl.experiment import halfwidth as halfwidth_lib
from conformer_fl.experiment import report as report_lib
from conformer_fl.experiment import stability_runs
from conformer_fl.experiment import summary as summary_lib

CONFIG_FILE = "experiment_config.json"
# A training function of conformer_fl/train.py: (run config, workdir) -> params.
TrainFn = Callable[[ml_collections.ConfigDict, str], Any]
# Version of the cached final evaluations (3: with the per-utterance errors,
# words and speakers); a cache of another version is computed again.
EVAL_SCHEMA = 3


# The stages of `_run_stages` (the progress banners' [i/NUM_STAGES]).
NUM_STAGES = 7
STAGE_SECONDS_FILE = "stage_seconds.json"
# Client costs of every arm of model 0 (W/), the half-width ranking of each
# pre-trained model (W/pretrain*/analysis/).
COSTS_FILE = "client_costs.json"
HALFWIDTH_FILE = "halfwidth.json"


class _Progress:
  """Stage banners on stdout and the wall time of every stage that ran.

  `timed(name)` measures a stage; the seconds of stages that ran are kept in
  W/stage_seconds.json (merged over runs, so a rerun that reuses a stage
  keeps the time of the run that computed it).
  """

  def __init__(self, num_stages: int, workdir: epath.Path):
    self._num_stages = num_stages
    self._start = time.perf_counter()
    self._path = workdir / STAGE_SECONDS_FILE
    self.seconds = _read_json(self._path)

  def stage(self, index: int, text: str) -> None:
    if multihost.is_chief():
      elapsed = time.perf_counter() - self._start
      print(f"[{index}/{self._num_stages}] {text}  (+{elapsed:.0f} s)",
            flush=True)

  @contextlib.contextmanager
  def timed(self, name: str, record: bool = True) -> Iterator[None]:
    """Records the wall seconds of the `with` body as stage `name`.

    Args:
      name: the stage.
      record: False leaves the recorded time as it is (a stage that only
        reads what an earlier run computed).
    """
    tic = time.perf_counter()
    yield
    if not record:
      return
    self.seconds[name] = time.perf_counter() - tic
    if multihost.is_chief():
      workdir_lib.write_atomically(self._path, json.dumps(self.seconds, indent=2))

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self._start


def check_workdir_config(config: ml_collections.ConfigDict,
                         workdir: epath.Path) -> None:
  """Writes W/experiment_config.json, or checks the config against it.

  The rule of every mode (`conformer_fl.workdir.check_config`) with the
  experiment's list of resumable fields,
  `workdir.EXPERIMENT_RESUMABLE_FIELDS`: only the fields named `data_dir`,
  which say where the corpus is, not what is computed. Stability runs may be
  added or dropped (`workdir.EXPERIMENT_GROWABLE_FIELDS`: a demo's workdir
  grows into the study's); the file is then rewritten with this config.

  Args:
    config: the experiment config.
    workdir: the experiment's workdir W.

  Raises:
    workdir.ConfigChangedError: (a ValueError) the workdir holds an
      experiment with a different config, naming each field and both values.
  """
  workdir_lib.check_is_directory(workdir)
  if workdir_lib.check_config(
      workdir, config, config_file=CONFIG_FILE,
      resumable=workdir_lib.EXPERIMENT_RESUMABLE_FIELDS, derived=(),
      growable=workdir_lib.EXPERIMENT_GROWABLE_FIELDS) and not _grew(
          workdir, config):
    return
  if multihost.is_chief():
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_atomically(workdir / CONFIG_FILE, json.dumps(
        workdir_lib.config_as_json(config), indent=2))


def _grew(workdir: epath.Path, config: ml_collections.ConfigDict) -> bool:
  """Whether `config` adds or drops stability runs of W/experiment_config.json."""
  saved = _read_json(workdir / CONFIG_FILE)
  given = workdir_lib.config_as_json(config)
  # The growable fields are those `unmatched_fields` leaves out for them.
  return workdir_lib.unmatched_fields(saved, given) != (
      workdir_lib.unmatched_fields(
          saved, given, workdir_lib.EXPERIMENT_GROWABLE_FIELDS))


def evaluate_checkpoint(
    workdir: epath.Path, split: str, *, step: int | None = None,
    data_config: ml_collections.ConfigDict | None = None,
    domains: tuple[str, ...] | None = None) -> dict[str, float]:
  """WER and loss of a run's checkpoint on one split, over all its batches.

  Args:
    workdir: a central or federated run (config.json, tokenizer, checkpoints).
    split: e.g. 'test'.
    step: the checkpoint (None = the latest).
    data_config: where the examples come from (None = the run's own
      config.data); the run's tokenizer is used either way.
    domains: eval domains (None = data_config.eval_domains).

  Returns:
    {'wer', 'cer', 'wer_low', 'wer_high', 'loss', 'num_examples', 'step',
     'split', 'references': [str], 'hypotheses': [str]} (the transcripts in
    the split's order, for paired comparisons and samples in the report).
  """
  run_config = workdir_lib.Workdir(workdir).config()
  data_config = data_config or run_config.data
  domains = tuple(data_config.eval_domains) if domains is None else domains
  tokenizer = input_pipeline.get_tokenizer(run_config.data, os.fspath(workdir))
  model = models.build_model(run_config.model)
  store = checkpointing.CheckpointStore(os.fspath(workdir), read_only=True)
  try:
    step = store.latest_step() if step is None else step
    variables = store.restore_variables(step)
  finally:
    store.close()
  batches = input_pipeline.get_eval_batches(data_config, tokenizer,
                                            split=split, domains=domains)
  metrics, examples = evaluation.evaluate(
      evaluation.jitted_eval_step(model), variables, batches,
      tokenizer.decode)
  return {**metrics, "step": step, "split": split,
          "references": [r for r, _ in examples],
          "hypotheses": [h for _, h in examples]}


def _cached(path: epath.Path, key: dict[str, Any],
            compute: Callable[[], dict[str, Any]],
            chief_computes: bool = False) -> dict[str, Any]:
  """compute(), kept in `path` and reused while `key` (a dict) is the same.

  Process 0 decides whether the saved value is reused and hands it over, so
  every process computes, or none. `chief_computes`: process 0 alone computes
  (host-side work: the others would repeat it) and hands the value over.
  """
  key = json.loads(json.dumps(key))
  saved = _read_json(path) if multihost.is_chief() else {}
  value = multihost.chief_decides(
      saved["value"] if saved.get("key") == key else None, f"cached/{path.name}")
  if value is not None:
    return value
  if chief_computes:
    value = multihost.chief_decides(
        compute() if multihost.is_chief() else None, f"computed/{path.name}")
  else:
    value = compute()
  if multihost.is_chief():
    workdir_lib.write_atomically(path, json.dumps({"key": key, "value": value},
                                                  indent=2))
  return value


def _done(done_by_the_files: bool) -> bool:
  """Process 0's answer to "is this stage done?", on every process.

  Each process reads the same files, but at different times: process 0 may
  have written a stage's last file before another process looks.
  """
  return multihost.chief_decides(bool(done_by_the_files), "stage_done")


def _read_json(path: epath.Path) -> dict[str, Any]:
  """The JSON object in `path`; {} if there is none or it is torn."""
  if not path.exists():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    return {}  # A write cut short.


def _pretrain_config(config: ml_collections.ConfigDict,
                     model: int) -> ml_collections.ConfigDict:
  run_config = config.pretrain.copy_and_resolve_references()
  with run_config.unlocked():
    run_config.seed = int(config.pretrain_seeds[model])
  return run_config


def _adapt_config(config: ml_collections.ConfigDict, run: design.Run,
                  dropout_config: ml_collections.ConfigDict,
                  init_dir: epath.Path) -> ml_collections.ConfigDict:
  run_config = config.adapt.copy_and_resolve_references()
  with run_config.unlocked():
    run_config.seed = run.seed
    run_config.federated.init_workdir = os.fspath(init_dir)
    run_config.federated.dropout = dropout_config
    run_config.federated.client_optimizer.learning_rate = run.lr
  return run_config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the experiment's own fields before any work.

  Raises:
    ValueError: naming the bad field.
  """
  unknown = sorted(set(config.arms) - set(arms_lib.BASE_ARMS))
  if not config.arms or unknown or "full" not in config.arms:
    raise ValueError(f"config.arms={tuple(config.arms)}: expected 'full' and"
                     f" others of {arms_lib.BASE_ARMS}.")
  design.validate(config.comparison, config.pretrain_seeds)
  if config.analysis.analysis.granularity != "module":
    raise ValueError("config.analysis.analysis.granularity must be 'module':"
                     " the arms read each droppable module's label.")
  for stage, mode in (("pretrain", "central"), ("analysis", "analysis"),
                      ("adapt", "federated")):
    if config[stage].mode != mode:
      raise ValueError(f"config.{stage}.mode={config[stage].mode!r}; the"
                       f" experiment runs it as {mode!r}.")


def run_experiment(config: ml_collections.ConfigDict, workdir: str, *,
                   train_central: TrainFn,
                   train_federated: TrainFn) -> dict[str, Any]:
  """Runs every stage (module docstring) and returns the summary.

  Args:
    config: the experiment config (configs/experiment.py).
    workdir: the experiment's directory W.
    train_central: the central loop that pre-trains (`train.train_central`;
      `conformer_fl/main.py` passes it).
    train_federated: the federated loop of every run (`train.train_federated`).
  """
  workdir = epath.Path(workdir)
  validate_config(config)
  workdir_lib.check_is_directory(workdir)
  # Checked before the lock, whose file would be the first write.
  workdir_lib.check_config(
      workdir, config, config_file=CONFIG_FILE,
      resumable=workdir_lib.EXPERIMENT_RESUMABLE_FIELDS, derived=(),
      growable=workdir_lib.EXPERIMENT_GROWABLE_FIELDS)
  with run_setup.chief_holds_lock(workdir):
    # Writes experiment_config.json when new, or grown by stability runs.
    check_workdir_config(config, workdir)
    return _run_stages(config, workdir, train_central, train_federated)


def _last_dev_wer(run_dir: epath.Path) -> float:
  """The last dev WER a federated run logged."""
  rows = [r for r in summary_lib.read_metrics(run_dir) if "eval/wer" in r]
  if not rows:
    raise ValueError(f"{run_dir} logged no dev WER: set"
                     " adapt.federated.eval_every <= adapt.federated.rounds.")
  return float(rows[-1]["eval/wer"])


def _spec_key(spec: arms_lib.ArmSpec) -> str:
  return f"{design.level_name(spec.level)}/{spec.arm}"


@dataclasses.dataclass(frozen=True)
class _Pretrained:
  """What stages 2-3 give of one pre-trained model.

  Attributes:
    specs: its ArmSpecs (`arms.arm_specs`), absent arms (with a note)
      included.
    importance: its importance.json.
    halfwidth: its `halfwidth.evaluate_half_width` result.
    cost_model: its `arms.CostModel`.
    params: its trained params.
    model_state: its trained model state (batch statistics).
  """
  specs: list[arms_lib.ArmSpec]
  importance: importance_file.Importance
  halfwidth: dict[str, Any]
  cost_model: arms_lib.CostModel
  params: Any
  model_state: Any

  @property
  def present(self) -> list[arms_lib.ArmSpec]:
    """The specs of the arms that run (those without a note)."""
    return [s for s in self.specs if not s.note]


# (run) -> None: trains one federated run of the design, or reuses it.
AdaptFn = Callable[[design.Run], None]


def _run_stages(config: ml_collections.ConfigDict, workdir: epath.Path,
                train_central: TrainFn,
                train_federated: TrainFn) -> dict[str, Any]:
  """The stages of `run_experiment`, its workdir checked and locked.

  1 the corpus, 2-3 each pre-trained model and its analysis, 4 the
  learning-rate grid, 5 the final federated runs, 6 the held-out engine and
  stability runs, 7 the summary's own evaluations, then the report.
  """
  progress = _Progress(NUM_STAGES, workdir)
  _prepare_corpus(config, progress)
  pretrained = [
      _pretrain_and_analyse(config, workdir, progress, model, train_central)
      for model in range(len(config.pretrain_seeds))]
  present = [p.present for p in pretrained]
  by_key = [{_spec_key(s): s for s in specs} for specs in present]
  pairs = [[(s.arm, s.level) for s in specs] for specs in present]
  adapt = functools.partial(_adapt, config, workdir, progress,
                            train_federated, by_key)
  grid_dev_wer, picks = _tune_learning_rates(config, workdir, progress,
                                             pairs[0], adapt)
  final, results = _final_runs(config, workdir, pairs, picks, adapt)
  engines, stability = _held_out_stages(config, workdir, progress,
                                        train_central)
  costs, not_adapted, dev_evals = _summary_evaluations(
      config, workdir, progress, final, pretrained[0])
  summary = summary_lib.build_summary(
      config, workdir, specs_by_model=[p.specs for p in pretrained],
      cost_models=[p.cost_model for p in pretrained],
      analyses=[p.importance for p in pretrained],
      halfwidths=[p.halfwidth for p in pretrained], costs=costs,
      results=results, grid_dev_wer=grid_dev_wer, picks=picks,
      not_adapted=not_adapted, dev_evals=dev_evals,
      stage_seconds=progress.seconds, stability=stability, engines=engines,
      corpus=corpus_lib.read_card(
          config.pretrain.data.copy_and_resolve_references()))
  _write_report(summary, workdir, progress)
  return summary


def _prepare_corpus(config: ml_collections.ConfigDict,
                    progress: _Progress) -> None:
  """Stage 1: builds the corpus of config.adapt.data when it is missing.

  A corpus prepared as tfrecord is refused here, not after pre-training (the
  federated clients read records by index).
  """
  progress.stage(1, f"corpus: {config.pretrain.data.dataset}"
                    f"/{config.pretrain.data.builder_config}")
  with progress.timed("corpus", record=not multihost.chief_decides(
      corpus_lib.is_prepared(config.pretrain.data), "corpus_stage_prepared")):
    corpus_lib.ensure_prepared(config.adapt.data, random_access=True)


def _pretrain_and_analyse(config: ml_collections.ConfigDict,
                          workdir: epath.Path, progress: _Progress,
                          model: int, train_central: TrainFn) -> _Pretrained:
  """Stages 2-3 of pre-trained model `model` (an index of pretrain_seeds).

  Pre-trains W/pretrain* (`design.pretrain_dir`), runs the analysis pass and
  the half-width ranking on it, and derives its arms; each step reuses what
  an earlier run of the same config wrote.

  Returns:
    The model's arms, analysis, half-width ranking, cost model and trained
    variables.
  """
  steps = config.pretrain.central.num_steps
  seed = int(config.pretrain_seeds[model])
  model_dir = design.pretrain_dir(workdir, model)
  name = f"model {model} (seed {config.pretrain_seeds[model]})"
  _pretrain(config, progress, model, model_dir, name, train_central)
  importance = _analyse(config, progress, model, model_dir, name)
  store = checkpointing.CheckpointStore(os.fspath(model_dir), read_only=True)
  try:
    trained = store.restore_variables(steps)
  finally:
    store.close()
  params, model_state = models.split_variables(trained)
  halfwidth = _half_width(config, progress, model, model_dir, name, trained)
  pretrained = workdir_lib.Workdir(model_dir).config()
  cost_model = arms_lib.cost_model(
      params, models.droppable_modules_from_config(pretrained.model))
  c = config.comparison
  specs = arms_lib.arm_specs(
      cost_model, importance, tuple(config.arms), tuple(c.levels),
      unit_kinds=tuple(config.adapt.federated.dropout.unit_kinds),
      max_rate=c.max_rate, random_draws=c.random_draws, seed=seed)
  return _Pretrained(specs=specs, importance=importance, halfwidth=halfwidth,
                     cost_model=cost_model, params=params,
                     model_state=model_state)


def _pretrain(config: ml_collections.ConfigDict, progress: _Progress,
              model: int, model_dir: epath.Path, name: str,
              train_central: TrainFn) -> None:
  """Stage 2: pre-trains `model` in `model_dir`, unless it is done there.

  Args:
    config: the experiment config.
    progress: the stage banners and timer.
    model: the index of the model's seed in config.pretrain_seeds.
    model_dir: its workdir (`design.pretrain_dir`).
    name: its name in the banners.
    train_central: the central loop.
  """
  steps = config.pretrain.central.num_steps
  if _done(checkpointing.latest_saved_step(model_dir) == steps):
    progress.stage(2, f"pre-training {name}: done ({steps} steps), reused")
    return
  progress.stage(2, f"pre-training {name}: {steps} central steps ->"
                    f" {model_dir}")
  with progress.timed(f"pretrain/model_{model}"):
    train_central(_pretrain_config(config, model), os.fspath(model_dir))


def _analyse(config: ml_collections.ConfigDict, progress: _Progress,
             model: int, model_dir: epath.Path,
             name: str) -> importance_file.Importance:
  """Stage 3: the analysis pass over `model_dir`, unless done at its step.

  Args: as `_pretrain`'s.

  Returns:
    The model's importance.json.
  """
  steps = config.pretrain.central.num_steps
  if _done(importance_file.Importance.exists(model_dir) and
           importance_file.Importance.read(model_dir).trained_step == steps):
    progress.stage(3, f"analysis {name}: done, reused")
  else:
    progress.stage(3, f"analysis {name}: resetting each unit")
    with progress.timed(f"analysis/model_{model}"):
      importance_lib.run_analysis(config.analysis, os.fspath(model_dir))
  return importance_file.Importance.read(model_dir)


def _half_width(config: ml_collections.ConfigDict, progress: _Progress,
                model: int, model_dir: epath.Path, name: str,
                trained: Any) -> dict[str, Any]:
  """Stage 3: the half-width ranking of `model`, cached in its analysis dir.

  Args: as `_pretrain`'s, and `trained`, the model's trained variables.

  Returns:
    `halfwidth.evaluate_half_width`'s result (W/pretrain*/analysis/
    halfwidth.json).
  """
  c = config.comparison
  steps = config.pretrain.central.num_steps
  seed = int(config.pretrain_seeds[model])
  halfwidth_path = (workdir_lib.Workdir(model_dir).analysis_dir /
                    HALFWIDTH_FILE)
  with progress.timed(f"halfwidth/model_{model}", record=not _done(
      halfwidth_path.exists())):
    progress.stage(3, f"half-width ranking {name}")
    return _cached(
        halfwidth_path, {"draws": c.halfwidth_draws, "step": steps,
                         "seed": seed},
        lambda: halfwidth_lib.evaluate_half_width(
            os.fspath(model_dir), config.analysis.analysis,
            c.halfwidth_draws, seed, trained),
        chief_computes=True)


def _adapt(config: ml_collections.ConfigDict, workdir: epath.Path,
           progress: _Progress, train_federated: TrainFn,
           by_key: list[dict[str, arms_lib.ArmSpec]], run: design.Run) -> None:
  """Stages 4-5: trains the federated `run`, unless it is done.

  Args:
    config: the experiment config.
    workdir: W.
    progress: the stage banners and timer.
    train_federated: the federated loop.
    by_key: each model's {`_spec_key`: ArmSpec} of the arms that run.
    run: the run of the design (`design.Run`).
  """
  spec = by_key[run.model][f"{design.level_name(run.level)}/{run.arm}"]
  run_dir = run.path(workdir)
  rounds = config.adapt.federated.rounds
  label = (f"{run.arm} {design.level_name(run.level)} model {run.model}"
           f" seed {run.seed} lr {run.lr:g}")
  if _done(checkpointing.latest_saved_step(run_dir) == rounds):
    progress.stage(5, f"adapt {label}: done, reused")
    return
  progress.stage(5, f"adapt {label}: {rounds} rounds -> {run_dir}")
  with progress.timed(os.fspath(run_dir.relative_to(workdir))):
    train_federated(_adapt_config(config, run, arms_lib.dropout_config(spec),
                                  design.pretrain_dir(workdir, run.model)),
                    os.fspath(run_dir))


def _tune_learning_rates(
    config: ml_collections.ConfigDict, workdir: epath.Path,
    progress: _Progress, pairs: list[tuple[str, float | None]],
    adapt: AdaptFn) -> tuple[dict[design.Run, float], dict[str, float]]:
  """Stage 4: the learning-rate grid of model 0's arms.

  Args:
    config: the experiment config.
    workdir: W.
    progress: the stage banners and timer.
    pairs: model 0's (arm, level) that run.
    adapt: trains one run (`_adapt`).

  Returns:
    ({tuning Run: its last dev WER}, {arm: picked client learning rate}).
  """
  c = config.comparison
  tuning = design.tuning_runs(pairs, c.verdict_level, tuple(c.lr_grid),
                              int(c.verdict_seeds[0]))
  progress.stage(4, f"learning-rate grid: {len(tuning)} runs"
                    if tuning else "learning-rate grid: one rate, no tuning")
  for run in tuning:
    adapt(run)
  grid_dev_wer = {run: _last_dev_wer(run.path(workdir)) for run in tuning}
  picks = design.pick_learning_rates(grid_dev_wer, tuple(c.lr_grid))
  return grid_dev_wer, picks


def _final_runs(config: ml_collections.ConfigDict, workdir: epath.Path,
                pairs: list[list[tuple[str, float | None]]],
                picks: dict[str, float], adapt: AdaptFn
                ) -> tuple[list[design.Run], dict[design.Run, dict[str, Any]]]:
  """Stage 5: trains every final run and evaluates it on the final split.

  Args:
    config: the experiment config.
    workdir: W.
    pairs: each model's (arm, level) that run.
    picks: {arm: client learning rate} (`_tune_learning_rates`).
    adapt: trains one run (`_adapt`).

  Returns:
    (the final runs in order, {Run: `evaluate_checkpoint` result}), the
    evaluations cached in each run's final-eval file.
  """
  c = config.comparison
  final = design.final_runs(pairs, c.verdict_level, tuple(c.verdict_seeds),
                            tuple(c.control_seeds), tuple(c.level_seeds),
                            tuple(c.lr_grid), picks)
  results = {}
  for run in final:
    adapt(run)
    run_dir = run.path(workdir)
    split = config.final_eval_split
    results[run] = _cached(
        workdir_lib.Workdir(run_dir).final_eval_path,
        {"split": split, "round": checkpointing.latest_saved_step(run_dir),
         "schema": EVAL_SCHEMA},
        lambda run_dir=run_dir: evaluate_checkpoint(run_dir, split))
  return final, results


def _evaluate_cached(run_dir: epath.Path, split: str, *,
                     data_config: ml_collections.ConfigDict, step: int,
                     name: str) -> dict[str, Any]:
  """`evaluate_checkpoint`, cached in run_dir/eval_{name}.json."""
  return _cached(
      run_dir / f"eval_{name}.json",
      {"split": split, "step": step, "schema": EVAL_SCHEMA,
       "engines": list(data_config.eval_engines)},
      lambda: evaluate_checkpoint(run_dir, split, step=step,
                                  data_config=data_config))


def _held_out_stages(config: ml_collections.ConfigDict, workdir: epath.Path,
                     progress: _Progress, train_central: TrainFn
                     ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
  """Stage 6: the leave-one-engine-out model and the stability runs.

  Returns:
    (`engines.run_stage`'s result, `stability_runs.run_stage`'s result or
    None when config.stability.runs is empty).
  """
  engines = engines_lib.run_stage(
      config, workdir, train_central=train_central, evaluate=_evaluate_cached,
      timed=progress.timed, announce=lambda text: progress.stage(6, text))
  stability = None
  if config.stability.runs:
    stability = stability_runs.run_stage(
        config, workdir, train_central=train_central, timed=progress.timed,
        announce=lambda text: progress.stage(6, text))
  return engines, stability


def _summary_evaluations(
    config: ml_collections.ConfigDict, workdir: epath.Path,
    progress: _Progress, final: list[design.Run], model_0: _Pretrained
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
  """Stage 7: what the summary needs besides the runs, each cached.

  Args:
    config: the experiment config.
    workdir: W.
    progress: the stage banners and timer.
    final: the final runs (the first gives the adaptation config).
    model_0: pre-trained model 0, whose arms' client costs are measured.

  Returns:
    ({arm key: client step cost} of model 0 (W/client_costs.json), each
    model's evaluation not adapted on the final split, each model's
    evaluation on its own dev split).
  """
  progress.stage(7, "summary: client costs, not-adapted evaluations, verdict,"
                    " report")
  with progress.timed("summary", record=not _done(
      (workdir / COSTS_FILE).exists())):
    adapt_run = workdir_lib.Workdir(final[0].path(workdir)).config()
    costs = _client_costs(config, workdir, adapt_run, model_0)
    not_adapted, dev_evals = [], []
    for model in range(len(config.pretrain_seeds)):
      model_not_adapted, dev_eval = _pretrained_evaluations(
          config, workdir, adapt_run, model)
      not_adapted.append(model_not_adapted)
      dev_evals.append(dev_eval)
  return costs, not_adapted, dev_evals


def _client_costs(config: ml_collections.ConfigDict, workdir: epath.Path,
                  adapt_run: ml_collections.ConfigDict,
                  model_0: _Pretrained) -> dict[str, Any]:
  """The measured client step cost of each arm of model 0, cached.

  Args:
    config: the experiment config.
    workdir: W.
    adapt_run: the config of a final federated run.
    model_0: pre-trained model 0.

  Returns:
    {arm key: `costs.arm_costs` entry with its 'batch_shape'}
    (W/client_costs.json).
  """
  c = config.comparison
  present = model_0.present

  def client_costs():
    tokenizer = input_pipeline.get_tokenizer(
        adapt_run.data, os.fspath(design.pretrain_dir(workdir, 0)))
    batch = costs_lib.first_round_step_batch(adapt_run, tokenizer)
    measured = costs_lib.arm_costs(
        adapt_run, {_spec_key(s): arms_lib.dropout_config(s)
                    for s in present}, model_0.params, model_0.model_state,
        batch, repeats=c.timing_repeats)
    return {key: {**cost, "batch_shape": list(batch["audio"].shape)}
            for key, cost in measured.items()}

  return _cached(workdir / COSTS_FILE,
                 {"repeats": c.timing_repeats,
                  **{_spec_key(s): s.dropout for s in present}},
                 client_costs, chief_computes=True)


def _pretrained_evaluations(
    config: ml_collections.ConfigDict, workdir: epath.Path,
    adapt_run: ml_collections.ConfigDict, model: int
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Pre-trained `model`'s evaluations, cached in its workdir.

  Returns:
    (the model, not adapted, on the adaptation domain's final split
    (not_adapted_eval.json); the model on the dev split of its own domain
    (dev_eval.json)).
  """
  steps = config.pretrain.central.num_steps
  model_dir = design.pretrain_dir(workdir, model)
  not_adapted = _cached(
      model_dir / "not_adapted_eval.json",
      {"split": config.final_eval_split, "step": steps,
       "schema": EVAL_SCHEMA},
      lambda: evaluate_checkpoint(
          model_dir, config.final_eval_split, step=steps,
          data_config=adapt_run.data))
  dev_eval = _cached(
      model_dir / "dev_eval.json", {"split": "dev", "step": steps,
                                    "schema": EVAL_SCHEMA},
      lambda: evaluate_checkpoint(model_dir, "dev", step=steps))
  return not_adapted, dev_eval


def _write_report(summary: dict[str, Any], workdir: epath.Path,
                  progress: _Progress) -> None:
  """Process 0 writes W/report.md from `summary` and prints its path."""
  if multihost.is_chief():
    report_lib.write_report(summary, workdir)
    print(f"Report: {workdir / 'report.md'}  ({progress.elapsed:.0f} s)",
          flush=True)
