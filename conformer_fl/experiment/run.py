"""Runs the experiment's stages; see `conformer_fl.experiment`."""

from collections.abc import Callable, Iterator
import contextlib
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
from conformer_fl import run_setup
from conformer_fl import workdir as workdir_lib
from conformer_fl.analysis import importance as importance_lib
from conformer_fl.data import input_pipeline
from conformer_fl.experiment import arms as arms_lib
from conformer_fl.experiment import costs as costs_lib
from conformer_fl.experiment import stability_runs
from conformer_fl.experiment import summary as summary_lib

CONFIG_FILE = "experiment_config.json"
# A training loop of conformer_fl/train.py: (run config, workdir) -> params.
TrainFn = Callable[[ml_collections.ConfigDict, str], Any]
# Version of the cached final evaluations (2: with CER, the WER interval and
# the transcripts); a cache of another version is computed again.
EVAL_SCHEMA = 2


STAGE_SECONDS_FILE = "stage_seconds.json"


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


def corpus_is_built(data_config: ml_collections.ConfigDict) -> bool:
  """Whether the local corpus of `data_config` is prepared (True if not local)."""
  if data_config.dataset != "synthetic_speech":
    return True
  from conformer_fl.data import synthetic_speech  # pylint: disable=g-import-not-at-top
  return synthetic_speech.SyntheticSpeech(
      config=data_config.builder_config,
      data_dir=data_config.data_dir or None).is_prepared()


def build_corpus(data_config: ml_collections.ConfigDict) -> None:
  """Synthesizes the local corpus of `data_config` unless it is built."""
  if data_config.dataset != "synthetic_speech":
    return
  from conformer_fl.data import synthetic_speech  # pylint: disable=g-import-not-at-top
  synthetic_speech.build(data_config.builder_config,
                         data_config.data_dir or None)


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
  run_config = importance_lib.load_run_config(workdir)
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
    return {}  # A write cut short (the files are written atomically now).


