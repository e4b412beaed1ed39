"""Federated Dropout, model-agnostic: sub-models, the client wrapper, the mean.

A `SubmodelSpec` names, for each dropped layer, the leaves of the parameter
(and model-state) tree that carry that layer's units and the axis they sit
on (conformer_fl/federated/dropout.py builds it from the model's declaration,
models/units.py:droppable_modules). A client's sub-model is made
by `jnp.take` of its kept unit indices along those axes, so it has genuinely
smaller arrays (fewer FLOPs and less memory); its update is scattered back
into zeros of the full shape.

Which units a client keeps is the spec's policy (KEPT_POLICIES: random,
ordered, static, rolling), from the client's rng and the round index.

Round pieces (conformer_fl/federated/fl_round.py calls them when given a spec):
  `wrap_client_update`: the round's client update run on the client's
    sub-model; returns full-shape outputs plus the client's kept-unit
    indicators {layer: float32 [num_units]}, which the round weighs like a
    delta.
  `make_average`: the server-side mean. Each element of a dropped layer, of
    the params and of the model state (e.g. batch-norm running statistics),
    is averaged over the finite clients that kept it,
    sum_c w_c kept_c x_c / sum_c w_c kept_c; a parameter no client trained
    (and every frozen one) gets a zero pseudo-gradient and a zero server
    update, a running statistic no client kept keeps the server's value.

Shapes of one dropped layer with n (`num_units`) units of which k
(`num_kept`) are kept:
  kept indices: int32 [num_kept], ascending within each of the layer's G
    groups and group-major (group g's indices lie in [g n/G, (g+1) n/G)), k/G
    per group.
  A leaf [..., num_units * copies, ...] (axis `axis`) becomes
  [..., num_kept * copies, ...];
  `copies` = 2 for a kernel whose axis holds two halves of n (GLU input:
  [a | b], unit i owns columns i and n + i).

Frozen units (`frozen_paths`): subtrees the clients do not train. They are
split off the trainable tree (their place holds None, an empty pytree), given
to the loss as constants, and get a zero delta and no server update.

Paths are tuples of dict keys (conformer_fl/tree_paths.py).
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from conformer_fl import tree_paths

Path = tuple[str, ...]
PyTree = Any
KeptIndices = dict[str, jax.Array]  # layer name -> int32 [num_kept]

# Which units a client keeps (`kept_indices`); per group of m = n/G units of a
# layer that keeps k/G per group:
#   'random': Caldas et al. 2018 (arXiv 1812.07210), a fresh uniform subset
#     per client and round (`sample_kept_indices`).
#   'ordered': FjORD (Horvath et al. 2021), the leading slice [0, k/G).
#   'static': HeteroFL (Diao et al. 2021), a fixed leading slice per capacity
#     level; with the one capacity level of a spec it is the same slice as
#     'ordered'.
#   'rolling': FedRolex (Alam et al. 2022), at round r the window
#     (r + j) mod m, j in [0, k/G), which rolls one unit per round.
KEPT_POLICIES = ("random", "ordered", "static", "rolling")

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
      raise ValueError(f"{self.name}: num_groups={self.num_groups} does not "
                       f"divide num_units={self.num_units}.")
    if (not 0 < self.num_kept <= self.num_units or
        self.num_kept % self.num_groups):
      raise ValueError(
          f"{self.name}: num_kept={self.num_kept} must be in (0, "
          f"{self.num_units}] and a multiple of num_groups={self.num_groups}.")


@dataclasses.dataclass(frozen=True)
class SubmodelSpec:
  """What a client's sub-model drops and freezes (static, hashable).

  Attributes:
    layers: the dropped layers (same kept counts for every client).
    frozen_paths: subtrees of params the clients do not train.
    policy: which units a client keeps, one of KEPT_POLICIES (`kept_indices`).
  """
  layers: tuple[DroppedLayer, ...] = ()
  frozen_paths: tuple[Path, ...] = ()
  policy: str = "random"

  def __post_init__(self):
    if self.policy not in KEPT_POLICIES:
      raise ValueError(f"federated.dropout.policy={self.policy!r}; expected "
                       f"one of {KEPT_POLICIES}.")

  @property
  def is_identity(self) -> bool:
    """True when the sub-model is the full model trained in full."""
    return not self.layers and not self.frozen_paths

  @property
  def kept_units(self) -> dict[str, int]:
    """{dropped layer name: units every client keeps}: the sub-model's widths.

    The model side builds the sub-model's loss from them (for the Conformer,
    `models.build_model(config, kept_units=spec.kept_units)`).
    """
    return {layer.name: layer.num_kept for layer in self.layers}


def _under(key: Path, path: Path) -> bool:
  return key[:len(path)] == path


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


def _in_groups(layer: DroppedLayer, within: jax.Array) -> jax.Array:
  """int32 [num_kept]: per-group positions [G, k/G] -> full-layer indices."""
  group_size = layer.num_units // layer.num_groups
  offsets = group_size * jnp.arange(layer.num_groups)[:, None]
  return (jnp.sort(within, axis=1) + offsets).reshape(-1).astype(jnp.int32)


def all_kept_indices(spec: SubmodelSpec) -> KeptIndices:
  """The leading k/G units of every group of every layer (a fixed choice).

  Group g of a layer keeps g n/G + [0, k/G): policies 'ordered' and 'static',
  and the sub-model whose costs are measured.
  """
  return {layer.name: _in_groups(layer, jnp.broadcast_to(
      jnp.arange(layer.num_kept // layer.num_groups),
      (layer.num_groups, layer.num_kept // layer.num_groups)))
          for layer in spec.layers}


def rolling_kept_indices(spec: SubmodelSpec,
                         round_index: jax.Array) -> KeptIndices:
  """A window of consecutive units per group that rolls with the round.

  In each group of m = n/G units, round r keeps the k/G units
  (r + j) mod m, j in [0, k/G): the window starts at unit r mod m and wraps
  around within the group. round_index: int32 [] (traced or concrete).
  """
  kept = {}
  for layer in spec.layers:
    group_size = layer.num_units // layer.num_groups
    per_group = layer.num_kept // layer.num_groups
    start = jnp.asarray(round_index, jnp.int32) % group_size
    window = (start + jnp.arange(per_group, dtype=jnp.int32)) % group_size
    kept[layer.name] = _in_groups(layer, jnp.broadcast_to(
        window, (layer.num_groups, per_group)))
  return kept


def kept_indices(spec: SubmodelSpec, rng: jax.Array,
                 round_index: jax.Array) -> KeptIndices:
  """One client's kept units under `spec.policy` (KEPT_POLICIES).

  Args:
    spec: the sub-model spec.
    rng: the client's dropout rng (read by 'random' only).
    round_index: int32 [], the server's round (read by 'rolling' only); a
      traced scalar, so one compiled round serves every round.

  Returns:
    {layer name: int32 [num_kept]} (group-major, ascending within a group).
  """
  if spec.policy == "random":
    return sample_kept_indices(spec, rng)
  if spec.policy == "rolling":
    return rolling_kept_indices(spec, round_index)
  return all_kept_indices(spec)  # 'ordered', 'static'.


def _leaf_indices(layer: DroppedLayer, leaf: GatheredLeaf,
                  kept: jax.Array) -> jax.Array:
  """int32 [num_kept * copies]: positions of the kept units along leaf.axis."""
  return jnp.concatenate(
      [kept + copy * layer.num_units for copy in range(leaf.copies)])


def kept_indicator(spec: SubmodelSpec,
                   kept: KeptIndices) -> dict[str, jax.Array]:
  """{layer name: float32 [num_units]}: 1.0 at the kept units, else 0.0."""
  return {
      layer.name: jnp.zeros((layer.num_units,), jnp.float32).at[
          kept[layer.name]].set(1.0) for layer in spec.layers
  }


# ----------------------------------------------------------------------------
# Gather (extract) and scatter back.
# ----------------------------------------------------------------------------


def _leaves(layer: DroppedLayer, which: str) -> tuple[GatheredLeaf, ...]:
  return layer.param_leaves if which == "params" else layer.state_leaves


def gather_submodel(spec: SubmodelSpec, tree: PyTree, kept: KeptIndices,
                    which: str = "params") -> PyTree:
  """The sub-model's tree: each dropped layer's leaves gathered to k units.

  Args:
    spec: the sub-model spec.
    tree: the full params (which='params') or model_state ('model_state').
    kept: kept indices of one client (sample_kept_indices).
    which: 'params' or 'model_state'.

  Returns:
    The tree with [.., n*copies, ..] leaves replaced by [.., k*copies, ..].
  """
  flat = tree_paths.flatten(tree)
  values = {}
  for layer in spec.layers:
    for leaf in _leaves(layer, which):
      values[leaf.path] = jnp.take(
          flat[leaf.path], _leaf_indices(layer, leaf, kept[layer.name]),
          axis=leaf.axis)
  return tree_paths.replace_all(tree, values)


def scatter_to_full(spec: SubmodelSpec, sub_tree: PyTree, fill: PyTree,
                    kept: KeptIndices, which: str = "params") -> PyTree:
  """Writes a sub-model tree back into `fill` (a full-shape tree).

  Kept positions get the sub-model's values, the others keep `fill`'s (zeros
  for deltas and model-state sums). Leaves outside dropped layers are taken
  from sub_tree as they are.
  """
  full_flat, sub_flat = tree_paths.flatten(fill), tree_paths.flatten(sub_tree)
  values = {}
  for layer in spec.layers:
    for leaf in _leaves(layer, which):
      indices = _leaf_indices(layer, leaf, kept[layer.name])
      full = jnp.moveaxis(full_flat[leaf.path], leaf.axis, 0)
      sub = jnp.moveaxis(sub_flat[leaf.path], leaf.axis, 0)
      values[leaf.path] = jnp.moveaxis(
          full.at[indices].set(sub.astype(full.dtype)), 0, leaf.axis)
  return tree_paths.replace_all(sub_tree, values)


# ----------------------------------------------------------------------------
# Frozen units.
# ----------------------------------------------------------------------------


def split_frozen(spec: SubmodelSpec,
                 params: PyTree) -> tuple[PyTree, tuple[PyTree, ...]]:
  """(trainable tree with None at the frozen paths, frozen subtrees)."""
  frozen = tuple(tree_paths.get(params, path) for path in spec.frozen_paths)
  trainable = tree_paths.replace_all(params,
                            {path: None for path in spec.frozen_paths})
  return trainable, frozen


def merge_frozen(spec: SubmodelSpec, trainable: PyTree,
                 frozen: Sequence[PyTree]) -> PyTree:
  """Inverse of split_frozen."""
  return tree_paths.replace_all(trainable, dict(zip(spec.frozen_paths, frozen)))


# ----------------------------------------------------------------------------
# Client side: the sub-model and the wrapped client update.
# ----------------------------------------------------------------------------


def client_submodel(
    spec: SubmodelSpec, params: PyTree, model_state: PyTree,
    kept: KeptIndices) -> tuple[PyTree, tuple[PyTree, ...], PyTree]:
  """A client's sub-model: (trainable params, frozen subtrees, model_state).

  Args:
    spec: the sub-model spec.
    params, model_state: full server values.
    kept: the client's kept indices.

  Returns:
    Trainable params (gathered; None at the frozen paths), the frozen
    subtrees (gathered), the gathered model_state.
  """
  trainable, frozen = split_frozen(spec, gather_submodel(spec, params, kept))
  return trainable, frozen, gather_submodel(spec, model_state, kept,
                                            "model_state")


def with_frozen(spec: SubmodelSpec, loss_fn: Callable[..., Any],
                frozen: Sequence[PyTree]) -> Callable[..., Any]:
  """loss_fn of (trainable, model_state, batch, rng): frozen merged back in."""

  def trainable_loss(trainable, model_state, batch, rng):
    return loss_fn(merge_frozen(spec, trainable, frozen), model_state, batch,
                   rng)

  return trainable_loss


def wrap_client_update(client_update: Callable[..., Any], spec: SubmodelSpec,
                       loss_fn: Callable[..., Any],
                       client_optimizer: Any) -> Callable[..., Any]:
  """The round's client update of ONE client, run on its sub-model.

  Args:
    client_update: round.client_update(server_params, server_model_state,
      batches, step_mask, client_rng, *, loss_fn, client_optimizer) ->
      ClientOutput (delta, model_state, loss_sum, num_examples_seen).
    spec: the sub-model spec.
    loss_fn: the sub-model's loss, loss_fn(params, model_state, batch, rng)
      on params gathered to the widths `spec.kept_units`.
    client_optimizer: the round's.

  Returns:
    fn(server_params, server_model_state, batches, step_mask, client_rng,
    round_index) -> ClientOutput with full-shape delta (zero at dropped and
    frozen units), model_state (zero at the dropped units of state leaves)
    and units {layer name: float32 [num_units] kept indicator}. The kept
    units are
    `kept_indices(spec, fold_in(client_rng, DROPOUT_RNG_TAG), round_index)`
    (round_index: int32 [], the server's round); the frozen subtrees are
    constants (stop_gradient) of the loss.
  """

  def dropout_client_update(server_params, server_model_state, batches,
                            step_mask, client_rng, round_index):
    kept = kept_indices(
        spec, jax.random.fold_in(client_rng, DROPOUT_RNG_TAG), round_index)
    trainable, frozen, sub_state = client_submodel(
        spec, server_params, server_model_state, kept)
    frozen = jax.lax.stop_gradient(frozen)
    output = client_update(trainable, sub_state, batches, step_mask,
                           client_rng, loss_fn=with_frozen(spec, loss_fn,
                                                           frozen),
                           client_optimizer=client_optimizer)
    zeros = jax.tree.map(jnp.zeros_like, server_params)
    delta = merge_frozen(spec, output.delta,
                         jax.tree.map(jnp.zeros_like, frozen))
    delta = scatter_to_full(spec, delta, zeros, kept)
    model_state = scatter_to_full(
        spec, output.model_state,
        jax.tree.map(jnp.zeros_like, server_model_state), kept, "model_state")
    return output._replace(delta=delta, model_state=model_state,
                           units=kept_indicator(spec, kept))

  return dropout_client_update


# ----------------------------------------------------------------------------
# Server side: count-normalized mean.
# ----------------------------------------------------------------------------


def _broadcast_units(values: jax.Array, leaf: GatheredLeaf,
                     shape: tuple[int, ...]) -> jax.Array:
  """[num_units] per-unit values -> leaf shape (tiled over copies, on axis)."""
  tiled = jnp.tile(values, leaf.copies)
  axis = leaf.axis % len(shape)
  expand = [1] * len(shape)
  expand[axis] = tiled.shape[0]
  return jnp.broadcast_to(tiled.reshape(expand), shape)


def trained_weights(spec: SubmodelSpec, params: PyTree,
                    unit_weights: Mapping[str, jax.Array],
                    which: str = "params") -> dict[Path, Any]:
  """{leaf path: sum_c w_c kept_c broadcast to the leaf} for partial leaves.

  Covers the leaves of dropped layers (unit_weights[name] float32 [num_units] =
  sum_c w_c * kept_indicator_c) and, for which='params', every leaf under a
  frozen path (0). Leaves absent from the result were trained by every
  finite client. `params` is the full params (or model_state) tree.
  """
  flat = tree_paths.flatten(params)
  weights = {}
  for layer in spec.layers:
    for leaf in _leaves(layer, which):
      weights[leaf.path] = _broadcast_units(unit_weights[layer.name], leaf,
                                            flat[leaf.path].shape)
  if which == "params":
    for path, value in flat.items():
      if any(_under(path, frozen) for frozen in spec.frozen_paths):
        weights[path] = jnp.zeros(value.shape, jnp.float32)
  return weights


def count_normalized_mean(total_sum: PyTree, plain_mean: PyTree,
                          weights: Mapping[Path, jax.Array],
                          untrained: PyTree | None = None) -> PyTree:
  """sum_c w_c kept_c x_c / sum_c w_c kept_c at the leaves of `weights`.

  Args:
    total_sum: sum_c w_c x_c (x zero where the client did not keep a unit).
    plain_mean: total_sum / sum_c w_c (kept for leaves every client trained,
      so that a spec without dropped layers reproduces the plain round).
    weights: trained_weights(...).
    untrained: values where no client kept the element (the server's model
      state); None = 0.
  """
  flat_sum = tree_paths.flatten(total_sum)
  flat_untrained = None if untrained is None else tree_paths.flatten(untrained)
  values = {}
  for path, weight in weights.items():
    total = flat_sum[path]
    safe = jnp.where(weight > 0, weight, 1.0).astype(total.dtype)
    fallback = 0.0 if flat_untrained is None else flat_untrained[path]
    values[path] = jnp.where(weight > 0, total / safe,
                             fallback).astype(total.dtype)
  return tree_paths.replace_all(plain_mean, values)


def zero_untrained(updates: PyTree,
                   weights: Mapping[Path, jax.Array]) -> PyTree:
  """Server updates set to 0 where no client trained the element.

  (A server optimizer with momentum would otherwise keep moving them.)
  """
  flat = tree_paths.flatten(updates)
  values = {path: jnp.where(weight > 0, flat[path], 0.0)
            for path, weight in weights.items()}
  return tree_paths.replace_all(updates, values)


def make_average(spec: SubmodelSpec,
                 plain_average: Callable[..., Any]) -> Callable[..., Any]:
  """The round's server-side mean for the clients' sub-models.

  Args:
    spec: the sub-model spec.
    plain_average: aggregation.weighted_mean(sums, params, model_state) ->
      Averages(delta, model_state, mask_updates, metrics).

  Returns:
    average(sums, params, model_state) -> Averages whose delta and
    model_state are count-normalized (module docstring), whose mask_updates
    zeroes the server update of elements no client trained, and whose
    metrics add 'submodel_kept_fraction/<layer>' (weighted mean kept
    fraction). sums['unit_weights'] = {layer: sum_c w_c kept_c} [num_units].
  """

  def average(sums, params, model_state):
    plain = plain_average(sums, params, model_state)
    unit_weights = sums["unit_weights"]
    trained = trained_weights(spec, params, unit_weights)
    kept_state = trained_weights(spec, model_state, unit_weights,
                                 "model_state")
    safe_weight = jnp.where(sums["weight"] > 0, sums["weight"], 1.0)
    metrics = {
        f"submodel_kept_fraction/{layer.name}":
            jnp.sum(unit_weights[layer.name]) / (safe_weight *
                                                 layer.num_units)
        for layer in spec.layers}
    return plain._replace(
        delta=count_normalized_mean(sums["delta"], plain.delta, trained),
        model_state=count_normalized_mean(sums["model_state"],
                                          plain.model_state, kept_state,
                                          model_state),
        mask_updates=lambda updates: zero_untrained(updates, trained),
        metrics={**plain.metrics, **metrics})

  return average
