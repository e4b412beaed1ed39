"""Stability of layer importance across runs (seeds, sizes, conv-module norms).

Inputs are importance.json dicts (`conformer_fl.analysis` schema), one per
run. For every pair of runs: the Jaccard overlap of their ambient sets and the
rank correlation of importance (WER and loss increase under the tau = 0
reset), both over the pairs of units that correspond. Runs of the same depth
pair units by name. Runs of different depths pair them by relative depth: each
block unit of the deeper run ('encoder/block_05/conv' of 6 blocks) with the
unit of the same kind in the block of the shallower run whose centre,
(index + 0.5) / number of blocks, is nearest ('encoder/block_03/conv' of 4);
units outside the blocks pair by name. Next to each Jaccard overlap stands its
chance level: the expected overlap of two random sets of the same sizes.
"""

from collections.abc import Sequence
import re
from typing import Any

from scipy import stats

from conformer_fl.analysis import movement

IMPORTANCE_KEYS = ("wer_increase", "loss_increase")
_BLOCK = re.compile(r"(?:^|/)block_(\d+)(?:/|$)")


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
  """|A & B| / |A | B|; 1.0 when both sets are empty."""
  a, b = set(a), set(b)
  union = a | b
  return len(a & b) / len(union) if union else 1.0


def chance_jaccard(num_items: int, size_a: int, size_b: int) -> float:
  """Expected Jaccard overlap of two random subsets of sizes a and b of n items.

  The intersection of a random a-subset and a random b-subset of n items is
  hypergeometric; the overlap is |A & B| / (a + b - |A & B|), 1.0 for two
  empty sets (as `jaccard`).
  """
  if not 0 <= size_a <= num_items or not 0 <= size_b <= num_items:
    raise ValueError(f"Subset sizes {size_a}, {size_b} of {num_items} items.")
  if size_a == 0 and size_b == 0:
    return 1.0
  counts = range(max(0, size_a + size_b - num_items), min(size_a, size_b) + 1)
  law = stats.hypergeom(num_items, size_a, size_b)
  return float(sum(law.pmf(k) * k / (size_a + size_b - k) for k in counts))


def _block(unit: str) -> tuple[int, str] | None:
  """'encoder/block_03/conv' -> (3, 'encoder/block/conv'); None outside blocks."""
  match = _BLOCK.search(unit)
  if match is None:
    return None
  return int(match.group(1)), _BLOCK.sub("/block/", unit, count=1)


def matched_units(a: dict[str, Any], b: dict[str, Any]
                  ) -> list[tuple[str, str]]:
  """The pairs (unit of a, unit of b) that correspond (module docstring).

  Runs of the same number of blocks pair units by name; otherwise every block
  unit of the deeper run pairs with the nearest-centred block unit of the same
  kind in the shallower one (a tie goes to the shallower block; units of the
  shallower run may appear in several pairs), and units outside the blocks
  pair by name.
  """
  blocks_a = a["model"]["num_blocks"]
  blocks_b = b["model"]["num_blocks"]
  if blocks_a == blocks_b:
    return [(u, u) for u in a["units"] if u in b["units"]]
  swap = blocks_a > blocks_b
  deep, shallow = (a, b) if swap else (b, a)
  deep_blocks, shallow_blocks = max(blocks_a, blocks_b), min(blocks_a, blocks_b)
  shallow_by_kind = {}
  for unit in shallow["units"]:
    located = _block(unit)
    if located is not None:
      shallow_by_kind[(located[0], located[1])] = unit
  pairs = []
  for unit in deep["units"]:
    located = _block(unit)
    if located is None:
      partner = unit if unit in shallow["units"] else None
    else:
      index, kind = located
      # |(j + 1/2) / shallow - (index + 1/2) / deep| in exact integers, so
      # that a tie goes to the shallower block j whatever the rounding.
      nearest = min(range(shallow_blocks), key=lambda j: (
          abs((2 * j + 1) * deep_blocks - (2 * index + 1) * shallow_blocks),
          j))
      partner = shallow_by_kind.get((nearest, kind))
    if partner is not None:
      pairs.append((unit, partner) if swap else (partner, unit))
  return pairs


def relative_depth(unit: str, num_blocks: int) -> float | None:
  """block index / num_blocks for a unit inside a Conformer block, else None."""
  match = _BLOCK.search(unit)
  if match is None:
    return None
  if num_blocks < 1:
    raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
  return int(match.group(1)) / num_blocks


def _importance(result: dict[str, Any], key: str) -> dict[str, float | None]:
  return {unit: entry[key] for unit, entry in result["units"].items()}


def compare_pair(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  """Jaccard of ambient sets and importance rank correlations over matched units.

  Returns:
    {'num_common_units': number of pairs, 'matching': 'name' |
     'relative_depth', 'jaccard_ambient', 'chance_jaccard_ambient',
     'wer_increase': correlations, 'loss_increase': correlations}. The
    overlap is taken over the pairs: pairs whose two units are both ambient,
    over pairs with at least one ambient unit. Matched by relative depth, a
    unit of the shallower run may stand in several pairs, so the pairs are
    not independent draws and the chance level (random sets of pairs of the
    same sizes) is a reference, not an exact null.
  """
  pairs = matched_units(a, b)
  ambient_a, ambient_b = set(a["ambient"]), set(b["ambient"])
  in_a = [i for i, (u, _) in enumerate(pairs) if u in ambient_a]
  in_b = [i for i, (_, v) in enumerate(pairs) if v in ambient_b]
  comparison: dict[str, Any] = dict(
      num_common_units=len(pairs),
      matching=("name" if a["model"]["num_blocks"] == b["model"]["num_blocks"]
                else "relative_depth"),
      jaccard_ambient=jaccard([str(i) for i in in_a], [str(i) for i in in_b]),
      chance_jaccard_ambient=chance_jaccard(len(pairs), len(in_a), len(in_b)))
  for key in IMPORTANCE_KEYS:
    x, y = _importance(a, key), _importance(b, key)
    comparison[key] = movement.rank_correlations([x[u] for u, _ in pairs],
                                                 [y[v] for _, v in pairs])
  return comparison


def depth_profile(result: dict[str, Any]) -> dict[str, Any]:
  """Per run: (relative depth, importance) of its block units and their correlation."""
  num_blocks = result["model"]["num_blocks"]
  points = []
  for unit, entry in result["units"].items():
    depth = relative_depth(unit, num_blocks)
    if depth is not None:
      points.append(dict(unit=unit, relative_depth=depth,
                         **{k: entry[k] for k in IMPORTANCE_KEYS}))
  profile: dict[str, Any] = dict(num_blocks=num_blocks, points=points)
  for key in IMPORTANCE_KEYS:
    profile[f"{key}_vs_depth"] = movement.rank_correlations(
        [p["relative_depth"] for p in points], [p[key] for p in points])
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
    raise ValueError(f"{len(results)} results but {len(labels)} labels.")
  pairs = []
  for i in range(len(results)):
    for j in range(i + 1, len(results)):
      pairs.append(dict(a=labels[i], b=labels[j],
                        **compare_pair(results[i], results[j])))
  return dict(runs=list(labels), pairs=pairs,
              depth={label: depth_profile(result)
                     for label, result in zip(labels, results)})
