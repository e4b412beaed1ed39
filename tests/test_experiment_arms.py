"""The claim-5 arms at equal client cost, from a hand-written importance.json.

The model is the demo8x64 Conformer with shapes only (`jax.eval_shape`):
nothing is compiled or trained. The cost model is checked against the
sub-model the round builds (`submodel.gather_submodel`, `split_frozen`).
"""

import dataclasses

import jax
import numpy as np
import pytest

from conformer_fl import models
from conformer_fl.experiment import arms
from conformer_fl.federated import dropout
from conformer_fl.federated import submodel
from conformer_fl.models import variables as variables_lib

import importance_fakes  # tests/importance_fakes.py

KINDS = ("ffn", "conv", "mhsa")


@pytest.fixture(scope="module")
def model():
  """(params shapes, CostModel, droppable) of demo8x64 with group norm."""
  config = models.get_model_config("demo8x64", conv_norm="group_norm",
                                   decoder="ctc")
  shapes = jax.eval_shape(lambda: variables_lib.init_variables(
      models.build_model(config), 0))
  droppable = models.droppable_modules_from_config(config)
  return shapes["params"], arms.cost_model(shapes["params"], droppable), (
      droppable)


def _importance(cost_model, critical_every=3, ambient_every=2, seed=0):
  """WER increases drawn at random; labels from a fixed pattern."""
  rng = np.random.default_rng(seed)
  units = {}
  for i, m in enumerate(cost_model.modules):
    label = ("critical" if i % critical_every == 0 else
             "ambient" if i % ambient_every == 0 else "undetermined")
    increase = {"critical": 0.1, "ambient": 0.0, "undetermined": 0.02}[label]
    units[m.name] = importance_fakes.unit(increase + 0.01 * rng.random(),
                                          label=label)
  return importance_fakes.importance(units)


def _counted(params, droppable, dropout_fields):
  """Parameters a client optimizes, counted on the round's own sub-model."""
  spec = dropout.make_dropout_spec(params, None, droppable=droppable,
                                   **dropout_fields)
  if spec.is_identity:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  def trainable(p):
    sub = submodel.gather_submodel(spec, p, submodel.all_kept_indices(spec))
    return submodel.split_frozen(spec, sub)[0]

  return sum(int(np.prod(x.shape))
             for x in jax.tree.leaves(jax.eval_shape(trainable, params)))


def test_cost_model_counts_what_the_round_trains(model):
  params, cost_model, droppable = model
  names = [m.name for m in cost_model.modules]
  assert len(names) == 32
  rng = np.random.default_rng(1)
  for _ in range(3):
    rates = {n: float(rng.uniform(0, 0.75)) for n in names}
    assert cost_model.client_params(cost_model.kept(rates)) == _counted(
        params, droppable, dict(rates=rates, unit_kinds=KINDS))
  frozen = names[::5]
  assert cost_model.client_params(frozen=frozen) == _counted(
      params, droppable, dict(freeze_units=frozen))
  assert cost_model.client_params() == cost_model.total == _counted(
      params, droppable, {})


def test_each_arm_reaches_the_cost_level(model):
  _, cost_model, _ = model
  # 6 of 32 modules critical: 55% is within reach of the other 26 at <= 0.75.
  importance = _importance(cost_model, critical_every=6)
  specs = arms.arm_specs(
      cost_model, importance, ("full", "targeted", "anti_targeted", "uniform",
                               "random", "freeze"), (0.85, 0.70, 0.55),
      unit_kinds=KINDS, max_rate=0.75, random_draws=2, seed=0)
  by_key = {(s.arm, s.level): s for s in specs}
  assert by_key[("full", None)].params_fraction == 1.0
  for arm in ("targeted", "anti_targeted", "uniform", "random_0", "random_1"):
    for level in (0.85, 0.70, 0.55):
      spec = by_key[(arm, level)]
      assert not spec.note
      assert spec.params_fraction == pytest.approx(level, abs=0.01), (arm,
                                                                     level)
      assert all(r <= 0.75 for r in spec.dropout["rates"].values())
  # Uniform: one rate on every module.
  uniform = by_key[("uniform", 0.70)]
  assert uniform.dropout["kind"] == "uniform"
  assert len(uniform.kept) == 32
  # Freeze: the ambient modules, nothing thinned.
  ambient = [n for n, u in importance.units.items() if u.label == "ambient"]
  assert list(by_key[("freeze", None)].dropout["freeze_units"]) == ambient


