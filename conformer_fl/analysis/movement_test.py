"""Does weight movement predict importance beyond module type and size?

The primary test of the analysis (its measure declared by
`config.analysis.movement_measure`): over the droppable modules of the
encoder blocks (ffn1, mhsa, conv, ffn2, or whole blocks at block
granularity), Spearman's rho between the unit's movement and its WER
increase under reset, with

  * a permutation p-value whose null permutes the WER increases only among
    units of one module type (ffn, mhsa, conv; `MODULE_TYPES`), so that a
    correlation carried by type alone (conv modules move more and matter
    more) is part of the null, and units are not assumed exchangeable
    across types;
  * the partial Spearman correlation given log parameter count (ranks of
    movement and increase with the ranks of log size partialled out), with
    a p-value from the same permutations.

Both p-values are (1 + permutations at least as extreme, in absolute value)
/ (1 + permutations). The absolute distance grows with the square root of a
unit's parameter count, so the primary measure is a size-free one:
'relative_distance' (||w_T - w_0|| / ||w_0||) or 'rms_movement'
(||w_T - w_0|| / sqrt(parameters)). Every other correlation of the analysis
is secondary (`importance.movement_correlations`).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from conformer_fl.analysis import importance_file

MEASURES = ("relative_distance", "rms_movement")
# The module type of each droppable module of a Conformer block.
MODULE_TYPES = {"ffn1": "ffn", "ffn2": "ffn", "mhsa": "mhsa", "conv": "conv"}


def droppable_module_types(unit_names: Sequence[str]) -> dict[str, str]:
  """{unit name: module type} of the droppable units, in model order.

  'encoder/block_NN/<module>' with a module of `MODULE_TYPES`; at block
  granularity, 'encoder/block_NN' of type 'block'.
  """
  types = {}
  for name in unit_names:
    parts = name.split("/")
    if len(parts) < 2 or parts[0] != "encoder" or not parts[1].startswith(
        "block_"):
      continue
    if len(parts) == 2:
      types[name] = "block"
    elif len(parts) == 3 and parts[2] in MODULE_TYPES:
      types[name] = MODULE_TYPES[parts[2]]
  return types


def _ranks(x: np.ndarray) -> np.ndarray:
  """Average ranks along the last axis (ties share their mean rank)."""
  return stats.rankdata(x, axis=-1)


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pearson correlation of a [N] with each row of b [..., N]."""
  a = a - a.mean()
  b = b - b.mean(-1, keepdims=True)
  return (b @ a) / np.sqrt((a @ a) * np.sum(b * b, -1))


def _partial(r_xy: np.ndarray, r_xz: float, r_yz: np.ndarray) -> np.ndarray:
  return (r_xy - r_xz * r_yz) / np.sqrt((1 - r_xz**2) * (1 - r_yz**2))


def within_strata_permutations(strata: Sequence[Any], num_permutations: int,
                               seed: int = 0) -> np.ndarray:
  """int [num_permutations, N]: permutations of range(N), N = len(strata),
  that move an index only within its stratum (random sort keys, sorted within
  stratum blocks)."""
  codes = np.unique(np.asarray([str(s) for s in strata]), return_inverse=True)[1]
  n = len(codes)
  rng = np.random.default_rng(seed)
  keys = rng.random((num_permutations, n))
  # Sorting by (stratum, key) lists each stratum's indices in random order;
  # position i of a stratum then takes its i-th shuffled member.
  order = np.lexsort((keys, np.broadcast_to(codes, keys.shape)), axis=-1)
  by_stratum = np.argsort(codes, kind="stable")           # [N]
  permutations = np.empty((num_permutations, n), np.int64)
  permutations[:, by_stratum] = order
  return permutations


def movement_test(movement: Sequence[float], increase: Sequence[float],
                  num_params: Sequence[int], module_types: Sequence[str], *,
                  num_permutations: int = 10000,
                  seed: int = 0) -> dict[str, Any]:
  """The stratified permutation test and the size-partialled correlation.

  Args:
    movement: [N] the primary movement measure of each of the N units.
    increase: [N] the WER increase of each unit under reset.
    num_params: [N] parameters of each unit.
    module_types: [N] the stratum of each unit (`droppable_module_types`).
    num_permutations: permutations within strata.
    seed: the permutation seed.

  Returns:
    {'num_units', 'strata': {type: count}, 'spearman', 'pvalue' (stratified
     permutation), 'partial_spearman_log_params', 'partial_pvalue',
     'num_permutations'}; statistics and p-values None when undefined (fewer
    than 4 units, or a constant input).
  """
  x = np.asarray(movement, np.float64)
  y = np.asarray(increase, np.float64)
  z = np.log(np.asarray(num_params, np.float64))
  n = len(x)
  if not len(y) == len(z) == len(module_types) == n:
    raise ValueError(f"movement_test: {n} movements, {len(y)} increases,"
                     f" {len(z)} sizes, {len(module_types)} types; pass one of"
                     " each per unit.")
  strata = {t: int(c) for t, c in zip(*np.unique(
      np.asarray(module_types, str), return_counts=True))}
  result: dict[str, Any] = dict(
      num_units=n, strata=strata, spearman=None, pvalue=None,
      partial_spearman_log_params=None, partial_pvalue=None,
      num_permutations=int(num_permutations))
  if n < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return result
  rx, ry, rz = _ranks(x), _ranks(y), _ranks(z)
  permuted = ry[within_strata_permutations(module_types, num_permutations,
                                           seed)]            # [P, n]
  rho = float(_correlation(rx, ry[None])[0])
  null = _correlation(rx, permuted)
  result["spearman"] = rho
  result["pvalue"] = float((1 + np.sum(np.abs(null) >= abs(rho) - 1e-12))
                           / (1 + num_permutations))
  if np.ptp(z) > 0:
    r_xz = float(_correlation(rz, rx[None])[0])
    r_yz = float(_correlation(rz, ry[None])[0])
    if abs(r_xz) < 1 and abs(r_yz) < 1:
      partial = float(_partial(rho, r_xz, r_yz))
      null_yz = _correlation(rz, permuted)
      ok = np.abs(null_yz) < 1
      null_partial = _partial(null[ok], r_xz, null_yz[ok])
      result["partial_spearman_log_params"] = partial
      result["partial_pvalue"] = float(
          (1 + np.sum(np.abs(null_partial) >= abs(partial) - 1e-12))
          / (1 + int(ok.sum())))
  return result


def primary_movement_test(units: Mapping[str, importance_file.Unit],
                          measure: str, *, num_permutations: int = 10000,
                          seed: int = 0) -> dict[str, Any]:
  """`movement_test` of `measure` over the droppable units of importance.json.

  Args:
    units: the analysis's units (`Importance.units`; their movement, WER
      increase and parameter count are read).
    measure: one of `MEASURES`.
    num_permutations: permutations within module types.
    seed: the permutation seed.

  Returns:
    {'measure', 'units': [names], plus `movement_test`'s keys}; units whose
    measure is None (a zero initial norm) are left out.
  """
  if measure not in MEASURES:
    raise ValueError(f"analysis.movement_measure={measure!r}; expected one of"
                     f" {MEASURES}.")
  types = droppable_module_types(list(units))
  names = [n for n in types
           if getattr(units[n].movement, measure) is not None]
  result = movement_test(
      [getattr(units[n].movement, measure) for n in names],
      [units[n].wer_increase for n in names],
      [units[n].num_params for n in names], [types[n] for n in names],
      num_permutations=num_permutations, seed=seed)
  return dict(measure=measure, units=names, **result)
