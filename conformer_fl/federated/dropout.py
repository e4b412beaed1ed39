"""Federated Dropout specs: which units each client drops, from the config.

Caldas et al. (arXiv 1812.07210) and Guliani et al. (arXiv 2110.03634): every
client of a round trains a sub-model that keeps a random subset of the units
of some layers, with a rate per layer. Which modules can drop units, which
of their leaves carry the units and along which axis is the model's
declaration, handed in as data (`droppable`: a sequence of records with
fields kind, module, leaves, groups; the Conformer's is
models/units.py:droppable_modules); this module knows no layer
name. The round side (gather, scatter, count-normalized mean) is
conformer_fl/federated/submodel.py.

Which units a client keeps (`policy`, submodel.KEPT_POLICIES), the same
choice in every dropped layer, within each group:
  'random' (Caldas et al. 2018, arXiv 1812.07210; the default): a fresh
    uniform subset per client and round, from the client's rng.
  'ordered' (FjORD, Horvath et al. 2021): the leading units [0, k).
  'static' (HeteroFL, Diao et al. 2021): a fixed leading slice per capacity
    level; one spec is one capacity level, so it keeps the same units as
    'ordered'.
  'rolling' (FedRolex, Alam et al. 2022): the k consecutive units starting
    at unit r mod n of round r, wrapping around (mod n).
Every client of a round keeps the same units under the three deterministic
policies. kind='targeted' (rates by layer importance) combines with any of
them: the rates set how many units each layer keeps, the policy which. The
experiment's arms (`conformer_fl.experiment.arms`) derive those rates from a
run's analysis/importance.json.

Keep count of a layer of n units at rate r: round((1 - r) * n), at least one
unit (one per group), the same for every client so that clients vmap; a rate
that keeps all n leaves the layer whole (not gathered).

Capacity tiers (`tier_specs_from_config`, `dropout.tiers`): clients of mixed
capacity in one round, each tier a share of the clients with a width
multiplier w; a tier's layers keep round(w (1 - r) n) units (its spec is
built at rate 1 - w (1 - r)), chosen by the policy ('static' gives HeteroFL:
each tier its leading slice). The round (fl_round.py, tiers.py) vmaps each
tier at its own widths.

Groups (e.g. a group norm over the conv channels): dropping whole units at
random would mix units of different groups in a reshaped sub-model group. A
layer of G groups keeps k/G units inside every group
(k = G * round((1 - r) * n / G)), group-major, so each sub-model group holds
a subset of one full-model group.

Which layers get which rate, and which subtrees are frozen, is selected by
patterns over '/'-joined names (conformer_fl/unit_patterns.py: an exact name,
a prefix such as a block 'encoder/block_03', or a glob such as '*/conv'):
  rates: {pattern: rate}; a pattern must match some subtree of the params
    (a unit, e.g. 'decoder', or anything inside one); the droppable modules
    it selects take its rate, the most specific pattern (the one selecting
    the fewest droppable modules) winning where several select a module.
  freeze_units: patterns over the subtrees of the params; the topmost
    selected subtrees are not trained by the clients at all (outside the
    client optimizer, zero delta, no server update).
"""

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import optax

from conformer_fl import tree_paths
from conformer_fl import unit_patterns
from conformer_fl.federated import fl_round as round_lib
from conformer_fl.federated import submodel as submodel_lib

PyTree = Any
Path = tuple[str, ...]
# A model's declaration of one droppable module kind (duck-typed, e.g.
# models/units.py:DroppableModule): .kind (str), .module (regex
# of the module's '/'-path), .leaves ((regex, axis, copies), ...), .groups.
Droppable = Any

DROPOUT_KINDS = ("none", "uniform", "targeted")


def _joined(path: Path) -> str:
  return "/".join(path)


