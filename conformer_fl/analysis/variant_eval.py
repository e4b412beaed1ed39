"""Evaluating many variable sets of one model: vectorized and one at a time.

Vectorized: the variable sets are stacked on a leading axis [V, ...] and the
eval step (`conformer_fl.evaluation.make_eval_step`) is vmapped over it, so one
compiled function per batch shape evaluates `variants_per_call` variants at
once. The last chunk is padded with repeats of its last variant, so every call
has the same shape and nothing recompiles (a group smaller than a chunk is one
chunk of its own size). A unit of SHAREABLE_PATHS that no
variant of a chunk changes is passed once, unbatched (`split_shared`): at most
two compiled variants per batch shape (front end shared or batched).

Over a mesh (`make_vectorized_eval_fn(model, mesh)`, the one-axis mesh of every
device of every process, `federated.mesh.make_client_mesh`): a chunk's variants
are split over all devices of all hosts (`jax.shard_map` of the vmapped step;
no communication), each process builds and sends only the variants of its own
devices, and the metrics of each process's variants are gathered once at the
end (`multihost.gather_json`). Chunks are then multiples of the number of
devices, so a job of 4 devices computes the same chunks, bit for bit, as one
process or as two processes of 2 devices.

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
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from conformer_fl import evaluation
from conformer_fl import multihost
from conformer_fl import tree_paths
from conformer_fl.analysis import resets
from conformer_fl.federated import mesh as mesh_lib

Batch = dict[str, Any]
Variables = resets.Variables
EvalFn = Callable[[Variables, Batch], dict[str, jax.Array]]


def make_single_eval_fn(model: nn.Module) -> EvalFn:
  """jit(eval_step): variables -> outputs of one variant."""
  return jax.jit(evaluation.make_eval_step(model))


# Units passed once, unbatched, to every variant of a chunk that leaves them
# untouched. The front end's 2-D convolution kernel, batched per variant,
# becomes a grouped convolution that XLA:CPU runs slower than the whole rest
# of the model (benchmarks/analysis_vectorized.py measures it); so it is
# batched only in chunks that reset it. Each shared/batched pattern compiles
# once.
SHAREABLE_PATHS = (("encoder", "subsampling"),)


def make_vectorized_eval_fn(model: nn.Module,
                            mesh: Mesh | None = None) -> EvalFn:
  """jit(vmap(eval_step)) over stacked variables, with shared units.

  Args:
    model: the model.
    mesh: None = one device; else the clients mesh
      (`federated.mesh.make_client_mesh`): the variants axis is split over its
      devices (`jax.shard_map`, each device vmaps its own variants).

  Returns `fn(batched, shared, batch)`: `batched` the variables stacked [V, ...]
  without the shared units; `shared` {collection: {'/'-joined path: subtree}}
  (no leading axis) put back into every variant; outputs [V, ...]. Over a
  mesh V is a multiple of its devices, `batched` is sharded over it and
  `shared` and `batch` are replicated (`evaluate_vectorized` places them).
  """
  eval_step = evaluation.make_eval_step(model)

  def eval_variant(batched, shared, batch):
    variables = dict(batched)
    for collection, units in shared.items():
      for name, value in units.items():
        variables[collection] = tree_paths.put(
            variables[collection], tuple(name.split("/")), value)
    return eval_step(variables, batch)

  vectorized = jax.vmap(eval_variant, in_axes=(0, None, None))
  if mesh is None:
    return jax.jit(vectorized)
  return jax.jit(jax.shard_map(
      vectorized, mesh=mesh,
      in_specs=(P(mesh_lib.CLIENTS_AXIS), P(), P()),
      out_specs=P(mesh_lib.CLIENTS_AXIS), check_vma=False))


def split_shared(variable_sets: Sequence[Variables],
                 shareable_paths=SHAREABLE_PATHS,
                 rows: slice = slice(None)) -> tuple[Variables, dict]:
  """(stacked variables [R, ...] without the shared units, shared units).

  A shareable unit is shared when every variant holds the very same subtree
  object (reset variants share untouched subtrees with the trained model).

  Args:
    variable_sets: the V variants of a chunk.
    shareable_paths: the units that may be shared.
    rows: the variants to stack (R of them; all by default). What is shared
      is decided over all V, so every process of a mesh, stacking only its
      own rows, makes the same choice.
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
  return resets.stack_variables(trimmed[rows]), shared


