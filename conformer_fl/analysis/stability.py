"""Stability of layer importance across runs (seeds, sizes, conv-module norms).

Inputs are `importance_file.Importance` results, one per run. For every
pair of runs: the Jaccard overlap of their ambient sets and the rank
correlation of importance (WER and loss increase under the tau = 0
reset), both over the pairs of units that correspond. Runs of the same depth
pair units by name. Runs of different depths pair them by relative depth,
one to one: each block of the shallower run with the block of the deeper run
whose centre, (index + 0.5) / number of blocks, is nearest to its own (4
blocks against 6: 0-0, 1-2, 2-3, 3-5), units of one kind with each other;
the deeper run's other blocks stay unpaired, so no unit stands in two pairs.
Units outside the blocks pair by name.

Next to each Jaccard overlap stand two nulls, each with its chance level
(expected overlap) and the tail probability of an intersection at least as
large as the one seen:
  * random sets: two random sets of the same sizes among the pairs (the
    intersection is hypergeometric);
  * random within type: the ambient units of each type (a pair's type is its
    unit's kind: 'encoder/block/conv', 'encoder/block/final_norm', a unit
    outside the blocks its own) drawn at random among the units of that type,
    the counts per type kept. Units ambient by construction (norms) then
    overlap under the null too. The intersection is a sum of independent
    hypergeometric counts, its law their convolution.
Two empty ambient sets give no overlap to measure: their Jaccard, chance
levels and tail probabilities are None (and left out of any mean).
"""

from collections.abc import Sequence
import re
from typing import Any

import numpy as np
from scipy import stats

from conformer_fl.analysis import importance_file
from conformer_fl.analysis import movement

IMPORTANCE_KEYS = ("wer_increase", "loss_increase")
_BLOCK = re.compile(r"(?:^|/)block_(\d+)(?:/|$)")


def jaccard(a: Sequence[str], b: Sequence[str]) -> float | None:
  """|A & B| / |A | B|; None when both sets are empty (nothing to overlap)."""
  a, b = set(a), set(b)
  union = a | b
  return len(a & b) / len(union) if union else None


def _check_sizes(num_items: int, size_a: int, size_b: int) -> None:
  if not 0 <= size_a <= num_items or not 0 <= size_b <= num_items:
    raise ValueError(f"Subset sizes {size_a}, {size_b} of {num_items} items.")


def intersection_law(num_items: Sequence[int], sizes_a: Sequence[int],
                     sizes_b: Sequence[int]) -> np.ndarray:
  """float64 [K + 1]: P(|A & B| = k) when A and B are drawn at random per type.

  Type t has num_items[t] items; A holds sizes_a[t] of them and B sizes_b[t],
  each drawn uniformly and independently. The intersection of one type is
  hypergeometric; the total is their convolution.
  """
  law = np.ones(1)
  for n, a, b in zip(num_items, sizes_a, sizes_b):
    _check_sizes(n, a, b)
    law = np.convolve(law, stats.hypergeom(n, a, b).pmf(np.arange(min(a, b)
                                                                  + 1)))
  return law


def _expected_jaccard(law: np.ndarray, size_a: int, size_b: int) -> float:
  k = np.arange(len(law))
  return float(np.sum(law * k / (size_a + size_b - k)))


def chance_jaccard(num_items: int, size_a: int, size_b: int) -> float | None:
  """Expected Jaccard overlap of two random subsets of sizes a and b of n items.

  The intersection of a random a-subset and a random b-subset of n items is
  hypergeometric; the overlap is |A & B| / (a + b - |A & B|); None for two
  empty sets (as `jaccard`).
  """
  _check_sizes(num_items, size_a, size_b)
  if size_a == 0 and size_b == 0:
    return None
  return _expected_jaccard(intersection_law([num_items], [size_a], [size_b]),
                           size_a, size_b)


