"""Faults a run meets, and what it does about them (docs/running.md, "When a run fails").

The rules are tested on their functions (config rule, lock, log trimming,
checkpoint fallback, the divergence guard); each case also runs once through
the real entry point, `python -m conformer_fl.main` in a subprocess, at tiny
scale on one CPU device. One finished tiny central run is copied for every case
that starts from a workdir (its programs then come from the compilation cache);
the tests assert the one-line message, the exit status, and that no file of the
workdir changed where nothing should have.
"""

from collections.abc import Iterator
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conformer_fl import checkpointing
from conformer_fl import config_lib
from conformer_fl.training import divergence
from conformer_fl import metric_logging
from conformer_fl import workdir as workdir_lib
from conformer_fl.tools import sweep

import xla_env  # tests/xla_env.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
# Parameters * this: a state whose loss is finite but exploded.
EXPLOSION_SCALE = 1e3


# ----------------------------------------------------------------------------
# Helpers.


def _main(args: list[str]) -> subprocess.CompletedProcess:
  """`python -m conformer_fl.main ARGS` on one CPU device; not checked.

  One device compiles the fewest programs, the fastest: these runs test the
  workdir, not the sharding (tests/test_train_e2e.py does).
  """
  return subprocess.run([sys.executable, "-m", "conformer_fl.main", *args],
                        cwd=ROOT, env=xla_env.subprocess_env(1),
                        capture_output=True, text=True, timeout=900,
                        check=False)


def _central_args(workdir, data_dir, overrides, *extra: str,
                  steps: int = STEPS) -> list[str]:
  return [
      f"--config=configs/central.py:size=tiny,corpus=tiny,domain=all,steps={steps}",
      f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
      *overrides, *extra]


def _error_line(result: subprocess.CompletedProcess) -> str:
  """The run's last stderr line, which must be its one-line error."""
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("error: "), result.stderr[-3000:]
  return line


def _assert_ok(result: subprocess.CompletedProcess) -> None:
  assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])


