"""Aggregation of client results over the leading clients axis [C, ...].

Pure functions on pytrees whose leaves carry a leading clients axis. The round
(fl_round.py) calls `aggregate` on the clients of one device (inside shard_map),
psums its weighted sums over the mesh 'clients' axis, and turns them into the
server's means (`weighted_mean`, or Federated Dropout's in submodel.py) and
metrics (`round_metrics`).

Per-client decisions that depend on every leaf (drop a non-finite client,
clip a client's norm) reach the leaves only through the [C] weights of
`weighted_sum`, never as a select or scale applied to each leaf: XLA:CPU
fuses a cheap [C] value computed from all L leaves (an `&` chain) into each
of its L readers, which copies it L times. With the per-leaf form the
compile time of a round grows quadratically with the model's blocks; with
the weights form it grows linearly (tests/test_round_sharding.py checks the
growth).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from flax import traverse_util
import jax
import jax.numpy as jnp
import optax

PyTree = Any


def client_all_finite(tree: PyTree) -> jax.Array:
  """bool [C]: True where every element of client c in every leaf is finite.

  Integer and boolean leaves are always finite.
  """
  finite = None
  for leaf in jax.tree.leaves(tree):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      continue
    leaf_finite = jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
    finite = leaf_finite if finite is None else finite & leaf_finite
  if finite is None:
    raise ValueError("client_all_finite needs at least one float leaf.")
  return finite


def zero_nonfinite(tree: PyTree) -> PyTree:
  """Replaces NaN and Inf by 0, element by element, in every float leaf.

  Dropped clients then enter `weighted_sum` with weight 0 without poisoning
  it (NaN * 0 would be NaN); the values of kept clients are all finite and
  pass unchanged. Integer and boolean leaves pass unchanged.
  """
  return jax.tree.map(
      lambda x: jnp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), tree)


def client_global_norms(tree: PyTree) -> jax.Array:
  """float32 [C]: global L2 norm of each client's slice of the pytree."""
  squares = [jnp.sum(jnp.square(x.reshape(x.shape[0], -1).astype(jnp.float32)),
                     axis=1) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares))


def clip_scales(norms: jax.Array,
                max_norm: float) -> tuple[jax.Array, jax.Array]:
  """Per-client factors that scale updates down to global L2 norm <= max_norm.

  Args:
    norms: float32 [C], the clients' global norms (`client_global_norms`).
    max_norm: the bound (> 0).

  Returns:
    (scale float32 [C] in (0, 1], was_clipped bool [C]). Multiply a client's
    aggregation weight by its scale rather than each of its leaves (see the
    module docstring).
  """
  was_clipped = norms > max_norm
  scale = jnp.where(was_clipped, max_norm / jnp.maximum(norms, 1e-30), 1.0)
  return scale, was_clipped


def weighted_sum(tree: PyTree, weights: jax.Array) -> PyTree:
  """sum_c weights[c] * x[c] over the leading axis of every leaf.

  Args:
    tree: pytree of [C, ...] float leaves (finite where weights > 0; zero
      the others first with `zero_nonfinite`). Non-float leaves give
      meaningless values: callers drop them.
    weights: float32 [C], >= 0.

  Returns:
    Pytree of [...] leaves.
  """
  return jax.tree.map(
      lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), tree)


def unit_update_norms(
    old_params: PyTree,
    new_params: PyTree,
    unit_paths: Mapping[str, Sequence[str] | str],
) -> dict[str, jax.Array]:
  """{'update_norm/<name>': ||new[unit] - old[unit]||_2} for every unit."""
  norms = {}
  for name, path in unit_paths.items():
    difference = jax.tree.map(jnp.subtract, _subtree(new_params, path, name),
                              _subtree(old_params, path, name))
    norms[f"update_norm/{name}"] = optax.global_norm(difference)
  return norms


def _subtree(params: PyTree, path: Sequence[str] | str, name: str) -> PyTree:
  """The leaves of nested dicts `params` under `path` (tuple or 'a/b/c')."""
  keys = tuple(path.split("/")) if isinstance(path, str) else tuple(path)
  flat = {key: value for key, value in traverse_util.flatten_dict(
      params).items() if key[:len(keys)] == keys}
  if not flat:
    raise ValueError(f"Unit {name!r}: path {keys} not found in params.")
  return flat


# ----------------------------------------------------------------------------
# The round's aggregation (conformer_fl/federated/fl_round.py).
# ----------------------------------------------------------------------------


