"""Federated Dropout for the Conformer: which units each client drops.

Caldas et al. (arXiv 1812.07210) and Guliani et al. (arXiv 2110.03634): every
client of a round trains a sub-model that keeps a random subset of the units
of some layers, with a rate per layer. Here the droppable units of a block's
modules (unit names from `conformer_fl.models.list_units(params, 'module')`):

  kind 'ffn'  (ffn1, ffn2): the ffn_mult*D hidden units: columns of
              dense_in/kernel [D, F] and dense_in/bias [F], rows of
              dense_out/kernel [F, D].
  kind 'conv' (conv): the C = D inner channels after the GLU: columns i and
              C+i of pointwise_in/kernel [D, 2C] and bias [2C] (the GLU's two
              halves), depthwise/kernel [K, 1, C], every conv_norm leaf [C]
              (and batch-norm running statistics), rows of
              pointwise_out/kernel [C, D].
  kind 'mhsa' (mhsa): the H heads (each of width Dh = D/H, unchanged):
              query/key/value/pos_proj kernels [D, H, Dh] (axis 1), their
              biases and content_bias/position_bias [H, Dh] (axis 0),
              output/kernel [H, Dh, D] (axis 0).
The layer norms, output biases and everything outside these are kept whole.
The model (conformer.py) reads FFN width, channel count and head count from
the kernels it is given, so the sub-model runs with the same loss_fn.

Keep count of a layer of n units at rate r: round((1 - r) * n), at least one
unit (one per group), the same for every client so that clients vmap; a rate
that keeps all n leaves the layer whole (not gathered).

Group norm: the conv channels are split into G groups of C/G consecutive
channels; dropping whole channels at random would mix channels of different
groups in a reshaped sub-model group. We keep k/G channels inside every group
(k = G * round((1 - r) * C / G)), group-major, so each sub-model group holds a
subset of one full-model group, and its statistics are those of that subset.

Frozen units (`freeze_units`, any unit name or prefix): not trained by the
clients at all (outside the client optimizer, zero delta, no server update).
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import optax

from conformer_fl.federated import submodel as submodel_lib
from conformer_fl.models import units as units_lib

PyTree = Any
Path = tuple[str, ...]

UNIT_KINDS = ('ffn', 'conv', 'mhsa')
DROPOUT_KINDS = ('none', 'uniform', 'targeted')
_MODULE_KIND = {'ffn1': 'ffn', 'ffn2': 'ffn', 'conv': 'conv', 'mhsa': 'mhsa'}
_HEAD_LEAVES = (('query', 'kernel', 1), ('query', 'bias', 0),
                ('key', 'kernel', 1), ('key', 'bias', 0),
                ('value', 'kernel', 1), ('value', 'bias', 0),
                ('pos_proj', 'kernel', 1), ('content_bias', None, 0),
                ('position_bias', None, 0), ('output', 'kernel', 0))


def _leaf_paths(tree: Mapping[str, Any], prefix: Path) -> list[Path]:
  """Paths of every leaf under `tree`, prefixed."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [prefix + tuple(key.key for key in key_path) for key_path, _ in flat]


def _layer_leaves(kind: str, path: Path, unit_params: Mapping[str, Any],
                  model_state: Mapping[str, Any] | None):
  """(num_units, param leaves, state leaves) of one droppable module."""
  leaf = submodel_lib.GatheredLeaf
  if kind == 'ffn':
    num_units = unit_params['dense_in']['kernel'].shape[-1]
    return num_units, (leaf(path + ('dense_in', 'kernel'), 1),
                       leaf(path + ('dense_in', 'bias'), 0),
                       leaf(path + ('dense_out', 'kernel'), 0)), ()
  if kind == 'conv':
    num_units = unit_params['pointwise_in']['kernel'].shape[-1] // 2
    params = [leaf(path + ('pointwise_in', 'kernel'), 1, copies=2),
              leaf(path + ('pointwise_in', 'bias'), 0, copies=2),
              leaf(path + ('depthwise', 'kernel'), 2),
              leaf(path + ('pointwise_out', 'kernel'), 0)]
    params += [leaf(p, -1) for p in _leaf_paths(unit_params['conv_norm'],
                                                path + ('conv_norm',))]
    states = []
    for collection, tree in (model_state or {}).items():
      try:
        norm_state = submodel_lib.get_path(tree, path + ('conv_norm',))
      except KeyError:
        continue
      states += [leaf(p, -1) for p in _leaf_paths(
          norm_state, (collection,) + path + ('conv_norm',))]
    return num_units, tuple(params), tuple(states)
  if kind == 'mhsa':
    num_units = unit_params['query']['kernel'].shape[1]
    params = tuple(
        leaf(path + ((name,) if sub is None else (name, sub)), axis)
        for name, sub, axis in _HEAD_LEAVES)
    return num_units, params, ()
  raise ValueError(f'Unknown unit kind {kind!r}; expected one of {UNIT_KINDS}.')


