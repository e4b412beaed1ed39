"""Sub-model policies (federated.dropout.policy): which units a client keeps.

Kept indices are checked against hand-written lists; rounds use a toy
two-layer linear model x [B, 3] -> hidden [B, 4] (w) -> output (v, b) whose
hidden units are dropped, on a 1-device mesh with 2 clients, so that every
number is computed by hand in numpy.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conformer_fl import config_lib
from conformer_fl import models
from conformer_fl.federated import dropout
from conformer_fl.federated import fl_round as round_lib
from conformer_fl.federated import mesh as mesh_lib
from conformer_fl.federated import submodel as submodel_lib


def _layer(name, num_units, num_kept, num_groups):
  return submodel_lib.DroppedLayer(name=name, num_units=num_units,
                                   num_kept=num_kept, num_groups=num_groups,
                                   param_leaves=())


# Layer 'a': n = 8 in G = 2 groups of 4, k = 4 (2 per group); 'b': n = 6,
# one group, k = 2.
SPEC = submodel_lib.SubmodelSpec(layers=(_layer("a", 8, 4, 2),
                                         _layer("b", 6, 2, 1)))


def _kept(policy, seed=0, round_index=0):
  spec = dataclasses.replace(SPEC, policy=policy)
  kept = submodel_lib.kept_indices(spec, jax.random.key(seed),
                                   jnp.int32(round_index))
  return {name: np.asarray(value).tolist() for name, value in kept.items()}


@pytest.mark.parametrize("policy", ["ordered", "static"])
def test_leading_slice_in_every_group(policy):
  for round_index in (0, 3):
    assert _kept(policy, seed=5, round_index=round_index) == {
        "a": [0, 1, 4, 5], "b": [0, 1]}


@pytest.mark.parametrize("round_index, expected", [
    # Window start r mod 4 in each group of 'a', r mod 6 in 'b'.
    (0, {"a": [0, 1, 4, 5], "b": [0, 1]}),
    (1, {"a": [1, 2, 5, 6], "b": [1, 2]}),
    # r = 3 = n/G - 1 for 'a': units 3 and 0 (wrapped) of each group.
    (3, {"a": [0, 3, 4, 7], "b": [3, 4]}),
    # r = 5 = n - 1 for 'b': units 5 and 0 (wrapped); 'a' starts at 1.
    (5, {"a": [1, 2, 5, 6], "b": [0, 5]}),
    (6, {"a": [2, 3, 6, 7], "b": [0, 1]}),
])
def test_rolling_window_wraps_within_groups(round_index, expected):
  assert _kept("rolling", seed=9, round_index=round_index) == expected


def test_random_draws_unchanged():
  """The 'random' policy keeps the draws of sample_kept_indices as they were
  before policies existed (these lists are those draws)."""
  assert _kept("random", seed=3) == {"a": [0, 1, 4, 7], "b": [0, 5]}
  assert _kept("random", seed=11) == {"a": [0, 1, 5, 7], "b": [1, 5]}
  # The round index does not enter a random draw.
  assert _kept("random", seed=11, round_index=7) == _kept("random", seed=11)
  assert submodel_lib.SubmodelSpec().policy == "random"


def test_rolling_round_index_traced_in_one_compilation():
  spec = dataclasses.replace(SPEC, policy="rolling")
  compiled = jax.jit(lambda r: submodel_lib.kept_indices(
      spec, jax.random.key(0), r)).lower(jnp.int32(0)).compile()
  assert np.asarray(compiled(jnp.int32(3))["b"]).tolist() == [3, 4]
  assert np.asarray(compiled(jnp.int32(13))["a"]).tolist() == [1, 2, 5, 6]


def test_unknown_policy_is_an_error():
  with pytest.raises(ValueError, match="federated.dropout.policy='fjord'"):
    dataclasses.replace(SPEC, policy="fjord")


def test_policy_from_config():
  config = config_lib.federated_config().dropout
  assert config.policy == "random"
  model_config = models.get_model_config("tiny", num_blocks=1,
                                         conv_norm="group_norm",
                                         conv_norm_groups=2, decoder="ctc")
  model = models.build_model(model_config)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 3200)), jnp.zeros((1, 3200)),
      jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2)), train=False))
  config.kind, config.default_rate, config.policy = "uniform", 0.5, "rolling"
  droppable = models.droppable_modules_from_config(model_config)
  spec = dropout.dropout_spec_from_config(config, shapes["params"], {},
                                          droppable)
  assert spec.policy == "rolling"
  # A dropout config without the field (older arms) keeps 'random'.
  old = ml_collections.ConfigDict({
      k: v for k, v in config.to_dict().items() if k != "policy"})
  assert dropout.dropout_spec_from_config(
      old, shapes["params"], {}, droppable).policy == "random"


# ----------------------------------------------------------------------------
# A round with a deterministic policy, by hand.
# ----------------------------------------------------------------------------

IN, HIDDEN, BATCH, CLIENT_LR = 3, 4, 3, 0.1


def toy_loss(params, model_state, batch, rng):
  del rng
  prediction = batch["x"] @ params["w"] @ params["v"] + params["b"]
  mask = batch["example_mask"]
  squared = jnp.where(mask > 0, (prediction - batch["y"]) ** 2, 0.0)
  return jnp.sum(squared) / jnp.maximum(jnp.sum(mask), 1.0), model_state


def toy_spec(policy):
  return submodel_lib.SubmodelSpec(layers=(submodel_lib.DroppedLayer(
      name="hidden", num_units=HIDDEN, num_kept=2, num_groups=1,
      param_leaves=(submodel_lib.GatheredLeaf(("w",), 1),
                    submodel_lib.GatheredLeaf(("v",), 0))),), policy=policy)


def toy_params():
  return {"w": np.linspace(-1, 1, IN * HIDDEN).reshape(IN, HIDDEN).astype(
      np.float32), "v": np.array([0.5, -0.3, 0.8, 0.2], np.float32),
          "b": np.float32(0.1)}


def toy_round_data():
  rng = np.random.default_rng(4)
  example_mask = np.ones((2, 1, BATCH), np.float32)
  example_mask[1, :, 2] = 0.0  # client 1 has 2 examples
  return round_lib.RoundData(
      batches={"x": rng.normal(size=(2, 1, BATCH, IN)).astype(np.float32),
               "y": rng.normal(size=(2, 1, BATCH)).astype(np.float32),
               "example_mask": example_mask},
      step_mask=np.ones((2, 1), np.float32),
      num_examples=example_mask.sum(axis=(1, 2)))


def hand_client_delta(params, kept, x, y, mask):
  """One numpy SGD step on the units `kept`; the full-shape delta."""
  w, v = params["w"][:, kept], params["v"][kept]
  hidden = x @ w
  g = 2.0 * (hidden @ v + params["b"] - y) * mask / mask.sum()  # [B]
  delta = {"w": np.zeros_like(params["w"]), "v": np.zeros_like(params["v"])}
  delta["w"][:, kept] = -CLIENT_LR * np.outer(x.T @ g, v)
  delta["v"][kept] = -CLIENT_LR * (hidden.T @ g)
  delta["b"] = -CLIENT_LR * g.sum()
  return delta


def run_rounds(policy, num_rounds, seed=0):
  """`num_rounds` rounds of the same data: the params after each, and the
  number of programs compiled so far after each."""
  mesh = mesh_lib.make_client_mesh(1)
  server_optimizer = optax.sgd(1.0)
  round_fn = round_lib.make_federated_round(
      toy_loss, optax.sgd(CLIENT_LR), server_optimizer, mesh,
      submodel=toy_spec(policy))
  state = round_lib.init_server_state(toy_params(), {}, server_optimizer)
  history, compiled = [], []
  for _ in range(num_rounds):
    state, _ = round_fn(state, toy_round_data(), jax.random.key(seed))
    history.append(jax.tree.map(np.array, state.params))
    # pylint: disable-next=protected-access
    compiled.append(round_fn.jitted._cache_size())
  return history, compiled


def hand_round(params, kept):
  """The server's params after one round in which both clients keep `kept`:
  the example-weighted mean delta on the kept units, the rest unchanged."""
  data = toy_round_data()
  weights = data.num_examples  # [3, 2]
  x, y, mask = (data.batches[k] for k in ("x", "y", "example_mask"))
  deltas = [hand_client_delta(params, kept, x[c, 0], y[c, 0], mask[c, 0])
            for c in range(2)]
  return {name: params[name] + sum(weights[c] * deltas[c][name]
                                   for c in range(2)) / weights.sum()
          for name in params}


def test_ordered_round_changes_only_the_leading_units():
  (new_params,), _ = run_rounds("ordered", 1)
  params = toy_params()
  expected = hand_round(params, np.array([0, 1]))
  for name in params:
    np.testing.assert_allclose(new_params[name], expected[name], rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_array_equal(new_params["w"][:, 2:], params["w"][:, 2:])
  np.testing.assert_array_equal(new_params["v"][2:], params["v"][2:])
  assert np.all(new_params["w"][:, :2] != params["w"][:, :2])


def test_rolling_round_moves_its_window_without_recompiling():
  history, compiled = run_rounds("rolling", 4)
  params = toy_params()
  # Rounds 0..3 keep units {0,1}, {1,2}, {2,3}, {3,0}.
  for round_index, kept in enumerate(([0, 1], [1, 2], [2, 3], [0, 3])):
    expected = hand_round(params, np.array(kept))
    for name in params:
      np.testing.assert_allclose(history[round_index][name], expected[name],
                                 rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(HIDDEN), kept)
    np.testing.assert_array_equal(history[round_index]["v"][untouched],
                                  params["v"][untouched])
    params = history[round_index]
  # Round 0's state arrives unsharded (one more program); rounds 1..3 run
  # round 1's program.
  assert compiled[1:] == [compiled[1]] * 3


def test_random_round_unchanged():
  """A spec with policy='random' runs the round it ran before policies
  existed: client c keeps sample_kept_indices of its dropout rng."""
  (new_params,), _ = run_rounds("random", 1, seed=2)
  params = toy_params()
  data = toy_round_data()
  weights = data.num_examples
  x, y, mask = (data.batches[k] for k in ("x", "y", "example_mask"))
  total = {name: np.zeros_like(value) for name, value in params.items()}
  count = np.zeros(HIDDEN)
  for c in range(2):
    client_rng = jax.random.fold_in(jax.random.fold_in(
        jax.random.key(2), 0), c)
    kept = np.asarray(submodel_lib.sample_kept_indices(
        toy_spec("random"), jax.random.fold_in(
            client_rng, submodel_lib.DROPOUT_RNG_TAG))["hidden"])
    delta = hand_client_delta(params, kept, x[c, 0], y[c, 0], mask[c, 0])
    for name in params:
      total[name] = total[name] + weights[c] * delta[name]
    count[kept] += weights[c]
  safe = np.where(count > 0, count, 1.0)
  np.testing.assert_allclose(new_params["w"], params["w"] + np.where(
      count > 0, total["w"] / safe, 0.0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_params["v"], params["v"] + np.where(
      count > 0, total["v"] / safe, 0.0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_params["b"], params["b"] + total["b"] /
                             weights.sum(), rtol=1e-5)
