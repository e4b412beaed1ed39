"""Everyday mistakes end in one line naming the problem and the fix.

Each case runs the real entry point, `python -m conformer_fl.main` in a
subprocess, and asserts its last stderr line (`error: ...`, no traceback),
exit status 1, and that nothing was written: every mistake is found before a
run starts (conformer_fl/cli.py for flags, conformer_fl/preflight.py for the
rest). The corpus is built the same way by every reader: ArrayRecord.
"""

import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

from conformer_fl import config_lib
from conformer_fl import preflight
from conformer_fl.data import corpus
from conformer_fl.data import paths
from conformer_fl.data import synthetic_speech

import entry_point  # tests/entry_point.py
import xla_env  # tests/xla_env.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
CENTRAL = "--config=configs/central.py:size=tiny,corpus=tiny,steps=2"
FEDERATED = "--config=configs/federated.py:size=tiny,corpus=tiny,rounds=1"


def _main(*args: str, devices: int = 4, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "conformer_fl.main", *args], cwd=ROOT,
      env=xla_env.subprocess_env(devices, **env), capture_output=True,
      text=True, timeout=300, check=False)


def _error_line(result: subprocess.CompletedProcess) -> str:
  """The one-line error of a refused run (exit status 1, no traceback)."""
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("error: "), result.stderr[-3000:]
  return line


