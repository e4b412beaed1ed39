"""The divergence guard of the training loop.

Central training: the jitted step computes, as one int32 scalar, which of the
loss, the gradient, the new parameters (with the model state) and the new
optimizer state hold a NaN or Inf (`nonfinite_flags`), and folds it into a small
`guard` carried from step to step on the device (`update_guard`): the first step
that was not finite, its flags and its loss. The loop reads the guard only when
it reads the metrics anyway (the first step, log and eval steps) and before
every checkpoint (`check_guard`), so no step adds a host sync, no non-finite
state is ever saved, and the error names the exact first step. Federated
training reads its round's metrics every round anyway: a round whose every
client was non-finite (and so left out) or whose new server state is not finite
stops the run.

Loss explosion (`LossExplosionGuard`): a loss that stays finite but grows by
orders of magnitude (a learning rate far too high: the loss of a CTC model then
climbs to ~1e5, its floor for outputs that cannot align, and on to 1e14). The
loop (conformer_fl/training/loop.py) feeds the guard the training loss of its
first step or round (the loss of the parameters it starts from) and of every
logged or evaluated one, values it reads anyway. A value above `factor` times
the median of the last `window` accepted values is not accepted; `patience` such
values in a row stop the run, and the exploded model is logged but not
evaluated. A resumed run first replays the losses of metrics.jsonl. The loss of
step (round) i is that of checkpoint i - 1, so the checkpoints from the last
accepted step on are moved to `<workdir>/checkpoints_diverged/`: the workdir's
newest checkpoint is then one that an accepted loss vouches for.

Either way the run stops with `DivergenceError`, naming the step or round and
the quantity; the run (`run_setup.open_run`) ends metrics.jsonl with a `stopped`
record, and the entry point prints the one-line message and exits with status 1.
When the run resumed from a checkpoint without checksums
(`allow_unverified_checkpoints`), the message says that this checkpoint may be
damaged rather than blaming the learning rate.
"""

import collections
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
DIVERGED_DIR = "checkpoints_diverged"


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


def _cause(resumed_unverified: int | None, fix: str) -> str:
  """The likely cause and fix, for the end of a divergence message.

  Args:
    resumed_unverified: the step or round this run resumed from, if that
      checkpoint had no checksums (None: it was verified, or a fresh start).
    fix: the fix otherwise, e.g. 'try e.g. a lower central.peak_learning_rate'.
  """
  if resumed_unverified is None:
    return f"({fix})."
  return (f"(the run resumed from checkpoint {resumed_unverified}, which had"
          " no checksums: it may be damaged, which a learning rate would not"
          " explain; rerun without --config.allow_unverified_checkpoints=True"
          " to resume from the newest verified checkpoint instead).")


def check_guard(guard: dict[str, Any], last_checkpoint: int | None,
                resumed_unverified: int | None = None) -> None:
  """Raises DivergenceError if the host copy of a central `guard` is set.

  Args:
    guard: the guard as numpy values.
    last_checkpoint: the newest step saved (for the message).
    resumed_unverified: as in `_cause`.
  """
  step = int(np.asarray(guard["step"]))
  if step < 0:
    return
  flags = int(np.asarray(guard["flags"]))
  loss = float(np.asarray(guard["loss"]))
  verb = "is" if flags in (LOSS, GRADIENT, OPTIMIZER_STATE) else "are"
  raise DivergenceError(
      f"Central training diverged at step {step}: {describe(flags)} {verb} not"
      f" finite (loss {loss}); the last checkpoint is step {last_checkpoint},"
      " nothing non-finite was saved "
      + _cause(resumed_unverified,
               "try e.g. a lower central.peak_learning_rate"), step)


def check_round(round_index: int, metrics: dict[str, Any],
                server_state_finite: bool, last_checkpoint: int | None,
                resumed_unverified: int | None = None) -> None:
  """Raises DivergenceError for a federated round that made no finite progress.

  Args:
    round_index: the round (1-based, as logged).
    metrics: the round's metrics as numpy values.
    server_state_finite: whether the new server state is finite.
    last_checkpoint: the newest round saved (for the message).
    resumed_unverified: as in `_cause`.
  """
  clients = int(metrics["num_clients"])
  nonfinite = int(metrics["num_nonfinite_clients"])
  if clients and nonfinite == clients:
    raise DivergenceError(
        f"Federated training diverged at round {round_index}: the update of"
        f" every client ({nonfinite} of {clients}) was not finite and was left"
        " out, so the server did not move; the last checkpoint is round"
        f" {last_checkpoint} " + _cause(
            resumed_unverified,
            "try e.g. a lower federated.client_optimizer.learning_rate"),
        round_index)
  if not server_state_finite:
    raise DivergenceError(
        f"Federated training diverged at round {round_index}: the new server"
        " state (parameters or server optimizer state) is not finite; the last"
        f" checkpoint is round {last_checkpoint} " + _cause(
            resumed_unverified,
            "try e.g. a lower federated.server_optimizer.learning_rate"),
        round_index)


class LossExplosionGuard:
  """Stops a run whose finite loss grew far above its running median.

  Fed on the host with the loss of each logged step or round (module
  docstring). Every process feeds it the same replicated values, so every
  process stops alike.

  Attributes:
    factor: a value above factor * reference is not accepted (0 = off).
    patience: this many values in a row not accepted stop the run.
    window: the reference is the median of the last `window` accepted values.
  """

  def __init__(self, factor: float, patience: int, window: int):
    if factor and (factor <= 1 or patience < 1 or window < 1):
      raise ValueError(
          f"loss_guard needs factor > 1 (or 0 = off), patience >= 1 and"
          f" window >= 1; got factor={factor}, patience={patience},"
          f" window={window}.")
    self.factor, self.patience = factor, patience
    self._accepted = collections.deque(maxlen=window)
    # (index, loss) of the values not accepted since the last accepted one.
    self._streak: list[tuple[int, float]] = []
    self.last_accepted: int | None = None

  def reference(self) -> float | None:
    """The median of the accepted values in the window (None: none yet)."""
    return float(np.median(self._accepted)) if self._accepted else None

  def update(self, index: int, loss: float) -> bool:
    """Takes the loss of step or round `index`; True when the run must stop.

    Non-finite values are the non-finite guard's: ignored here.
    """
    if not self.factor or not np.isfinite(loss):
      return False
    reference = self.reference()
    if reference is None or loss <= self.factor * reference:
      self._accepted.append(float(loss))
      self._streak, self.last_accepted = [], index
      return False
    self._streak.append((index, float(loss)))
    return len(self._streak) >= self.patience

  def message(self, what: str, last_checkpoint: int | None, moved: str,
              fix: str, resumed_unverified: int | None = None) -> str:
    """The one line of a tripped guard.

    Args:
      what: 'Central training' / 'Federated training', and the index's name
        'step' / 'round', as 'Central training|step'.
      last_checkpoint: the newest step or round kept.
      moved: the checkpoints set aside, e.g. 'the checkpoints [6, 8] were
        moved to DIR; ' ('' if none).
      fix: as in `_cause`.
      resumed_unverified: as in `_cause`.
    """
    mode, unit = what.split("|")
    first, *_ = self._streak
    values = ", ".join(f"{loss:.3g} at {unit} {index}"
                       for index, loss in self._streak)
    return (f"{mode} diverged at {unit} {first[0]}: the loss exploded,"
            f" {len(self._streak)} losses in a row above"
            f" {self.factor:g} x the median of the previous ones"
            f" ({self.reference():.3g}): {values}; {moved}the last checkpoint"
            f" is {unit} {last_checkpoint} " + _cause(resumed_unverified, fix))
