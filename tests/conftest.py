"""Test-wide settings: several XLA CPU devices, quiet TensorFlow, CPU-only TF.

XLA_FLAGS must be set before jax is first imported, so it is set here, at
collection time, for every test module.
"""

import os
import pathlib
import subprocess
import sys

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=4"
)
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are cached on disk for the whole test session, so the
# subprocesses of the end-to-end tests reuse what an earlier one compiled.
_CACHE_DIR = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"conformer_fl_jax_cache_{os.getpid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Overrides of every tiny central run of the end-to-end tests (train, sweep):
# the same program shapes, so later runs reuse the session's compiled programs.
TINY_CENTRAL_OVERRIDES = (
    "--config.data.tokenizer.vocab_size=48",
    "--config.data.bucket_seconds=(8.0,)",
    "--config.central.warmup_steps=2",
    "--config.central.log_every=2",
    "--config.central.eval_every=4",
    "--config.central.checkpoint_every=2",
)


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the 'tiny' synthetic corpus, built once per session."""
  from conformer_fl.data import synthetic_speech  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path_factory.mktemp("tiny_corpus"))
  synthetic_speech.build("tiny", data_dir)
  return data_dir


def _run_tiny_experiment(workdir, data_dir) -> str:
  """`configs/experiment.py:scale=tiny` through the entry point; its stdout."""
  command = [sys.executable, "-m", "conformer_fl.main",
             "--config=configs/experiment.py:scale=tiny",
             f"--workdir={workdir}", f"--config.data_dir={data_dir}"]
  result = subprocess.run(command, cwd=pathlib.Path(__file__).parents[1],
                          env=dict(os.environ), capture_output=True, text=True,
                          timeout=900, check=False)
  assert result.returncode == 0, (
      f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n"
      f"{result.stderr[-6000:]}")
  return result.stdout


@pytest.fixture(scope="session")
def tiny_central_overrides() -> tuple[str, ...]:
  return TINY_CENTRAL_OVERRIDES


@pytest.fixture(scope="session")
def run_tiny_experiment():
  """`run(workdir, data_dir) -> stdout`: the tiny experiment's entry point."""
  return _run_tiny_experiment


@pytest.fixture(scope="session")
def tiny_experiment(tiny_corpus_dir, tmp_path_factory):
  """(workdir, stdout) of `make demo`'s pipeline at tiny scale, run once.

  tests/test_experiment_e2e.py checks it; the targeted-dropout notebook runs
  the same config on the same workdir and must reuse every stage.
  """
  workdir = tmp_path_factory.mktemp("tiny_experiment")
  return workdir, _run_tiny_experiment(workdir, tiny_corpus_dir)