def _snapshot(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_tfrecord_dir(tmp_path_factory) -> str:
  """The tiny corpus as tfrecord files (what an older version prepared)."""
  data_dir = str(tmp_path_factory.mktemp("tiny_tfrecord"))
  synthetic_speech.build("tiny", data_dir, file_format="tfrecord")
  return data_dir


def test_a_mistyped_config_field(tmp_path):
  result = _main(CENTRAL, f"--workdir={tmp_path / 'w'}",
                 "--config.central.num_step=3")
  assert _error_line(result) == (
      "error: --config.central.num_step: config.central has no field"
      " 'num_step'; did you mean --config.central.num_steps?")
  assert not (tmp_path / "w").exists()


def test_a_bad_config_argument_and_a_missing_config_file(tmp_path):
  result = _main("--config=configs/central.py:size=tiny,corpu=tiny",
                 f"--workdir={tmp_path / 'w'}")
  assert _error_line(result).startswith(
      "error: --config=configs/central.py:size=tiny,corpu=tiny: Bad config"
      " argument 'corpu=tiny': expected key=value with key one of ['corpus',")
  result = _main("--config=configs/centrl.py", f"--workdir={tmp_path / 'w'}")
  assert _error_line(result).startswith(
      "error: --config=configs/centrl.py: no such config file"
      " 'configs/centrl.py'")
  assert not (tmp_path / "w").exists()


def test_missing_debian_packages(tmp_path):
  data_dir = tmp_path / "tfds"
  # No espeak-ng or flite on this PATH; the corpus must be built.
  result = _main(CENTRAL, f"--workdir={tmp_path / 'w'}",
                 f"--config.data.data_dir={data_dir}", PATH=str(tmp_path))
  line = _error_line(result)
  assert line.startswith(
      "error: The synthetic speech corpus needs Debian packages that are not"
      " installed: espeak-ng (the `espeak-ng` program); flite")
  assert "sudo apt-get install espeak-ng flite" in line
  assert not (tmp_path / "w").exists()
  assert not data_dir.exists()


def test_clients_that_do_not_divide_over_the_devices(tmp_path, tiny_corpus_dir):
  result = _main(FEDERATED, f"--workdir={tmp_path / 'w'}",
                 f"--config.data.data_dir={tiny_corpus_dir}",
                 "--config.federated.clients_per_round=6")
  assert _error_line(result) == (
      "error: federated.clients_per_round=6 does not divide over the 4"
      " devices (each device trains the same number of clients): set"
      " --config.federated.clients_per_round=8 (a multiple of 4).")
  assert not (tmp_path / "w").exists()


def test_an_init_workdir_without_a_checkpoint(tmp_path, tiny_corpus_dir):
  central = tmp_path / "central"
  central.mkdir()
  (central / "notes.txt").write_text("not a run")
  result = _main(FEDERATED, f"--workdir={tmp_path / 'w'}",
                 f"--config.data.data_dir={tiny_corpus_dir}",
                 f"--config.federated.init_workdir={central}")
  assert _error_line(result) == (
      f"error: federated.init_workdir='{central}' has no checkpoint: run the"
      f" central training there first (configs/central.py"
      f" --workdir={central}), or give another workdir.")
  assert not (tmp_path / "w").exists()
  assert _snapshot(central) == {"notes.txt": _snapshot(central)["notes.txt"]}


def test_the_analysis_of_an_empty_workdir(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  result = _main("--config=configs/analysis.py", f"--workdir={empty}")
  assert _error_line(result) == (
      f"error: {empty} holds no trained run (no config.json): give the"
      " analysis the --workdir of a finished central or federated run.")
  assert not list(empty.iterdir())


def test_a_central_config_in_an_experiment_root(tmp_path, tiny_corpus_dir):
  root = tmp_path / "experiment"
  root.mkdir()
  (root / "experiment_config.json").write_text("{}")
  before = _snapshot(root)
  result = _main(CENTRAL, f"--workdir={root}",
                 f"--config.data.data_dir={tiny_corpus_dir}")
  assert _error_line(result) == (
      f"error: {root} is an experiment's workdir (it has"
      " experiment_config.json): run configs/experiment.py there, or give"
      " this run a new --workdir (the experiment's pre-trained run is"
      f" {root / 'pretrain'}).")
  assert _snapshot(root) == before


def test_a_tfrecord_corpus_is_refused_for_federated_clients(
    tmp_path, tiny_tfrecord_dir):
  result = _main(FEDERATED, f"--workdir={tmp_path / 'w'}",
                 f"--config.data.data_dir={tiny_tfrecord_dir}",
                 "--config.federated.clients_per_round=4")
  line = _error_line(result)
  assert line.startswith("error: synthetic_speech/tiny/")
  assert "is prepared as tfrecord files" in line
  assert "Delete that folder (the local corpus is then rebuilt as ArrayRecord)" in line
  assert not (tmp_path / "w").exists()


def test_a_central_run_builds_the_corpus_that_federated_runs_read(tmp_path):
  """docs/training.md's sequence on an empty data_dir: central, then federated."""
  data_dir = str(tmp_path / "tfds")
  central = entry_point.parse_config(
      CENTRAL.removeprefix("--config="), f"--config.data.data_dir={data_dir}")
  preflight.check(central, str(tmp_path / "c"))  # What main.run does first.
  files = sorted(p.name for p in (tmp_path / "tfds").rglob("*.array_record*"))
  assert files == [f"synthetic_speech-{s}.array_record-00000-of-00001"
                   for s in ("dev", "test", "train")]
  federated = entry_point.parse_config(
      FEDERATED.removeprefix("--config="), f"--config.data.data_dir={data_dir}",
      "--config.federated.clients_per_round=4")
  corpus.ensure_prepared(federated.data, random_access=True)  # No error.
  assert not (tmp_path / "c").exists()


def test_the_corpus_command_builds_where_the_configs_read():
  assert config_lib.DEFAULT_DATA_DIR == paths.DEFAULT_DATA_DIR
  result = subprocess.run(
      [sys.executable, "-m", "conformer_fl.data.synthetic_speech", "--helpfull"],
      cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
      timeout=300, check=False)  # absl's --helpfull exits with status 1.
  assert f"(default: '{paths.DEFAULT_DATA_DIR}')" in result.stdout
  home = os.path.expanduser("~")
  if "TFDS_DATA_DIR" not in os.environ:
    assert paths.DEFAULT_DATA_DIR == os.path.join(
        home, ".cache", "conformer_fl", "tfds")
