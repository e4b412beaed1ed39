"""Sub-models of federated dropout: extract (gather) and scatter back.

Model-agnostic: a `SubmodelSpec` names, for each dropped layer, the leaves of
the parameter (and model-state) tree that carry that layer's units and the
axis they sit on. A client's sub-model is made by `jnp.take` of its kept unit
indices along those axes, so it has genuinely smaller arrays (fewer FLOPs and
less memory); its update is scattered back into zeros of the full shape.
`conformer_fl/federated/dropout.py` builds the spec of a Conformer.

Shapes of one dropped layer with n units of which k are kept:
  kept indices: int32 [k], ascending within each of the layer's G groups and
    group-major (group g's indices lie in [g n/G, (g+1) n/G)), k/G per group.
  A leaf [..., n * copies, ...] (axis `axis`) becomes [..., k * copies, ...];
  `copies` = 2 for a kernel whose axis holds two halves of n (GLU input:
  [a | b], unit i owns columns i and n + i).

Frozen units (`frozen_paths`): subtrees the clients do not train. They are
split off the trainable tree (their place holds None, an empty pytree), given
to the loss as constants, and get a zero delta and no server update.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from conformer_fl.models.units import get_unit as get_path

Path = tuple[str, ...]
PyTree = Any
KeptIndices = dict[str, jax.Array]  # layer name -> int32 [num_kept]

# fold_in tag of the dropout rng: fold_in(client_rng, tag). Local step k uses
# fold_in(client_rng, k) with k < K, far below the tag.
DROPOUT_RNG_TAG = 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class GatheredLeaf:
  """A leaf that carries a dropped layer's units.

  Attributes:
    path: keys from the root of the params (or model_state) tree to the leaf.
    axis: the axis of the units.
    copies: how many consecutive blocks of n entries the axis holds (2 for
      the GLU input kernel/bias, else 1).
  """
  path: Path
  axis: int
  copies: int = 1


@dataclasses.dataclass(frozen=True)
class DroppedLayer:
  """One layer whose units are sub-sampled.

  Attributes:
    name: unit name, e.g. 'encoder/block_03/ffn1'.
    num_units: n, the layer's unit count in the full model.
    num_kept: k, kept per client (a multiple of num_groups, 0 < k <= n;
      k = n gathers every unit, the identity, which tests use).
    num_groups: G; k / G units are kept in each group of n / G consecutive
      units (group norm keeps its groups; 1 elsewhere).
    param_leaves: leaves of the params tree gathered along their unit axis.
    state_leaves: leaves of the model_state tree (e.g. batch-norm running
      statistics) gathered the same way.
  """
  name: str
  num_units: int
  num_kept: int
  num_groups: int
  param_leaves: tuple[GatheredLeaf, ...]
  state_leaves: tuple[GatheredLeaf, ...] = ()

  def __post_init__(self):
    if self.num_units % self.num_groups:
      raise ValueError(f'{self.name}: num_groups={self.num_groups} does not '
                       f'divide num_units={self.num_units}.')
    if (not 0 < self.num_kept <= self.num_units or
        self.num_kept % self.num_groups):
      raise ValueError(
          f'{self.name}: num_kept={self.num_kept} must be in (0, '
          f'{self.num_units}] and a multiple of num_groups={self.num_groups}.')


@dataclasses.dataclass(frozen=True)
class SubmodelSpec:
  """What a client's sub-model drops and freezes (static, hashable).

  Attributes:
    layers: the dropped layers (same kept counts for every client).
    frozen_paths: subtrees of params the clients do not train.
  """
  layers: tuple[DroppedLayer, ...] = ()
  frozen_paths: tuple[Path, ...] = ()

  @property
  def is_identity(self) -> bool:
    """True when the sub-model is the full model trained in full."""
    return not self.layers and not self.frozen_paths


# ----------------------------------------------------------------------------
# Nested-dict helpers.
# ----------------------------------------------------------------------------


def replace_paths(tree: Mapping[str, Any], values: Mapping[Path, Any]) -> dict:
  """A copy of `tree` with the entry at each path replaced (pure)."""
  if not values:
    return tree
  if () in values:
    return values[()]
  by_head: dict[str, dict[Path, Any]] = {}
  for path, value in values.items():
    by_head.setdefault(path[0], {})[path[1:]] = value
  updated = dict(tree)
  for head, rest in by_head.items():
    if head not in tree:
      raise KeyError(f'replace_paths: no key {head!r} in {sorted(tree)}.')
    updated[head] = replace_paths(tree[head], rest)
  return updated


# ----------------------------------------------------------------------------
# Kept units.
# ----------------------------------------------------------------------------


def sample_kept_indices(spec: SubmodelSpec, rng: jax.Array) -> KeptIndices:
  """A uniform random choice of kept units per layer (deterministic in rng).

  Layer i draws from fold_in(rng, i); in each of its G groups it keeps the
  k/G units with the smallest uniform keys, in ascending order.

  Returns:
    {layer name: int32 [num_kept]} (group-major, ascending within a group).
  """
  kept = {}
  for index, layer in enumerate(spec.layers):
    group_size = layer.num_units // layer.num_groups
    keys = jax.random.uniform(jax.random.fold_in(rng, index),
                              (layer.num_groups, group_size))
    order = jnp.argsort(keys, axis=1)[:, :layer.num_kept // layer.num_groups]
    offsets = group_size * jnp.arange(layer.num_groups)[:, None]
    kept[layer.name] = (jnp.sort(order, axis=1) + offsets).reshape(-1).astype(
        jnp.int32)
  return kept


def all_kept_indices(spec: SubmodelSpec) -> KeptIndices:
  """The leading k units of every layer (a fixed choice, e.g. for costs)."""
  kept = {}
  for layer in spec.layers:
    group_size = layer.num_units // layer.num_groups
    per_group = jnp.arange(layer.num_kept // layer.num_groups)
    kept[layer.name] = (per_group[None, :] + group_size *
                        jnp.arange(layer.num_groups)[:, None]).reshape(-1)
  return kept


def _leaf_indices(layer: DroppedLayer, leaf: GatheredLeaf,
                  kept: jax.Array) -> jax.Array:
  """int32 [k * copies]: the positions of the kept units along leaf.axis."""
  return jnp.concatenate(
      [kept + copy * layer.num_units for copy in range(leaf.copies)])


def kept_indicator(spec: SubmodelSpec,
                   kept: KeptIndices) -> dict[str, jax.Array]:
  """{layer name: float32 [n]}: 1.0 at the kept units, else 0.0."""
  return {
      layer.name: jnp.zeros((layer.num_units,), jnp.float32).at[
          kept[layer.name]].set(1.0) for layer in spec.layers
  }


# ----------------------------------------------------------------------------
# Gather (extract) and scatter back.
# ----------------------------------------------------------------------------


def _leaves(layer: DroppedLayer, which: str) -> tuple[GatheredLeaf, ...]:
  return layer.param_leaves if which == 'params' else layer.state_leaves


def gather_submodel(spec: SubmodelSpec, tree: PyTree, kept: KeptIndices,
                    which: str = 'params') -> PyTree:
  """The sub-model's tree: each dropped layer's leaves gathered to k units.

  Args:
    spec: the sub-model spec.
    tree: the full params (which='params') or model_state ('model_state').
    kept: kept indices of one client (sample_kept_indices).
    which: 'params' or 'model_state'.

  Returns:
    The tree with [.., n*copies, ..] leaves replaced by [.., k*copies, ..].
  """
  values = {}
  for layer in spec.layers:
    for leaf in _leaves(layer, which):
      full = get_path(tree, leaf.path)
      values[leaf.path] = jnp.take(
          full, _leaf_indices(layer, leaf, kept[layer.name]), axis=leaf.axis)
  return replace_paths(tree, values)


def scatter_to_full(spec: SubmodelSpec, sub_tree: PyTree, fill: PyTree,
                    kept: KeptIndices, which: str = 'params') -> PyTree:
  """Writes a sub-model tree back into `fill` (a full-shape tree).

  Kept positions get the sub-model's values, the others keep `fill`'s (zeros
  for deltas, the server's values for model_state). Leaves outside dropped
  layers are taken from sub_tree as they are.
  """
  values = {}
  for layer in spec.layers:
    for leaf in _leaves(layer, which):
      indices = _leaf_indices(layer, leaf, kept[layer.name])
      full = jnp.moveaxis(get_path(fill, leaf.path), leaf.axis, 0)
      sub = jnp.moveaxis(get_path(sub_tree, leaf.path), leaf.axis, 0)
      values[leaf.path] = jnp.moveaxis(
          full.at[indices].set(sub.astype(full.dtype)), 0, leaf.axis)
  return replace_paths(sub_tree, values)


# ----------------------------------------------------------------------------
# Frozen units.
# ----------------------------------------------------------------------------


def split_frozen(spec: SubmodelSpec,
                 params: PyTree) -> tuple[PyTree, tuple[PyTree, ...]]:
  """(trainable tree with None at the frozen paths, frozen subtrees)."""
  frozen = tuple(get_path(params, path) for path in spec.frozen_paths)
  trainable = replace_paths(params,
                            {path: None for path in spec.frozen_paths})
  return trainable, frozen


def merge_frozen(spec: SubmodelSpec, trainable: PyTree,
                 frozen: Sequence[PyTree]) -> PyTree:
  """Inverse of split_frozen."""
  return replace_paths(trainable, dict(zip(spec.frozen_paths, frozen)))


# ----------------------------------------------------------------------------
# Server side: count-normalized mean.
# ----------------------------------------------------------------------------


def _broadcast_units(values: jax.Array, leaf: GatheredLeaf,
                     shape: tuple[int, ...]) -> jax.Array:
  """[n] per-unit values -> leaf shape (tiled over copies, along axis)."""
  tiled = jnp.tile(values, leaf.copies)
  axis = leaf.axis % len(shape)
  expand = [1] * len(shape)
  expand[axis] = tiled.shape[0]
  return jnp.broadcast_to(tiled.reshape(expand), shape)


def trained_weights(spec: SubmodelSpec, params: PyTree,
                    unit_weights: Mapping[str, jax.Array]) -> dict[Path, Any]:
  """{leaf path: sum_c w_c kept_c broadcast to the leaf} for partial leaves.

  Covers the leaves of dropped layers (unit_weights[name] float32 [n] =
  sum_c w_c * kept_indicator_c) and every leaf under a frozen path (0).
  Leaves absent from the result were trained by every finite client.
  """
  weights = {}
  for layer in spec.layers:
    for leaf in layer.param_leaves:
      shape = get_path(params, leaf.path).shape
      weights[leaf.path] = _broadcast_units(unit_weights[layer.name], leaf,
                                            shape)
  for frozen_path in spec.frozen_paths:
    flat = jax.tree_util.tree_flatten_with_path(get_path(params, frozen_path))
    for key_path, leaf_value in flat[0]:
      path = frozen_path + tuple(k.key for k in key_path)
      weights[path] = jnp.zeros(leaf_value.shape, jnp.float32)
  return weights


def count_normalized_mean(delta_sum: PyTree, plain_mean: PyTree,
                          weights: Mapping[Path, jax.Array]) -> PyTree:
  """sum_c w_c kept_c delta_c / sum_c w_c kept_c, 0 where no client trained.

  Args:
    delta_sum: sum_c w_c delta_c (deltas zero at untrained positions).
    plain_mean: delta_sum / sum_c w_c (kept for leaves every client trained,
      so that a spec without dropped layers reproduces the plain round).
    weights: trained_weights(...).
  """
  values = {}
  for path, weight in weights.items():
    total = get_path(delta_sum, path)
    safe = jnp.where(weight > 0, weight, 1.0).astype(total.dtype)
    values[path] = jnp.where(weight > 0, total / safe, 0.0).astype(total.dtype)
  return replace_paths(plain_mean, values)


def zero_untrained(updates: PyTree,
                   weights: Mapping[Path, jax.Array]) -> PyTree:
  """Server updates set to 0 where no client trained the element.

  (A server optimizer with momentum would otherwise keep moving them.)
  """
  values = {path: jnp.where(weight > 0, get_path(updates, path), 0.0)
            for path, weight in weights.items()}
  return replace_paths(updates, values)
