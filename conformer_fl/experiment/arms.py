"""The Federated Dropout arms of the experiment, built from layer importance.

Four arms adapt the same pre-trained model (`ARMS`):
  full      every client trains the whole model;
  targeted  the *targeted* units (the least important ones, see
            `targeted_units`) lose `targeting.targeted_rate` of their
            feed-forward units, conv channels and attention heads; the other
            units lose `targeting.other_rate` (0 = none);
  uniform   the control: every droppable layer loses the same rate, chosen so
            that a client optimizes as many parameters as in `targeted`;
  freeze    the clients do not train the targeted units at all.

Which units are targeted (`config.targeting.rule`):
  ambient   the units `analysis/importance.json` calls ambient (WER after the
            tau = 0 reset within the thresholds of the baseline);
  rank      the `targeting.num_units` units whose reset to tau = 0 raises
            `targeting.metric` ('wer' or 'loss') least (the importance
            ranking). Small models trained briefly often have no unit under
            the thresholds, and while their WER is still near 100% only the
            loss tells the units apart; ranking still targets the least
            important ones.
Only units that hold droppable layers (a block, or its ffn1/ffn2/conv/mhsa
module, per `unit_kinds`) can be targeted.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from conformer_fl import models
from conformer_fl.federated import dropout as federated_dropout
from conformer_fl.federated import submodel as submodel_lib

ARMS = ("full", "uniform", "targeted", "freeze")
TARGETING_RULES = ("ambient", "rank")
TARGETING_METRICS = ("wer", "loss")
# The layer kind (`dropout.unit_kinds`) that each module of a block holds.
MODULE_KINDS = {"ffn1": "ffn", "ffn2": "ffn", "conv": "conv", "mhsa": "mhsa"}


def droppable_units(units: Sequence[str],
                    unit_kinds: Sequence[str]) -> list[str]:
  """The units (analysis names) holding layers of `unit_kinds`, in model order.

  A block ('encoder/block_03') holds every kind; a module
  ('encoder/block_03/ffn1') holds its own kind; subsampling and the decoder
  hold none.
  """
  kinds = set(unit_kinds)
  chosen = []
  for name in units:
    parts = name.split("/")
    if len(parts) < 2 or not parts[1].startswith("block_"):
      continue
    if len(parts) == 2 or MODULE_KINDS.get(parts[2]) in kinds:
      chosen.append(name)
  return chosen


def targeted_units(importance: Mapping[str, Any],
                   targeting: ml_collections.ConfigDict,
                   unit_kinds: Sequence[str]) -> list[str]:
  """The units the targeted and freeze arms aim at (module docstring).

  Args:
    importance: the contents of analysis/importance.json.
    targeting: config.targeting (rule, num_units, metric).
    unit_kinds: config.adapt.federated.dropout.unit_kinds.

  Returns:
    Unit names in model order.

  Raises:
    ValueError: an unknown rule, or a num_units the model cannot meet.
  """
  candidates = droppable_units(list(importance["units"]), unit_kinds)
  if targeting.rule == "ambient":
    ambient = set(importance["ambient"])
    return [name for name in candidates if name in ambient]
  if targeting.rule == "rank":
    if not 1 <= targeting.num_units <= len(candidates):
      raise ValueError(
          f"targeting.num_units={targeting.num_units}: expected 1 to"
          f" {len(candidates)} (the droppable units: {candidates}).")
    if targeting.metric not in TARGETING_METRICS:
      raise ValueError(f"targeting.metric={targeting.metric!r}; expected one"
                       f" of {TARGETING_METRICS}.")
    increase = {name: importance["units"][name][f"{targeting.metric}_increase"]
                for name in candidates}
    # Least important first; model order breaks ties.
    ranked = sorted(candidates, key=lambda name: increase[name])
    chosen = set(ranked[:targeting.num_units])
    return [name for name in candidates if name in chosen]
  raise ValueError(f"targeting.rule={targeting.rule!r}; expected one of"
                   f" {TARGETING_RULES}.")


def client_param_count(spec: submodel_lib.SubmodelSpec | None,
                       params: Any) -> int:
  """Parameters one client optimizes with `spec` (None = the full model)."""
  if spec is None:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  def trainable(params):
    sub = submodel_lib.gather_submodel(
        spec, params, submodel_lib.all_kept_indices(spec))
    return submodel_lib.split_frozen(spec, sub)[0]

  shapes = jax.eval_shape(trainable, params)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _dropout(kind: str = "none", rates: Mapping[str, float] | None = None,
             default_rate: float = 0.0, unit_kinds: Sequence[str] = (),
             freeze_units: Sequence[str] = ()) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      kind=kind, rates=dict(rates or {}), default_rate=float(default_rate),
      unit_kinds=tuple(unit_kinds), freeze_units=tuple(freeze_units)))


def matching_uniform_rate(target_count: int, params: Any, model_state: Any,
                          model_config: ml_collections.ConfigDict,
                          unit_kinds: Sequence[str],
                          resolution: float = 0.01) -> float:
  """The uniform rate whose client parameter count is closest to target_count.

  Bisects the rates 0, resolution, ..., < 1: the count never rises with the
  rate.
  """
  rates = [round(float(r), 6) for r in np.arange(0.0, 1.0, resolution)]

  def count(rate: float) -> int:
    spec = federated_dropout.dropout_spec_from_config(
        _dropout("uniform", default_rate=rate, unit_kinds=unit_kinds),
        params, model_state,
        models.droppable_modules_from_config(model_config))
    return client_param_count(spec, params)

  low, high = 0, len(rates) - 1  # First rate whose count <= target_count.
  while low < high:
    middle = (low + high) // 2
    if count(rates[middle]) <= target_count:
      high = middle
    else:
      low = middle + 1
  candidates = {rates[i] for i in (low - 1, low) if 0 <= i < len(rates)}
  return min(sorted(candidates),
             key=lambda rate: abs(count(rate) - target_count))


def arm_dropout_configs(
    arms: Sequence[str],
    targets: Sequence[str],
    targeting: ml_collections.ConfigDict,
    base_dropout: ml_collections.ConfigDict,
    params: Any,
    model_state: Any,
    model_config: ml_collections.ConfigDict,
) -> dict[str, ml_collections.ConfigDict]:
  """`federated.dropout` of each arm (module docstring).

  Args:
    arms: names from ARMS.
    targets: `targeted_units(...)`.
    targeting: config.targeting (targeted_rate, other_rate).
    base_dropout: config.adapt.federated.dropout (its unit_kinds are used).
    params, model_state: the pre-trained model (shapes only).
    model_config: its config.model.

  Returns:
    {arm: dropout ConfigDict}, ready for config.federated.dropout.
  """
  unknown = sorted(set(arms) - set(ARMS))
  if unknown:
    raise ValueError(f"Unknown arms {unknown}; expected some of {ARMS}.")
  kinds = tuple(base_dropout.unit_kinds)
  targeted = _dropout(
      "targeted", {name: targeting.targeted_rate for name in targets},
      targeting.other_rate, kinds)
  configs = {"full": _dropout(unit_kinds=kinds), "targeted": targeted,
             "freeze": _dropout(unit_kinds=kinds, freeze_units=targets)}
  if "uniform" in arms:
    spec = federated_dropout.dropout_spec_from_config(
        targeted, params, model_state,
        models.droppable_modules_from_config(model_config))
    rate = matching_uniform_rate(client_param_count(spec, params), params,
                                 model_state, model_config, kinds)
    configs["uniform"] = _dropout("uniform", default_rate=rate,
                                  unit_kinds=kinds)
  return {arm: configs[arm] for arm in arms}
