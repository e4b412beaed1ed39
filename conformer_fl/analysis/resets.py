"""Reset variants of a model: one unit replaced by another source's value.

A variant is the trained model's variables with the subtree of one unit (a
`conformer_fl.models.list_units` path) taken from a *source*: an earlier
checkpoint tau (re-initialization; tau = 0 is the initial value) or a fresh
initialization with another seed (re-randomization). The unit's batch-norm
statistics (the `batch_stats` subtree at the same path, when the model has
one) are reset with its parameters. Variables are plain pytrees:
{'params': ..., ['batch_stats': ...]}.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from conformer_fl import tree_paths

PyTree = Any
Variables = dict[str, PyTree]
Path = tuple[str, ...]

BASELINE = "baseline"
REINIT = "reinit"
RERANDOMIZE = "rerandomize"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One model to evaluate.

  Attributes:
    kind: 'baseline' (the trained model), 'reinit' (unit <- checkpoint tau) or
      'rerandomize' (unit <- fresh init with `source` as the seed).
    unit: the unit's name; None for the baseline.
    source: the checkpoint step tau (reinit) or the init seed (rerandomize).
  """
  kind: str
  unit: str | None = None
  source: int | None = None


def reset_unit(variables: Variables, source: Variables, path: Path) -> Variables:
  """`variables` with the unit at `path` taken from `source` (pure).

  Every collection that holds the path (always 'params'; 'batch_stats' for a
  unit with batch norm) is reset; the other subtrees are shared, not copied.

  Raises:
    KeyError: the unit is missing from `variables['params']`, or `source`
      lacks a collection subtree that `variables` has.
  """
  if not tree_paths.has(variables["params"], path):
    raise KeyError(f"No unit '{'/'.join(path)}' in the model's params.")
  reset = dict(variables)
  for collection, tree in variables.items():
    if not tree_paths.has(tree, path):
      continue
    if collection not in source or not tree_paths.has(source[collection], path):
      raise KeyError(f"The reset source has no '{collection}' subtree at "
                     f"'{'/'.join(path)}'.")
    reset[collection] = tree_paths.replace(
        tree, path, tree_paths.get(source[collection], path))
  return reset


def make_variants(unit_names: Sequence[str], taus: Sequence[int],
                  seeds: Sequence[int]) -> list[Variant]:
  """The baseline, then per unit its reinit (each tau) and rerandomize (each seed)."""
  variants = [Variant(BASELINE)]
  for unit in unit_names:
    variants.extend(Variant(REINIT, unit, tau) for tau in taus)
    variants.extend(Variant(RERANDOMIZE, unit, seed) for seed in seeds)
  return variants


def variant_variables(variant: Variant, trained: Variables,
                      checkpoints: Mapping[int, Variables],
                      fresh_inits: Mapping[int, Variables],
                      units: Mapping[str, Path]) -> Variables:
  """The variables of `variant`.

  Args:
    variant: what to build.
    trained: the trained model's variables.
    checkpoints: {tau: variables} of the re-initialization sources.
    fresh_inits: {seed: variables} of the re-randomization sources.
    units: {name: path} of the model's units.
  """
  if variant.kind == BASELINE:
    return trained
  if variant.kind not in (REINIT, RERANDOMIZE):
    raise ValueError(f"Unknown variant kind {variant.kind!r}.")
  sources = checkpoints if variant.kind == REINIT else fresh_inits
  if variant.source not in sources:
    raise KeyError(f"No {variant.kind} source {variant.source}; have "
                   f"{sorted(sources)}.")
  return reset_unit(trained, sources[variant.source], units[variant.unit])


def stack_variables(variable_sets: Sequence[Variables]) -> Variables:
  """Stacks N structurally equal variable sets on a new leading axis [N, ...]."""
  if not variable_sets:
    raise ValueError("stack_variables needs at least one variable set.")
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]),
                      *variable_sets)