def _check(num_variants: int, batches: Sequence[Batch]) -> None:
  if num_variants < 1:
    raise ValueError("No variants to evaluate.")
  if not batches:
    raise ValueError("No eval batches: is the eval split (or its domains) "
                     "empty?")


def devices_multiple(count: int, num_devices: int) -> int:
  """`count` rounded up to a multiple of `num_devices` (a mesh's variants
  per call: every device evaluates the same number)."""
  return -(-count // num_devices) * num_devices


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
    mesh: Mesh | None = None,
) -> list[dict[str, float]]:
  """Evaluates variants 0..num_variants-1 in chunks of `variants_per_call`.

  Args:
    eval_fn: `make_vectorized_eval_fn(model, mesh)`.
    get_variables: index -> that variant's variables (built lazily, so only
      one chunk is held in memory; over a mesh, only this process's variants).
    num_variants: V.
    batches: the eval batches (with 'example_mask'), the same on every process.
    decode: token ids -> text.
    variants_per_call: chunk size (>= 1); over a mesh, rounded up to a
      multiple of its devices.
    groups: partition of the indices; chunks never mix groups (e.g. variants
      that reset a shareable unit apart from those that keep it shared).
      None = one group in index order.
    mesh: None = one device; else the mesh of `eval_fn` (module docstring):
      every process must call this with the same arguments.

  Returns:
    V dicts of `EvalAccumulator.result` (on every process).
  """
  _check(num_variants, batches)
  if variants_per_call < 1:
    raise ValueError(f"variants_per_call must be >= 1, got {variants_per_call}.")
  groups = [list(range(num_variants))] if groups is None else groups
  if sorted(i for g in groups for i in g) != list(range(num_variants)):
    raise ValueError(f"groups must partition range({num_variants}).")
  num_devices = 1 if mesh is None else mesh.size
  chunks = []
  for group in groups:
    # A group smaller than variants_per_call is one chunk of its own size
    # (no padding); a group's pattern of shared units compiles apart anyway.
    size = min(devices_multiple(variants_per_call, num_devices),
               devices_multiple(len(group), num_devices))
    chunks.extend((group[start:start + size], size)
                  for start in range(0, len(group), size))
  if mesh is None:
    place_batched = place_shared = jax.device_put
    rows = lambda size: (0, size)
  else:
    place_batched = lambda tree: mesh_lib.shard_round_data(tree, mesh)
    place_shared = lambda tree: mesh_lib.replicate(tree, mesh)
    rows = lambda size: mesh_lib.process_client_range(size, mesh)
  device_batches = [place_shared(b) for b in batches]
  accumulators = {}
  for indices, size in chunks:
    padded = indices + [indices[-1]] * (size - len(indices))
    first, last = rows(size)  # The rows of this process's devices.
    mine = padded[first:last]
    # Variants are built lazily and share untouched subtrees: building all
    # of a chunk's is cheap; only this process's rows are stacked.
    batched, shared = split_shared([get_variables(i) for i in padded],
                                   rows=slice(first, last))
    batched, shared = place_batched(batched), place_shared(shared)
    for batch, device_batch in zip(batches, device_batches):
      outputs = eval_fn(batched, shared, device_batch)
      if mesh is not None:
        outputs = multihost_utils.global_array_to_host_local_array(
            outputs, mesh, P(mesh_lib.CLIENTS_AXIS))
      outputs = jax.device_get(outputs)
      for row, index in enumerate(mine[:max(0, len(indices) - first)]):
        accumulators.setdefault(index, evaluation.EvalAccumulator(decode)).add(
            jax.tree.map(lambda x, r=row: x[r], outputs), batch)
  # Each process evaluated the variants of its own rows; one exchange gives
  # every process every variant's metrics.
  mine = {index: a.result() for index, a in accumulators.items()}
  merged = {}
  for part in multihost.gather_json(sorted(mine.items()), "variant_metrics"):
    merged.update((index, metrics) for index, metrics in part)
  return [merged[index] for index in range(num_variants)]


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
