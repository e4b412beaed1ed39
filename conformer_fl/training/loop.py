"""The training loop of central and federated training.

`train(run, mode, state, checkpoints, cadence)` runs steps (rounds)
`checkpoints.start + 1` to `cadence.total` of `mode.step`, and on the steps the
cadence names (`clu.periodic_actions` triggers; the last step does
everything):
  read        the step's outputs are brought to the host and `mode.read`
              checks them (the divergence guard): on the first step, every
              `read_every` steps, and on every step below;
  log         the training metrics and the throughput (over the steps since
              the previous record, their evaluation left out) go to
              metrics.jsonl;
  eval        the model is evaluated on the eval split (and logged);
  checkpoint  the state is saved.
The loss-explosion guard takes the training loss of the first step and of every
logged or evaluated one; when it trips, the step is logged (not evaluated), the
exploded checkpoints are set aside and the run stops with `DivergenceError`.
A tqdm bar (process 0) shows the progress, the loss and the throughput.

Central and federated training differ only in their `Mode`: the step callable,
what it reads, where the model variables are in the state, and names.
"""

from collections.abc import Callable, Iterable
import dataclasses
import time
from typing import Any

from absl import logging
from clu import periodic_actions
import tqdm

from conformer_fl import evaluation
from conformer_fl import multihost
from conformer_fl.training import run_setup
from conformer_fl.training import state as state_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When the loop acts, in steps (rounds); the last step does everything.

  Attributes:
    total: the last step.
    log_every, eval_every, checkpoint_every: every this many steps.
    read_every: read the step's outputs every this many steps besides
      (None: only on the first step and those that log, evaluate or save).
  """

  total: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  read_every: int | None = None


@dataclasses.dataclass(frozen=True)
class Mode:
  """What a kind of training gives the loop.

  Attributes:
    name: 'central' or 'federated' (the progress bar; messages say
      'Central training').
    step: (state, index) -> (state, outputs): runs step (round) `index`
      (1-based); outputs are device values, read only when the cadence says.
    read: (state, outputs, index, checkpoints) -> the step's training metrics
      as host values; raises `divergence.DivergenceError` when the step was not
      finite (`checkpoints` gives the last saved step for the message).
    variables: state -> (params, model_state), device pytrees.
    explosion_fix: the fix a loss explosion's message suggests.
    rate_name: the throughput metric, e.g. 'steps_per_second'.
    per_step: what the throughput counts per step (1, or the clients of a
      round).
  """

  name: str
  step: Callable[[PyTree, int], tuple[PyTree, PyTree]]
  read: Callable[[PyTree, PyTree, int, state_lib.Checkpoints], dict[str, Any]]
  variables: Callable[[PyTree], tuple[PyTree, PyTree]]
  explosion_fix: str
  rate_name: str
  per_step: int = 1


class _Due(periodic_actions.PeriodicAction):
  """Called after every step: True on the steps of its cadence."""

  def _apply(self, step: int, t: float) -> None:
    del step, t  # The loop acts on the returned flag.


def _due(every: int | None, on_steps: Iterable[int]) -> _Due:
  return _Due(every_steps=every, on_steps=on_steps)


def train(run: run_setup.Run, mode: Mode, state: PyTree,
          checkpoints: state_lib.Checkpoints, cadence: Cadence) -> PyTree:
  """Trains from `checkpoints.start` to `cadence.total` (module docstring).

  Returns:
    The final state.

  Raises:
    divergence.DivergenceError: a step was not finite, or the loss exploded.
  """
  start = checkpoints.start
  log = _due(cadence.log_every, [cadence.total])
  evaluate = _due(cadence.eval_every, [cadence.total])
  save = _due(cadence.checkpoint_every, [cadence.total])
  read = _due(cadence.read_every, [start + 1])
  eval_step = evaluation.jitted_eval_step(run.model)
  eval_batches = run_setup.eval_batches(run)
  rate_label = mode.rate_name.replace("_per_second", "_s")

  progress = tqdm.tqdm(total=cadence.total, initial=start, desc=mode.name,
                       disable=not multihost.is_chief(), dynamic_ncols=True)
  tic, timed_from = time.perf_counter(), start
  try:
    for index in range(start + 1, cadence.total + 1):
      state, outputs = mode.step(state, index)
      progress.update(1)
      # Every trigger sees every step (clu checks it).
      due = dict(log=log(index), evaluate=evaluate(index), save=save(index),
                 read=read(index))
      if not any(due.values()):
        continue
      metrics = mode.read(state, outputs, index, checkpoints)
      metrics[mode.rate_name] = (mode.per_step * (index - timed_from)
                                 / (time.perf_counter() - tic))
      progress.set_postfix({"loss": f"{metrics['loss']:.3f}",
                            rate_label: f"{metrics[mode.rate_name]:.2f}"})
      # An exploded model is logged, not evaluated.
      exploded = ((index == start + 1 or due["log"] or due["evaluate"])
                  and checkpoints.loss_guard.update(index,
                                                    float(metrics["loss"])))
      if due["evaluate"] and not exploded:
        params, model_state = mode.variables(state)
        variables = {"params": run_setup.local_copy(params),
                     **run_setup.local_copy(model_state)}
        metrics.update(run_setup.evaluate(run, eval_step, variables,
                                          eval_batches, index))
        logging.info("%s %d: %s", run.logger.step_key, index,
                     {k: v for k, v in metrics.items()
                      if not k.startswith("update_norm/")})
      written = due["log"] or due["evaluate"] or exploded
      if written:
        run.logger.write(index, metrics)
      if exploded:
        raise checkpoints.stop_exploded(f"{mode.name.capitalize()} training",
                                        index, mode.explosion_fix)
      if due["save"]:
        checkpoints.save(index, state)
      if written:
        # The next record's throughput: the steps after this one, timed from
        # here (this step's evaluation, logging and saving left out).
        tic, timed_from = time.perf_counter(), index
  finally:
    progress.close()
  return state
