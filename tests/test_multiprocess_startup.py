"""Multi-process start-up pieces that need no second process.

The two-process runs themselves (a warm compilation cache on one process, a
cold and slow one on the other) are in tests/test_train_e2e.py.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

from conformer_fl import multihost
from conformer_fl.federated import mesh as mesh_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import local_multiprocess  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_process_env_goes_to_one_process():
  assert local_multiprocess.parse_process_env(
      ["1:JAX_COMPILATION_CACHE_DIR=/tmp/c1", "0:A=x=y", "1:EMPTY="], 2) == {
          1: {"JAX_COMPILATION_CACHE_DIR": "/tmp/c1", "EMPTY": ""},
          0: {"A": "x=y"}}
  for bad in ("2:A=1", "x:A=1", "1:A", "1:=3", "A=1"):
    with pytest.raises(ValueError, match=r"Bad --process_env .*INDEX:NAME=VALUE"):
      local_multiprocess.parse_process_env([bad], 2)


def test_compile_barrier_timeout_from_the_environment(monkeypatch):
  monkeypatch.delenv(multihost.COMPILE_BARRIER_TIMEOUT_ENV, raising=False)
  assert multihost.compile_barrier_timeout_s() == 3600
  monkeypatch.setenv(multihost.COMPILE_BARRIER_TIMEOUT_ENV, "7200")
  assert multihost.compile_barrier_timeout_s() == 7200
  for bad in ("0", "-5", "1h"):
    monkeypatch.setenv(multihost.COMPILE_BARRIER_TIMEOUT_ENV, bad)
    with pytest.raises(ValueError, match="must be a positive whole number"):
      multihost.compile_barrier_timeout_s()


def test_barrier_after_compile_is_the_jitted_function_in_one_process():
  calls = []

  def double(x):
    calls.append(x.shape)  # Traced once per shape.
    return 2 * x

  jitted = jax.jit(double)
  synced = mesh_lib.barrier_after_compile(jitted, "double")
  assert synced.jitted is jitted
  assert synced(jnp.ones(3)).tolist() == [2.0, 2.0, 2.0]
  assert synced(jnp.ones(3)).tolist() == [2.0, 2.0, 2.0]
  assert calls == [(3,)]
