"""Aggregation of client results over the leading clients axis [C, ...].

Pure functions on pytrees whose leaves carry a leading clients axis. The round
applies them to the clients of one device (inside shard_map) and then psums
the per-device weighted sums over the mesh 'clients' axis.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def _per_client(values: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes [C] values to broadcast against a [C, ...] leaf."""
  return values.reshape(values.shape + (1,) * (like.ndim - 1))


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
    raise ValueError('client_all_finite needs at least one float leaf.')
  return finite


def zero_where_not(keep: jax.Array, tree: PyTree) -> PyTree:
  """Sets client c of every leaf to 0 where keep[c] is False ([C] bool).

  Uses jnp.where, so NaN/Inf of dropped clients do not reach later sums
  (NaN * 0 would be NaN).
  """
  return jax.tree.map(
      lambda x: jnp.where(_per_client(keep, x), x, jnp.zeros_like(x)), tree)


def client_global_norms(tree: PyTree) -> jax.Array:
  """float32 [C]: global L2 norm of each client's slice of the pytree."""
  squares = [jnp.sum(jnp.square(x.reshape(x.shape[0], -1).astype(jnp.float32)),
                     axis=1) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares))


def clip_client_norms(
    tree: PyTree, max_norm: float) -> tuple[PyTree, jax.Array, jax.Array]:
  """Scales each client's slice down to global L2 norm <= max_norm.

  Args:
    tree: pytree of [C, ...] leaves (e.g. client deltas; must be finite).
    max_norm: the bound (> 0).

  Returns:
    (clipped tree, norms before clipping float32 [C], was_clipped bool [C]).
  """
  norms = client_global_norms(tree)
  was_clipped = norms > max_norm
  scale = jnp.where(was_clipped, max_norm / jnp.maximum(norms, 1e-30), 1.0)
  clipped = jax.tree.map(
      lambda x: (x * _per_client(scale, x)).astype(x.dtype), tree)
  return clipped, norms, was_clipped


def weighted_sum(tree: PyTree, weights: jax.Array) -> PyTree:
  """sum_c weights[c] * x[c] over the leading axis of every leaf.

  Args:
    tree: pytree of [C, ...] float leaves (finite where weights > 0; zero
      the others first with `zero_where_not`). Non-float leaves give
      meaningless values: callers drop them.
    weights: float32 [C], >= 0.

  Returns:
    Pytree of [...] leaves.
  """
  return jax.tree.map(
      lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), tree)


def subtree(params: PyTree, path: Sequence[str] | str, name: str) -> PyTree:
  """The sub-pytree of nested dicts at `path` (tuple of keys or 'a/b/c')."""
  keys = tuple(path.split('/')) if isinstance(path, str) else tuple(path)
  node = params
  for depth, key in enumerate(keys):
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(
          f'Unit {name!r}: path {keys} not found in params (no key {key!r}'
          f' after {keys[:depth]}).')
    node = node[key]
  return node


def unit_update_norms(
    old_params: PyTree,
    new_params: PyTree,
    unit_paths: Mapping[str, Sequence[str] | str],
) -> dict[str, jax.Array]:
  """{'update_norm/<name>': ||new[unit] - old[unit]||_2} for every unit."""
  norms = {}
  for name, path in unit_paths.items():
    difference = jax.tree.map(jnp.subtract, subtree(new_params, path, name),
                              subtree(old_params, path, name))
    norms[f'update_norm/{name}'] = optax.global_norm(difference)
  return norms