def droppable_layers(
    params: Mapping[str, Any], model_state: Mapping[str, Any] | None,
    droppable: Sequence[Droppable],
) -> dict[str, tuple[Droppable, int, tuple[submodel_lib.GatheredLeaf, ...],
                     tuple[submodel_lib.GatheredLeaf, ...]]]:
  """{module name: (declaration, n units, param leaves, state leaves)}.

  Modules are the params subtrees whose '/'-path fully matches a
  declaration's `module`, ordered by their parent path, then by the order of
  the declarations (the model's computation order within a block).

  Raises:
    ValueError: a module with no declared leaf, or whose leaves disagree on
      its unit count.
  """
  shapes = {path: value.shape
            for path, value in tree_paths.flatten(params).items()}
  param_paths = list(shapes)
  state_paths = {collection: tree_paths.leaf_paths(tree)
                 for collection, tree in (model_state or {}).items()
                 if isinstance(tree, Mapping)}
  found = {}
  for rank, declaration in enumerate(droppable):
    pattern = re.compile(declaration.module)
    for path in param_paths:
      for depth in range(1, len(path)):
        if pattern.fullmatch(_joined(path[:depth])):
          found.setdefault(path[:depth], (rank, declaration))
  layers = {}
  for module in sorted(found, key=lambda m: (m[:-1], found[m][0], m)):
    declaration = found[module][1]

    def matching(paths, prefix=(), module=module, declaration=declaration):
      leaves = []
      for path in paths:
        if path[:len(module)] != module:
          continue
        below = _joined(path[len(module):])
        for leaf_pattern, axis, copies in declaration.leaves:
          if re.fullmatch(leaf_pattern, below):
            leaves.append(submodel_lib.GatheredLeaf(prefix + path, axis,
                                                    copies))
            break
      return tuple(leaves)

    param_leaves = matching(param_paths)
    state_leaves = sum((matching(paths, (collection,))
                        for collection, paths in state_paths.items()), ())
    counts = {shapes[leaf.path][leaf.axis] // leaf.copies
              for leaf in param_leaves}
    if len(counts) != 1:
      raise ValueError(f"{_joined(module)}: its declared leaves match no leaf"
                       f" or disagree on the unit count ({sorted(counts)}).")
    layers[_joined(module)] = (declaration, counts.pop(), param_leaves,
                               state_leaves)
  return layers


def _check_rate(where: str, rate: float) -> None:
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"Dropout rate {rate!r} of {where} must lie in [0, 1).")


def subtree_names(params: Mapping[str, Any]) -> list[str]:
  """'/'-joined paths of every subtree of `params` (inner nodes and leaves).

  In tree order, each parent before its children: ['decoder',
  'decoder/dense', 'decoder/dense/kernel', ...].
  """
  names = {}
  for path in tree_paths.leaf_paths(params):
    for depth in range(1, len(path) + 1):
      names.setdefault(_joined(path[:depth]), None)
  return list(names)


def _topmost(names: Sequence[str]) -> list[str]:
  """The names none of whose '/'-prefixes is among `names`, in order."""
  chosen = set(names)
  return [name for name in names
          if not any("/".join(name.split("/")[:depth]) in chosen
                     for depth in range(1, name.count("/") + 1))]


