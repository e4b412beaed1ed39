"""Evaluating many variable sets of one model: vectorized and one at a time.

Vectorized: the variable sets are stacked on a leading axis [V, ...] and the
eval step (`conformer_fl.evaluation.make_eval_step`) is vmapped over it, so one
compiled function per batch shape evaluates `variants_per_call` variants at
once. The last chunk is padded with repeats of its last variant, so every call
has the same shape and nothing recompiles.

One at a time (the baseline the vectorized path is measured against): the
same jitted single-variant eval step, looped over variants.

Both return the same numbers: per variant {'loss', 'wer', 'num_examples'}
(`evaluation.EvalAccumulator.result`).
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

from conformer_fl import evaluation
from conformer_fl.analysis import resets

Batch = dict[str, Any]
Variables = resets.Variables
EvalFn = Callable[[Variables, Batch], dict[str, jax.Array]]


def make_single_eval_fn(model: nn.Module) -> EvalFn:
  """jit(eval_step): variables -> outputs of one variant."""
  return jax.jit(evaluation.make_eval_step(model))


def make_vectorized_eval_fn(model: nn.Module) -> EvalFn:
  """jit(vmap(eval_step)): variables [V, ...] -> outputs [V, ...] (batch shared)."""
  return jax.jit(jax.vmap(evaluation.make_eval_step(model), in_axes=(0, None)))


def _check(num_variants: int, batches: Sequence[Batch]) -> None:
  if num_variants < 1:
    raise ValueError('No variants to evaluate.')
  if not batches:
    raise ValueError('No eval batches: is the eval split (or its domains) '
                     'empty?')


def evaluate_vectorized(
    eval_fn: EvalFn,
    get_variables: Callable[[int], Variables],
    num_variants: int,
    batches: Sequence[Batch],
    decode: Callable[[list[int]], str],
    variants_per_call: int,
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

  Returns:
    V dicts {'loss', 'wer', 'num_examples'}.
  """
  _check(num_variants, batches)
  if variants_per_call < 1:
    raise ValueError(f'variants_per_call must be >= 1, got {variants_per_call}.')
  device_batches = [jax.device_put(b) for b in batches]
  accumulators = [evaluation.EvalAccumulator(decode) for _ in range(num_variants)]
  for start in range(0, num_variants, variants_per_call):
    indices = list(range(start, min(start + variants_per_call, num_variants)))
    padded = indices + [indices[-1]] * (variants_per_call - len(indices))
    stacked = jax.device_put(resets.stack_variables(
        [get_variables(i) for i in padded]))
    for batch, device_batch in zip(batches, device_batches):
      outputs = jax.device_get(eval_fn(stacked, device_batch))
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
