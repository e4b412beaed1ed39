"""The real entry point end to end on the tiny corpus: central then federated.

Every run goes through `python -m conformer_fl.main` in a subprocess (the federated
multi-host case through `launch/local_multiprocess.py`), and the tests read back
the workdir CONTRACT files. One bucket length and a fixed round shape keep each
run to one compiled program; the session's persistent compilation cache lets later
runs reuse it.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conformer_fl import checkpointing

import xla_env  # tests/xla_env.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(args: list[str], *, devices: int = 4, launcher: list[str] | None = None):
  env = xla_env.subprocess_env(devices)
  command = [sys.executable, *(launcher or ["-m", "conformer_fl.main"]), *args]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
  assert result.returncode == 0, (
      f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n"
      f"{result.stderr[-6000:]}")
  return result


def _central_args(workdir, data_dir, steps: int,
                  overrides: tuple[str, ...]) -> list[str]:
  return [
      f"--config=configs/central.py:size=tiny,corpus=tiny,domain=all,steps={steps}",
      f"--workdir={workdir}",
      f"--config.data.data_dir={data_dir}",
      *overrides,
  ]


def _federated_args(workdir, data_dir, init_workdir, rounds: int) -> list[str]:
  return [
      f"--config=configs/federated.py:size=tiny,corpus=tiny,domain=all,rounds={rounds}",
      f"--workdir={workdir}",
      f"--config.data.data_dir={data_dir}",
      "--config.data.tokenizer.vocab_size=48",
      "--config.data.bucket_seconds=(8.0,)",
      f"--config.federated.init_workdir={init_workdir}",
      "--config.federated.clients_per_round=4",
      "--config.federated.local_steps=2",
      "--config.federated.client_batch_size=2",
      "--config.federated.fixed_round_shape=True",
      "--config.federated.eval_every=2",
      "--config.federated.checkpoint_every=1",
  ]


def _metrics(workdir) -> list[dict]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def _params(workdir, step: int):
  return checkpointing.CheckpointStore(str(workdir), read_only=True).restore(
      step)["params"]


def _assert_trees_equal(a, b, atol: float = 0.0):
  flat_a = _flatten(a)
  flat_b = _flatten(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_allclose(flat_a[key], flat_b[key], atol=atol, rtol=0,
                               err_msg=key)


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}"))
    return out
  return {prefix: np.asarray(tree)}


@pytest.fixture(scope="module")
def central_run(tmp_path_factory, tiny_corpus_dir, tiny_central_overrides):
  workdir = tmp_path_factory.mktemp("central")
  _run(_central_args(workdir, tiny_corpus_dir, 4, tiny_central_overrides))
  return workdir


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory, tiny_corpus_dir, central_run):
  workdir = tmp_path_factory.mktemp("federated")
  _run(_federated_args(workdir, tiny_corpus_dir, central_run, rounds=2))
  return workdir


def test_central_run_writes_the_workdir_contract(central_run):
  config = json.loads((central_run / "config.json").read_text())
  assert config["mode"] == "central"
  assert config["model"]["vocab_size"] == 48  # Set from the tokenizer.
  assert (central_run / "tokenizer.model").exists()
  assert list(central_run.glob("events.out.tfevents.*"))
  metrics = _metrics(central_run)
  assert [m["step"] for m in metrics] == [2, 4]
  assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
  assert 0.0 <= metrics[-1]["eval/wer"] and metrics[-1]["eval/num_examples"] > 0
  store = checkpointing.CheckpointStore(str(central_run), read_only=True)
  assert store.all_steps() == [0, 2, 4]
  # Step 0 holds the initial parameters: training moved them.
  moved = [np.abs(a - b).max() for a, b in zip(
      _flatten(_params(central_run, 0)).values(),
      _flatten(_params(central_run, 4)).values())]
  assert max(moved) > 0


def test_central_resume_equals_uninterrupted(tmp_path, tiny_corpus_dir,
                                             central_run,
                                             tiny_central_overrides):
  # Interrupted after the step-2 checkpoint, then run again on the workdir.
  _run(_central_args(tmp_path, tiny_corpus_dir, 2, tiny_central_overrides))
  _run(_central_args(tmp_path, tiny_corpus_dir, 4, tiny_central_overrides))
  _assert_trees_equal(_params(tmp_path, 4), _params(central_run, 4))
  assert [m["step"] for m in _metrics(tmp_path)] == [2, 4]


def test_federated_run_writes_the_workdir_contract(federated_run, central_run):
  config = json.loads((federated_run / "config.json").read_text())
  assert config["mode"] == "federated"
  # The pre-trained run's tokenizer is reused.
  assert ((federated_run / "tokenizer.model").read_bytes()
          == (central_run / "tokenizer.model").read_bytes())
  metrics = _metrics(federated_run)
  assert [m["round"] for m in metrics] == [1, 2]
  for m in metrics:
    assert m["num_clients"] == 4 and m["num_nonfinite_clients"] == 0
    assert m["num_examples"] > 0 and np.isfinite(m["loss"])
    assert any(k.startswith("update_norm/encoder/block_00/") for k in m)
  assert "eval/wer" in metrics[-1]
  store = checkpointing.CheckpointStore(str(federated_run), read_only=True)
  assert store.all_steps() == [0, 1, 2]
  # Round 0 starts from the central run's final parameters.
  _assert_trees_equal(_params(federated_run, 0), _params(central_run, 4))
  assert (federated_run / "clients").is_dir()


def test_federated_resume_equals_uninterrupted(tmp_path, tiny_corpus_dir,
                                               central_run, federated_run):
  _run(_federated_args(tmp_path, tiny_corpus_dir, central_run, rounds=1))
  _run(_federated_args(tmp_path, tiny_corpus_dir, central_run, rounds=2))
  _assert_trees_equal(_params(tmp_path, 2), _params(federated_run, 2))


_TWO_PROCESSES = ["launch/local_multiprocess.py", "--num_processes=2",
                  "--devices_per_process=2"]

# Put on process 1's PYTHONPATH as sitecustomize.py: it compiles the federated
# round DELAY seconds slower (a slower host), more than gloo's fixed 30 s.
_SLOW_ROUND_COMPILE = """
import sys
import time

