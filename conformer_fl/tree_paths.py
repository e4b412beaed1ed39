"""Paths into nested dicts of arrays (params, model state): one utility.

A path is a tuple of keys, ('encoder', 'block_03', 'conv'), naming a subtree
or a leaf; '/'.join(path) is its name ('encoder/block_03/conv'). The functions
are pure and share structure: what a path does not touch is the same object in
the result as in the input (the analysis relies on it to pass unchanged units
once to a batch of variants), so replacing one unit of a large tree copies
only the dicts along its path. Flat views come from `flax.traverse_util`.
"""

from collections.abc import Mapping
from typing import Any

from flax import traverse_util

Path = tuple[str, ...]
PyTree = Any


def _name(path: Path) -> str:
  return "/".join(path) or "<root>"


def get(tree: Mapping[str, Any], path: Path) -> PyTree:
  """The subtree or leaf of `tree` at `path` (the object itself, not a copy).

  Raises:
    KeyError: naming the path and the first missing key.
  """
  node = tree
  for depth, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"No entry '{_name(path)}': missing key {key!r} at"
                     f" '{_name(path[:depth])}'.")
    node = node[key]
  return node


def has(tree: Mapping[str, Any], path: Path) -> bool:
  """Whether `tree` holds a subtree or leaf at `path`."""
  try:
    get(tree, path)
  except KeyError:
    return False
  return True


def replace(tree: Mapping[str, Any], path: Path, value: PyTree) -> PyTree:
  """A copy of `tree` with the subtree or leaf at `path` replaced by `value`.

  Raises:
    KeyError: no entry at `path` (an entry is replaced, never added).
  """
  get(tree, path)
  if not path:
    return value
  head, rest = path[0], path[1:]
  return {**tree, head: replace(tree[head], rest, value) if rest else value}


def replace_all(tree: Mapping[str, Any],
                values: Mapping[Path, PyTree]) -> PyTree:
  """`replace` at every path of `values`, in order."""
  for path, value in values.items():
    tree = replace(tree, path, value)
  return tree


def without(tree: Mapping[str, Any], path: Path) -> dict[str, Any]:
  """A copy of `tree` without the entry at `path` (a dict left empty stays).

  Raises:
    KeyError: no entry at `path`, or an empty path.
  """
  if not path:
    raise KeyError("without: the path is empty.")
  get(tree, path)
  head, rest = path[0], path[1:]
  if not rest:
    return {key: value for key, value in tree.items() if key != head}
  return {**tree, head: without(tree[head], rest)}


def put(tree: Mapping[str, Any], path: Path, value: PyTree) -> dict[str, Any]:
  """A copy of `tree` with `value` at `path`, adding the dicts on the way."""
  if not path:
    raise KeyError("put: the path is empty.")
  head, rest = path[0], path[1:]
  child = value if not rest else put(tree.get(head, {}), rest, value)
  return {**tree, head: child}


def leaf_paths(tree: Mapping[str, Any]) -> list[Path]:
  """The path of every leaf, in traversal order."""
  return list(traverse_util.flatten_dict(tree))


def flatten(tree: Mapping[str, Any]) -> dict[Path, Any]:
  """{path: leaf}; an empty dict is kept as a marker `unflatten` restores."""
  return traverse_util.flatten_dict(tree, keep_empty_nodes=True)


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
  """The nested dicts of `flatten`'s output."""
  return traverse_util.unflatten_dict(dict(flat))
