"""Orbax checkpoints of a run: step 0 (the initial state) always, then a cadence.

A workdir's `checkpoints/` holds one orbax step directory per saved step (the step is
the training step for central runs and the round for federated runs). The analysis
pass reads them back with `restore(step)`; training resumes from
`restore_latest_intact()`.

Integrity. Orbax (through TensorStore's zarr/OCDBT files) keeps no checksum of the
array data: a flipped byte in a data file restores without an error, as a changed
value. So `save` refuses a state that is not finite and records a CRC32 of every
leaf's bytes in the step's orbax custom metadata (`_CHECKPOINT_METADATA`,
`StepMetadata.custom_metadata`), and `restore` checks the restored state against
them and for non-finite values, raising `CheckpointError` naming the step and the
leaf. A step whose checksums are missing (its `_CHECKPOINT_METADATA` deleted or
torn, or written without them) cannot be checked: it is *unverified*, and is
refused like a damaged one (`UnverifiedCheckpointError`) unless the store was
opened with `allow_unverified=True` (the run configs'
`allow_unverified_checkpoints`), which restores it with a one-line warning and
records it in `unverified_steps`. A step whose commit marker
(`commit_success.txt`) alone is missing still has its checksums, and is checked.
`restore_latest_intact` walks the saved steps from the newest: a step that fails
to restore (a truncated or missing file: orbax and TensorStore errors) or fails
the checks (or is unverified) is reported in one line and the next older step
is tried; the damaged
steps newer than the one restored are moved to `<workdir>/checkpoints_damaged/`
(deleted on GCS, where folders cannot be renamed) so that training can save those
steps again. When no step is intact the run stops with `CheckpointError`.
"""

from collections.abc import Callable, Iterator
import contextlib
import gc
import inspect
import os
import sys
from typing import Any
import zlib

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from conformer_fl import multihost
from conformer_fl import workdir as workdir_lib

PyTree = Any
CHECKSUM_KEY = "crc32"
# Orbax's per-step metadata file, which holds the checksums.
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
DAMAGED_DIR = "checkpoints_damaged"
ALLOW_UNVERIFIED_FIELD = "allow_unverified_checkpoints"


class CheckpointError(workdir_lib.RunError):
  """A checkpoint that does not restore or restores damaged.

  Attributes:
    step: the step (None: about the whole directory).
  """

  def __init__(self, message: str, step: int | None = None):
    super().__init__(message)
    self.step = step


class UnverifiedCheckpointError(CheckpointError):
  """A checkpoint whose checksums are missing, so damage cannot be detected."""


