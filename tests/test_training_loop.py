"""The shared training loop (conformer_fl/training/loop.py) on a counter state.

The state is {'w': f32[], 'step': i32[]}; step i adds 1 to w and reports the
loss `losses[i]`. Evaluation is replaced by a function of the step, so the
tests see the loop's cadence, resume and guards in seconds, without a model.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conformer_fl import checkpointing
from conformer_fl import metric_logging
from conformer_fl import workdir as workdir_lib
from conformer_fl.training import divergence
from conformer_fl.training import loop
from conformer_fl.training import run_setup
from conformer_fl.training import state as state_lib


@pytest.fixture(autouse=True)
def evaluation_by_step(monkeypatch):
  """Evaluation of step i gives {'eval/wer': i / 100}."""
  monkeypatch.setattr(loop.evaluation, "jitted_eval_step", lambda model: None)
  monkeypatch.setattr(run_setup, "eval_batches", lambda run: [])
  monkeypatch.setattr(
      run_setup, "evaluate",
      lambda run, eval_step, variables, batches, step: {"eval/wer": step / 100})


def _run(workdir, patience: int = 3) -> run_setup.Run:
  config = ml_collections.ConfigDict(dict(
      loss_guard=dict(factor=10.0, patience=patience, window=20)))
  return run_setup.Run(config, workdir, None, None,
                       checkpointing.CheckpointStore(str(workdir)),
                       metric_logging.MetricsLogger(str(workdir), "step"))


def _train(workdir, cadence: loop.Cadence,
           losses: dict[int, float] | None = None,
           patience: int = 3) -> tuple[dict[str, np.ndarray], list[int]]:
  """Trains the counter; returns the final state and the steps read."""
  run, read_steps = _run(workdir, patience), []
  losses = losses or {}

  def step(state, index):
    del index
    new = {"w": state["w"] + 1, "step": state["step"] + 1}
    return new, {"loss": jnp.float32(losses.get(int(new["step"]), 1.0))}

  def read(state, outputs, index, saved):
    del state, saved
    read_steps.append(index)
    return jax.device_get(outputs)

  mode = loop.Mode(name="central", step=step, read=read,
                   variables=lambda state: ({"w": state["w"]}, {}),
                   explosion_fix="lower it", rate_name="steps_per_second")
  initial = {"w": jnp.float32(0), "step": jnp.int32(0)}
  try:
    state, checkpoints = state_lib.resume(run, initial, state_lib.AS_IS)
    state = loop.train(run, mode, state, checkpoints, cadence)
  finally:
    run.logger.close()
    run.store.close()
  return jax.device_get(state), read_steps


def _records(workdir) -> list[dict]:
  return workdir_lib.Workdir(workdir).metrics()


def test_the_cadence_logs_evaluates_and_saves_on_its_steps(tmp_path):
  state, read_steps = _train(tmp_path, loop.Cadence(7, 2, 3, 4))
  assert float(state["w"]) == 7.0
  # The first step, and every step that logs, evaluates or saves.
  assert read_steps == [1, 2, 3, 4, 6, 7]
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [2, 3, 4, 6, 7]
  assert [r["step"] for r in records if "eval/wer" in r] == [3, 6, 7]
  assert records[1]["eval/wer"] == 0.03
  assert all(r["steps_per_second"] > 0 for r in records)
  store = checkpointing.CheckpointStore(str(tmp_path), read_only=True)
  assert store.all_steps() == [0, 4, 7]
  assert float(store.restore(4)["w"]) == 4.0


def test_read_every_reads_each_step(tmp_path):
  _, read_steps = _train(tmp_path, loop.Cadence(5, 2, 5, 5, read_every=1))
  assert read_steps == [1, 2, 3, 4, 5]
  assert [r["step"] for r in _records(tmp_path)] == [2, 4, 5]


def test_a_resumed_run_goes_on_from_its_newest_checkpoint(tmp_path):
  _train(tmp_path, loop.Cadence(5, 1, 5, 2))  # Saves 0, 2, 4, 5.
  # Step 5 lost, and with it the last record: training resumes after step 4.
  store = checkpointing.CheckpointStore(str(tmp_path))
  store.set_aside([5])
  store.close()
  state, read_steps = _train(tmp_path, loop.Cadence(6, 1, 5, 2))
  assert float(state["w"]) == 6.0
  assert read_steps == [5, 6]
  assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_an_exploded_loss_stops_and_sets_its_checkpoints_aside(tmp_path):
  with pytest.raises(divergence.DivergenceError) as raised:
    _train(tmp_path, loop.Cadence(8, 1, 100, 2),
           losses={5: 100.0, 6: 200.0}, patience=2)
  assert raised.value.step == 6
  message = str(raised.value)
  assert message.startswith("Central training diverged at step 5: the loss"
                            " exploded, 2 losses in a row above 10 x")
  assert message.endswith("the last checkpoint is step 2 (lower it).")
  # The loss of step 5 is that of checkpoint 4: 4 is set aside, 2 is kept.
  assert checkpointing.CheckpointStore(
      str(tmp_path), read_only=True).all_steps() == [0, 2]
  assert sorted(p.name for p in (tmp_path / divergence.DIVERGED_DIR).iterdir()
                ) == ["4"]
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[-1]["loss"] == 200.0