def _snapshot(directory) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory`."""
  directory = pathlib.Path(directory)
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def _metric_lines(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def _largest_data_file(workdir, step: int) -> pathlib.Path:
  files = (pathlib.Path(workdir) / "checkpoints" / str(step)).rglob("d/*")
  return max((f for f in files if f.is_file()), key=lambda f: f.stat().st_size)


def _flip_bytes(path: pathlib.Path, count: int = 64) -> None:
  """Inverts `count` bytes in the middle of `path` (bit rot, no error on read)."""
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
  path.write_bytes(bytes(data))


def _dead_pid() -> int:
  """The PID of a process that has exited."""
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def _experiment_config(arg: str = "scale=tiny"):
  return sweep.load_config_file(f"configs/experiment.py:{arg}",
                                root=str(ROOT))


# ----------------------------------------------------------------------------
# The config rule.


def test_resumable_fields_are_one_documented_list():
  assert workdir_lib.RESUMABLE_FIELDS == (
      "central.num_steps", "federated.rounds",
      "central.log_every", "central.eval_every", "central.checkpoint_every",
      "federated.log_every", "federated.eval_every",
      "federated.checkpoint_every", "central.num_devices",
      "data.data_dir", "federated.init_workdir",
      "eval_max_batches", "data.eval_batch_size", "data.prefetch_batches",
      "allow_unverified_checkpoints", "loss_guard.*")
  doc = (ROOT / "docs" / "running.md").read_text()
  section = doc[doc.index("## When a run fails"):]
  for field in workdir_lib.RESUMABLE_FIELDS:
    assert (f"`{field}`" in section or field.split(".")[-1] in section
            or field.rstrip(".*") in section), field


@pytest.mark.parametrize("make_config,field,value", [
    (lambda: config_lib.central_run_config(size="tiny"),
     "central.peak_learning_rate", 0.01),
    (lambda: config_lib.central_run_config(size="tiny"), "seed", 1),
    (lambda: config_lib.central_run_config(size="tiny"), "model.num_blocks", 3),
    (lambda: config_lib.federated_run_config(size="tiny"),
     "federated.client_optimizer.learning_rate", 0.5),
    (lambda: config_lib.federated_run_config(size="tiny"),
     "federated.dropout.default_rate", 0.25),
])
def test_a_field_that_changes_the_parameters_is_refused(tmp_path, make_config,
                                                        field, value):
  saved = make_config()
  (tmp_path / "config.json").write_text(saved.to_json_best_effort(indent=2))
  before = _snapshot(tmp_path)
  changed = make_config()
  *parents, leaf = field.split(".")
  node = changed
  for parent in parents:
    node = node[parent]
  old = node[leaf]
  node[leaf] = value
  with pytest.raises(workdir_lib.ConfigChangedError) as raised:
    workdir_lib.check_config(tmp_path, changed)
  assert f"{field}: {old!r} in the workdir, {value!r} now" in str(raised.value)
  assert "\n" not in str(raised.value)
  assert _snapshot(tmp_path) == before


def test_a_changed_mode_is_refused_naming_it(tmp_path):
  central = config_lib.central_run_config(size="tiny")
  (tmp_path / "config.json").write_text(central.to_json_best_effort())
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match="mode: 'central' in the workdir, 'federated' now"):
    workdir_lib.check_config(tmp_path,
                             config_lib.federated_run_config(size="tiny"))


def test_resumable_and_derived_fields_may_change(tmp_path):
  saved = config_lib.federated_run_config(size="tiny")
  saved.model.vocab_size = 48  # config.json holds the tokenizer's size.
  (tmp_path / "config.json").write_text(saved.to_json_best_effort())
  rerun = config_lib.federated_run_config(size="tiny", rounds=90)
  rerun.federated.eval_every = 5
  rerun.federated.checkpoint_every = 3
  rerun.data.data_dir = "/elsewhere/tfds"
  rerun.federated.init_workdir = "/elsewhere/central"
  rerun.eval_max_batches = 2
  assert workdir_lib.check_config(tmp_path, rerun)
  assert not workdir_lib.check_config(tmp_path / "new", rerun)


def test_a_field_the_code_added_since_is_not_a_change(tmp_path):
  saved = workdir_lib.config_as_json(config_lib.central_run_config(size="tiny"))
  del saved["data"]["max_label_rate"]  # As if written before the field existed.
  saved["retired_field"] = 1
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert workdir_lib.check_config(tmp_path,
                                  config_lib.central_run_config(size="tiny"))
  assert workdir_lib.unmatched_fields(
      saved, workdir_lib.config_as_json(
          config_lib.central_run_config(size="tiny"))) == (
              ["data.max_label_rate"], ["retired_field"])


def test_the_experiment_applies_the_rule_with_its_own_list(tmp_path):
  from conformer_fl import experiment  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(tmp_path)
  experiment.check_workdir_config(_experiment_config(), workdir)
  saved = (tmp_path / experiment.CONFIG_FILE).read_bytes()
  moved = _experiment_config()
  moved.data_dir = "/another/machine"
  experiment.check_workdir_config(moved, workdir)
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match=r"adapt\.federated\.rounds: 2 in the workdir, 7 now"):
    experiment.check_workdir_config(
        _experiment_config("scale=tiny,rounds=7"), workdir)
  assert (tmp_path / experiment.CONFIG_FILE).read_bytes() == saved


def test_a_file_is_not_a_workdir(tmp_path):
  (tmp_path / "run").write_text("notes")
  with pytest.raises(workdir_lib.WorkdirError, match="is not a directory"):
    workdir_lib.check_is_directory(tmp_path / "run")
  with pytest.raises(workdir_lib.WorkdirError, match=r"run is a file\)"):
    workdir_lib.check_is_directory(tmp_path / "run" / "below")
  workdir_lib.check_is_directory(tmp_path / "absent" / "below")


# ----------------------------------------------------------------------------
# The lock.


def test_a_held_lock_refuses_a_second_run_naming_its_holder(tmp_path):
  with workdir_lib.WorkdirLock(tmp_path):
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid()
    assert holder["host"] == socket.gethostname()
    with pytest.raises(workdir_lib.WorkdirLockedError,
                       match=f"in use by another run \\(PID {os.getpid()} on"
                             f" host {socket.gethostname()}"):
      workdir_lib.WorkdirLock(tmp_path).acquire()
  assert not (tmp_path / ".lock").exists()
  with workdir_lib.WorkdirLock(tmp_path):  # Free again.
    pass


def test_a_stale_lock_is_taken_over(tmp_path):
  pid = _dead_pid()
  (tmp_path / ".lock").write_text(json.dumps(
      {"pid": pid, "host": socket.gethostname(), "started": "yesterday"}))
  lock = workdir_lib.WorkdirLock(tmp_path)
  lock.acquire()
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  lock.release()


def test_a_lock_from_another_host_needs_to_be_told(tmp_path, monkeypatch):
  stale = json.dumps({"pid": 1, "host": "another-host", "started": "today"})
  (tmp_path / ".lock").write_text(stale)
  with pytest.raises(workdir_lib.WorkdirLockedError,
                     match="on another host .*CONFORMER_FL_TAKE_OVER_LOCK=1"):
    workdir_lib.WorkdirLock(tmp_path).acquire()
  assert (tmp_path / ".lock").read_text() == stale
  monkeypatch.setenv(workdir_lib.TAKE_OVER_ENV, "1")
  with workdir_lib.WorkdirLock(tmp_path):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
  # A file system without flock (an NFS mount without a lock daemon).
  def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(fcntl, "flock", no_flock)
  lock = workdir_lib.WorkdirLock(tmp_path)
  lock.acquire()
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  lock.release()
  assert not (tmp_path / ".lock").exists()
  # A live process of this host in the record holds the lock; a dead one not.
  (tmp_path / ".lock").write_text(json.dumps(
      {"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))
  with pytest.raises(workdir_lib.WorkdirLockedError,
                     match=f"in use by another run \\(PID {os.getppid()} on"):
    workdir_lib.WorkdirLock(tmp_path).acquire()
  (tmp_path / ".lock").write_text(json.dumps(
      {"pid": _dead_pid(), "host": socket.gethostname(), "started": "then"}))
  with workdir_lib.WorkdirLock(tmp_path):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------
# Logs.


def test_metrics_are_trimmed_to_the_restored_step(tmp_path):
  path = epath.Path(tmp_path) / "metrics.jsonl"
  kept = '{"step": 2, "loss": 3.0}\n{"step": 4, "loss": 2.0}\n'
  path.write_text(kept + '{"step": 6, "loss": 1.0}\n'
                  '{"step": 7, "stopped": "diverged"}\n{"step": 8, "lo')
  metric_logging.trim_metrics(path, 4)
  assert path.read_text() == kept
  # Two runs that shared a workdir before the lock: one record per step.
  path.write_text('{"step": 2, "loss": 9.0}\n{"step": 2, "loss": 3.0}\n'
                  '{"step": 4, "loss": 8.0}\n{"step": 4, "loss": 2.0}\n')
  metric_logging.trim_metrics(path, 4)
  assert path.read_text() == kept
  metric_logging.trim_metrics(path, 4)  # Nothing to do: not rewritten.
  assert path.read_text() == kept
  assert [r["step"] for r in workdir_lib.read_records(path)] == [2, 4]


def test_eval_samples_are_trimmed_to_whole_blocks(tmp_path):
  path = epath.Path(tmp_path) / "eval_samples.txt"
  kept = "step 4\n  REF: a b\n  HYP: a\nstep 4\n  REF: c\n  HYP: c\n"
  path.write_text(kept + "step 8\n  REF: d\n  HYP: d\nstep 8\n  REF: e\n  HY")
  metric_logging.trim_samples(path, 4)
  assert path.read_text() == kept


# ----------------------------------------------------------------------------
# Checkpoints.


def _state(seed: int):
  rng = np.random.default_rng(seed)
  return {"params": {"w": rng.standard_normal((64, 128)).astype(np.float32),
                     "b": rng.standard_normal(128).astype(np.float32)},
          "step": np.asarray(seed, np.int32)}


def _saved_store(workdir, steps=(0, 2, 4, 6)):
  store = checkpointing.CheckpointStore(str(workdir))
  for step in steps:
    store.save(step, _state(step))
  return store


def test_save_refuses_a_nonfinite_state(tmp_path):
  store = checkpointing.CheckpointStore(str(tmp_path))
  state = _state(0)
  state["params"]["w"][3, :8] = np.nan
  with pytest.raises(ValueError, match="8 non-finite values in params/w"):
    store.save(0, state)
  assert store.all_steps() == []


def test_damaged_steps_fall_back_to_the_newest_intact_one(tmp_path):
  store = _saved_store(tmp_path)
  _flip_bytes(_largest_data_file(tmp_path, 6))       # Restores, other values.
  _largest_data_file(tmp_path, 4).unlink()            # A file is gone.
  data = _largest_data_file(tmp_path, 2)
  data.write_bytes(data.read_bytes()[:len(data.read_bytes()) // 2])  # Torn.
  reports = []
  step, state = store.restore_latest_intact(like=_state(0),
                                            report=reports.append)
  assert step == 0
  np.testing.assert_array_equal(state["params"]["w"], _state(0)["params"]["w"])
  assert reports[0].startswith("checkpoint step 6 in ")
  assert "is damaged: the bytes of params/w differ from the checksums" in (
      reports[0])
  assert reports[0].endswith("trying step 4")
  assert reports[1].startswith("checkpoint step 4 in ")
  assert "does not restore (" in reports[1]
  assert reports[2].startswith("checkpoint step 2 in ")
  assert reports[3] == ("Resuming from checkpoint step 0, the newest intact one;"
                        " the damaged steps [2, 4, 6] were moved to"
                        f" {tmp_path / 'checkpoints_damaged'}.")
  assert all("\n" not in line for line in reports)
  assert store.all_steps() == [0]
  assert sorted(p.name for p in (tmp_path / "checkpoints_damaged").iterdir()) == [
      "2", "4", "6"]
  store.save(2, _state(2))  # The step can be saved again.


def test_a_nonfinite_checkpoint_is_damaged_and_none_intact_stops(tmp_path):
  store = checkpointing.CheckpointStore(str(tmp_path))
  state = _state(0)
  state["params"]["b"][:] = np.inf
  # Written as an older version of this code would have: no checks, no sums.
  manager = store._manager  # pylint: disable=protected-access
  manager.save(0, args=checkpointing.ocp.args.StandardSave(state))
  with pytest.raises(checkpointing.CheckpointError,
                     match="No intact checkpoint in .*: checkpoint step 0 in"
                           " .* is damaged: 128 non-finite values in"
                           " params/b. Move the checkpoints away"):
    store.restore_latest_intact(like=_state(0), report=lambda line: None)
  assert store.all_steps() == [0]  # Nothing is moved when nothing is intact.
  assert checkpointing.CheckpointStore(
      str(tmp_path / "empty")).restore_latest_intact() == (None, None)


def test_a_step_without_checksums_is_unverified_and_passed_over(tmp_path):
  store = _saved_store(tmp_path)
  _flip_bytes(_largest_data_file(tmp_path, 6))
  (tmp_path / "checkpoints" / "6" / checkpointing.STEP_METADATA_FILE).unlink()
  # A missing commit marker alone leaves the checksums: step 4 is checked.
  (tmp_path / "checkpoints" / "4" / "commit_success.txt").unlink()
  _flip_bytes(_largest_data_file(tmp_path, 4))
  with pytest.raises(checkpointing.UnverifiedCheckpointError,
                     match="checkpoint step 6 in .* is unverified: its checksums"
                           " are missing \\(.*6/_CHECKPOINT_METADATA is"
                           " missing\\)"):
    store.restore(6, like=_state(0))
  reports = []
  step, _ = store.restore_latest_intact(like=_state(0), report=reports.append)
  assert step == 2
  assert "is unverified" in reports[0] and reports[0].endswith("trying step 4")
  assert "differ from the checksums saved with it" in reports[1]
  assert store.all_steps() == [0, 2]


def test_an_unverified_step_restores_when_allowed(tmp_path):
  _saved_store(tmp_path).close()
  (tmp_path / "checkpoints" / "6" / checkpointing.STEP_METADATA_FILE).unlink()
  store = checkpointing.CheckpointStore(str(tmp_path), allow_unverified=True)
  reports = []
  step, state = store.restore_latest_intact(like=_state(0),
                                            report=reports.append)
  assert step == 6 and store.unverified_steps == {6}
  np.testing.assert_array_equal(state["params"]["w"], _state(6)["params"]["w"])
  assert len(reports) == 1 and reports[0].endswith(
      "; restoring it anyway (allow_unverified_checkpoints=True).")


def test_no_verified_step_names_the_field_that_allows_them(tmp_path):
  _saved_store(tmp_path, steps=(0,)).close()
  (tmp_path / "checkpoints" / "0" / checkpointing.STEP_METADATA_FILE).unlink()
  store = checkpointing.CheckpointStore(str(tmp_path))
  with pytest.raises(checkpointing.CheckpointError,
                     match="or accept the unverified steps with"
                           " --config.allow_unverified_checkpoints=True.$"):
    store.restore_latest_intact(like=_state(0), report=lambda line: None)


# ----------------------------------------------------------------------------
# The divergence guard.

# Logged training losses (rounded) of tiny federated runs of configs/federated.py
# (2 clients x 2 local steps per round): the default learning rates, then
# the client or the server learning rate 1e6.
_NORMAL = (227.0, 248.5, 117.6, 137.9, 224.0, 147.4, 147.9, 75.1, 84.8, 142.1,
           154.0, 165.9, 58.0, 79.7, 93.7, 83.0, 102.3, 80.4, 189.6, 143.8)
_CLIENT_LR_1E6 = (99405.7, 7.49e12, 3.11e13, 1.61e14, 3.09e14, 2.43e13)
_SERVER_LR_1E6 = (227.0, 2.61e8, 99999.3, 99999.3, 99999.3, 99999.3)


@pytest.mark.parametrize("losses,stop", [
    (_NORMAL, None), (_CLIENT_LR_1E6, 4), (_SERVER_LR_1E6, 4)])
def test_the_loss_guard_stops_an_explosion_only(losses, stop):
  guard = divergence.LossExplosionGuard(factor=10.0, patience=3, window=20)
  stopped = next((i for i, loss in enumerate(losses, 1)
                  if guard.update(i, loss)), None)
  assert stopped == stop
  if stop:
    assert guard.last_accepted == 1
    assert guard.message("Federated training|round", 0, "", "try x") == (
        f"Federated training diverged at round 2: the loss exploded, 3 losses"
        f" in a row above 10 x the median of the previous ones"
        f" ({losses[0]:.3g}): {losses[1]:.3g} at round 2, {losses[2]:.3g} at"
        f" round 3, {losses[3]:.3g} at round 4; the last checkpoint is round 0"
        " (try x).")


def test_a_spike_that_falls_back_is_not_an_explosion():
  guard = divergence.LossExplosionGuard(factor=10.0, patience=3, window=4)
  for i, loss in enumerate((100.0, 90.0, 5e3, 6e3, 80.0, 7e3, 70.0), 1):
    assert not guard.update(i, loss)
  assert guard.reference() == 85.0  # median(100, 90, 80, 70): spikes left out.
  assert not divergence.LossExplosionGuard(0.0, 3, 20).update(1, 1e30)
  with pytest.raises(ValueError, match="loss_guard needs factor > 1"):
    divergence.LossExplosionGuard(0.5, 3, 20)


def test_the_nonfinite_message_agrees_in_number():
  guard = {"step": 9, "loss": 3.0}
  for flags, text in ((divergence.PARAMETERS, "the parameters are not finite"),
                      (divergence.LOSS, "the loss is not finite"),
                      (divergence.LOSS | divergence.GRADIENT,
                       "the loss and the gradient are not finite")):
    with pytest.raises(divergence.DivergenceError, match=text) as raised:
      divergence.check_guard(dict(guard, flags=flags), 6)
    assert str(raised.value).endswith(
        "nothing non-finite was saved (try e.g. a lower"
        " central.peak_learning_rate).")


def test_the_guard_keeps_the_first_nonfinite_step():
  guard = divergence.init_guard()
  finite = divergence.nonfinite_flags(jnp.float32(2.0), jnp.float32(1.7),
                                      {"p": jnp.ones(3)}, {"m": jnp.ones(3)})
  guard = divergence.update_guard(guard, jnp.int32(1), finite, jnp.float32(2.0))
  divergence.check_guard(jax.device_get(guard), 0)  # Nothing to report.
  flags = divergence.nonfinite_flags(
      jnp.float32(5.0), jnp.float32(1.7), {"p": jnp.array([1.0, jnp.nan])},
      {"m": jnp.array([jnp.inf])})
  guard = divergence.update_guard(guard, jnp.int32(2), flags, jnp.float32(5.0))
  later = divergence.nonfinite_flags(jnp.float32(jnp.nan), jnp.float32(1.7),
                                     {}, {})
  guard = divergence.update_guard(guard, jnp.int32(3), later, jnp.float32(jnp.nan))
  with pytest.raises(divergence.DivergenceError,
                     match=r"^Central training diverged at step 2: the parameters"
                           r" and the optimizer state are not finite \(loss 5.0\);"
                           r" the last checkpoint is step 0,") as raised:
    divergence.check_guard(jax.device_get(guard), 0)
  assert raised.value.step == 2


def test_a_round_that_drops_every_client_stops():
  metrics = {"num_clients": 4, "num_nonfinite_clients": 4, "loss": np.nan}
  with pytest.raises(divergence.DivergenceError,
                     match="at round 3: the update of every client \\(4 of 4\\)"):
    divergence.check_round(3, metrics, True, 2)
  divergence.check_round(3, dict(metrics, num_nonfinite_clients=3), True, 2)
  with pytest.raises(divergence.DivergenceError, match="new server state"):
    divergence.check_round(3, dict(metrics, num_nonfinite_clients=0), False, 2)


# ----------------------------------------------------------------------------
# Through the entry point.


@pytest.fixture(scope="module")
def finished_central(tmp_path_factory, tiny_corpus_dir, tiny_central_overrides):
  """A finished tiny central run (checkpoints 0, 2, 4); copy it, never change it."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  _assert_ok(_main(_central_args(workdir, tiny_corpus_dir,
                                 tiny_central_overrides)))
  return workdir


@pytest.fixture
def copy_of(tmp_path, finished_central):
  target = tmp_path / "run"
  shutil.copytree(finished_central, target)
  return target


def _plant_divergent_step(workdir, step: int = 6, scale: float = 1e30) -> None:
  """Saves `step`: the latest state of `workdir` with every parameter * scale.

  A state that is finite and intact (it restores and verifies) but from which
  the next step or round diverges (1e30: to NaN); the runs that resume from
  it are the very programs of the finished run, which the compilation cache
  already holds.
  """
  store = checkpointing.CheckpointStore(str(workdir))
  state = store.restore(store.latest_step())
  state["params"] = jax.tree.map(lambda x: x * scale, state["params"])
  state["step"] = np.asarray(step, np.int32)
  store.save(step, state)
  store.close()


def test_central_divergence_stops_before_saving_it(copy_of, tiny_corpus_dir,
                                                   tiny_central_overrides):
  """Resumed from a step without checksums, allowed: the message says so."""
  _plant_divergent_step(copy_of)
  (copy_of / "checkpoints" / "6" / checkpointing.STEP_METADATA_FILE).unlink()
  result = _main(_central_args(copy_of, tiny_corpus_dir, tiny_central_overrides,
                               "--config.allow_unverified_checkpoints=True",
                               steps=8))
  line = _error_line(result)
  assert line.startswith("error: Central training diverged at step 7: the loss,")
  assert line.endswith(
      "the last checkpoint is step 6, nothing non-finite was saved (the run"
      " resumed from checkpoint 6, which had no checksums: it may be damaged,"
      " which a learning rate would not explain; rerun without"
      " --config.allow_unverified_checkpoints=True to resume from the newest"
      " verified checkpoint instead).")
  assert (f"checkpoint step 6 in {copy_of}/checkpoints is unverified: its"
          " checksums are missing") in result.stderr
  assert ("; restoring it anyway (allow_unverified_checkpoints=True)."
          in result.stderr)
  steps = checkpointing.CheckpointStore(str(copy_of), read_only=True)
  assert steps.all_steps() == [0, 2, 4, 6]
  records = _metric_lines(copy_of)
  assert [r["step"] for r in records] == [2, 4, 7]
  assert records[-1] == {"step": 7, "stopped": line[len("error: "):]}


def test_federated_round_without_a_finite_client_stops(tmp_path, copy_of,
                                                       tiny_corpus_dir):
  _plant_divergent_step(copy_of)
  workdir = tmp_path / "fed"
  result = _main([
      "--config=configs/federated.py:size=tiny,corpus=tiny,domain=all,rounds=2",
      f"--workdir={workdir}", f"--config.data.data_dir={tiny_corpus_dir}",
      "--config.data.tokenizer.vocab_size=48",
      "--config.data.bucket_seconds=(8.0,)",
      f"--config.federated.init_workdir={copy_of}",
      "--config.federated.clients_per_round=2",
      "--config.federated.local_steps=1",
      "--config.federated.client_batch_size=1",
      "--config.federated.fixed_round_shape=True",
  ])
  line = _error_line(result)
  assert line.startswith("error: Federated training diverged at round 1: the"
                         " update of every client (2 of 2) was not finite")
  first, stopped = _metric_lines(workdir)
  assert first["round"] == 1 and first["loss"] == "nan"  # Not 0.0.
  assert first["num_nonfinite_clients"] == first["num_clients"] == 2
  assert first["server_update_norm"] == 0.0
  assert stopped == {"round": 1, "stopped": line[len("error: "):]}
  assert checkpointing.CheckpointStore(str(workdir), read_only=True).all_steps() == [0]


def test_a_damaged_checkpoint_falls_back_and_resumes_bit_equal(
    copy_of, finished_central, tiny_corpus_dir, tiny_central_overrides):
  _flip_bytes(_largest_data_file(copy_of, 4))
  # Step 2's checksums gone: unverified, passed over though its data is
  # intact (flipped bytes there may also break its decompression, which
  # would fail the restore before the checksums are looked at).
  (copy_of / "checkpoints" / "2" / checkpointing.STEP_METADATA_FILE).unlink()
  result = _main(_central_args(copy_of, tiny_corpus_dir, tiny_central_overrides))
  _assert_ok(result)
  assert "checkpoint step 4 in " in result.stderr
  assert "differ from the checksums saved with it; trying step 2" in result.stderr
  assert (f"checkpoint step 2 in {copy_of}/checkpoints is unverified: its"
          f" checksums are missing ({copy_of}/checkpoints/2/"
          "_CHECKPOINT_METADATA is missing), so damage to its data cannot be"
          " detected; trying step 0") in result.stderr
  assert "Resuming from checkpoint step 0, the newest intact one" in result.stderr
  steps = checkpointing.CheckpointStore(str(copy_of), read_only=True)
  assert steps.all_steps() == [0, 2, 4]
  reference = checkpointing.CheckpointStore(str(finished_central), read_only=True)
  for a, b in zip(jax.tree.leaves(steps.restore(4)["params"]),
                  jax.tree.leaves(reference.restore(4)["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert sorted(p.name for p in (copy_of / "checkpoints_damaged").iterdir()) == [
      "2", "4"]
  assert [r["step"] for r in _metric_lines(copy_of)] == [2, 4]


def test_no_intact_checkpoint_stops(copy_of, tiny_corpus_dir,
                                    tiny_central_overrides):
  for step in (0, 2, 4):
    _largest_data_file(copy_of, step).unlink()
  before = _snapshot(copy_of)
  result = _main(_central_args(copy_of, tiny_corpus_dir, tiny_central_overrides))
  # Orbax's reader threads, abandoned by the failed restores, may still print
  # an asyncio traceback of their own as the process ends (sometimes, not
  # always): the run's own error is one line and no frame of this project
  # appears in any traceback.
  assert result.returncode == 1, result.stderr[-3000:]
  assert "/conformer_fl/" not in "".join(
      line for line in result.stderr.splitlines(True)
      if line.lstrip().startswith("File ")), result.stderr[-3000:]
  (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
  assert line.startswith(f"error: No intact checkpoint in {copy_of}/checkpoints:"
                         f" checkpoint step 4 in ")
  after = {k: v for k, v in _snapshot(copy_of).items()
           if not k.startswith("events.out.tfevents.") or k in before}
  assert after.pop("metrics.jsonl") != before.pop("metrics.jsonl")
  assert after == before
  assert "stopped" in _metric_lines(copy_of)[-1]


def test_torn_logs_and_a_stale_lock_resume_cleanly(copy_of, tiny_corpus_dir,
                                                   tiny_central_overrides):
  before = _snapshot(copy_of)
  metrics = copy_of / "metrics.jsonl"
  samples = copy_of / "eval_samples.txt"
  metrics.write_text(metrics.read_text() + '{"step": 6, "loss": 1.0}\n'
                     '{"step": 7, "lo')
  samples.write_text(samples.read_text() + "step 8\n  REF: a b\n  HY")
  pid = _dead_pid()
  (copy_of / ".lock").write_text(json.dumps(
      {"pid": pid, "host": socket.gethostname(), "started": "today"}))
  result = _main(_central_args(copy_of, tiny_corpus_dir, tiny_central_overrides))
  _assert_ok(result)
  assert (f"Taking over the lock {copy_of}/.lock left by a run that is gone (PID"
          f" {pid} on host {socket.gethostname()}, started today)."
          in result.stderr)
  after = _snapshot(copy_of)
  new_events = set(after) - set(before)
  assert all(name.startswith("events.out.tfevents.") for name in new_events)
  assert {k: v for k, v in after.items() if k not in new_events} == before


def test_a_changed_config_is_refused_and_nothing_is_written(
    copy_of, tiny_corpus_dir, tiny_central_overrides):
  before = _snapshot(copy_of)
  result = _main(_central_args(
      copy_of, tiny_corpus_dir, tiny_central_overrides,
      "--config.central.peak_learning_rate=0.01", "--config.seed=3",
      "--config.model.num_blocks=3"))
  line = _error_line(result)
  assert line.startswith(f"error: --workdir={copy_of} was made by another config")
  for change in ("central.peak_learning_rate: 0.002 in the workdir, 0.01 now",
                 "model.num_blocks: 2 in the workdir, 3 now",
                 "seed: 0 in the workdir, 3 now"):
    assert change in line
  assert _snapshot(copy_of) == before


def test_a_second_run_is_refused(copy_of, tiny_corpus_dir,
                                 tiny_central_overrides):
  with workdir_lib.WorkdirLock(copy_of):
    before = _snapshot(copy_of)
    result = _main(_central_args(copy_of, tiny_corpus_dir,
                                 tiny_central_overrides))
    line = _error_line(result)
    assert line == (f"error: --workdir={copy_of} is in use by another run (PID"
                    f" {os.getpid()} on host {socket.gethostname()}, started"
                    f" {json.loads((copy_of / '.lock').read_text())['started']});"
                    " wait for it to end or use another workdir.")
    assert _snapshot(copy_of) == before


def test_a_file_given_as_workdir_is_named(tmp_path, tiny_corpus_dir,
                                          tiny_central_overrides):
  path = tmp_path / "notes.txt"
  path.write_text("not a run")
  line = _error_line(_main(_central_args(path, tiny_corpus_dir,
                                         tiny_central_overrides)))
  assert line == (f"error: --workdir={path} is not a directory: give a directory"
                  " (it is made if absent).")
  assert path.read_text() == "not a run"


def test_a_finite_loss_explosion_stops_and_sets_its_checkpoints_aside(
    copy_of, tiny_corpus_dir, tiny_central_overrides):
  _plant_divergent_step(copy_of, scale=EXPLOSION_SCALE)
  # Step 7 (the loss of step 6's state: the guard's first value) and 8 (the
  # last step, logged) are far above the median of steps 2 and 4.
  result = _main(_central_args(copy_of, tiny_corpus_dir, tiny_central_overrides,
                               "--config.loss_guard.patience=2", steps=8))
  line = _error_line(result)
  assert line.startswith("error: Central training diverged at step 7: the loss"
                         " exploded, 2 losses in a row above 10 x the median"
                         " of the previous ones (")
  assert line.endswith(
      f" at step 8; the checkpoints [4, 6] were moved to"
      f" {copy_of}/checkpoints_diverged; the last checkpoint is step 2 (try"
      " e.g. a lower central.peak_learning_rate).")
  assert checkpointing.CheckpointStore(
      str(copy_of), read_only=True).all_steps() == [0, 2]
  assert sorted(p.name for p in (copy_of / "checkpoints_diverged").iterdir()
                ) == ["4", "6"]
  records = _metric_lines(copy_of)
  assert [r["step"] for r in records] == [2, 4, 8, 8]
  assert records[2]["loss"] > 10 * max(records[0]["loss"], records[1]["loss"])
  assert "eval/wer" not in records[2]  # An exploded model is not evaluated.
  assert records[-1] == {"step": 8, "stopped": line[len("error: "):]}


def test_a_truncated_tokenizer_is_named(copy_of, tiny_corpus_dir,
                                        tiny_central_overrides):
  path = copy_of / "tokenizer.model"
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  before = _snapshot(copy_of)
  line = _error_line(_main(_central_args(copy_of, tiny_corpus_dir,
                                         tiny_central_overrides)))
  assert line.startswith(f"error: {path} is not a valid SentencePiece model (")
  assert line.endswith("restore it from a copy of this run, or use a new"
                       " workdir (a run's checkpoints need the tokenizer that"
                       " trained them).")
  assert _snapshot(copy_of) == before


@contextlib.contextmanager
def _unwritable(directory: pathlib.Path) -> Iterator[None]:
  """`directory` unwritable to this user: immutable for root, else read-only."""
  if os.geteuid() != 0:
    directory.chmod(0o555)
    try:
      yield
    finally:
      directory.chmod(0o755)
    return
  if shutil.which("chattr") is None or subprocess.run(
      ["chattr", "+i", str(directory)], check=False,
      capture_output=True).returncode:
    pytest.skip("root without chattr +i: cannot make a directory unwritable")
  try:
    yield
  finally:
    subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_an_unwritable_workdir_is_named(copy_of, tiny_corpus_dir,
                                        tiny_central_overrides):
  before = _snapshot(copy_of)
  with _unwritable(copy_of):
    result = _main(_central_args(copy_of, tiny_corpus_dir,
                                 tiny_central_overrides))
  line = _error_line(result)
  assert line.startswith(f"error: --workdir={copy_of} cannot be written (")
  assert line.endswith(
      f": {copy_of}/.lock): make it writable (chmod u+w; chattr -i if it is"
      " immutable; remount a read-only file system) or use another workdir.")
  assert _snapshot(copy_of) == before