def overlap_nulls(types: Sequence[str], in_a: Sequence[bool],
                  in_b: Sequence[bool]) -> dict[str, Any]:
  """The two nulls of the module docstring for one pair of ambient sets.

  Args:
    types: [N] the type of each of the N items (pairs of matched units).
    in_a: [N] whether the item is in A (ambient in run a).
    in_b: [N] whether it is in B.

  Returns:
    {'intersection': |A & B|, 'chance_jaccard', 'overlap_pvalue' (random
     sets), 'chance_jaccard_within_types', 'overlap_pvalue_within_types'};
    the last four None when A and B are both empty.
  """
  in_a, in_b = np.asarray(in_a, bool), np.asarray(in_b, bool)
  k, size_a, size_b = int(np.sum(in_a & in_b)), int(in_a.sum()), int(in_b.sum())
  result: dict[str, Any] = dict(
      intersection=k, chance_jaccard=None, overlap_pvalue=None,
      chance_jaccard_within_types=None, overlap_pvalue_within_types=None)
  if size_a == 0 and size_b == 0:
    return result
  names = sorted(set(types))
  of_type = [np.array([t == name for t in types]) for name in names]
  laws = dict(
      overlap=intersection_law([len(types)], [size_a], [size_b]),
      within_types=intersection_law([int(m.sum()) for m in of_type],
                                    [int(in_a[m].sum()) for m in of_type],
                                    [int(in_b[m].sum()) for m in of_type]))
  for name, law in laws.items():
    suffix = "" if name == "overlap" else "_within_types"
    result[f"chance_jaccard{suffix}"] = _expected_jaccard(law, size_a, size_b)
    result[f"overlap_pvalue{suffix}"] = float(min(1.0, law[k:].sum()))
  return result


def unit_type(unit: str) -> str:
  """A unit's kind: 'encoder/block/conv' for 'encoder/block_03/conv'; a unit
  outside the blocks is its own type."""
  located = _block(unit)
  return unit if located is None else located[1]


def ambient_frequency(
    results: Sequence[importance_file.Importance]) -> dict[str, Any]:
  """Per unit name: in how many of the runs that have it it is ambient.

  Returns:
    {unit: {'runs', 'ambient', 'frequency'}}, units in first-seen order.
  """
  frequency: dict[str, dict[str, Any]] = {}
  for result in results:
    ambient = set(result.ambient)
    for unit in result.units:
      entry = frequency.setdefault(unit, dict(runs=0, ambient=0))
      entry["runs"] += 1
      entry["ambient"] += unit in ambient
  for entry in frequency.values():
    entry["frequency"] = entry["ambient"] / entry["runs"]
  return frequency


def _block(unit: str) -> tuple[int, str] | None:
  """'encoder/block_03/conv' -> (3, 'encoder/block/conv'); None outside blocks."""
  match = _BLOCK.search(unit)
  if match is None:
    return None
  return int(match.group(1)), _BLOCK.sub("/block/", unit, count=1)


def matched_units(a: importance_file.Importance,
                  b: importance_file.Importance) -> list[tuple[str, str]]:
  """The pairs (unit of a, unit of b) that correspond (module docstring).

  Runs of the same number of blocks pair units by name; otherwise each block
  of the shallower run pairs with the block of the deeper run whose centre is
  nearest to its own (a tie goes to the shallower block), units of one kind
  with each other, and units outside the blocks pair by name. The pairing is
  one to one: centres of the deeper run lie closer together than those of
  the shallower, so two shallow blocks never share their nearest deep
  block. Pairs follow the deeper run's unit order.
  """
  blocks_a = a.model.num_blocks
  blocks_b = b.model.num_blocks
  if blocks_a == blocks_b:
    return [(u, u) for u in a.units if u in b.units]
  swap = blocks_a > blocks_b
  deep, shallow = (a, b) if swap else (b, a)
  deep_blocks, shallow_blocks = max(blocks_a, blocks_b), min(blocks_a, blocks_b)
  shallow_by_kind = {}
  for unit in shallow.units:
    located = _block(unit)
    if located is not None:
      shallow_by_kind[(located[0], located[1])] = unit
  # |(j + 1/2) / shallow - (i + 1/2) / deep| in exact integers, so that a
  # tie goes to the shallower block i whatever the rounding.
  partner_block = {}
  for j in range(shallow_blocks):
    nearest = min(range(deep_blocks), key=lambda i, j=j: (
        abs((2 * j + 1) * deep_blocks - (2 * i + 1) * shallow_blocks), i))
    partner_block[nearest] = j
  pairs = []
  for unit in deep.units:
    located = _block(unit)
    if located is None:
      partner = unit if unit in shallow.units else None
    else:
      index, kind = located
      partner = (shallow_by_kind.get((partner_block[index], kind))
                 if index in partner_block else None)
    if partner is not None:
      pairs.append((unit, partner) if swap else (partner, unit))
  return pairs


