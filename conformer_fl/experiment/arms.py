"""The arms of the claim-5 test, at equal client cost, from layer importance.

Every arm adapts the same pre-trained model; all but `full` and `freeze`
train a sub-model whose client cost (the parameters a client optimizes, as a
fraction of the full model's) is matched to a cost level c, e.g. 0.70:

  full           every client trains the whole model;
  targeted       rates by the importance ranking over the droppable modules
                 (ffn1, mhsa, conv, ffn2 of every block): the modules not
                 labelled critical, least important first, get weights
                 (k - r) / k for rank r = 0 .. k-1, critical modules none;
                 rate = min(alpha * weight, max_rate) with alpha solved so
                 the cost is c;
  anti_targeted  the control that credits or refutes the ranking: the same
                 k weights on the k *most* important modules (critical ones
                 included), alpha solved for the same cost;
  uniform        one rate on every droppable module, solved for the cost
                 (attention keeps whole heads, so its kept width is coarser;
                 the report prints every module's kept width), a fresh
                 random subset of units per client and round (policy
                 'random', Caldas et al. 2018);
  uniform_ordered, uniform_static, uniform_rolling
                 the uniform arm's rate (the same kept widths, the same
                 cost), units chosen by the sub-model policy of the
                 literature (`federated.dropout.policy`, POLICY_ARMS):
                 'ordered' (FjORD) and 'static' (HeteroFL) the leading units,
                 'rolling' (FedRolex) a window that moves one unit a round;
  random_D       the null: the same k weights on k modules drawn at random
                 (draw D, order random), alpha solved for the cost;
  targeted_rescaled  `targeted` with inverted dropout (kept units' outputs
                 times n / k on the clients: `federated.dropout.rescale`);
  freeze         the ambient droppable modules are not trained (no dropout;
                 its cost is whatever that leaves, not matched).

Labels ('ambient' | 'critical' | 'undetermined') and the WER increase of
each module come from analysis/importance.json (the paired rule of
`conformer_fl.analysis.importance`). The cost of a dropout config is
computed exactly from the parameter shapes (`CostModel`); compiled FLOPs,
peak memory and measured step time of each arm are in `experiment/costs.py`.
"""

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import ml_collections
import numpy as np

from conformer_fl import tree_paths
from conformer_fl.analysis import importance_file
from conformer_fl.federated import dropout as federated_dropout

# The uniform arm's rate under each other policy of federated/dropout.py.
POLICY_ARMS = {"uniform_ordered": "ordered", "uniform_static": "static",
               "uniform_rolling": "rolling"}
BASE_ARMS = ("full", "targeted", "anti_targeted", "uniform", "random",
             "targeted_rescaled", "freeze", *POLICY_ARMS)
LABELS = ("ambient", "critical", "undetermined")


@dataclasses.dataclass(frozen=True)
class Module:
  """One droppable module: name, kind, n units, groups, params per unit."""
  name: str
  kind: str
  num_units: int
  groups: int
  params_per_unit: int


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Client trainable parameters as a function of kept units and frozen modules.

  Attributes:
    total: parameters of the full model.
    modules: the droppable modules, in model order.
    module_params: {module name: all its parameters} (for freezing).
  """
  total: int
  modules: tuple[Module, ...]
  module_params: Mapping[str, int]

  def client_params(self, kept: Mapping[str, int] | None = None,
                    frozen: Sequence[str] = ()) -> int:
    """Parameters a client optimizes: kept units of each module, frozen out."""
    kept = kept or {}
    count = self.total
    for m in self.modules:
      if m.name in frozen:
        count -= self.module_params[m.name]
      elif m.name in kept:
        count -= (m.num_units - kept[m.name]) * m.params_per_unit
    return count

  def kept(self, rates: Mapping[str, float]) -> dict[str, int]:
    """{module: kept units} at `rates` (the rounding of federated dropout)."""
    return {m.name: federated_dropout.kept_count(m.num_units, m.groups,
                                                 rates.get(m.name, 0.0))
            for m in self.modules}

  def fraction(self, rates: Mapping[str, float]) -> float:
    return self.client_params(self.kept(rates)) / self.total


def cost_model(params: Any, droppable: Sequence[Any]) -> CostModel:
  """The `CostModel` of a model's params and its droppable declaration."""
  layers = federated_dropout.droppable_layers(params, None, droppable)
  flat = {"/".join(path): leaf
          for path, leaf in tree_paths.flatten(params).items()}
  modules, module_params = [], {}
  for name, (declaration, num_units, leaves, _) in layers.items():
    per_unit = sum(int(np.prod(flat["/".join(leaf.path)].shape)) // num_units
                   for leaf in leaves)
    modules.append(Module(name, declaration.kind, num_units,
                          declaration.groups, per_unit))
    module_params[name] = sum(int(np.size(x)) for key, x in flat.items()
                              if key.startswith(name + "/"))
  total = sum(int(np.size(x)) for x in flat.values())
  return CostModel(total, tuple(modules), module_params)