def layer_rates(params: Mapping[str, Any], rates: Mapping[str, float],
                droppable: Sequence[Droppable], default_rate: float = 0.0,
                unit_kinds: Sequence[str] | None = None) -> dict[str, float]:
  """{droppable module name: rate} (keys of rates are patterns).

  Args:
    params: full model params.
    rates: {pattern: rate in [0, 1)}, patterns as in
      conformer_fl/unit_patterns.py, e.g. {'*/conv': 0.5,
      'encoder/block_03': 0.25}; where several select a module, the one
      selecting the fewest droppable modules wins.
    droppable: the model's declaration (module docstring).
    default_rate: rate of the modules no pattern selects.
    unit_kinds: the declared kinds to drop (None = all).

  Raises:
    ValueError: a rate outside [0, 1), an undeclared unit kind, a pattern of
      `rates` that matches no subtree of params ('matches no unit', naming
      `federated.dropout.rates`), or two equally specific patterns giving one
      module different rates.
  """
  field = "federated.dropout.rates"
  kinds = tuple(dict.fromkeys(d.kind for d in droppable))
  unknown_kinds = sorted(set(unit_kinds or ()) - set(kinds))
  if unknown_kinds:
    raise ValueError(f"Unknown dropout unit kind(s) {unknown_kinds}; "
                     f"expected some of {kinds}.")
  _check_rate("default_rate", default_rate)
  for key, rate in rates.items():
    _check_rate(repr(key), rate)
  unit_patterns.match_units(rates, subtree_names(params), field=field)
  layers = droppable_layers(params, None, droppable)
  assigned = unit_patterns.assign_to_units(rates, list(layers), field=field)
  return {name: assigned.get(name, default_rate)
          for name, (declaration, *_) in layers.items()
          if unit_kinds is None or declaration.kind in unit_kinds}


def kept_count(num_units: int, groups: int, rate: float) -> int:
  """Units a layer of `num_units` in `groups` groups keeps at `rate`.

  G * max(1, round((1 - rate) * n / G)): the same count in every group, at
  least one unit per group (module docstring).
  """
  return groups * max(1, round((1.0 - rate) * num_units / groups))


def make_dropout_spec(
    params: Mapping[str, Any],
    model_state: Mapping[str, Any] | None = None,
    *,
    droppable: Sequence[Droppable],
    rates: Mapping[str, float] | None = None,
    default_rate: float = 0.0,
    unit_kinds: Sequence[str] | None = None,
    freeze_units: Sequence[str] = (),
    policy: str = "random",
    width: float = 1.0,
) -> submodel_lib.SubmodelSpec:
  """The SubmodelSpec of a model's params for per-layer dropout rates.

  Args:
    params: full model params.
    model_state: full model state (e.g. {'batch_stats': ...}) or None.
    droppable: the model's declaration of its droppable modules (module
      docstring), e.g. models.droppable_modules(conv_norm_groups).
    rates: {pattern: rate in [0, 1)} (`layer_rates`), e.g.
      {'encoder/block_03/ffn1': 0.5, 'encoder/block_03': 0.25, '*/conv':
      0.5}; the most specific pattern wins.
    default_rate: rate of the droppable modules no key matches.
    unit_kinds: which declared kinds are dropped (None = all).
    freeze_units: patterns (conformer_fl/unit_patterns.py) over the subtrees
      of params, e.g. ('encoder/block_00', '*/conv'); the topmost subtrees
      they select are not trained by the clients.
    policy: which units a client keeps (module docstring).
    width: a capacity tier's width multiplier w in (0, 1]: every selected
      layer keeps the share w (1 - rate) of its units (rate 1 - w (1 - rate)).

  Raises:
    ValueError: as `layer_rates`, or a freeze_units pattern that matches no
      subtree (naming `federated.dropout.freeze_units`).

  Returns:
    The spec (layers with keep count n left out; empty at rate 0).
  """
  if not 0.0 < width <= 1.0:
    raise ValueError(f"Capacity tier width {width!r} must lie in (0, 1].")
  layers = []
  found = droppable_layers(params, model_state, droppable)
  for name, rate in layer_rates(params, rates or {}, droppable, default_rate,
                                unit_kinds).items():
    declaration, num_units, param_leaves, state_leaves = found[name]
    groups = declaration.groups
    if num_units % groups:
      raise ValueError(f"{name}: {groups} groups do not divide its"
                       f" {num_units} units.")
    num_kept = kept_count(num_units, groups, rate if width == 1.0 else
                          1.0 - width * (1.0 - rate))
    if num_kept == num_units:
      continue
    layers.append(submodel_lib.DroppedLayer(
        name=name, num_units=num_units, num_kept=num_kept,
        num_groups=groups, param_leaves=param_leaves,
        state_leaves=state_leaves))
  frozen = _topmost(unit_patterns.select_units(
      freeze_units, subtree_names(params) if freeze_units else [],
      field="federated.dropout.freeze_units"))
  return submodel_lib.SubmodelSpec(
      layers=tuple(layers),
      frozen_paths=tuple(tuple(name.split("/")) for name in frozen),
      policy=policy)


