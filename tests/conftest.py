"""Test-wide settings: several XLA CPU devices, quiet TensorFlow, CPU-only TF.

XLA_FLAGS must be set before jax is first imported, so it is set here, at
collection time, for every test module.
"""

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=4"
)
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
# The suite is bound by XLA compile time (tiny models, a few steps each): LLVM
# without optimization compiles the tiny programs about twice as fast
# (measured: train_step + eval_step 69 s against 151 s) and changes no number
# (XLA's own HLO passes still run; LLVM reassociates no float arithmetic).
_COMPILE_SPEED_FLAG = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + _COMPILE_SPEED_FLAG
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are cached on disk for the whole test session, so the
# subprocesses of the end-to-end tests reuse what an earlier one compiled. Under
# pytest-xdist (`make test` runs two workers) the controller has set the
# directory before the workers start, so both workers share it: what one
# compiles, the other reuses. A size limit turns on JAX's locked cache
# (jax._src.lru_cache takes a file lock, from the `filelock` package, around
# every read and write), so concurrent processes never see a half-written entry.
_CACHE_DIR = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"conformer_fl_jax_cache_{os.getpid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
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


@pytest.fixture(scope="session")
def tiny_central_overrides() -> tuple[str, ...]:
  return TINY_CENTRAL_OVERRIDES


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist
# loadfile --no-loadscope-reorder`): each module is one work unit, so its
# module fixtures run once. Units are handed out in this order, the longest
# first (durations of a serial run), then the rest in collection order.
_LONGEST_FIRST = (
    "test_experiment_e2e",
    "test_train_e2e",
    "test_colabs",
    "test_sweep",
    "test_faults",
    "test_round_sharding",
    "test_analysis_known_answer",
    "test_transcribe",
)


def pytest_collection_modifyitems(items):
  rank = {module: i for i, module in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