def _rate_for(name: str, rates: Mapping[str, float], default_rate: float):
  """The rate of the longest key of `rates` equal to or a '/'-prefix of name."""
  best = None
  for key in rates:
    if name == key or name.startswith(key.rstrip('/') + '/'):
      if best is None or len(key) > len(best):
        best = key
  return default_rate if best is None else rates[best]


def _check_rate(where: str, rate: float) -> None:
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'Dropout rate {rate!r} of {where} must lie in [0, 1).')


def layer_rates(params: Mapping[str, Any], rates: Mapping[str, float],
                default_rate: float = 0.0,
                unit_kinds: Sequence[str] = UNIT_KINDS) -> dict[str, float]:
  """{droppable module unit name: rate} (keys of rates may be prefixes).

  Raises:
    ValueError: a rate outside [0, 1), an unknown unit kind, or a key of
      `rates` that matches no unit.
  """
  unknown_kinds = sorted(set(unit_kinds) - set(UNIT_KINDS))
  if unknown_kinds:
    raise ValueError(f'Unknown dropout unit kind(s) {unknown_kinds}; '
                     f'expected some of {UNIT_KINDS}.')
  _check_rate('default_rate', default_rate)
  names = list(units_lib.list_units(params, 'module'))
  for key, rate in rates.items():
    _check_rate(repr(key), rate)
    if not any(n == key or n.startswith(key.rstrip('/') + '/') for n in names):
      raise ValueError(f'Dropout rate for {key!r}, which is no unit (nor '
                       f'prefix of one); units: {names}.')
  droppable = {}
  for name, path in units_lib.list_units(params, 'module').items():
    kind = _MODULE_KIND.get(path[-1])
    if kind in unit_kinds and path[1].startswith('block_'):
      droppable[name] = _rate_for(name, rates, default_rate)
  return droppable


def make_dropout_spec(
    params: Mapping[str, Any],
    model_state: Mapping[str, Any] | None = None,
    *,
    rates: Mapping[str, float] | None = None,
    default_rate: float = 0.0,
    unit_kinds: Sequence[str] = UNIT_KINDS,
    freeze_units: Sequence[str] = (),
    conv_norm_groups: int = 1,
) -> submodel_lib.SubmodelSpec:
  """The SubmodelSpec of a Conformer's params for per-layer dropout rates.

  Args:
    params: full model params (ConformerASR).
    model_state: full model state (e.g. {'batch_stats': ...}) or None.
    rates: {unit name or prefix, e.g. 'encoder/block_03/ffn1' or
      'encoder/block_03': rate in [0, 1)}; the longest matching key wins.
    default_rate: rate of the droppable units no key matches.
    unit_kinds: which kinds are dropped: some of 'ffn', 'conv', 'mhsa'.
    freeze_units: unit names (or prefixes, e.g. 'encoder/block_00') that the
      clients do not train.
    conv_norm_groups: G of the conv module's group norm (1 for other norms).

  Returns:
    The spec (layers with keep count n left out; empty at rate 0).
  """
  layers = []
  for name, rate in layer_rates(params, rates or {}, default_rate,
                                unit_kinds).items():
    path = tuple(name.split('/'))
    kind = _MODULE_KIND[path[-1]]
    num_units, param_leaves, state_leaves = _layer_leaves(
        kind, path, submodel_lib.get_path(params, path), model_state)
    groups = conv_norm_groups if kind == 'conv' else 1
    if num_units % groups:
      raise ValueError(f'{name}: conv_norm_groups={groups} does not divide '
                       f'its {num_units} channels.')
    per_group = max(1, round((1.0 - rate) * num_units / groups))
    if per_group * groups == num_units:
      continue
    layers.append(submodel_lib.DroppedLayer(
        name=name, num_units=num_units, num_kept=per_group * groups,
        num_groups=groups, param_leaves=param_leaves,
        state_leaves=state_leaves))
  frozen = []
  all_paths = {'/'.join(p): p for p in _leaf_paths(params, ())}
  for unit in freeze_units:
    if not any(n == unit or n.startswith(unit.rstrip('/') + '/')
               for n in all_paths):
      raise ValueError(f'freeze_units: {unit!r} names no parameter subtree.')
    frozen.append(tuple(unit.rstrip('/').split('/')))
  return submodel_lib.SubmodelSpec(layers=tuple(layers),
                                   frozen_paths=tuple(frozen))


