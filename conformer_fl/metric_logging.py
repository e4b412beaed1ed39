"""Metrics of a run: TensorBoard through clu's writers, `metrics.jsonl` and samples.

`metrics.jsonl` (CONTRACT) holds one JSON object per logged step or round, with the key
`step` (central training) or `round` (federated training) and the scalar metrics.
A run that stops (`conformer_fl.workdir.RunError`, e.g. divergence) ends it with a
record `{"step" or "round": N, "stopped": "<why>"}`. `eval_samples.txt` holds a few
transcripts of every evaluation, in blocks that start with a line `step N` (or
`round N`). Only process 0 writes; the other processes of a multi-host job log
nothing.

Both files survive a kill: every record is appended with one `write` of whole
lines (and fsync'd on a local disk), and on resume `MetricsLogger.drop_after`
drops what was logged after the restored checkpoint, the `stopped` records,
repeated steps and a torn last line (a kill during a write), rewriting the file
by a rename. TensorBoard's event files are not trimmed: a resumed run starts a
new events file, and the steps between the restored checkpoint and the kill
appear in both (metrics.jsonl is the record).
"""

from collections.abc import Sequence
import json
import math
import os
import re
from typing import Any, Mapping

from absl import logging
from clu import metric_writers
from etils import epath
import jax
import numpy as np

from conformer_fl import workdir as workdir_lib

METRICS_FILE = workdir_lib.METRICS_FILE
SAMPLES_FILE = workdir_lib.SAMPLES_FILE
STOPPED_KEY = "stopped"


def _to_python(value: Any) -> float | int | str:
  value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf: keep them readable as strings.
  return value


def append_text(path: epath.Path, text: str) -> None:
  """Appends `text` (whole lines) with one write; fsync'd on a local disk."""
  if workdir_lib.is_remote(path):
    with path.open("a") as f:
      f.write(text)
    return
  data = text.encode()
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    written = os.write(fd, data)
    while written < len(data):  # Only on a signal or a full disk.
      written += os.write(fd, data[written:])
    os.fsync(fd)
  finally:
    os.close(fd)


def _index(record: Mapping[str, Any]) -> int | None:
  index = record.get("step", record.get("round"))
  return index if isinstance(index, int) else None


def trim_metrics(path: epath.Path, step: int) -> None:
  """Keeps one record per step <= `step`; drops stopped records, torn lines."""
  if not path.exists():
    return
  text = path.read_text()
  records, bad = workdir_lib.parse_records(text)
  for line in bad:
    logging.warning("%s: dropping a line that is not a JSON record (a write cut"
                    " short by a kill?): %.80r", path, line)
  # One record per step (of a step logged twice, the last record written),
  # in step order.
  kept = {_index(r): r for r in records if STOPPED_KEY not in r
          and _index(r) is not None and _index(r) <= step}
  new_text = "".join(json.dumps(kept[i]) + "\n" for i in sorted(kept))
  if new_text != text:
    workdir_lib.write_atomically(path, new_text)


_SAMPLE_HEADER = re.compile(r"^(step|round) (\d+)$")


def trim_samples(path: epath.Path, step: int) -> None:
  """Keeps the eval_samples.txt blocks of steps <= `step`, whole blocks only."""
  if not path.exists():
    return
  text = path.read_text()
  blocks, block = [], []
  for line in text.splitlines(keepends=True):
    if _SAMPLE_HEADER.match(line.rstrip("\n")) and block:
      blocks.append(block)
      block = []
    block.append(line)
  if block:
    blocks.append(block)
  kept = []
  for block in blocks:
    header = _SAMPLE_HEADER.match(block[0].rstrip("\n"))
    complete = block[-1].endswith("\n")
    if header and complete and int(header.group(2)) <= step:
      kept.append("".join(block))
  new_text = "".join(kept)
  if new_text != text:
    workdir_lib.write_atomically(path, new_text)


class MetricsLogger:
  """Writes scalar metrics to TensorBoard and to `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str, step_key: str):
    """Opens the writers.

    Args:
      workdir: the run's directory.
      step_key: "step" or "round": the key that indexes each JSON line.
    """
    if step_key not in ("step", "round"):
      raise ValueError(f"step_key must be 'step' or 'round', got {step_key!r}")
    self.step_key = step_key
    self._is_writer = jax.process_index() == 0
    self._path = workdir_lib.Workdir(workdir).metrics_path
    self._samples_path = workdir_lib.Workdir(workdir).samples_path
    self._writer = metric_writers.create_default_writer(
        workdir, just_logging=not self._is_writer, asynchronous=False
    )

  def drop_after(self, step: int) -> None:
    """Trims metrics.jsonl and eval_samples.txt to `step` (module docstring)."""
    if not self._is_writer:
      return
    trim_metrics(self._path, step)
    trim_samples(self._samples_path, step)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs `scalars` (numbers or 0-d arrays) at `step`."""
    scalars = {name: _to_python(value) for name, value in scalars.items()}
    numeric = {k: v for k, v in scalars.items() if not isinstance(v, str)}
    self._writer.write_scalars(step, numeric)
    if self._is_writer:
      append_text(self._path,
                  json.dumps({self.step_key: int(step), **scalars}) + "\n")

  def write_stopped(self, step: int, reason: str) -> None:
    """Ends metrics.jsonl with why the run stopped at `step`."""
    if self._is_writer:
      append_text(self._path, json.dumps(
          {self.step_key: int(step), STOPPED_KEY: reason}) + "\n")

  def write_samples(self, step: int,
                    examples: Sequence[tuple[str, str]]) -> None:
    """Appends (reference, hypothesis) pairs of the evaluation at `step`."""
    if self._is_writer:
      append_text(self._samples_path, "".join(
          f"{self.step_key} {step}\n  REF: {reference}\n  HYP: {hypothesis}\n"
          for reference, hypothesis in examples))

  def close(self) -> None:
    self._writer.flush()
    self._writer.close()