def test_targeted_spares_critical_modules_and_anti_targeted_mirrors_it(model):
  _, cost_model, _ = model
  importance = _importance(cost_model)
  labels = {n: u.label for n, u in importance.units.items()}
  specs = arms.arm_specs(cost_model, importance,
                         ("full", "targeted", "anti_targeted"), (0.70,),
                         unit_kinds=KINDS, max_rate=0.75, random_draws=0,
                         seed=0)
  targeted, anti = (s.dropout["rates"] for s in specs[1:])
  ranking = arms.module_ranking(importance, list(labels))
  eligible = [m for m in ranking if labels[m] != "critical"]
  # No critical module loses units; rates fall with importance.
  assert not any(labels[m] == "critical" for m in targeted)
  rates = [targeted.get(m, 0.0) for m in eligible]
  assert rates == sorted(rates, reverse=True) and rates[0] > 0
  # The mirror: the same number of modules, the most important ones, the
  # largest rate on the most important.
  top = ranking[::-1][:len(eligible)]
  assert set(anti) <= set(top)
  anti_rates = [anti.get(m, 0.0) for m in top]
  assert anti_rates == sorted(anti_rates, reverse=True) and anti_rates[0] > 0
  assert sum(labels[m] == "critical" for m in anti) > 0


def test_random_draws_are_seeded_and_differ(model):
  _, cost_model, _ = model
  importance = _importance(cost_model)
  make = lambda seed: [s.dropout["rates"] for s in arms.arm_specs(
      cost_model, importance, ("random",), (0.70,), unit_kinds=KINDS,
      max_rate=0.75, random_draws=3, seed=seed)]
  first = make(0)
  assert first == make(0)
  assert first != make(1)
  assert len({tuple(sorted(r)) for r in first}) == 3


def test_unreachable_level_is_reported_not_run(model):
  _, cost_model, _ = model
  importance = _importance(cost_model, critical_every=1)  # All critical.
  specs = arms.arm_specs(cost_model, importance, ("targeted",), (0.70,),
                         unit_kinds=KINDS, max_rate=0.75, random_draws=0,
                         seed=0)
  assert specs[0].note == "no module is not critical"
  importance = _importance(cost_model, critical_every=2, ambient_every=1)
  (spec,) = arms.arm_specs(cost_model, importance, ("targeted",), (0.30,),
                           unit_kinds=KINDS, max_rate=0.5, random_draws=0,
                           seed=0)
  assert spec.note.startswith("out of reach")


def test_missing_labels_are_named(model):
  _, cost_model, _ = model
  importance = _importance(cost_model)
  name = cost_model.modules[0].name
  importance = dataclasses.replace(importance, units=dict(
      importance.units, **{name: dataclasses.replace(importance.units[name],
                                                     label=None)}))
  with pytest.raises(ValueError, match="no paired label"):
    arms.arm_specs(cost_model, importance, ("targeted",), (0.7,),
                   unit_kinds=KINDS, max_rate=0.75, random_draws=0, seed=0)
  with pytest.raises(ValueError, match="config.arms has"):
    arms.arm_specs(cost_model, _importance(cost_model), ("loudest",), (0.7,),
                   unit_kinds=KINDS, max_rate=0.75, random_draws=0, seed=0)


