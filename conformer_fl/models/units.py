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
Any other top-level subtree would be a unit of its own (the model has none).

Droppable modules (`droppable_modules`): the Conformer's declaration, as data,
of which module units Federated Dropout may thin, which leaves carry their
units and along which axis (conformer_fl/federated/dropout.py reads it and
knows no layer name).
"""

import dataclasses
from typing import Any, Mapping

Path = tuple[str, ...]
PyTree = Any

GRANULARITIES = ("block", "module")

# Only used to order names as the computation runs (tree order is
# alphabetical); names themselves always come from the tree.
_ORDER = ("encoder", "subsampling", "ffn1", "mhsa", "conv", "ffn2",
          "final_norm")


def _in_model_order(keys) -> list[str]:
  rank = lambda key: (_ORDER.index(key) if key in _ORDER else len(_ORDER), key)
  return sorted(keys, key=rank)


def list_units(params: Mapping[str, Any],
               granularity: str = "block") -> dict[str, Path]:
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
    raise ValueError(f"Unknown unit granularity {granularity!r}; expected one "
                     f"of {GRANULARITIES}.")
  if "encoder" not in params:
    raise ValueError("list_units expects the params of a ConformerASR (a tree "
                     f"with an 'encoder' key); got keys {sorted(params)}.")
  paths: list[Path] = []
  for top_name in _in_model_order(params):
    if top_name != "encoder":
      paths.append((top_name,))
      continue
    for child_name in _in_model_order(params["encoder"]):
      if granularity == "module" and child_name.startswith("block_"):
        paths.extend(
            ("encoder", child_name, module_name)
            for module_name in _in_model_order(params["encoder"][child_name]))
      else:
        paths.append(("encoder", child_name))
  return {"/".join(path): path for path in paths}


# ----------------------------------------------------------------------------
# Droppable modules (Federated Dropout), declared by the model.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DroppableModule:
  """One kind of module unit whose units a client may drop.

  Attributes:
    kind: the kind's name ('ffn', 'conv', 'mhsa'), as config lists them.
    module: regular expression that fully matches the '/'-joined path of every
      module of this kind in the params (the ffn1 of every block, say).
    leaves: (pattern, axis, copies) triples: every leaf of the module whose
      '/'-joined path below the module fully matches `pattern` (in params and
      in each model_state collection) carries the n units along `axis`,
      `copies` consecutive blocks of n (2 for a GLU input: unit i owns
      entries i and n + i). A module has n = shape[axis] / copies units;
      leaves that match no pattern are kept whole.
    groups: G; units are kept k/G per group of n/G consecutive units (the
      conv module's group norm), 1 elsewhere.
    output: the '/'-joined path below the module of the leaf that maps the
      units to the module's output, with the units along axis 0: zeroing
      its rows of some units removes those units from the output.
  """
  kind: str
  module: str
  leaves: tuple[tuple[str, int, int], ...]
  groups: int = 1
  output: str = ""


def droppable_modules(conv_norm_groups: int = 1
                      ) -> tuple[DroppableModule, ...]:
  """The Conformer's droppable modules, in the order a block computes them.

  ffn1/ffn2: the ffn_mult*D hidden units, columns of dense_in/kernel [D, F]
    and dense_in/bias [F], rows of dense_out/kernel [F, D].
  conv: the C = D inner channels after the GLU, columns i and C+i of
    pointwise_in/kernel [D, 2C] and bias [2C], depthwise/kernel [K, 1, C],
    every conv_norm leaf [C] (params and batch-norm running statistics), rows
    of pointwise_out/kernel [C, D].
  mhsa: the H heads (of width D/H, unchanged): query/key/value/pos_proj
    kernels [D, H, Dh] (axis 1), their biases and content_bias/position_bias
    [H, Dh] (axis 0), output/kernel [H, Dh, D] (axis 0).
  The layer norms, output biases and everything else are kept whole. A
  sub-model's widths are a model of their own: `models.build_model(config,
  kept_units={'encoder/block_03/ffn1': F', ...})`.

  Args:
    conv_norm_groups: G of the conv module's group norm (1 for other norms).
  """
  block = r"encoder/block_\d+/"
  ffn_leaves = (("dense_in/kernel", 1, 1), ("dense_in/bias", 0, 1),
                ("dense_out/kernel", 0, 1))
  mhsa_leaves = (("(query|key|value|pos_proj)/kernel", 1, 1),
                 ("(query|key|value)/bias", 0, 1),
                 ("content_bias|position_bias", 0, 1),
                 ("output/kernel", 0, 1))
  conv_leaves = (("pointwise_in/kernel", 1, 2), ("pointwise_in/bias", 0, 2),
                 ("depthwise/kernel", 2, 1), ("pointwise_out/kernel", 0, 1),
                 ("conv_norm/.+", -1, 1))
  return (DroppableModule("ffn", block + "ffn1", ffn_leaves,
                          output="dense_out/kernel"),
          DroppableModule("mhsa", block + "mhsa", mhsa_leaves,
                          output="output/kernel"),
          DroppableModule("conv", block + "conv", conv_leaves,
                          conv_norm_groups, output="pointwise_out/kernel"),
          DroppableModule("ffn", block + "ffn2", ffn_leaves,
                          output="dense_out/kernel"))


def droppable_modules_from_config(
    model_config: Any) -> tuple[DroppableModule, ...]:
  """`droppable_modules` of a model config (its conv norm's group count)."""
  groups = (model_config.conv_norm_groups
            if model_config.conv_norm == "group_norm" else 1)
  return droppable_modules(groups)
