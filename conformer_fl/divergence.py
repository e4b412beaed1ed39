"""The divergence guard of the training loops.

Central training: the jitted step computes, as one int32 scalar, which of the
loss, the gradient, the new parameters (with the model state) and the new
optimizer state hold a NaN or Inf (`nonfinite_flags`), and folds it into a small
`guard` carried from step to step on the device (`update_guard`): the first step
that was not finite, its flags and its loss. The loop reads the guard only when
it reads the metrics anyway (log and eval steps) and before every checkpoint
(`check_guard`), so no step adds a host sync, no non-finite state is ever saved,
and the error names the exact first step. Federated training reads its round's
metrics every round anyway: a round whose every client was non-finite (and so
left out) or whose new server state is not finite stops the run.

Either way the run stops with `DivergenceError`, naming the step or round and
the quantity; the loop ends metrics.jsonl with a `stopped` record, and the entry
point prints the one-line message and exits with status 1.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from conformer_fl import workdir as workdir_lib

PyTree = Any

LOSS = 1
GRADIENT = 2
PARAMETERS = 4
OPTIMIZER_STATE = 8
_QUANTITIES = ((LOSS, "the loss"), (GRADIENT, "the gradient"),
               (PARAMETERS, "the parameters"),
               (OPTIMIZER_STATE, "the optimizer state"))


class DivergenceError(workdir_lib.RunError):
  """Training produced a NaN or Inf.

  Attributes:
    step: the first step (or round) that was not finite.
  """

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def all_finite(tree: PyTree) -> jax.Array:
  """bool []: every inexact leaf of `tree` is finite (traceable)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def nonfinite_flags(loss: jax.Array, grad_norm: jax.Array, params: PyTree,
                    opt_state: PyTree) -> jax.Array:
  """int32 []: the OR of the flags (LOSS, GRADIENT, ...) of non-finite parts.

  grad_norm: the gradient's global norm [], which the step computes anyway;
  it is finite exactly when every gradient entry is (short of overflow).
  """
  flags = jnp.zeros((), jnp.int32)
  for flag, finite in ((LOSS, jnp.isfinite(loss)),
                       (GRADIENT, jnp.isfinite(grad_norm)),
                       (PARAMETERS, all_finite(params)),
                       (OPTIMIZER_STATE, all_finite(opt_state))):
    flags = flags | jnp.where(finite, 0, flag).astype(jnp.int32)
  return flags


def init_guard() -> dict[str, jax.Array]:
  """The guard before any step: no step has been non-finite."""
  return {"step": jnp.asarray(-1, jnp.int32),
          "flags": jnp.zeros((), jnp.int32),
          "loss": jnp.zeros((), jnp.float32)}


def update_guard(guard: dict[str, jax.Array], step: jax.Array,
                 flags: jax.Array, loss: jax.Array) -> dict[str, jax.Array]:
  """Records `step` if it is the first whose `flags` are set (traceable)."""
  first = (guard["step"] < 0) & (flags != 0)
  return {"step": jnp.where(first, step.astype(jnp.int32), guard["step"]),
          "flags": jnp.where(first, flags, guard["flags"]),
          "loss": jnp.where(first, loss.astype(jnp.float32), guard["loss"])}


def describe(flags: int) -> str:
  """'the loss, the gradient and the parameters' for a flags value."""
  names = [name for flag, name in _QUANTITIES if flags & flag]
  if len(names) > 1:
    return ", ".join(names[:-1]) + " and " + names[-1]
  return names[0] if names else "nothing"


def check_guard(guard: dict[str, Any], last_checkpoint: int | None) -> None:
  """Raises DivergenceError if the host copy of a central `guard` is set.

  Args:
    guard: the guard as numpy values.
    last_checkpoint: the newest step saved (for the message).
  """
  step = int(np.asarray(guard["step"]))
  if step < 0:
    return
  flags = int(np.asarray(guard["flags"]))
  loss = float(np.asarray(guard["loss"]))
  verb = "is" if flags in (LOSS, GRADIENT, PARAMETERS, OPTIMIZER_STATE) else "are"
  raise DivergenceError(
      f"Central training diverged at step {step}: {describe(flags)} {verb} not"
      f" finite (loss {loss}); the last checkpoint is step {last_checkpoint},"
      " nothing non-finite was saved (try e.g. a lower"
      " central.peak_learning_rate).", step)


def check_round(round_index: int, metrics: dict[str, Any],
                server_state_finite: bool, last_checkpoint: int | None) -> None:
  """Raises DivergenceError for a federated round that made no finite progress.

  Args:
    round_index: the round (1-based, as logged).
    metrics: the round's metrics as numpy values.
    server_state_finite: whether the new server state is finite.
    last_checkpoint: the newest round saved (for the message).
  """
  clients = int(metrics["num_clients"])
  nonfinite = int(metrics["num_nonfinite_clients"])
  if clients and nonfinite == clients:
    raise DivergenceError(
        f"Federated training diverged at round {round_index}: the update of"
        f" every client ({nonfinite} of {clients}) was not finite and was left"
        " out, so the server did not move; the last checkpoint is round"
        f" {last_checkpoint} (try e.g. a lower"
        " federated.client_optimizer.learning_rate).", round_index)
  if not server_state_finite:
    raise DivergenceError(
        f"Federated training diverged at round {round_index}: the new server"
        " state (parameters or server optimizer state) is not finite; the last"
        f" checkpoint is round {last_checkpoint} (try e.g. a lower"
        " federated.server_optimizer.learning_rate).", round_index)