def unit_labels(importance: importance_file.Importance,
                modules: Sequence[str]) -> dict[str, str]:
  """{module: label} from importance.json (its per-unit label).

  Raises:
    ValueError: a module the analysis did not measure (it must run at
      module granularity), or an importance.json without labels.
  """
  units = importance.units
  missing = [m for m in modules if m not in units]
  if missing:
    raise ValueError(f"The analysis has no result for {missing[:3]}...: run it"
                     " at analysis.granularity='module'.")
  labels = {m: units[m].label for m in modules}
  bad = {m: v for m, v in labels.items() if v not in LABELS}
  if bad:
    raise ValueError(f"importance.json has no paired label for {sorted(bad)[:3]}"
                     f" (expected one of {LABELS}): analyse the run again.")
  return labels


def module_ranking(importance: importance_file.Importance,
                   modules: Sequence[str]) -> list[str]:
  """Modules least important first: WER increase after the reset, then order."""
  units = importance.units
  return sorted(modules, key=lambda m: (units[m].wer_increase,
                                        list(modules).index(m)))


def rank_weights(order: Sequence[str]) -> dict[str, float]:
  """{module: (k - r) / k} for the modules of `order` at rank r (0 first)."""
  k = len(order)
  return {name: (k - r) / k for r, name in enumerate(order)}


def solve_rates(model: CostModel, weights: Mapping[str, float],
                level: float, max_rate: float) -> dict[str, float] | None:
  """Rates min(alpha * weight, max_rate) whose cost fraction is nearest `level`.

  Bisection on alpha (the cost never rises with alpha). None when even
  alpha = infinity (every weighted module at max_rate) costs more than
  `level` by more than half the step of one unit: the level is out of
  reach for these modules.
  """
  def rates(alpha: float) -> dict[str, float]:
    return {m: min(alpha * w, max_rate) for m, w in weights.items()}

  floor = model.fraction(rates(1e9))
  if floor > level + 0.005:
    return None
  low, high = 0.0, max_rate / max(min(weights.values()), 1e-9)
  for _ in range(60):
    middle = (low + high) / 2
    if model.fraction(rates(middle)) > level:
      low = middle
    else:
      high = middle
  best = min((low, high), key=lambda a: abs(model.fraction(rates(a)) - level))
  return {m: round(r, 6) for m, r in rates(best).items() if r > 0}


def solve_uniform_rate(model: CostModel, level: float,
                       max_rate: float) -> float:
  """The single rate on every module whose cost fraction is nearest `level`."""
  names = [m.name for m in model.modules]
  candidates = np.linspace(0.0, max_rate, 301)
  costs = [model.fraction(dict.fromkeys(names, r)) for r in candidates]
  return round(float(candidates[int(np.argmin(np.abs(np.array(costs) - level)))]),
               6)


@dataclasses.dataclass(frozen=True)
class ArmSpec:
  """One arm at one cost level.

  Attributes:
    arm: e.g. 'targeted', 'random_1'.
    level: the cost level (fraction of the full client's parameters);
      None for full and freeze.
    dropout: its `federated.dropout` fields (a plain dict).
    kept: {module: kept units} (only modules that lose units).
    params_fraction: the client parameters it reaches, / full.
    note: why the arm is absent at this level ('' = present).
  """
  arm: str
  level: float | None
  dropout: Mapping[str, Any]
  kept: Mapping[str, int]
  params_fraction: float
  note: str = ""


def _dropout(kind: str = "none", rates: Mapping[str, float] | None = None,
             default_rate: float = 0.0, unit_kinds: Sequence[str] = (),
             freeze_units: Sequence[str] = (),
             rescale: bool = False, policy: str = "random") -> dict[str, Any]:
  return dict(kind=kind, rates=dict(rates or {}),
              default_rate=float(default_rate), unit_kinds=list(unit_kinds),
              freeze_units=list(freeze_units), rescale=bool(rescale),
              policy=policy)


def dropout_config(spec: ArmSpec) -> ml_collections.ConfigDict:
  """`config.federated.dropout` of an arm."""
  return ml_collections.ConfigDict(
      {**spec.dropout, "unit_kinds": tuple(spec.dropout["unit_kinds"]),
       "freeze_units": tuple(spec.dropout["freeze_units"])})


