"""What the processes of a multi-host job tell each other outside compiled programs.

A multi-host job (a TPU pod, or `launch/local_multiprocess.py` standing in for
one) runs the same Python program on every process. Its compiled steps
communicate through collectives; the small host-side facts the processes must
share (evaluation counts and transcripts, one process's decision) go through
the key-value store of JAX's distributed runtime (`jax.distributed`'s
coordination service) instead. That store waits as long as
`compile_barrier_timeout_s()` allows, compiles nothing and needs no
device: a host-side exchange costs no program and cannot hit the fixed 30 s
deadline of a CPU (gloo) collective whose processes arrive far apart (one of
them writing files, say).

Every process must make the same calls in the same order, as it does for
compiled programs: each call is numbered, and the n-th call has the same keys
on every process. With one process every function returns at once.

Process 0, the chief, alone writes a workdir's files.
"""

import itertools
import json
import os
from typing import Any

import jax

# Seconds a process waits for the others at a barrier or an exchange (the
# compile barrier of `mesh.barrier_after_compile`, `gather_json`); the
# environment variable overrides the default.
COMPILE_BARRIER_TIMEOUT_ENV = "CONFORMER_FL_COMPILE_BARRIER_TIMEOUT_S"
DEFAULT_COMPILE_BARRIER_TIMEOUT_S = 3600
# Numbers the exchanges of this process (see the module docstring).
_EXCHANGE_NUMBERS = itertools.count(1)
# This process's key of the last exchange, deleted at the next one.
_own_previous_key: list[str] = []
_KEY_PREFIX = "conformer_fl"


def is_chief() -> bool:
  """Whether this is process 0, the one that writes the workdir's files."""
  return jax.process_index() == 0


def _client() -> Any:
  """The distributed runtime's client (the one orbax's barriers use too)."""
  # There is no public accessor; orbax.checkpoint.multihost reads it so too.
  client = jax._src.distributed.global_state.client  # pylint: disable=protected-access
  if client is None:
    raise RuntimeError("Several JAX processes but no distributed client: call"
                       " jax.distributed.initialize() first.")
  return client


def compile_barrier_timeout_s() -> int:
  """The barrier timeout: $CONFORMER_FL_COMPILE_BARRIER_TIMEOUT_S or the default.

  Raises:
    ValueError: the variable is set but is not a positive number of seconds.
  """
  value = os.environ.get(COMPILE_BARRIER_TIMEOUT_ENV, "").strip()
  if not value:
    return DEFAULT_COMPILE_BARRIER_TIMEOUT_S
  try:
    seconds = int(value)
  except ValueError:
    seconds = 0
  if seconds <= 0:
    raise ValueError(f"{COMPILE_BARRIER_TIMEOUT_ENV}={value!r} must be a"
                     " positive whole number of seconds.")
  return seconds


def gather_json(value: Any, name: str) -> list[Any]:
  """Every process's `value` (JSON-serializable), in process order.

  Args:
    value: this process's part; it travels as JSON, so Python floats come
      back bit-exact, tuples as lists and dict keys as strings.
    name: names the exchange in the store (and in a timeout's error).

  Returns:
    [value of process 0, value of process 1, ...], the same on every process.
  """
  if jax.process_count() == 1:
    return [value]
  client = _client()
  own_key = (f"{_KEY_PREFIX}/{next(_EXCHANGE_NUMBERS)}/{name}/"
             f"{jax.process_index()}")
  client.key_value_set(own_key, json.dumps(value, allow_nan=True))
  timeout_ms = compile_barrier_timeout_s() * 1000
  values = [value if p == jax.process_index() else json.loads(
      client.blocking_key_value_get(own_key[:own_key.rindex("/") + 1] + str(p),
                                    timeout_ms))
            for p in range(jax.process_count())]
  # Every process has now set this exchange's key, so every process has read
  # the previous exchange's: this process's part of it can go (the store
  # would otherwise keep every evaluation's transcripts).
  if _own_previous_key:
    client.key_value_delete(_own_previous_key.pop())
  _own_previous_key.append(own_key)
  return values


def chief_decides(value: Any, name: str) -> Any:
  """Process 0's `value` (JSON-serializable) on every process.

  For a decision read from shared files (is this stage done?) that every
  process must make alike: files change while the processes are apart.
  """
  if jax.process_count() == 1:
    return value
  return gather_json(value if is_chief() else None, name)[0]


def all_true(ok: bool, name: str) -> bool:
  """Whether `ok` holds on every process (the same answer everywhere)."""
  return all(gather_json(bool(ok), name))


def sync(name: str) -> None:
  """Waits until every process has called `sync` (the n-th call) too."""
  gather_json(None, name)
