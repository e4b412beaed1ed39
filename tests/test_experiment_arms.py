"""The experiment's arms, built from a hand-written importance.json.

The model is the demo-size Conformer (4 blocks) with shapes only
(`jax.eval_shape`): nothing is compiled or trained.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conformer_fl import config_lib
from conformer_fl import models
from conformer_fl.experiment import arms
from conformer_fl.federated import dropout

KINDS = ("ffn", "conv", "mhsa")
UNITS = ("encoder/subsampling", "encoder/block_00", "encoder/block_01",
         "encoder/block_02", "encoder/block_03", "decoder")
# Increase under the tau = 0 reset. By WER: block_02 least important, then
# 00; by loss: block_01, then 03.
WER_INCREASE = (0.30, 0.002, 0.05, 0.001, 0.20, 0.08)
LOSS_INCREASE = (9.0, 4.0, 0.5, 3.0, 1.0, 2.0)


def _importance(ambient=("encoder/block_00", "encoder/block_02",
                         "encoder/subsampling")):
  """A hand-written importance.json (the fields the arms read)."""
  text = json.dumps({
      "units": {u: {"wer_increase": w, "loss_increase": l}
                for u, w, l in zip(UNITS, WER_INCREASE, LOSS_INCREASE)},
      "ambient": list(ambient),
      "critical": [u for u in UNITS if u not in ambient],
  })
  return json.loads(text)


@pytest.fixture(scope="module")
def model():
  config = config_lib.model_config("demo", conv_norm="group_norm")
  module = models.build_model(config)
  audio = jnp.zeros((1, 16000))
  labels = jnp.ones((1, 4), jnp.int32)
  variables = jax.eval_shape(lambda: module.init(
      jax.random.key(0), audio, jnp.zeros_like(audio), labels,
      jnp.zeros(labels.shape), train=False))
  params = variables.pop("params")
  return config, params, dict(variables)


def _targeting(rule="ambient", num_units=2, targeted_rate=0.5, other_rate=0.0,
               metric="wer"):
  return ml_collections.ConfigDict(dict(
      rule=rule, num_units=num_units, targeted_rate=targeted_rate,
      other_rate=other_rate, metric=metric))


def test_droppable_units_are_blocks_and_their_modules():
  assert arms.droppable_units(UNITS, KINDS) == list(UNITS[1:5])
  modules = ["encoder/block_00/ffn1", "encoder/block_00/mhsa",
             "encoder/block_00/conv", "encoder/block_00/ffn2",
             "encoder/block_00/final_norm", "decoder"]
  assert arms.droppable_units(modules, ("ffn",)) == [
      "encoder/block_00/ffn1", "encoder/block_00/ffn2"]


def test_ambient_rule_targets_only_ambient_blocks():
  # The ambient subsampling unit holds no droppable layer: not targeted.
  assert arms.targeted_units(_importance(), _targeting("ambient"), KINDS) == [
      "encoder/block_00", "encoder/block_02"]
  assert arms.targeted_units(_importance(ambient=()), _targeting("ambient"),
                             KINDS) == []


def test_rank_rule_targets_least_important_in_model_order():
  importance = _importance(ambient=())
  assert arms.targeted_units(importance, _targeting("rank", 1), KINDS) == [
      "encoder/block_02"]
  assert arms.targeted_units(importance, _targeting("rank", 3), KINDS) == [
      "encoder/block_00", "encoder/block_01", "encoder/block_02"]
  assert arms.targeted_units(importance, _targeting("rank", 2, metric="loss"),
                             KINDS) == ["encoder/block_01", "encoder/block_03"]


@pytest.mark.parametrize("targeting,message", [
    (_targeting("rank", 0), "num_units=0"),
    (_targeting("rank", 5), "num_units=5"),
    (_targeting("loudest"), "targeting.rule='loudest'"),
    (_targeting("rank", metric="cer"), "targeting.metric='cer'"),
])
def test_bad_targeting_is_named(targeting, message):
  with pytest.raises(ValueError, match=message):
    arms.targeted_units(_importance(), targeting, KINDS)


def test_arms_from_importance(model):
  config, params, model_state = model
  base = config_lib.federated_config().dropout
  targets = arms.targeted_units(_importance(), _targeting(), KINDS)
  configs = arms.arm_dropout_configs(arms.ARMS, targets, _targeting(), base,
                                     params, model_state, config)
  assert list(configs) == list(arms.ARMS)
  droppable = models.droppable_modules_from_config(config)
  specs = {arm: dropout.dropout_spec_from_config(c, params, model_state,
                                                 droppable)
           for arm, c in configs.items()}

  assert specs["full"] is None
  # Targeted: only the ambient blocks' layers are dropped, at rate 0.5.
  dropped = specs["targeted"].layers
  assert {layer.name.rsplit("/", 1)[0] for layer in dropped} == {
      "encoder/block_00", "encoder/block_02"}
  assert {layer.name.rsplit("/", 1)[1] for layer in dropped} == {
      "ffn1", "ffn2", "conv", "mhsa"}
  for layer in dropped:
    assert layer.num_kept == round(0.5 * layer.num_units)
  assert not specs["targeted"].frozen_paths
  # Freeze: the same blocks, not trained at all, nothing dropped.
  assert not specs["freeze"].layers
  assert specs["freeze"].frozen_paths == (("encoder", "block_00"),
                                          ("encoder", "block_02"))
  # Uniform: one rate on every block's layers.
  assert {layer.name.rsplit("/", 1)[0] for layer in specs["uniform"].layers} == {
      f"encoder/block_0{i}" for i in range(4)}

  counts = {arm: arms.client_param_count(spec, params)
            for arm, spec in specs.items()}
  full = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert counts["full"] == full
  block = sum(int(np.prod(x.shape))
              for x in jax.tree.leaves(params["encoder"]["block_00"]))
  assert counts["freeze"] == full - 2 * block
  assert counts["targeted"] < full
  # The control optimizes as many parameters as the targeted arm: within
  # what one rate step (0.01) changes.
  step = arms.client_param_count(dropout.dropout_spec_from_config(
      ml_collections.ConfigDict(dict(
          kind="uniform", rates={}, default_rate=0.01, unit_kinds=KINDS,
          freeze_units=())), params, model_state,
      models.droppable_modules_from_config(config)), params)
  assert abs(counts["uniform"] - counts["targeted"]) <= full - step
  rate = configs["uniform"].default_rate
  assert 0.2 <= rate <= 0.3  # Half the blocks at 0.5 ~ all blocks at 0.25.


def test_unknown_arm_is_named(model):
  config, params, model_state = model
  with pytest.raises(ValueError, match="Unknown arms.*'halfway'"):
    arms.arm_dropout_configs(("full", "halfway"), [], _targeting(),
                             config_lib.federated_config().dropout, params,
                             model_state, config)