def host_leaves(tree: PyTree) -> dict[str, np.ndarray]:
  """{leaf name: this process's numpy copy} (a replicated array's full value)."""
  def local(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  # Names like 'params/encoder/.../kernel' (dict keys, list indices, fields).
  return {jax.tree_util.keystr(path, simple=True, separator="/"): local(x)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def checksums(leaves: dict[str, np.ndarray]) -> dict[str, str]:
  """CRC32 (hex) of every leaf's bytes."""
  return {name: f"{zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8)):08x}"
          for name, a in leaves.items()}


def nonfinite_problem(leaves: dict[str, np.ndarray]) -> str | None:
  """'N non-finite values in LEAF (and K more leaves)', or None if all finite."""
  bad = []
  for name, a in leaves.items():
    if np.issubdtype(a.dtype, np.inexact):
      count = int(a.size - np.count_nonzero(np.isfinite(a)))
      if count:
        bad.append((name, count))
  if not bad:
    return None
  (name, count), more = bad[0], len(bad) - 1
  return (f"{count} non-finite value{'s' * (count > 1)} in {name}"
          + (f" and {more} more lea{'ves' if more > 1 else 'f'}" if more else ""))


def _one_line(error: BaseException, limit: int = 320) -> str:
  """'Type: first line' of the error's root cause, cut to `limit` characters.

  Orbax wraps TensorStore's error (which names the file and what is wrong
  with it) in one that names only the array slice: the root cause says more.
  """
  seen = {id(error)}
  while (error.__cause__ or error.__context__) is not None:
    cause = error.__cause__ or error.__context__
    if id(cause) in seen:
      break
    seen.add(id(cause))
    error = cause
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_abandoned_read(unraisable: Any) -> bool:
  """Whether an unraisable error comes from a coroutine never awaited (the
  reads a failed restore leaves behind)."""
  return inspect.iscoroutine(unraisable.object)


def _log_abandoned_read(unraisable: Any) -> None:
  """sys.unraisablehook: abandoned reads in one line, others as before."""
  if not _is_abandoned_read(unraisable):
    _PREVIOUS_UNRAISABLEHOOK[0](unraisable)
    return
  error = unraisable.exc_value
  lines = str(error).strip().splitlines()
  logging.info("An abandoned read of a damaged checkpoint failed too: %s: %s",
               type(error).__name__, lines[0][:300] if lines else "")


_PREVIOUS_UNRAISABLEHOOK = [sys.unraisablehook]


@contextlib.contextmanager
def _abandoned_reads_logged() -> Iterator[None]:
  """Logs, in one line each, the errors of reads a failed restore abandoned.

  When one array of a damaged step fails to read, orbax raises at once and
  leaves the step's other reads as coroutines that are never awaited; those
  that fail too end as "Exception ignored in: <coroutine ...>" tracebacks on
  stderr whenever Python collects them, which may be long after the restore
  (at exit, say). The restore's own error already names the step, so from the
  first restore on, `sys.unraisablehook` logs those of coroutines in one line
  each (every other unraisable error goes to the previous hook), and
  the ones collectable at once are collected here.
  """
  if sys.unraisablehook is not _log_abandoned_read:
    _PREVIOUS_UNRAISABLEHOOK[0] = sys.unraisablehook
    sys.unraisablehook = _log_abandoned_read
  try:
    yield
  finally:
    gc.collect()


class CheckpointStore:
  """The checkpoints of one workdir.

  Attributes:
    directory: `<workdir>/checkpoints`, absolute: orbax refuses a relative
      checkpoint path, and a workdir given on the command line often is one
      (`make demo`'s `runs/demo`). Cloud paths (`gs://...`) pass unchanged.
  """

  def __init__(self, workdir: str, *, read_only: bool = False,
               allow_unverified: bool = False):
    """Opens `<workdir>/checkpoints`.

    Args:
      workdir: the run's directory (local or `gs://`).
      read_only: never create, write or clean up anything.
      allow_unverified: restore steps without checksums (with a warning)
        instead of refusing them (module docstring).
    """
    self.allow_unverified = allow_unverified
    # The steps restored so far that had no checksums (allow_unverified).
    self.unverified_steps: set[int] = set()
    workdir = str(workdir)
    if not workdir_lib.is_remote(workdir):
      workdir = os.path.abspath(workdir)
    self.workdir = epath.Path(workdir)
    self.directory = workdir_lib.Workdir(self.workdir).checkpoints_dir
    options = ocp.CheckpointManagerOptions(
        create=not read_only,
        read_only=read_only,
        # Every step this run asks to save is kept: the analysis pass resets layers
        # to any of them.
        max_to_keep=None,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=options)

  def all_steps(self) -> list[int]:
    """Saved steps, ascending."""
    self._manager.reload()  # Another process (or run) may have saved since.
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest saved step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: PyTree) -> None:
    """Saves `state` (a pytree of arrays) as `step`, synchronously.

    Process 0 checks that the state is finite and records its checksums.

    Raises:
      ValueError: the state holds a NaN or Inf (nothing is saved).
    """
    custom_metadata = None
    if jax.process_index() == 0:
      leaves = host_leaves(state)
      problem = nonfinite_problem(leaves)
      if problem:
        raise ValueError(f"Refusing to save step {step} in {self.directory}:"
                         f" {problem}.")
      custom_metadata = {CHECKSUM_KEY: checksums(leaves)}
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True,
                       custom_metadata=custom_metadata)
    self._manager.wait_until_finished()

  def _saved_checksums(self, step: int) -> tuple[dict[str, str], str]:
    """(the checksums saved with `step`, why there are none: '' if there are)."""
    metadata_file = self.directory / str(step) / STEP_METADATA_FILE
    if not metadata_file.exists():
      return {}, f"{metadata_file} is missing"
    try:
      custom = self._manager.metadata(step).custom_metadata or {}
    except Exception as e:  # pylint: disable=broad-exception-caught
      # A torn _CHECKPOINT_METADATA: the data may still be whole.
      return {}, f"{metadata_file} does not read ({_one_line(e, 160)})"
    sums = custom.get(CHECKSUM_KEY) or {}
    return sums, "" if sums else f"{metadata_file} holds no checksums"

  def unverified_message(self, step: int, why: str) -> str:
    """The one line about an unverified `step` (`why`: the missing sums)."""
    return (f"checkpoint step {step} in {self.directory} is unverified: its"
            f" checksums are missing ({why}), so damage to its data cannot be"
            " detected")

  def verify(self, step: int, state: PyTree) -> None:
    """Checks a restored `state` of `step` for non-finite values and checksums.

    A step without checksums passes only with `allow_unverified` (and is then
    added to `unverified_steps`).

    Raises:
      CheckpointError: naming the step and the first damaged leaf.
      UnverifiedCheckpointError: the step has no checksums (and
        `allow_unverified` is False).
    """
    leaves = host_leaves(state)
    expected, missing = self._saved_checksums(step)
    if expected:
      actual = checksums(leaves)
      wrong = sorted(name for name in expected
                     if actual.get(name, expected[name]) != expected[name])
      if wrong:
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} is damaged: the bytes"
            f" of {wrong[0]}" + (f" and {len(wrong) - 1} more leaves" if
                                 len(wrong) > 1 else "")
            + " differ from the checksums saved with it", step)
    problem = nonfinite_problem(leaves)
    if problem:
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} is damaged: {problem}",
          step)
    if missing:
      if not self.allow_unverified:
        raise UnverifiedCheckpointError(self.unverified_message(step, missing),
                                        step)
      self.unverified_steps.add(step)

  def restore(self, step: int, like: PyTree | None = None, *,
              verify: bool = True) -> PyTree:
    """Restores `step`.

    Args:
      step: a saved step.
      like: a pytree of arrays or `jax.ShapeDtypeStruct`s with the structure (and
        shardings) to restore into; None restores the saved structure onto this
        process's first device, whatever topology saved it (so a multi-process
        run can read a single-process run's checkpoint and vice versa).
      verify: check the restored state (`verify`).

    Returns:
      The saved pytree.

    Raises:
      FileNotFoundError: `step` was never saved.
      CheckpointError: the step's metadata is missing, or `verify` fails.
      Exception: orbax's and TensorStore's errors for a step whose files are
        damaged.
    """
    if step not in self.all_steps():
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {self.directory}; saved steps:"
          f" {self.all_steps()}"
      )
    if like is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      metadata = self._manager.item_metadata(step)
      if metadata is None or getattr(metadata, "tree", None) is None:
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} is damaged: its"
            " orbax metadata (default/_METADATA) is missing", step)
      abstract = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          metadata.tree)
    else:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    if verify:
      self.verify(step, state)
    return state

  def restore_latest_intact(
      self, like: PyTree | None = None,
      report: Callable[[str], None] = logging.warning,
  ) -> tuple[int | None, PyTree | None]:
    """The newest step that restores and verifies, and its state.

    Damaged and unverified steps are reported (one line each, through
    `report`) and, once an older step restores, moved out of the checkpoint
    directory (module docstring). With `allow_unverified` an unverified step
    is restored, reported in one line. Every process makes the same choice.

    Args:
      like: as in `restore`.
      report: called with one line per damaged step.

    Returns:
      (step, state), or (None, None) when no step was ever saved.

    Raises:
      CheckpointError: steps were saved but none is intact.
    """
    steps = self.all_steps()
    problems, unverified = [], False
    for step in reversed(steps):
      state, problem = None, None
      with _abandoned_reads_logged():
        try:
          state = self.restore(step, like)
        except UnverifiedCheckpointError as e:
          problem, unverified = str(e), True
        except CheckpointError as e:
          problem = str(e)
        except Exception as e:  # pylint: disable=broad-exception-caught
          # Orbax and TensorStore raise many types for a damaged file.
          problem = (f"checkpoint step {step} in {self.directory} does not"
                     f" restore ({_one_line(e)})")
      if not multihost.all_true(problem is None, "checkpoint_restored"):
        problem = problem or (f"checkpoint step {step} in {self.directory}"
                              " does not restore on another process")
        problems.append(problem)
        older = [s for s in steps if s < step]
        report(f"{problem}; " + (f"trying step {older[-1]}" if older else
                                 "no older step"))
        continue
      if step in self.unverified_steps:
        _, missing = self._saved_checksums(step)
        report(f"{self.unverified_message(step, missing)}; restoring it anyway"
               f" ({ALLOW_UNVERIFIED_FIELD}=True).")
      damaged = [s for s in steps if s > step]
      if damaged:
        where = self.set_aside(damaged)
        report(f"Resuming from checkpoint step {step}, the newest intact one;"
               f" the damaged steps {damaged} {where}.")
      return step, state
    if not steps:
      return None, None
    accept = (f", or accept the unverified steps with"
              f" --config.{ALLOW_UNVERIFIED_FIELD}=True" if unverified else "")
    raise CheckpointError(
        f"No intact checkpoint in {self.directory}: " + "; ".join(problems)
        + f". Move the checkpoints away (or use a new workdir) to start"
        f" again{accept}.")

  def set_aside(self, steps: list[int], folder: str = DAMAGED_DIR) -> str:
    """Moves `steps` to <workdir>/`folder`/ (deletes them on GCS).

    Every process calls it (process 0 moves, the others wait).

    Returns:
      What happened to them, for a message: 'were moved to DIR' or 'were
      deleted'.
    """
    if jax.process_index() == 0:
      for step in steps:
        source = self.directory / str(step)
        if workdir_lib.is_remote(self.directory):
          self._manager.delete(step)
          continue
        target_dir = self.workdir / folder
        target_dir.mkdir(parents=True, exist_ok=True)
        target, copy = target_dir / str(step), 1
        while target.exists():
          target, copy = target_dir / f"{step}.{copy}", copy + 1
        os.rename(source, target)
    multihost.sync("checkpoints_set_aside")
    self._manager.reload()
    return ("were deleted" if workdir_lib.is_remote(self.directory) else
            f"were moved to {self.workdir / folder}")

  def restore_variables(self, step: int) -> dict[str, PyTree]:
    """The model variables of `step`, {'params': ..., **model_state}, as numpy."""
    saved = self.restore(step)
    variables = {"params": saved["params"], **(saved.get("model_state") or {})}
    return jax.tree.map(np.asarray, jax.device_get(variables))

  def close(self) -> None:
    self._manager.close()


def latest_saved_step(workdir: str | os.PathLike[str]) -> int | None:
  """The last checkpointed step of the run in `workdir`; None if it has none."""
  if not workdir_lib.Workdir(workdir).checkpoints_dir.exists():
    return None
  store = CheckpointStore(os.fspath(workdir), read_only=True)
  try:
    return store.latest_step()
  finally:
    store.close()