def _adapt_config(config: ml_collections.ConfigDict,
                  dropout_config: ml_collections.ConfigDict,
                  seed: int, pretrain_dir: epath.Path
                  ) -> ml_collections.ConfigDict:
  run_config = config.adapt.copy_and_resolve_references()
  with run_config.unlocked():
    run_config.seed = seed
    run_config.federated.init_workdir = os.fspath(pretrain_dir)
    run_config.federated.dropout = dropout_config
  return run_config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the experiment's own fields before any work.

  Raises:
    ValueError: naming the bad field.
  """
  if not config.arms or set(config.arms) - set(arms_lib.ARMS):
    raise ValueError(f"config.arms={tuple(config.arms)}: expected some of"
                     f" {arms_lib.ARMS}.")
  if not config.seeds:
    raise ValueError("config.seeds is empty: give at least one federated seed.")
  if config.targeting.rule not in arms_lib.TARGETING_RULES:
    raise ValueError(f"config.targeting.rule={config.targeting.rule!r}; expected"
                     f" one of {arms_lib.TARGETING_RULES}.")
  if config.targeting.metric not in arms_lib.TARGETING_METRICS:
    raise ValueError(f"config.targeting.metric={config.targeting.metric!r};"
                     f" expected one of {arms_lib.TARGETING_METRICS}.")
  for field in ("targeted_rate", "other_rate"):
    rate = config.targeting[field]
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"config.targeting.{field}={rate}: must be in [0, 1).")
  if config.targeting.rule == "rank":
    granularity = config.analysis.analysis.granularity
    kinds = set(config.adapt.federated.dropout.unit_kinds)
    per_block = 1 if granularity == "block" else sum(
        kind in kinds for kind in arms_lib.MODULE_KINDS.values())
    most = config.pretrain.model.num_blocks * per_block
    if not 1 <= config.targeting.num_units <= most:
      raise ValueError(
          f"config.targeting.num_units={config.targeting.num_units}: expected 1"
          f" to {most} ({granularity} units that hold droppable layers).")
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
    train_federated: the federated loop of every arm and seed
      (`train.train_federated`).
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


def _run_stages(config: ml_collections.ConfigDict, workdir: epath.Path,
                train_central: TrainFn,
                train_federated: TrainFn) -> dict[str, Any]:
  """The stages of `run_experiment`, its workdir checked and locked."""
  num_stages = 6 if config.stability.runs else 5
  progress = _Progress(num_stages, workdir)
  pretrain_dir = workdir / "pretrain"

  progress.stage(1, f"corpus: {config.pretrain.data.dataset}"
                    f"/{config.pretrain.data.builder_config}")
  if not multihost.chief_decides(corpus_is_built(config.pretrain.data),
                                 "corpus_built"):
    with progress.timed("corpus"):
      if multihost.is_chief():
        build_corpus(config.pretrain.data)
      multihost.sync("corpus")  # The others wait for process 0 to build it.
  # The federated clients read the corpus by record index: a corpus prepared
  # as tfrecord (by an older version) is refused now, not after pre-training.
  input_pipeline.open_record_source(config.adapt.data,
                                    config.adapt.data.train_split)

  steps = config.pretrain.central.num_steps
  if _done(checkpointing.latest_saved_step(pretrain_dir) == steps):
    progress.stage(2, f"pre-training: done ({steps} steps), reused")
  else:
    progress.stage(2, f"pre-training: {steps} central steps -> {pretrain_dir}")
    with progress.timed("pretrain"):
      train_central(config.pretrain, os.fspath(pretrain_dir))

  importance_path = (pretrain_dir / importance_lib.OUTPUT_DIR /
                     importance_lib.IMPORTANCE_FILE)
  if _done(importance_path.exists() and
           importance_lib.load_importance(pretrain_dir)["trained_step"] == steps):
    progress.stage(3, "analysis: done, reused")
  else:
    progress.stage(3, "analysis: resetting each unit of the pre-trained model")
    with progress.timed("analysis"):
      importance_lib.run_analysis(config.analysis, os.fspath(pretrain_dir))
  importance = importance_lib.load_importance(pretrain_dir)

  pretrained = importance_lib.load_run_config(pretrain_dir)
  store = checkpointing.CheckpointStore(os.fspath(pretrain_dir), read_only=True)
  try:
    params, model_state = models.split_variables(
        store.restore_variables(steps))
  finally:
    store.close()
  kinds = tuple(config.adapt.federated.dropout.unit_kinds)
  targets = arms_lib.targeted_units(importance, config.targeting, kinds)
  if not targets:
    raise ValueError(
        f"targeting.rule={config.targeting.rule!r} found no unit to target"
        f" (ambient: {importance['ambient']}); use targeting.rule='rank' in a"
        f" new workdir (copy {pretrain_dir} into it to reuse the pre-training).")
  arm_dropouts = arms_lib.arm_dropout_configs(
      tuple(config.arms), targets, config.targeting,
      config.adapt.federated.dropout, params, model_state, pretrained.model)

  rounds = config.adapt.federated.rounds
  results = {}
  for arm, dropout_config in arm_dropouts.items():
    for seed in config.seeds:
      run_dir = workdir / "arms" / arm / f"seed_{seed}"
      if _done(checkpointing.latest_saved_step(run_dir) == rounds):
        progress.stage(4, f"adapt {arm} seed {seed}: done, reused")
      else:
        progress.stage(4, f"adapt {arm} seed {seed}: {rounds} federated rounds"
                          f" -> {run_dir}")
        with progress.timed(f"adapt/{arm}/seed_{seed}"):
          train_federated(
              _adapt_config(config, dropout_config, seed, pretrain_dir),
              os.fspath(run_dir))
      split = config.final_eval_split
      results[(arm, seed)] = _cached(
          run_dir / "final_eval.json",
          {"split": split, "round": checkpointing.latest_saved_step(run_dir),
           "schema": EVAL_SCHEMA},
          lambda: evaluate_checkpoint(run_dir, split))

  stability = None
  if config.stability.runs:
    stability = stability_runs.run_stage(
        config, workdir, train_central=train_central, timed=progress.timed,
        announce=lambda text: progress.stage(5, text))

  progress.stage(num_stages, "summary: client cost of each arm, final"
                             " evaluations, table, figures")
  # The final evaluations and costs are cached: a rerun keeps the time of
  # the run that computed them.
  with progress.timed("summary", record=not _done(
      (workdir / "client_costs.json").exists())):
    adapt_run = importance_lib.load_run_config(
        workdir / "arms" / config.arms[0] / f"seed_{config.seeds[0]}")

    def client_costs():
      tokenizer = input_pipeline.get_tokenizer(adapt_run.data,
                                               os.fspath(pretrain_dir))
      batch = costs_lib.first_round_step_batch(adapt_run, tokenizer)
      costs = costs_lib.arm_costs(adapt_run, arm_dropouts, params, model_state,
                                  batch)
      return {arm: {**cost, "batch_shape": list(batch["audio"].shape)}
              for arm, cost in costs.items()}

    costs = _cached(workdir / "client_costs.json",
                    {arm: d.to_dict() for arm, d in arm_dropouts.items()},
                    client_costs, chief_computes=True)
    # The pre-trained model, not adapted, on the adaptation domain.
    pretrained_eval = _cached(
        workdir / "pretrained_eval.json",
        {"split": config.final_eval_split, "step": steps,
         "schema": EVAL_SCHEMA},
        lambda: evaluate_checkpoint(pretrain_dir, config.final_eval_split,
                                    step=steps, data_config=adapt_run.data))
    # The pre-trained model on the dev split of its own domain, every utterance.
    pretrain_dev_eval = _cached(
        workdir / "pretrain_dev_eval.json", {"split": "dev", "step": steps,
                                               "schema": EVAL_SCHEMA},
        lambda: evaluate_checkpoint(pretrain_dir, "dev", step=steps))
  summary = summary_lib.build_summary(
      config, workdir, importance, targets, arm_dropouts, costs, results,
      pretrained_eval, pretrain_dev_eval, progress.seconds, stability)
  if multihost.is_chief():
    summary_lib.write_report(summary, workdir)
    print(f"Report: {workdir / 'report.md'}  ({progress.elapsed:.0f} s)",
          flush=True)
  return summary
