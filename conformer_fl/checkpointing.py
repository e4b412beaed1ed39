"""Orbax checkpoints of a run: step 0 (the initial state) always, then a cadence.

A workdir's `checkpoints/` holds one orbax step directory per saved step (the step is
the training step for central runs and the round for federated runs). The analysis
pass reads them back with `restore(step)`; training resumes from `latest_step()`.
"""

import os
from typing import Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointStore:
  """The checkpoints of one workdir.

  Attributes:
    directory: `<workdir>/checkpoints`, absolute: orbax refuses a relative
      checkpoint path, and a workdir given on the command line often is one
      (`make demo`'s `runs/demo`). Cloud paths (`gs://...`) pass unchanged.
  """

  def __init__(self, workdir: str, *, read_only: bool = False):
    workdir = str(workdir)
    if "://" not in workdir:
      workdir = os.path.abspath(workdir)
    self.directory = epath.Path(workdir) / "checkpoints"
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
    """Saves `state` (a pytree of arrays) as `step`, synchronously."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, like: PyTree | None = None) -> PyTree:
    """Restores `step`.

    Args:
      step: a saved step.
      like: a pytree of arrays or `jax.ShapeDtypeStruct`s with the structure (and
        shardings) to restore into; None restores the saved structure onto this
        process's first device, whatever topology saved it (so a multi-process
        run can read a single-process run's checkpoint and vice versa).

    Returns:
      The saved pytree.

    Raises:
      FileNotFoundError: `step` was never saved.
    """
    if step not in self.all_steps():
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {self.directory}; saved steps:"
          f" {self.all_steps()}"
      )
    if like is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          self._manager.item_metadata(step).tree)
    else:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_variables(self, step: int) -> dict[str, PyTree]:
    """The model variables of `step`, {'params': ..., **model_state}, as numpy."""
    saved = self.restore(step)
    variables = {"params": saved["params"], **(saved.get("model_state") or {})}
    return jax.tree.map(np.asarray, jax.device_get(variables))

  def close(self) -> None:
    self._manager.close()
