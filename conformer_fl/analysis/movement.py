"""How far each unit's weights moved in training, and its rank correlation.

  distance          ||theta_u(T) - theta_u(0)||_2 over all parameters of unit u
  initial_norm      ||theta_u(0)||_2
  relative_distance distance / initial_norm (None when initial_norm is 0)
  rms_movement      distance / sqrt(number of parameters of u): the root mean
                    square change per parameter
  update_norm_sum   sum over rounds <= T of the server update norm of u logged
                    by federated training (`update_norm/<unit>` in
                    metrics.jsonl); None for central runs. A unit coarser
                    than the logged ones (a block, with module norms logged)
                    gets, per round, sqrt(sum of its modules' squared norms):
                    exact, because the modules partition the block.
Rank correlations (Spearman's rho, Kendall's tau-b; scipy.stats) relate a
movement measure to the WER (or loss) increase under reset; undefined values
(constant inputs, fewer than 2 units) are None, never NaN, so the JSON stays
standard.
"""

from collections.abc import Mapping, Sequence
import math
import os
from typing import Any

from etils import epath
import jax
import numpy as np
from scipy import stats

from conformer_fl import tree_paths
from conformer_fl import workdir as workdir_lib

PyTree = Any
Path = tuple[str, ...]
UPDATE_NORM_PREFIX = "update_norm/"


def tree_l2_norm(tree: PyTree) -> float:
  """sqrt(sum of squares) over every leaf, in float64."""
  return math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                       for x in jax.tree.leaves(tree)))


def unit_movement(trained_params: PyTree, initial_params: PyTree,
                  units: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
  """{unit: {'distance', 'initial_norm', 'relative_distance',
  'rms_movement'}} (module docstring)."""
  movement = {}
  for name, path in units.items():
    trained = tree_paths.get(trained_params, path)
    initial = tree_paths.get(initial_params, path)
    distance = tree_l2_norm(jax.tree.map(
        lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
        trained, initial))
    initial_norm = tree_l2_norm(initial)
    size = sum(np.size(x) for x in jax.tree.leaves(initial))
    movement[name] = dict(
        distance=distance, initial_norm=initial_norm,
        relative_distance=distance / initial_norm if initial_norm > 0 else None,
        rms_movement=distance / math.sqrt(size) if size else None)
  return movement


def read_update_norm_sums(metrics_path: str | os.PathLike[str],
                          unit_names: Sequence[str],
                          last_round: int) -> dict[str, float | None] | None:
  """Per unit, the summed per-round update norms of rounds <= `last_round`.

  Args:
    metrics_path: a run's metrics.jsonl (local or `gs://`).
    unit_names: the analysis units.
    last_round: the trained checkpoint's round T.

  Returns:
    None when the file has no `update_norm/` keys (central runs, or no file);
    else {unit: sum or None when no logged unit lies inside it}.
  """
  metrics_path = epath.Path(metrics_path)
  if not metrics_path.exists():
    return None
  per_round: dict[int, dict[str, float]] = {}
  # A torn last line (a run killed while writing it) is skipped.
  for record in workdir_lib.read_records(metrics_path):
    norms = {k[len(UPDATE_NORM_PREFIX):]: float(v) for k, v in record.items()
             if k.startswith(UPDATE_NORM_PREFIX)}
    round_index = record.get("round", record.get("step"))
    if norms and round_index is not None and round_index <= last_round:
      per_round[int(round_index)] = norms  # A resumed run's rewrite wins.
  if not per_round:
    return None
  sums = {}
  for unit in unit_names:
    total, found = 0.0, False
    for norms in per_round.values():
      inside = [v for k, v in norms.items()
                if k == unit or k.startswith(unit + "/")]
      if inside:
        found = True
        total += math.sqrt(sum(v * v for v in inside))
    sums[unit] = total if found else None
  return sums


def _finite_or_none(value: float) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def rank_correlations(x: Sequence[float | None],
                      y: Sequence[float | None]) -> dict[str, Any]:
  """Spearman and Kendall correlation of x and y over pairs with no None.

  Returns:
    {'num_units': n, 'spearman': {'statistic', 'pvalue'},
     'kendall': {'statistic', 'pvalue'}}; statistic and pvalue are None when
    undefined (n < 2 or a constant input).
  """
  if len(x) != len(y):
    raise ValueError(f"rank_correlations: {len(x)} x values vs {len(y)} y.")
  pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
  result: dict[str, Any] = dict(num_units=len(pairs))
  xs = np.array([a for a, _ in pairs], np.float64)
  ys = np.array([b for _, b in pairs], np.float64)
  constant = len(pairs) < 2 or np.all(xs == xs[0]) or np.all(ys == ys[0])
  for name, fn in (("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
    if constant:
      result[name] = dict(statistic=None, pvalue=None)
      continue
    outcome = fn(xs, ys)
    result[name] = dict(statistic=_finite_or_none(outcome.statistic),
                        pvalue=_finite_or_none(outcome.pvalue))
  return result
