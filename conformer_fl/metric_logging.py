"""Metrics of a run: TensorBoard through clu's writers and `metrics.jsonl`.

`metrics.jsonl` (CONTRACT) holds one JSON object per logged step or round, with the key
`step` (central training) or `round` (federated training) and the scalar metrics.
Only process 0 writes; the other processes of a multi-host job log nothing.
"""

import json
import math
from typing import Any, Mapping

from clu import metric_writers
from etils import epath
import jax
import numpy as np


def _to_python(value: Any) -> float | int:
  value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf: keep them readable as strings.
  return value


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
    self._path = epath.Path(workdir) / "metrics.jsonl"
    self._writer = metric_writers.create_default_writer(
        workdir, just_logging=not self._is_writer, asynchronous=False
    )

  def drop_after(self, step: int) -> None:
    """Removes lines logged after `step`: a resumed run logs them again."""
    if not self._is_writer or not self._path.exists():
      return
    kept = [
        line
        for line in self._path.read_text().splitlines()
        if line.strip() and json.loads(line)[self.step_key] <= step
    ]
    self._path.write_text("".join(line + "\n" for line in kept))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs `scalars` (numbers or 0-d arrays) at `step`."""
    scalars = {name: _to_python(value) for name, value in scalars.items()}
    numeric = {k: v for k, v in scalars.items() if not isinstance(v, str)}
    self._writer.write_scalars(step, numeric)
    if self._is_writer:
      with self._path.open("a") as f:
        f.write(json.dumps({self.step_key: int(step), **scalars}) + "\n")

  def close(self) -> None:
    self._writer.flush()
    self._writer.close()