def dropout_spec_from_config(
    dropout_config: ml_collections.ConfigDict,
    params: Mapping[str, Any],
    model_state: Mapping[str, Any] | None,
    droppable: Sequence[Droppable],
    width: float = 1.0,
) -> submodel_lib.SubmodelSpec | None:
  """The spec of `config.federated.dropout` (see config_lib); None when off.

  A config without `policy` keeps the 'random' units. width: a capacity
  tier's width multiplier (`make_dropout_spec`), applied to the layers of
  `unit_kinds` whatever the kind ('none' included).

  `droppable`: the model's declaration, e.g.
  models.droppable_modules_from_config(config.model).
  """
  kind = dropout_config.kind
  if kind not in DROPOUT_KINDS:
    raise ValueError(f"federated.dropout.kind={kind!r}; expected one of "
                     f"{DROPOUT_KINDS}.")
  rates = dict(dropout_config.rates) if kind == "targeted" else {}
  default_rate = dropout_config.default_rate if kind != "none" else 0.0
  if kind == "uniform" and rates:
    raise ValueError("federated.dropout.kind=uniform takes default_rate only;"
                     " use kind=targeted with rates.")
  spec = make_dropout_spec(
      params, model_state, droppable=droppable, rates=rates,
      default_rate=default_rate, unit_kinds=tuple(dropout_config.unit_kinds),
      freeze_units=tuple(dropout_config.freeze_units),
      policy=dropout_config.get("policy", "random"), width=width)
  return None if spec.is_identity else spec


def tier_specs_from_config(
    dropout_config: ml_collections.ConfigDict,
    params: Mapping[str, Any],
    model_state: Mapping[str, Any] | None,
    droppable: Sequence[Droppable],
    clients_per_round: int,
) -> list[tuple[int, submodel_lib.SubmodelSpec | None]] | None:
  """[(clients, spec)] per capacity tier of `dropout.tiers`; None = no tiers.

  dropout.tiers: ((fraction, width), ...), fractions summing to 1; tier t
  gets round(fraction_t * clients_per_round) clients and the spec of
  `dropout_spec_from_config` at its width.

  Raises:
    ValueError: fractions that do not sum to 1, or whose client counts do not
      add up to clients_per_round.
  """
  tiers = tuple(tuple(tier) for tier in dropout_config.get("tiers", ()))
  if not tiers:
    return None
  fractions = [fraction for fraction, _ in tiers]
  counts = [round(fraction * clients_per_round) for fraction in fractions]
  if abs(sum(fractions) - 1.0) > 1e-6 or sum(counts) != clients_per_round:
    raise ValueError(
        f"federated.dropout.tiers={tiers}: the fractions sum to "
        f"{sum(fractions):g} and give {counts} clients for "
        f"clients_per_round={clients_per_round}; make them sum to 1 and give"
        " whole clients.")
  return [(count, dropout_spec_from_config(dropout_config, params,
                                           model_state, droppable, width))
          for count, (_, width) in zip(counts, tiers)]


# ----------------------------------------------------------------------------
# Cost of a client step.
# ----------------------------------------------------------------------------


