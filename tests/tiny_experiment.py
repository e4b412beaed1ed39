"""`configs/experiment.py:scale=tiny` through the real entry point, for tests."""

from collections.abc import Sequence
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TWO_PROCESSES = ("launch/local_multiprocess.py", "--num_processes=2",
                 "--devices_per_process=2", "--")


def run(workdir, data_dir, arg: str = "", overrides: Sequence[str] = (),
        launcher: Sequence[str] = ()) -> str:
  """`configs/experiment.py:scale=tiny[,arg]` in `workdir`; its stdout.

  Args:
    workdir: the experiment's workdir.
    data_dir: the TFDS data_dir of the tiny corpus.
    arg: more config-string arguments (e.g. ',stability=...').
    overrides: `--config.FIELD=VALUE` flags.
    launcher: a launcher and its flags before the entry point's
      (`TWO_PROCESSES`); () runs `python -m conformer_fl.main`.
  """
  entry = [*launcher] if launcher else ["-m", "conformer_fl.main"]
  command = [sys.executable, *entry,
             f"--config=configs/experiment.py:scale=tiny{arg}",
             f"--workdir={workdir}", f"--config.data_dir={data_dir}",
             *overrides]
  result = subprocess.run(command, cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=1200,
                          check=False)
  assert result.returncode == 0, (
      f"{' '.join(command)} failed:\n{result.stdout[-6000:]}\n"
      f"{result.stderr[-6000:]}")
  return result.stdout


def without_timings(summary: dict[str, Any]) -> dict[str, Any]:
  """The summary less what the machine's speed decides (seconds)."""
  summary = dict(summary, stage_seconds=None)
  summary["arms"] = [dict(row, step_seconds_fraction=None)
                     for row in summary["arms"]]
  summary["models"] = [dict(model, learning_curve=[
      dict(c, seconds=None) for c in model["learning_curve"]])
                       for model in summary["models"]]
  return summary


def restricted(summary: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
  """`summary` as the same config with only the arms `keys` and no engine check.

  Each arm is trained and evaluated on its own, so the rest is unchanged: the
  arms, comparisons and transcripts of other arms go, and so do the verdict
  (it needs the anti-targeted arm) and the leave-one-engine-out results.

  Args:
    summary: a summary.json of `configs/experiment.py:scale=tiny`.
    keys: the arm keys to keep ('LEVEL/ARM'), in the summary's order.
  """
  keys = set(keys)
  summary = dict(summary, verdict=None, engines=None)
  summary["arms"] = [row for row in summary["arms"] if row["key"] in keys]
  summary["comparisons"] = [c for c in summary["comparisons"]
                            if {c["a"], c["b"]} <= keys]
  summary["transcripts"] = [
      dict(s, arms={k: v for k, v in s["arms"].items() if k in keys})
      for s in summary["transcripts"]]
  return summary


def assert_close(got: Any, expected: Any, path: str = "summary",
                 rel: float = 1e-4) -> None:
  """Equal structure, strings, ints and flags; floats to a relative `rel`."""
  if isinstance(expected, dict):
    assert set(got) == set(expected), path
    for key in expected:
      assert_close(got[key], expected[key], f"{path}/{key}", rel)
  elif isinstance(expected, list):
    assert len(got) == len(expected), path
    for i, (a, b) in enumerate(zip(got, expected)):
      assert_close(a, b, f"{path}[{i}]", rel)
  elif isinstance(expected, float):
    assert got == pytest.approx(expected, rel=rel, abs=1e-9), path
  else:
    assert got == expected, path