def dropout_spec_from_config(
    dropout_config: ml_collections.ConfigDict,
    params: Mapping[str, Any],
    model_state: Mapping[str, Any] | None,
    model_config: ml_collections.ConfigDict,
) -> submodel_lib.SubmodelSpec | None:
  """The spec of `config.federated.dropout` (see config_lib); None when off."""
  kind = dropout_config.kind
  if kind not in DROPOUT_KINDS:
    raise ValueError(f'federated.dropout.kind={kind!r}; expected one of '
                     f'{DROPOUT_KINDS}.')
  rates = dict(dropout_config.rates) if kind == 'targeted' else {}
  default_rate = dropout_config.default_rate if kind != 'none' else 0.0
  if kind == 'uniform' and rates:
    raise ValueError('federated.dropout.kind=uniform takes default_rate only;'
                     ' use kind=targeted with rates.')
  groups = (model_config.conv_norm_groups
            if model_config.conv_norm == 'group_norm' else 1)
  spec = make_dropout_spec(
      params, model_state, rates=rates, default_rate=default_rate,
      unit_kinds=tuple(dropout_config.unit_kinds),
      freeze_units=tuple(dropout_config.freeze_units),
      conv_norm_groups=groups)
  return None if spec.is_identity else spec


def rates_from_importance(importance: Mapping[str, Sequence[str]], *,
                          ambient_rate: float = 0.5,
                          critical_rate: float = 0.0,
                          other_rate: float = 0.25) -> dict[str, float]:
  """Targeted rates: drop more of the ambient units, little of the critical.

  Args:
    importance: {'ambient': [unit names], 'critical': [unit names]} (as in
      analysis/importance.json; other keys are ignored). A name may be a
      block ('encoder/block_03') or a module; it applies to the droppable
      modules under it.
    ambient_rate, critical_rate: their rates.
    other_rate: rate of every unit in neither list (use as default_rate).

  Returns:
    {name: rate} for make_dropout_spec(rates=..., default_rate=other_rate).
  """
  for key in ('ambient', 'critical'):
    if key not in importance:
      raise ValueError(f'importance lacks the key {key!r}; it has '
                       f'{sorted(importance)}.')
  both = sorted(set(importance['ambient']) & set(importance['critical']))
  if both:
    raise ValueError(f'Units both ambient and critical: {both}.')
  for name, rate in (('ambient_rate', ambient_rate),
                     ('critical_rate', critical_rate),
                     ('other_rate', other_rate)):
    _check_rate(name, rate)
  rates = {name: ambient_rate for name in importance['ambient']}
  rates.update({name: critical_rate for name in importance['critical']})
  return rates


# ----------------------------------------------------------------------------
# Cost of a client step.
# ----------------------------------------------------------------------------


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

  params: number of parameters the client optimizes; flops: XLA cost
  analysis of the compiled step (loss, gradient, optimizer update); peak_bytes:
  arguments + outputs + temporaries - aliased, from its memory analysis.
  Arguments as in client_cost.
  """
  kept = submodel_lib.all_kept_indices(spec)
  sub_params = submodel_lib.gather_submodel(spec, params, kept)
  sub_state = submodel_lib.gather_submodel(spec, model_state, kept,
                                           'model_state')
  trainable, frozen = submodel_lib.split_frozen(spec, sub_params)

  def step(trainable, frozen, opt_state, model_state, batch, rng):
    def trainable_loss(trainable):
      return loss_fn(submodel_lib.merge_frozen(spec, trainable, frozen),
                     model_state, batch, rng)
    (loss, new_state), grads = jax.value_and_grad(
        trainable_loss, has_aux=True)(trainable)
    updates, opt_state = client_optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, new_state, loss

  compiled = jax.jit(step).lower(
      trainable, frozen, client_optimizer.init(trainable), sub_state, batch,
      rng).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
          memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {
      'params': float(sum(x.size for x in jax.tree.leaves(trainable))),
      'flops': float(cost['flops']),
      'peak_bytes': float(peak),
  }


def client_cost(
    loss_fn: Callable[..., tuple[jax.Array, PyTree]],
    client_optimizer: optax.GradientTransformation,
    spec: submodel_lib.SubmodelSpec,
    params: PyTree,
    model_state: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
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

  Returns:
    {'params', 'flops', 'peak_bytes'} of the sub-model's step,
    {'full_params', 'full_flops', 'full_peak_bytes'} of the full model's and
    '<name>_fraction' = sub / full for the three.
  """
  sub = client_step_cost(loss_fn, client_optimizer, spec, params,
                            model_state, batch, rng)
  full = client_step_cost(loss_fn, client_optimizer,
                             submodel_lib.SubmodelSpec(), params, model_state,
                             batch, rng)
  report = dict(sub)
  for key, value in full.items():
    report[f'full_{key}'] = value
    report[f'{key}_fraction'] = sub[key] / value if value else math.nan
  return report