def arm_names(arms: Sequence[str], random_draws: int) -> list[str]:
  """Config arm names with 'random' expanded to random_0 .. random_{D-1}."""
  names = []
  for arm in arms:
    names += ([f"random_{d}" for d in range(random_draws)] if arm == "random"
              else [arm])
  return names


def arm_specs(model: CostModel, importance: importance_file.Importance,
              arms: Sequence[str], levels: Sequence[float], *,
              unit_kinds: Sequence[str], max_rate: float,
              random_draws: int, seed: int) -> list[ArmSpec]:
  """Every arm at every level (module docstring); full and freeze once.

  Args:
    model: `cost_model(...)` of the pre-trained model.
    importance: its analysis/importance.json.
    arms: names from BASE_ARMS ('random' stands for random_draws draws).
    levels: cost levels, fractions of the full client's parameters.
    unit_kinds: federated.dropout.unit_kinds of the arms.
    max_rate: the highest rate any module gets.
    random_draws: draws of the random arm.
    seed: the random arm's draws (with the pre-trained model's seed).

  Returns:
    ArmSpecs; an arm a level cannot reach is present with `note` set and
    no dropout.
  """
  unknown = sorted(set(arms) - set(BASE_ARMS))
  if unknown:
    raise ValueError(f"config.arms has {unknown}; expected some of"
                     f" {BASE_ARMS}.")
  names = [m.name for m in model.modules]
  num_units = {m.name: m.num_units for m in model.modules}
  labels = unit_labels(importance, names)
  ranked = module_ranking(importance, names)
  eligible = [m for m in ranked if labels[m] != "critical"]
  k = len(eligible)
  weights = {"targeted": rank_weights(eligible),
             "targeted_rescaled": rank_weights(eligible),
             "anti_targeted": rank_weights(ranked[::-1][:k])}
  rng = np.random.default_rng(seed)
  for d in range(random_draws):
    weights[f"random_{d}"] = rank_weights(
        [names[i] for i in rng.permutation(len(names))[:k]])
  specs = []
  for arm in arm_names(arms, random_draws):
    if arm == "full":
      specs.append(ArmSpec(arm, None, _dropout(unit_kinds=unit_kinds), {}, 1.0))
      continue
    if arm == "freeze":
      frozen = [m for m in names if labels[m] == "ambient"]
      specs.append(ArmSpec(
          arm, None, _dropout(unit_kinds=unit_kinds, freeze_units=frozen), {},
          model.client_params(frozen=frozen) / model.total,
          "" if frozen else "no ambient module to freeze"))
      continue
    for level in levels:
      if arm == "uniform" or arm in POLICY_ARMS:
        rate = solve_uniform_rate(model, level, max_rate)
        rates = dict.fromkeys(names, rate)
        dropout = _dropout("uniform", default_rate=rate, unit_kinds=unit_kinds,
                           policy=POLICY_ARMS.get(arm, "random"))
      else:
        rates = solve_rates(model, weights[arm], level, max_rate) if k else None
        if rates is None:
          specs.append(ArmSpec(
              arm, level, _dropout(unit_kinds=unit_kinds), {}, 1.0,
              f"out of reach: {k} modules at rate <= {max_rate} cannot cut the"
              f" client to {level:.0%}" if k else "no module is not critical"))
          continue
        dropout = _dropout("targeted", rates, unit_kinds=unit_kinds,
                           rescale=arm == "targeted_rescaled")
      all_kept = model.kept(rates)
      kept = {m: n for m, n in all_kept.items() if n < num_units[m]}
      specs.append(ArmSpec(arm, level, dropout, kept,
                           model.client_params(all_kept) / model.total))
  return specs


def describe(spec: ArmSpec, model: CostModel) -> str:
  """The arm's client model in words, e.g. '6 modules thinned (rates 0.12-0.75)'."""
  if spec.note:
    return spec.note
  if spec.dropout["freeze_units"]:
    return f"{len(spec.dropout['freeze_units'])} ambient modules frozen"
  if spec.dropout["kind"] == "none":
    return "full model"
  by_kind = {}
  for m in model.modules:
    if m.name in spec.kept:
      by_kind.setdefault(m.kind, []).append(f"{spec.kept[m.name]}/{m.num_units}")
  widths = "; ".join(f"{kind} {', '.join(sorted(set(v)))}"
                     for kind, v in by_kind.items())
  rescale = ", rescaled" if spec.dropout.get("rescale") else ""
  policy = spec.dropout.get("policy", "random")
  units = "" if policy == "random" else f", {policy} units"
  return f"{len(spec.kept)} modules thinned{rescale}{units} ({widths})"