def select(predicate: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """Leafwise `new if predicate else old` (predicate: bool [])."""
  return jax.tree.map(lambda a, b: jnp.where(predicate, a, b), new, old)


def check_clip_update_norm(clip_update_norm: float | None) -> None:
  if clip_update_norm is not None and clip_update_norm <= 0:
    raise ValueError(
        f"clip_update_norm={clip_update_norm} must be > 0 or None.")


def aggregate(outputs: Any, weights: jax.Array, num_examples: jax.Array,
              clip_update_norm: float | None) -> dict[str, Any]:
  """Sums over the leading client axis [C] of the clients' outputs.

  A client whose delta, model_state or loss_sum holds a NaN/Inf gets weight
  0 and its loss is left out (NaN/Inf elements zeroed before any sum); a
  delta is clipped to L2 norm clip_update_norm by scaling its weight. Both
  reach the leaves only through [C] weights (module docstring).

  Args:
    outputs: round.ClientOutput with [C, ...] leaves; its per-client unit
      indicators (Federated Dropout) are summed with the weights.
    weights, num_examples: float32 [C] aggregation weights, examples trained.
    clip_update_norm: the bound, or None.

  Returns:
    {'delta', 'model_state', 'unit_weights': weighted sums; 'weight',
    'num_clients', 'loss', 'num_seen', 'num_examples', 'num_aggregated',
    'num_nonfinite', 'num_clipped', 'weighted_norm': scalars}.
  """
  finite = (client_all_finite((outputs.delta, outputs.model_state))
            & jnp.isfinite(outputs.loss_sum))
  deltas, model_states = zero_nonfinite((outputs.delta, outputs.model_state))
  weights = jnp.where(finite, weights, 0.0)
  norms = client_global_norms(deltas)
  scale, was_clipped = (jnp.ones_like(weights), jnp.zeros_like(finite))
  if clip_update_norm is not None:
    scale, was_clipped = clip_scales(norms, clip_update_norm)
  return {
      "delta": weighted_sum(deltas, weights * scale),
      "model_state": weighted_sum(model_states, weights),
      "unit_weights": weighted_sum(outputs.units, weights),
      "weight": jnp.sum(weights),
      "num_clients": jnp.asarray(weights.shape[0], jnp.int32),
      "loss": jnp.sum(jnp.where(finite, outputs.loss_sum, 0.0)),
      "num_seen": jnp.sum(jnp.where(finite, outputs.num_examples_seen, 0.0)),
      "num_examples": jnp.sum(num_examples),
      "num_aggregated": jnp.sum(jnp.where(finite, num_examples, 0.0)),
      "num_nonfinite": jnp.sum(~finite).astype(jnp.int32),
      "num_clipped": jnp.sum(was_clipped & finite).astype(jnp.int32),
      "weighted_norm": jnp.sum(weights * norms),
  }


def round_metrics(sums: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The round's scalar metrics from the all-client sums of `aggregate`.

  loss: example-weighted mean training loss over the active local steps of
  the finite clients (NaN if none); num_examples: examples trained by all
  clients; num_aggregated_examples: by the finite ones; num_clients,
  num_nonfinite_clients, num_clipped_clients: int32;
  mean_client_update_norm: weighted mean (finite clients) of the delta
  norms before clipping.
  """
  safe_weight = jnp.where(sums["weight"] > 0, sums["weight"], 1.0)
  return {
      "loss": jnp.where(sums["num_seen"] > 0, sums["loss"] /
                        jnp.maximum(sums["num_seen"], 1.0), jnp.nan),
      "num_examples": sums["num_examples"],
      "num_aggregated_examples": sums["num_aggregated"],
      "num_clients": sums["num_clients"],
      "num_nonfinite_clients": sums["num_nonfinite"],
      "num_clipped_clients": sums["num_clipped"],
      "mean_client_update_norm": sums["weighted_norm"] / safe_weight,
  }


class Averages(NamedTuple):
  """The server's means (leaves as the params / model_state).

  Attributes:
    delta: mean client delta (the pseudo-gradient is its negative).
    model_state: mean model_state.
    mask_updates: applied to the server optimizer's updates (identity for
      FedAvg; Federated Dropout zeroes untrained elements).
    metrics: extra scalar metrics.
  """
  delta: PyTree
  model_state: PyTree
  mask_updates: Callable[[PyTree], PyTree]
  metrics: dict[str, jax.Array]


def weighted_mean(sums: Mapping[str, Any], params: PyTree,
                  model_state: PyTree) -> Averages:
  """FedAvg's means: the sums of `aggregate` / sum_c w_c.

  Non-float model_state leaves (counters) keep the server's `model_state`;
  params is unused (the signature of every round average).
  """
  del params
  safe = jnp.where(sums["weight"] > 0, sums["weight"], 1.0)
  mean = lambda tree: jax.tree.map(
      lambda x: (x / safe.astype(x.dtype)).astype(x.dtype), tree)
  averaged_state = jax.tree.map(  # Non-float leaves (counters): server's.
      lambda old, new: new if jnp.issubdtype(old.dtype, jnp.inexact) else old,
      model_state, mean(sums["model_state"]))
  return Averages(mean(sums["delta"]), averaged_state, lambda u: u, {})