def test_each_policy_arm_is_the_uniform_arm_under_its_policy(model):
  """uniform_ordered / _static / _rolling: the uniform arm's rate, kept
  widths and cost at every level; only `policy` differs."""
  params, cost_model, droppable = model
  importance = _importance(cost_model)
  specs = arms.arm_specs(
      cost_model, importance, ("full", "uniform", "uniform_ordered",
                               "uniform_static", "uniform_rolling"),
      (0.85, 0.70), unit_kinds=KINDS, max_rate=0.75, random_draws=0, seed=0)
  by_key = {(s.arm, s.level): s for s in specs}
  assert len(specs) == 1 + 4 * 2
  for level in (0.85, 0.70):
    uniform = by_key[("uniform", level)]
    assert uniform.dropout["policy"] == "random"
    for arm, policy in (("uniform_ordered", "ordered"),
                        ("uniform_static", "static"),
                        ("uniform_rolling", "rolling")):
      spec = by_key[(arm, level)]
      assert not spec.note
      assert spec.dropout == {**uniform.dropout, "policy": policy}
      assert arms.dropout_config(spec).policy == policy
      assert dict(spec.kept) == dict(uniform.kept) and len(spec.kept) == 32
      assert spec.params_fraction == uniform.params_fraction
      assert spec.params_fraction == pytest.approx(level, abs=0.01)
      # The round's own spec of the arm's config: its policy and widths.
      round_spec = dropout.dropout_spec_from_config(
          arms.dropout_config(spec), params, None, droppable)
      assert round_spec.policy == policy
      assert round_spec.kept_units == dict(uniform.kept)
      assert cost_model.client_params(round_spec.kept_units) == _counted(
          params, droppable, dict(default_rate=spec.dropout["default_rate"],
                                  unit_kinds=KINDS, policy=policy))
      assert f", {policy} units (" in arms.describe(spec, cost_model)
  # Rates solved at 0.70: the ffn modules of demo8x64 (256 units) keep the
  # same count in every uniform arm.
  rate = by_key[("uniform", 0.70)].dropout["default_rate"]
  assert 0.0 < rate <= 0.75
  ffn = next(m for m in cost_model.modules if m.kind == "ffn")
  assert by_key[("uniform_rolling", 0.70)].kept[ffn.name] == (
      dropout.kept_count(ffn.num_units, ffn.groups, rate))


def test_importance_to_rates_by_hand():
  """Labels and WER increases -> targeted rates -> kept units, by hand.

  Three modules of 7 units of 10 parameters, 210 parameters in all; c is
  critical, a less important than b, so a gets weight 1 and b 1/2: rates
  (alpha, alpha / 2) keep round(7 (1 - alpha)) and round(7 (1 - alpha / 2))
  units. The least alpha whose cost is at most 0.81 is 1 - 4.5 / 7 =
  0.3571428..., where a drops from 5 to 4 kept units (b keeps 6): 170 / 210
  parameters, 0.8095.
  """
  modules = tuple(arms.Module(name, "ffn", 7, 1, 10) for name in "abc")
  cost_model = arms.CostModel(210, modules, dict.fromkeys("abc", 70))
  importance = importance_fakes.importance(
      {"a": importance_fakes.unit(0.001, label="ambient"),
       "b": importance_fakes.unit(0.01, label="undetermined"),
       "c": importance_fakes.unit(0.2, label="critical")})
  assert arms.module_ranking(importance, ["c", "b", "a"]) == ["a", "b", "c"]
  targeted, anti, freeze = arms.arm_specs(
      cost_model, importance, ("targeted", "anti_targeted", "freeze"),
      (0.81,), unit_kinds=("ffn",), max_rate=0.75, random_draws=0, seed=0)
  # Rates rounded to 6 digits.
  assert targeted.dropout["rates"] == {"a": 0.357143, "b": 0.178571}
  assert targeted.kept == {"a": 4, "b": 6}
  assert targeted.params_fraction == 170 / 210
  # The mirror: the same weights on the two most important, c then b.
  assert anti.dropout["rates"] == {"c": 0.357143, "b": 0.178571}
  assert anti.kept == {"c": 4, "b": 6}
  # Freeze: the ambient module a is not trained.
  assert freeze.dropout["freeze_units"] == ["a"]
  assert freeze.params_fraction == 140 / 210


def test_the_round_keeps_the_units_the_arm_counts(model):
  params, cost_model, droppable = model
  importance = _importance(cost_model, critical_every=6)
  for spec in arms.arm_specs(cost_model, importance,
                             ("targeted", "anti_targeted", "uniform"), (0.7,),
                             unit_kinds=KINDS, max_rate=0.75, random_draws=0,
                             seed=0):
    built = dropout.dropout_spec_from_config(
        arms.dropout_config(spec), params, None, droppable)
    assert {l.name: l.num_kept for l in built.layers} == spec.kept, spec.arm
