"""Layer units: named subtrees of the parameter tree, for analysis and dropout.

A unit's name is its path in the parameter tree joined by '/', e.g.
'encoder/block_03/conv'; `list_units` maps each name to its path tuple
('encoder', 'block_03', 'conv'). Names are derived from the tree, never
hard-coded, so they follow the model.

Granularities (every parameter belongs to exactly one unit at each):
  'block':  'encoder/subsampling' (the front end: the convolutional
            subsampling; the log-mel has no parameters), one unit per
            Conformer block 'encoder/block_NN', and 'decoder' (the CTC head or
            the whole RNN-T prediction + joint network).
  'module': as 'block', but each block is split into its children
            'encoder/block_NN/{ffn1, mhsa, conv, ffn2, final_norm}'. The
            block's final LayerNorm is a unit of its own: it belongs to no
            sub-module in the paper's figure, and keeping it separate keeps
            every unit a single subtree.
Any other top-level subtree (none today) would be a unit of its own.
"""

from typing import Any, Mapping

Path = tuple[str, ...]
PyTree = Any

GRANULARITIES = ('block', 'module')

# Only used to order names as the computation runs (tree order is
# alphabetical); names themselves always come from the tree.
_ORDER = ('encoder', 'subsampling', 'ffn1', 'mhsa', 'conv', 'ffn2',
          'final_norm')


def _in_model_order(keys) -> list[str]:
  rank = lambda key: (_ORDER.index(key) if key in _ORDER else len(_ORDER), key)
  return sorted(keys, key=rank)


def list_units(params: Mapping[str, Any],
               granularity: str = 'block') -> dict[str, Path]:
  """Units of a parameter tree, in the order the model computes them.

  Args:
    params: The 'params' collection (nested mappings of arrays).
    granularity: 'block' or 'module' (see the module docstring).

  Returns:
    {name: path}, name = '/'.join(path).

  Raises:
    ValueError: unknown granularity, or a params tree without 'encoder'.
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f'Unknown unit granularity {granularity!r}; expected one '
                     f'of {GRANULARITIES}.')
  if 'encoder' not in params:
    raise ValueError('list_units expects the params of a ConformerASR (a tree '
                     f"with an 'encoder' key); got keys {sorted(params)}.")
  paths: list[Path] = []
  for top_name in _in_model_order(params):
    if top_name != 'encoder':
      paths.append((top_name,))
      continue
    for child_name in _in_model_order(params['encoder']):
      if granularity == 'module' and child_name.startswith('block_'):
        paths.extend(
            ('encoder', child_name, module_name)
            for module_name in _in_model_order(params['encoder'][child_name]))
      else:
        paths.append(('encoder', child_name))
  return {'/'.join(path): path for path in paths}


def get_unit(tree: Mapping[str, Any], path: Path) -> PyTree:
  """The subtree of `tree` at `path` (a tuple of keys)."""
  node = tree
  for depth, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"No unit '{'/'.join(path)}': missing key {key!r} at "
                     f"'{'/'.join(path[:depth]) or '<root>'}'.")
    node = node[key]
  return node


def set_unit(tree: Mapping[str, Any], path: Path, value: PyTree) -> dict:
  """A copy of `tree` with the subtree at `path` replaced by `value`.

  Pure: `tree` is not modified; untouched subtrees are shared, not copied.
  The path must already exist (a unit is replaced, never added).
  """
  get_unit(tree, path)  # Raises a KeyError naming a bad path.
  if not path:
    return value
  head, rest = path[0], path[1:]
  updated = dict(tree)
  updated[head] = set_unit(tree[head], rest, value) if rest else value
  return updated
