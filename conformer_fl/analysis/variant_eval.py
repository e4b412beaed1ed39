"""Evaluating many variable sets of one model: vectorized and one at a time.

Vectorized: the variable sets are stacked on a leading axis [V, ...] and the
eval step (`conformer_fl.evaluation.make_eval_step`) is vmapped over it, so one
compiled function per batch shape evaluates `variants_per_call` variants at
once. The last chunk is padded with repeats of its last variant, so every call
has the same shape and nothing recompiles (a group smaller than a chunk is one
chunk of its own size). A unit of SHAREABLE_PATHS that no
variant of a chunk changes is passed once, unbatched (`split_shared`): at most
two compiled variants per batch shape (front end shared or batched).

One at a time (the baseline the vectorized path is measured against): the
same jitted single-variant eval step, looped over variants.

Both return the same numbers: per variant the metrics of
`evaluation.EvalAccumulator.result` ('loss', 'wer', 'cer', the WER interval,
'num_examples').
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

from conformer_fl import evaluation
from conformer_fl import tree_paths
from conformer_fl.analysis import resets

Batch = dict[str, Any]
Variables = resets.Variables
EvalFn = Callable[[Variables, Batch], dict[str, jax.Array]]


def make_single_eval_fn(model: nn.Module) -> EvalFn:
  """jit(eval_step): variables -> outputs of one variant."""
  return jax.jit(evaluation.make_eval_step(model))


# Units passed once, unbatched, to every variant of a chunk that leaves them
# untouched. The front end's 2-D convolution kernel, batched per variant,
# becomes a grouped convolution that XLA:CPU runs 2.5x slower than the whole
# rest of the model (benchmarks/analysis_vectorized.py); so it is batched only
# in chunks that reset it. Each shared/batched pattern compiles once.
SHAREABLE_PATHS = (("encoder", "subsampling"),)


def make_vectorized_eval_fn(model: nn.Module) -> EvalFn:
  """jit(vmap(eval_step)) over stacked variables, with shared units.

  Returns `fn(batched, shared, batch)`: `batched` the variables stacked [V, ...]
  without the shared units; `shared` {collection: {'/'-joined path: subtree}}
  (no leading axis) put back into every variant; outputs [V, ...].
  """
  eval_step = evaluation.make_eval_step(model)

  def eval_variant(batched, shared, batch):
    variables = dict(batched)
    for collection, units in shared.items():
      for name, value in units.items():
        variables[collection] = tree_paths.put(
            variables[collection], tuple(name.split("/")), value)
    return eval_step(variables, batch)

  return jax.jit(jax.vmap(eval_variant, in_axes=(0, None, None)))


def split_shared(variable_sets: Sequence[Variables],
                 shareable_paths=SHAREABLE_PATHS) -> tuple[Variables, dict]:
  """(stacked variables [V, ...] without the shared units, shared units).

  A shareable unit is shared when every variant holds the very same subtree
  object (reset variants share untouched subtrees with the trained model).
  """
  first = variable_sets[0]
  shared: dict[str, dict[str, Any]] = {}
  trimmed = list(variable_sets)
  for path in shareable_paths:
    for collection in first:
      if not tree_paths.has(first[collection], path):
        continue
      subtree = tree_paths.get(first[collection], path)
      if all(tree_paths.get(v[collection], path) is subtree
             for v in variable_sets[1:]):
        shared.setdefault(collection, {})["/".join(path)] = subtree
        trimmed = [dict(v, **{collection: tree_paths.without(v[collection], path)})
                   for v in trimmed]
  return resets.stack_variables(trimmed), shared


def _check(num_variants: int, batches: Sequence[Batch]) -> None:
  if num_variants < 1:
    raise ValueError("No variants to evaluate.")
  if not batches:
    raise ValueError("No eval batches: is the eval split (or its domains) "
                     "empty?")


def touches_shareable(path: tuple[str, ...] | None,
                      shareable_paths=SHAREABLE_PATHS) -> bool:
  """Whether resetting the unit at `path` changes a shareable unit."""
  if path is None:
    return False
  return any(path[:len(s)] == s or s[:len(path)] == path
             for s in shareable_paths)


def shareable_groups(unit_paths: Sequence[tuple[str, ...] | None],
                     shareable_paths=SHAREABLE_PATHS) -> list[list[int]]:
  """Variant indices split by whether they reset a shareable unit (empty
  groups dropped): chunks of the first group share the front end."""
  touches = [touches_shareable(p, shareable_paths) for p in unit_paths]
  groups = [[i for i, t in enumerate(touches) if not t],
            [i for i, t in enumerate(touches) if t]]
  return [g for g in groups if g]


def evaluate_vectorized(
    eval_fn: EvalFn,
    get_variables: Callable[[int], Variables],
    num_variants: int,
    batches: Sequence[Batch],
    decode: Callable[[list[int]], str],
    variants_per_call: int,
    groups: Sequence[Sequence[int]] | None = None,
) -> list[dict[str, float]]:
  """Evaluates variants 0..num_variants-1 in chunks of `variants_per_call`.

  Args:
    eval_fn: `make_vectorized_eval_fn(model)`.
    get_variables: index -> that variant's variables (built lazily, so only
      one chunk is held in memory).
    num_variants: V.
    batches: the eval batches (with 'example_mask').
    decode: token ids -> text.
    variants_per_call: chunk size (>= 1).
    groups: partition of the indices; chunks never mix groups (e.g. variants
      that reset a shareable unit apart from those that keep it shared).
      None = one group in index order.

  Returns:
    V dicts of `EvalAccumulator.result`.
  """
  _check(num_variants, batches)
  if variants_per_call < 1:
    raise ValueError(f"variants_per_call must be >= 1, got {variants_per_call}.")
  device_batches = [jax.device_put(b) for b in batches]
  accumulators = [evaluation.EvalAccumulator(decode) for _ in range(num_variants)]
  groups = [list(range(num_variants))] if groups is None else groups
  if sorted(i for g in groups for i in g) != list(range(num_variants)):
    raise ValueError(f"groups must partition range({num_variants}).")
  chunks = []
  for group in groups:
    # A group smaller than variants_per_call is one chunk of its own size
    # (no padding); a group's pattern of shared units compiles apart anyway.
    size = min(variants_per_call, len(group))
    chunks.extend((group[start:start + size], size)
                  for start in range(0, len(group), size))
  for indices, size in chunks:
    padded = indices + [indices[-1]] * (size - len(indices))
    batched, shared = jax.device_put(split_shared(
        [get_variables(i) for i in padded]))
    for batch, device_batch in zip(batches, device_batches):
      outputs = jax.device_get(eval_fn(batched, shared, device_batch))
      for row, index in enumerate(indices):
        accumulators[index].add(
            jax.tree.map(lambda x, r=row: x[r], outputs), batch)
  return [accumulator.result() for accumulator in accumulators]


def evaluate_one_at_a_time(
    eval_fn: EvalFn,
    get_variables: Callable[[int], Variables],
    num_variants: int,
    batches: Sequence[Batch],
    decode: Callable[[list[int]], str],
) -> list[dict[str, float]]:
  """As `evaluate_vectorized`, with `make_single_eval_fn(model)`, one variant per call."""
  _check(num_variants, batches)
  device_batches = [jax.device_put(b) for b in batches]
  results = []
  for index in range(num_variants):
    variables = jax.device_put(get_variables(index))
    accumulator = evaluation.EvalAccumulator(decode)
    for batch, device_batch in zip(batches, device_batches):
      accumulator.add(eval_fn(variables, device_batch), batch)
    results.append(accumulator.result())
  return results