def relative_depth(unit: str, num_blocks: int) -> float | None:
  """The block's centre, (index + 0.5) / num_blocks, for a unit inside a
  Conformer block, else None."""
  match = _BLOCK.search(unit)
  if match is None:
    return None
  if num_blocks < 1:
    raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
  return (int(match.group(1)) + 0.5) / num_blocks


def _importance(result: importance_file.Importance,
                key: str) -> dict[str, float | None]:
  return {unit: getattr(entry, key) for unit, entry in result.units.items()}


def compare_pair(a: importance_file.Importance,
                 b: importance_file.Importance) -> dict[str, Any]:
  """Jaccard of ambient sets and importance rank correlations over matched units.

  Returns:
    {'num_common_units': number of pairs, 'matching': 'name' |
     'relative_depth', 'both_empty': whether neither run has an ambient
     paired unit, 'jaccard_ambient', 'chance_jaccard_ambient',
     'overlap_pvalue', 'chance_jaccard_within_types',
     'overlap_pvalue_within_types', 'intersection', 'wer_increase':
     correlations, 'loss_increase': correlations}. The overlap is taken over
    the pairs: pairs whose two units are both ambient, over pairs with at
    least one ambient unit; the nulls are those of the module docstring
    (None, with the Jaccard, when both sets are empty).
  """
  pairs = matched_units(a, b)
  ambient_a, ambient_b = set(a.ambient), set(b.ambient)
  in_a = [u in ambient_a for u, _ in pairs]
  in_b = [v in ambient_b for _, v in pairs]
  nulls = overlap_nulls([unit_type(u) for u, _ in pairs], in_a, in_b)
  comparison: dict[str, Any] = dict(
      num_common_units=len(pairs),
      matching=("name" if a.model.num_blocks == b.model.num_blocks
                else "relative_depth"),
      both_empty=not any(in_a) and not any(in_b),
      jaccard_ambient=jaccard([str(i) for i, x in enumerate(in_a) if x],
                              [str(i) for i, x in enumerate(in_b) if x]),
      chance_jaccard_ambient=nulls.pop("chance_jaccard"), **nulls)
  for key in IMPORTANCE_KEYS:
    x, y = _importance(a, key), _importance(b, key)
    comparison[key] = movement.rank_correlations([x[u] for u, _ in pairs],
                                                 [y[v] for _, v in pairs])
  return comparison


def depth_profile(result: importance_file.Importance) -> dict[str, Any]:
  """Per run: (relative depth, importance) of its block units and their correlation."""
  num_blocks = result.model.num_blocks
  points = []
  for unit, entry in result.units.items():
    depth = relative_depth(unit, num_blocks)
    if depth is not None:
      points.append(dict(unit=unit, relative_depth=depth,
                         **{k: getattr(entry, k) for k in IMPORTANCE_KEYS}))
  profile: dict[str, Any] = dict(num_blocks=num_blocks, points=points)
  for key in IMPORTANCE_KEYS:
    profile[f"{key}_vs_depth"] = movement.rank_correlations(
        [p["relative_depth"] for p in points], [p[key] for p in points])
  return profile


def compare_runs(results: Sequence[importance_file.Importance],
                 labels: Sequence[str]) -> dict[str, Any]:
  """Stability over runs.

  Args:
    results: each run's importance.
    labels: a name per run (e.g. its workdir).

  Returns:
    {'runs': labels, 'pairs': [{'a', 'b', ...`compare_pair`}],
     'depth': {label: depth_profile}, 'ambient_frequency':
     `ambient_frequency`}.
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
                     for label, result in zip(labels, results)},
              ambient_frequency=ambient_frequency(results))
