"""Clients of mixed capacity in one round (federated.dropout.tiers).

A toy two-layer linear model x [B, 3] -> hidden [B, 4] (w) -> output (v, b)
whose hidden units are dropped; three tiers of 2 clients each (full width,
3 units by 'rolling', 2 units at random) on a 2-device mesh, against the same
six clients trained one at a time in numpy and averaged element by element.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conformer_fl import config_lib
from conformer_fl import models
from conformer_fl.federated import dropout
from conformer_fl.federated import fl_round as round_lib
from conformer_fl.federated import mesh as mesh_lib
from conformer_fl.federated import submodel as submodel_lib
from conformer_fl.federated import tiers as tiers_lib

IN, HIDDEN, BATCH, STEPS, CLIENT_LR = 3, 4, 3, 2, 0.1
CLIENTS, DEVICES = 6, 2


def toy_loss(params, model_state, batch, rng):
  del rng
  prediction = batch["x"] @ params["w"] @ params["v"] + params["b"]
  mask = batch["example_mask"]
  squared = jnp.where(mask > 0, (prediction - batch["y"]) ** 2, 0.0)
  return jnp.sum(squared) / jnp.maximum(jnp.sum(mask), 1.0), model_state


def toy_spec(num_kept, policy):
  return submodel_lib.SubmodelSpec(layers=(submodel_lib.DroppedLayer(
      name="hidden", num_units=HIDDEN, num_kept=num_kept, num_groups=1,
      param_leaves=(submodel_lib.GatheredLeaf(("w",), 1),
                    submodel_lib.GatheredLeaf(("v",), 0))),), policy=policy)


# Local slot j of each device is in tier j: global client c in tier c % 3.
TIERS = (tiers_lib.Tier(2, None), tiers_lib.Tier(2, toy_spec(3, "rolling")),
         tiers_lib.Tier(2, toy_spec(2, "random")))


def toy_params():
  return {"w": np.linspace(-1, 1, IN * HIDDEN).reshape(IN, HIDDEN).astype(
      np.float32), "v": np.array([0.5, -0.3, 0.8, 0.2], np.float32),
          "b": np.float32(0.1)}


def toy_round_data():
  rng = np.random.default_rng(7)
  example_mask = np.ones((CLIENTS, STEPS, BATCH), np.float32)
  example_mask[1, :, 2] = 0.0
  example_mask[4, :, 1:] = 0.0
  return round_lib.RoundData(
      batches={
          "x": rng.normal(size=(CLIENTS, STEPS, BATCH, IN)).astype(np.float32),
          "y": rng.normal(size=(CLIENTS, STEPS, BATCH)).astype(np.float32),
          "example_mask": example_mask},
      step_mask=np.ones((CLIENTS, STEPS), np.float32),
      num_examples=example_mask.sum(axis=(1, 2)))


def hand_client(params, kept, x, y, mask):
  """numpy SGD of one client on the units `kept`: the full-shape delta."""
  w, v, b = params["w"][:, kept], params["v"][kept], params["b"]
  w0, v0, b0 = w.copy(), v.copy(), b
  for step in range(x.shape[0]):
    hidden = x[step] @ w
    g = 2.0 * (hidden @ v + b - y[step]) * mask[step] / mask[step].sum()
    w, v, b = (w - CLIENT_LR * np.outer(x[step].T @ g, v),
               v - CLIENT_LR * (hidden.T @ g), b - CLIENT_LR * g.sum())
  delta = {"w": np.zeros_like(params["w"]), "v": np.zeros_like(params["v"])}
  delta["w"][:, kept], delta["v"][kept], delta["b"] = w - w0, v - v0, b - b0
  return delta


def run_round(tiers, seed, data, **kwargs):
  mesh = mesh_lib.make_client_mesh(DEVICES)
  server_optimizer = optax.sgd(1.0)
  round_fn = round_lib.make_federated_round(
      toy_loss, optax.sgd(CLIENT_LR), server_optimizer, mesh, tiers=tiers,
      **kwargs)
  state = round_lib.init_server_state(toy_params(), {}, server_optimizer)
  state, metrics = round_fn(state, data, jax.random.key(seed))
  return jax.tree.map(np.asarray, state.params), metrics


def test_tiered_round_against_clients_one_at_a_time():
  seed, data = 3, toy_round_data()
  new_params, metrics = run_round(TIERS, seed, data)
  params, weights = toy_params(), data.num_examples
  total = {name: np.zeros_like(value, np.float64)
           for name, value in params.items()}
  count = np.zeros(HIDDEN)
  kept_by_client = []
  for c in range(CLIENTS):
    spec = TIERS[c % 3].spec
    client_rng = jax.random.fold_in(jax.random.fold_in(
        jax.random.key(seed), 0), c)
    kept = np.arange(HIDDEN) if spec is None else np.asarray(
        submodel_lib.kept_indices(spec, jax.random.fold_in(
            client_rng, submodel_lib.DROPOUT_RNG_TAG), 0)["hidden"])
    kept_by_client.append(kept.tolist())
    delta = hand_client(params, kept, *(data.batches[k][c]
                                        for k in ("x", "y", "example_mask")))
    for name in params:
      total[name] += weights[c] * delta[name]
    count[kept] += weights[c]
  # Rolling at round 0 keeps units 0..2; full-width clients keep all.
  assert kept_by_client[0] == kept_by_client[3] == [0, 1, 2, 3]
  assert kept_by_client[1] == kept_by_client[4] == [0, 1, 2]
  assert len(kept_by_client[2]) == len(kept_by_client[5]) == 2
  for name in ("w", "v"):
    np.testing.assert_allclose(new_params[name],
                               params[name] + total[name] / count,
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_params["b"],
                             params["b"] + total["b"] / weights.sum(),
                             rtol=1e-5, atol=1e-6)
  # Kept fraction: sum_c w_c k_c / (sum_c w_c n).
  kept_counts = np.array([len(k) for k in kept_by_client])
  np.testing.assert_allclose(
      metrics["submodel_kept_fraction/hidden"],
      weights @ kept_counts / (weights.sum() * HIDDEN), rtol=1e-6)
  assert int(metrics["num_clients"]) == CLIENTS


def test_tiers_of_one_spec_equal_the_untiered_round():
  data = toy_round_data()
  spec = toy_spec(2, "random")
  tiered, _ = run_round((tiers_lib.Tier(4, spec), tiers_lib.Tier(2, spec)),
                        5, data)
  plain, _ = run_round(None, 5, data, submodel=spec)
  for name in plain:
    np.testing.assert_allclose(tiered[name], plain[name], rtol=1e-6,
                               atol=1e-7)


def test_tier_counts_are_checked():
  with pytest.raises(ValueError, match="tier 0 has 3 clients, not a positive"
                     " multiple of the 2 devices"):
    run_round((tiers_lib.Tier(3, None), tiers_lib.Tier(3, None)), 0,
              toy_round_data())
  with pytest.raises(ValueError, match="must add up to the round's"):
    run_round((tiers_lib.Tier(2, None), tiers_lib.Tier(2, None)), 0,
              toy_round_data())


def test_tier_specs_from_config():
  model_config = models.get_model_config("tiny", num_blocks=1,
                                         conv_norm="group_norm",
                                         conv_norm_groups=2, decoder="ctc")
  model = models.build_model(model_config)
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 3200)), jnp.zeros((1, 3200)),
      jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2)), train=False))["params"]
  droppable = models.droppable_modules_from_config(model_config)
  config = config_lib.federated_config().dropout
  assert dropout.tier_specs_from_config(config, params, {}, droppable, 8) is (
      None)
  config.tiers = ((0.5, 1.0), (0.25, 0.75), (0.25, 0.5))
  config.unit_kinds = ("ffn", "conv")
  config.policy = "static"
  (full_count, full), (count_75, tier_75), (count_50, tier_50) = (
      dropout.tier_specs_from_config(config, params, {}, droppable, 8))
  assert (full_count, count_75, count_50, full) == (4, 2, 2, None)
  assert tier_75.kept_units == {
      "encoder/block_00/ffn1": 96, "encoder/block_00/conv": 24,
      "encoder/block_00/ffn2": 96}
  assert tier_50.kept_units == {
      "encoder/block_00/ffn1": 64, "encoder/block_00/conv": 16,
      "encoder/block_00/ffn2": 64}
  assert tier_50.policy == "static"
  # With rates, a tier's width scales what the rate keeps: 0.5 * (1 - 0.5).
  config.kind, config.default_rate = "uniform", 0.5
  *_, (_, quarter) = dropout.tier_specs_from_config(config, params, {},
                                                    droppable, 8)
  assert quarter.kept_units["encoder/block_00/ffn1"] == 32
  config.tiers = ((0.5, 1.0), (0.4, 0.5))
  with pytest.raises(ValueError, match="make them sum to 1"):
    dropout.tier_specs_from_config(config, params, {}, droppable, 8)