from jax._src import compiler

DELAY = 35
_compile = compiler.compile_or_get_cached


def _slow_compile(backend, computation, *args, **kwargs):
  name = str(computation.operation.attributes["sym_name"]).strip('"')
  if "run_round" in name:
    print(f"slow host: compiling {name} {DELAY} s slower", file=sys.stderr,
          flush=True)
    time.sleep(DELAY)
  return _compile(backend, computation, *args, **kwargs)


compiler.compile_or_get_cached = _slow_compile
"""


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_corpus_dir, central_run):
  """Round 1 as 2 processes x 2 devices; process 0 fills the compilation cache."""
  workdir = tmp_path_factory.mktemp("two_processes")
  _run(_federated_args(workdir, tiny_corpus_dir, central_run, rounds=1),
       launcher=[*_TWO_PROCESSES, "--"])
  return workdir


def test_two_processes_match_one_process(two_process_run, federated_run):
  # Same clients, rngs and sums; only the all-reduce runs over two processes.
  _assert_trees_equal(_params(two_process_run, 1), _params(federated_run, 1),
                      atol=1e-5)


def test_two_processes_with_a_warm_cache_on_one_and_a_slow_compile(
    tmp_path, tiny_corpus_dir, central_run, federated_run, two_process_run):
  """Processes that reach the round far apart still run it, to the same result.

  The session's compilation cache holds what `two_process_run`'s process 0
  compiled. JAX writes that cache from process 0 only, under keys of its own:
  here process 0 reads every program from it, process 1 compiles every one, and
  the round 35 s slower on top. Without a barrier after compilation, process 0
  reached the round's first collective alone and gloo gave up after 30 s
  (`Gloo context initialization failed: DEADLINE_EXCEEDED`).
  """
  del two_process_run  # It warmed the cache of process 0.
  hook = tmp_path / "slow_host"
  hook.mkdir()
  (hook / "sitecustomize.py").write_text(_SLOW_ROUND_COMPILE)
  workdir = tmp_path / "run"
  log = "JAX_DEBUG_LOG_MODULES=jax._src.compiler"
  result = _run(
      _federated_args(workdir, tiny_corpus_dir, central_run, rounds=1),
      launcher=[*_TWO_PROCESSES, f"--process_env=0:{log}",
                f"--process_env=1:{log}",
                f"--process_env=1:PYTHONPATH={hook}{os.pathsep}"
                f"{os.environ.get('PYTHONPATH', '')}", "--"])
  lines = (result.stdout + result.stderr).splitlines()

  def logged(process: int, text: str) -> bool:
    return any(line.startswith(f"[p{process}] ") and text in line
               for line in lines)

  round_hit = "Persistent compilation cache hit for 'jit_run_round'"
  round_miss = "PERSISTENT COMPILATION CACHE MISS for 'jit_run_round'"
  assert logged(0, round_hit) and not logged(0, round_miss)
  assert logged(1, round_miss) and not logged(1, round_hit)
  assert logged(1, "slow host: compiling jit_run_round 35 s slower")
  assert logged(0, "Compiled federated_round; waiting up to")
  _assert_trees_equal(_params(workdir, 1), _params(federated_run, 1), atol=1e-5)