def compile_client_step(
    loss_fn: Callable[..., tuple[jax.Array, PyTree]],
    client_optimizer: optax.GradientTransformation,
    spec: submodel_lib.SubmodelSpec,
    params: PyTree,
    model_state: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
) -> tuple[Any, tuple[Any, ...]]:
  """One local step of a sub-model, compiled, and the arguments to run it.

  The step is the round's (`round.local_step`: loss, gradient of the
  trainable params, client optimizer update) on the sub-model of the leading
  kept units (`submodel.client_submodel`), frozen subtrees as arguments.
  `compiled(*args)` runs it (e.g. to time it); args[0] is the trainable
  params. Arguments as in `client_step_cost`.
  """
  trainable, frozen, sub_state = submodel_lib.client_submodel(
      spec, params, model_state, submodel_lib.all_kept_indices(spec))

  def step(trainable, frozen, opt_state, model_state, batch, rng):
    return round_lib.local_step(
        trainable, opt_state, model_state, batch, rng,
        loss_fn=submodel_lib.with_frozen(spec, loss_fn, frozen),
        client_optimizer=client_optimizer)

  args = (trainable, frozen, client_optimizer.init(trainable), sub_state,
          batch, rng)
  return jax.jit(step).lower(*args).compile(), args


def client_step_cost(
    loss_fn: Callable[..., tuple[jax.Array, PyTree]],
    client_optimizer: optax.GradientTransformation,
    spec: submodel_lib.SubmodelSpec,
    params: PyTree,
    model_state: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
) -> dict[str, float]:
  """{'params', 'flops', 'peak_bytes'} of one local step of a sub-model.

  The step is the round's (`round.local_step`: loss, gradient of the
  trainable params, client optimizer update) on the sub-model of the leading
  kept units (`submodel.client_submodel`), frozen subtrees as arguments.
  params: number of parameters the client optimizes; flops: XLA cost
  analysis of the compiled step; peak_bytes: arguments + outputs +
  temporaries - aliased, from its memory analysis. loss_fn: the sub-model's
  loss (widths `spec.kept_units`); the other arguments as in client_cost.
  """
  return compiled_step_cost(*compile_client_step(
      loss_fn, client_optimizer, spec, params, model_state, batch, rng))


def compiled_step_cost(compiled: Any, args: tuple[Any, ...]
                       ) -> dict[str, float]:
  """{'params', 'flops', 'peak_bytes'} of `compile_client_step`'s output."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
          memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {
      "params": float(sum(x.size for x in jax.tree.leaves(args[0]))),
      "flops": float(cost["flops"]),
      "peak_bytes": float(peak),
  }


def client_cost(
    loss_fn: Callable[..., tuple[jax.Array, PyTree]],
    client_optimizer: optax.GradientTransformation,
    spec: submodel_lib.SubmodelSpec,
    params: PyTree,
    model_state: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    submodel_loss_fn: Callable[..., tuple[jax.Array, PyTree]] | None = None,
) -> dict[str, float]:
  """What one client step costs with the sub-model of `spec`, against full.

  Compiles one local step (loss, gradient of the trainable params, client
  optimizer update) of the sub-model and of the full model, and reads XLA's
  cost and memory analyses.

  Args:
    loss_fn: the round's loss_fn(params, model_state, batch, rng).
    client_optimizer: the client optimizer (its state counts in memory).
    spec: the sub-model spec (kept units: the leading ones; shapes are what
      matter and they are the same for every choice).
    params, model_state: full model.
    batch: one local step's batch [B, ...] incl. 'example_mask' [B].
    rng: step rng.
    submodel_loss_fn: the sub-model's loss (widths `spec.kept_units`); None =
      loss_fn, for a loss that reads its widths from the params.

  Returns:
    {'params', 'flops', 'peak_bytes'} of the sub-model's step,
    {'full_params', 'full_flops', 'full_peak_bytes'} of the full model's and
    '<name>_fraction' = sub / full for the three.
  """
  sub = client_step_cost(submodel_loss_fn or loss_fn, client_optimizer, spec,
                         params, model_state, batch, rng)
  full = client_step_cost(loss_fn, client_optimizer,
                          submodel_lib.SubmodelSpec(), params, model_state,
                          batch, rng)
  report = dict(sub)
  for key, value in full.items():
    report[f"full_{key}"] = value
    report[f"{key}_fraction"] = sub[key] / value if value else math.nan
  return report
