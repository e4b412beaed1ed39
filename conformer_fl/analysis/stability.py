"""Stability of layer importance across runs (seeds, sizes, conv-module norms).

Inputs are importance.json dicts (`conformer_fl.analysis` schema), one per
run. For every pair of runs: the Jaccard overlap of their ambient sets and the
rank correlation of importance (WER and loss increase under the tau = 0
reset), both over the units the two runs share (runs of different sizes share
the blocks of the smaller one). Runs of different depths are compared through
relative depth: block index / number of blocks, against importance.
"""

from collections.abc import Sequence
import re
from typing import Any

from conformer_fl.analysis import movement

IMPORTANCE_KEYS = ('wer_increase', 'loss_increase')
_BLOCK = re.compile(r'(?:^|/)block_(\d+)(?:/|$)')


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
  """|A & B| / |A | B|; 1.0 when both sets are empty."""
  a, b = set(a), set(b)
  union = a | b
  return len(a & b) / len(union) if union else 1.0


def relative_depth(unit: str, num_blocks: int) -> float | None:
  """block index / num_blocks for a unit inside a Conformer block, else None."""
  match = _BLOCK.search(unit)
  if match is None:
    return None
  if num_blocks < 1:
    raise ValueError(f'num_blocks must be >= 1, got {num_blocks}.')
  return int(match.group(1)) / num_blocks


def _importance(result: dict[str, Any], key: str) -> dict[str, float | None]:
  return {unit: entry[key] for unit, entry in result['units'].items()}


def compare_pair(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  """Jaccard of ambient sets and importance rank correlations over shared units."""
  common = [unit for unit in a['units'] if unit in b['units']]
  common_set = set(common)
  comparison: dict[str, Any] = dict(
      num_common_units=len(common),
      jaccard_ambient=jaccard([u for u in a['ambient'] if u in common_set],
                              [u for u in b['ambient'] if u in common_set]))
  for key in IMPORTANCE_KEYS:
    x, y = _importance(a, key), _importance(b, key)
    comparison[key] = movement.rank_correlations([x[u] for u in common],
                                                 [y[u] for u in common])
  return comparison


def depth_profile(result: dict[str, Any]) -> dict[str, Any]:
  """Per run: (relative depth, importance) of its block units and their correlation."""
  num_blocks = result['model']['num_blocks']
  points = []
  for unit, entry in result['units'].items():
    depth = relative_depth(unit, num_blocks)
    if depth is not None:
      points.append(dict(unit=unit, relative_depth=depth,
                         **{k: entry[k] for k in IMPORTANCE_KEYS}))
  profile: dict[str, Any] = dict(num_blocks=num_blocks, points=points)
  for key in IMPORTANCE_KEYS:
    profile[f'{key}_vs_depth'] = movement.rank_correlations(
        [p['relative_depth'] for p in points], [p[key] for p in points])
  return profile


def compare_runs(results: Sequence[dict[str, Any]],
                 labels: Sequence[str]) -> dict[str, Any]:
  """Stability over runs.

  Args:
    results: importance.json dicts.
    labels: a name per run (e.g. its workdir).

  Returns:
    {'runs': labels, 'pairs': [{'a', 'b', 'num_common_units',
     'jaccard_ambient', 'wer_increase': correlations, 'loss_increase': ...}],
     'depth': {label: depth_profile}}.
  """
  if len(results) != len(labels):
    raise ValueError(f'{len(results)} results but {len(labels)} labels.')
  pairs = []
  for i in range(len(results)):
    for j in range(i + 1, len(results)):
      pairs.append(dict(a=labels[i], b=labels[j],
                        **compare_pair(results[i], results[j])))
  return dict(runs=list(labels), pairs=pairs,
              depth={label: depth_profile(result)
                     for label, result in zip(labels, results)})
