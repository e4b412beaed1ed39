"""The set-up of a training run: a run opened in its workdir.

`open_run(config, workdir, step_key)` checks the workdir (a directory whose
config.json allows this config, `conformer_fl.workdir.RESUMABLE_FIELDS`), takes
its lock on process 0, trains (or copies) the tokenizer, sets the model's
vocabulary from it, writes config.json and opens the checkpoint store and the
metrics logger: a `Run`. The other functions are the loop's host-side helpers
(evaluation batches, host copies, evaluation with logged samples).
"""

from collections.abc import Iterator, Sequence
import contextlib
import dataclasses
import os
from typing import Any

from etils import epath
import jax
import ml_collections
import numpy as np

from conformer_fl import checkpointing
from conformer_fl import evaluation
from conformer_fl import metric_logging
from conformer_fl import models
from conformer_fl import multihost
from conformer_fl import workdir as workdir_lib
from conformer_fl.data import input_pipeline
from conformer_fl.data import tokenizer as tokenizer_lib
from conformer_fl.training import divergence

PyTree = Any


@dataclasses.dataclass
class Run:
  """What the loop needs: the resolved config, model, tokenizer and outputs."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  model: models.ConformerASR
  tokenizer: tokenizer_lib.Tokenizer
  store: checkpointing.CheckpointStore
  logger: metric_logging.MetricsLogger


def _tokenizer(config: ml_collections.ConfigDict, workdir: epath.Path,
               init_workdir: str) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, trained (or copied from `init_workdir`) by process 0.

  Raises:
    workdir.WorkdirError: (on every process) the saved tokenizer.model does
      not load.
  """
  saved = workdir / "tokenizer.model"
  if init_workdir and not saved.exists() and multihost.is_chief():
    source = epath.Path(init_workdir) / "tokenizer.model"
    if source.exists():
      source.copy(saved)
  error = None
  if multihost.is_chief():
    try:
      tokenizer = input_pipeline.get_tokenizer(config.data, os.fspath(workdir))
    except tokenizer_lib.TokenizerFileError as e:
      error = workdir_lib.WorkdirError(str(e))
  _raise_on_every_process(error, f"load the tokenizer of {workdir}")
  if not multihost.is_chief():
    tokenizer = input_pipeline.get_tokenizer(config.data, os.fspath(workdir))
  return tokenizer


def _raise_on_every_process(error: Exception | None, what: str) -> None:
  """Raises `error` (process 0's) here, or on the other processes a stand-in."""
  failed = multihost.chief_decides(error is not None, "failed")
  if error is not None:
    raise error
  if failed:
    raise workdir_lib.WorkdirError(f"Process 0 could not {what}; see its log.")


@contextlib.contextmanager
def chief_holds_lock(workdir: str | os.PathLike[str]) -> Iterator[None]:
  """`workdir`'s lock, held by process 0 for the `with` body.

  Raises:
    workdir.WorkdirLockedError: (on every process) another run holds it.
  """
  lock = workdir_lib.WorkdirLock(workdir)
  error = None
  if multihost.is_chief():
    try:
      lock.acquire()
    except workdir_lib.WorkdirError as e:
      error = e
  _raise_on_every_process(error, f"take the lock of {workdir}")
  try:
    yield
  finally:
    lock.release()


def warn(message: str) -> None:
  """`workdir.warn(message)` on process 0."""
  if multihost.is_chief():
    workdir_lib.warn(message)


@contextlib.contextmanager
def open_run(config: ml_collections.ConfigDict, workdir: str, step_key: str,
             init_workdir: str = "") -> Iterator[Run]:
  """The run in `workdir`, its lock held by process 0 until the `with` ends.

  Nothing is written to the workdir until it is known to be a directory whose
  config.json (if any) differs from `config` in resumable fields only, and the
  lock is held. A `DivergenceError` or `CheckpointError` raised in the `with`
  body ends metrics.jsonl with a `stopped` record.

  Args:
    config: the run's config (not resolved; `Run.config` is, with
      model.vocab_size set from the tokenizer).
    workdir: the run's directory.
    step_key: the key of metrics.jsonl's records ('step' or 'round').
    init_workdir: a run whose tokenizer.model this run reuses ('' = none).
  """
  workdir_lib.check_is_directory(workdir)
  workdir_lib.check_config(workdir, config)
  with chief_holds_lock(workdir):
    workdir = epath.Path(workdir)
    if multihost.is_chief():
      workdir.mkdir(parents=True, exist_ok=True)
    multihost.sync("workdir")
    tokenizer = _tokenizer(config, workdir, init_workdir)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      # The decoder's output size is the tokenizer's vocabulary (blank included).
      config.model.vocab_size = tokenizer.vocab_size
    model = models.build_model(config.model)
    if multihost.is_chief():
      workdir_lib.write_atomically(workdir / workdir_lib.CONFIG_FILE,
                                   config.to_json_best_effort(indent=2))
    run = Run(config, workdir, model, tokenizer,
              checkpointing.CheckpointStore(
                  os.fspath(workdir), allow_unverified=bool(config.get(
                      checkpointing.ALLOW_UNVERIFIED_FIELD, False))),
              metric_logging.MetricsLogger(os.fspath(workdir), step_key))
    try:
      yield run
    except (divergence.DivergenceError, checkpointing.CheckpointError) as e:
      step = e.step if e.step is not None else (run.store.latest_step() or 0)
      run.logger.write_stopped(step, str(e))
      raise
    finally:
      run.logger.close()
      run.store.close()


def eval_batches(run: Run,
                 domains: Sequence[str] | None = None
                 ) -> list[dict[str, np.ndarray]]:
  """The eval split as padded batches, read once and kept (small eval sets).

  At most `config.eval_max_batches` batches (0 = all); each a dict of host
  arrays [B, ...] (`input_pipeline.get_eval_batches`).
  """
  batches = list(input_pipeline.get_eval_batches(
      run.config.data, run.tokenizer, domains=domains))
  limit = run.config.eval_max_batches
  return batches[:limit] if limit else batches


def local_copy(tree: PyTree) -> PyTree:
  """Host numpy copy of a replicated pytree (works across processes too)."""
  return jax.tree.map(
      lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
      else np.asarray(x), tree)


def evaluate(run: Run, eval_step: Any, variables: PyTree,
             batches: Sequence[dict[str, np.ndarray]],
             step: int) -> dict[str, float]:
  """{'eval/<metric>': value} of `variables` on `batches`; logs 3 samples.

  The scalar metrics only: the per-utterance lists of the evaluation are
  left out of the metric logs.
  """
  metrics, examples = evaluation.evaluate(
      eval_step, variables, batches, run.tokenizer.decode)
  run.logger.write_samples(step, examples[:3])
  return {f"eval/{k}": v for k, v in metrics.items()
          if not isinstance(v, list)}
