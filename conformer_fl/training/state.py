"""The training state on disk: restored or started, saved, set aside.

`resume(run, state, form)` restores the newest intact checkpoint of the run's
workdir into the structure of `state` (a fresh run saves `state` as step 0
instead), trims the logs to the restored step and feeds the loss-explosion
guard the losses logged up to it: a resumed run goes on exactly as an
uninterrupted one. The `Checkpoints` it returns saves the later steps and,
when the loss guard trips, sets the exploded checkpoints aside.

`SavedForm` says how a loop's state is written: central training saves its
dict state as it is (`AS_IS`), federated training the state dict of its
`ServerState` (`STATE_DICT`); the choice fixes the checkpoints' tree layout and
leaf names, and so which workdirs a run can resume.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

from absl import logging
import flax

from conformer_fl import multihost
from conformer_fl import workdir as workdir_lib
from conformer_fl.training import divergence
from conformer_fl.training import run_setup

PyTree = Any


@dataclasses.dataclass(frozen=True)
class SavedForm:
  """How a state is saved and read back.

  Attributes:
    to_saved: state -> the pytree saved.
    from_saved: (a state like the saved one, the restored pytree) -> state.
  """

  to_saved: Callable[[PyTree], PyTree]
  from_saved: Callable[[PyTree, PyTree], PyTree]


AS_IS = SavedForm(lambda state: state, lambda like, saved: saved)
STATE_DICT = SavedForm(flax.serialization.to_state_dict,
                       flax.serialization.from_state_dict)


@dataclasses.dataclass
class Checkpoints:
  """A loop's checkpoints and the guards that judge what they hold.

  Attributes:
    run: the open run.
    form: how the state is saved.
    start: the step (round) restored; 0 for a fresh run.
    last_saved: the newest step (round) saved.
    unverified: `start` if it was restored from a checkpoint without
      checksums (`allow_unverified_checkpoints`), else None.
    loss_guard: the loss-explosion guard, fed the logged losses up to `start`.
  """

  run: run_setup.Run
  form: SavedForm
  start: int
  last_saved: int
  unverified: int | None
  loss_guard: divergence.LossExplosionGuard

  def save(self, index: int, state: PyTree) -> None:
    """Saves `state` as step (round) `index`."""
    self.run.store.save(index, self.form.to_saved(state))
    self.last_saved = index

  def stop_exploded(self, mode: str, index: int,
                    fix: str) -> divergence.DivergenceError:
    """The error of a tripped loss guard, once the exploded steps are set aside.

    The loss of step (round) i is that of the state of checkpoint i - 1: the
    checkpoints from the guard's last accepted index on (whose state no
    accepted loss vouches for) are moved to `divergence.DIVERGED_DIR`
    (deleted on GCS).

    Args:
      mode: 'Central training' or 'Federated training'.
      index: the step (round) that tripped the guard.
      fix: the likely fix, e.g. 'try e.g. a lower central.peak_learning_rate'.
    """
    store, guard = self.run.store, self.loss_guard
    exploded = [s for s in store.all_steps()
                if guard.last_accepted is not None and s >= guard.last_accepted]
    moved = ""
    if exploded:
      where = store.set_aside(exploded, divergence.DIVERGED_DIR)
      moved = f"the checkpoints {exploded} {where}; "
    unit = self.run.logger.step_key
    return divergence.DivergenceError(
        guard.message(f"{mode}|{unit}", store.latest_step(), moved, fix,
                      self.unverified), index)


def _loss_guard(run: run_setup.Run,
                start: int) -> divergence.LossExplosionGuard:
  """The loss-explosion guard of `run.config.loss_guard` (factor 0 = off).

  It is fed the losses of metrics.jsonl up to `start` first (process 0 reads
  them, every process gets them), so that a resumed run judges its losses
  against the same history as an uninterrupted one.
  """
  g = run.config.get("loss_guard") or {}
  guard = divergence.LossExplosionGuard(
      g.get("factor", 0.0), g.get("patience", 1), g.get("window", 1))
  history = []
  if guard.factor and multihost.is_chief():
    for record in workdir_lib.Workdir(run.workdir).metrics():
      index = record.get(run.logger.step_key)
      if (isinstance(index, int) and index <= start
          and isinstance(record.get("loss"), float)):
        history.append((index, record["loss"]))
  for index, loss in multihost.chief_decides(history, "loss_history"):
    guard.update(index, loss)
  return guard


def resume(run: run_setup.Run, state: PyTree,
           form: SavedForm) -> tuple[PyTree, Checkpoints]:
  """The state to train from, and the run's `Checkpoints`.

  Restores the newest intact checkpoint into the structure (and shardings)
  of `state`, reporting damaged steps (`CheckpointStore.restore_latest_intact`);
  without any checkpoint, saves `state` as step 0 and returns it. The metrics
  and samples logged after the restored step are dropped.

  Raises:
    checkpointing.CheckpointError: steps were saved but none is intact.
  """
  start, restored = run.store.restore_latest_intact(
      like=form.to_saved(state), report=run_setup.warn)
  if start is None:
    start = 0
    run.store.save(0, form.to_saved(state))
  else:
    logging.info("Resuming from %s %d.", run.logger.step_key, start)
    state = form.from_saved(state, restored)
  run.logger.drop_after(start)
  unverified = start if start in run.store.unverified_steps else None
  return state, Checkpoints(run, form, start, start, unverified,
                            _loss_guard(run, start))
