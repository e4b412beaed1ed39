"""Federated round algebra checked against numbers computed by hand.

Toy model: params {'mean': {'w': w [2]}, 'unused': {'z': [1]}}, per-example loss
0.5 * ||w - x_i||^2, averaged over the real examples of the batch. Its gradient
is w - m, where m is the mean of the batch's real examples, so one client SGD
step with learning rate eta from w is

    w' = w - eta * (w - m) = (1 - eta) * w + eta * m.

With eta = 0.5 and server params w0 = [0, 1], two clients (batch size 2):
  client A, step 0: x = [1, 1], [3, 5]          m = [2, 3]   (2 examples)
            step 1: x = [0, 2], [4, 2]          m = [2, 2]   (2 examples)
  client B, step 0: x = [6, -1], (pad)          m = [6, -1]  (1 example)
            step 1: x = [2, 3], (pad)           m = [2, 3]   (1 example)
The 'unused' unit is not read by the loss: its update must be exactly 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conformer_fl import optimizers
from conformer_fl.federated import fl_round as round_lib
from conformer_fl.federated import mesh as mesh_lib

CLIENT_LR = 0.5
W0 = np.array([0.0, 1.0], np.float32)
UNIT_PATHS = {"mean": ("mean",), "unused": ("unused",)}
# [client, step, example, coordinate]; padded examples hold garbage.
EXAMPLES = np.array([
    [[[1, 1], [3, 5]], [[0, 2], [4, 2]]],
    [[[6, -1], [50, 50]], [[2, 3], [-70, 9]]],
], np.float32)
EXAMPLE_MASK = np.array([[[1, 1], [1, 1]], [[1, 0], [1, 0]]], np.float32)


def quadratic_loss(params, model_state, batch, rng):
  del rng
  squared = 0.5 * jnp.sum((params["mean"]["w"] - batch["x"]) ** 2, axis=-1)
  mask = batch["example_mask"]
  loss = jnp.sum(jnp.where(mask > 0, squared, 0.0)) / jnp.maximum(
      jnp.sum(mask), 1.0)
  return loss, model_state


def round_data(local_steps: int) -> round_lib.RoundData:
  example_mask = EXAMPLE_MASK[:, :local_steps]
  return round_lib.RoundData(
      batches={"x": EXAMPLES[:, :local_steps], "example_mask": example_mask},
      step_mask=np.ones((2, local_steps), np.float32),
      num_examples=example_mask.sum(axis=(1, 2)))


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_client_mesh(2)  # one client per device


def initial_state(server_optimizer, mesh):
  params = {"mean": {"w": jnp.asarray(W0)}, "unused": {"z": jnp.ones((1,))}}
  state = round_lib.init_server_state(params, {}, server_optimizer)
  return mesh_lib.replicate(state, mesh)


def run_rounds(server_optimizer, mesh, local_steps, num_rounds=1,
               client_optimizer=None, clip_update_norm=None,
               aggregation_weight="examples_trained", data=None):
  client_optimizer = client_optimizer or optax.sgd(CLIENT_LR)
  round_fn = round_lib.make_federated_round(
      quadratic_loss, client_optimizer, server_optimizer, mesh,
      clip_update_norm=clip_update_norm, unit_paths=UNIT_PATHS,
      aggregation_weight=aggregation_weight)
  state = initial_state(server_optimizer, mesh)
  all_metrics = []
  for _ in range(num_rounds):
    state, metrics = round_fn(state, data or round_data(local_steps),
                              jax.random.key(0))
    all_metrics.append(jax.device_get(metrics))
  return jax.device_get(state), all_metrics


def test_fedavg_one_local_step(mesh):
  # A: w = 0.5*[0, 1] + 0.5*[2, 3] = [1, 2], delta_A = [1, 1], weight 2.
  # B: w = 0.5*[0, 1] + 0.5*[6, -1] = [3, 0], delta_B = [3, -1], weight 1.
  # mean delta = (2*[1, 1] + [3, -1]) / 3 = [5/3, 1/3]; w1 = [5/3, 4/3].
  # loss at w0: A: 0.5*mean(1 + 25) = 6.5; B: 0.5*40 = 20;
  # example-weighted: (2*6.5 + 20) / 3 = 11.
  state, [metrics] = run_rounds(
      optimizers.make_server_optimizer("fedavg"), mesh, local_steps=1)
  np.testing.assert_allclose(state.params["mean"]["w"], [5 / 3, 4 / 3],
                             rtol=1e-6)
  np.testing.assert_array_equal(state.params["unused"]["z"], [1.0])
  assert int(state.round) == 1
  np.testing.assert_allclose(metrics["loss"], 11.0, rtol=1e-6)
  assert metrics["num_examples"] == 3.0
  assert metrics["num_nonfinite_clients"] == 0
  np.testing.assert_allclose(metrics["server_update_norm"],
                             np.sqrt(26) / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics["update_norm/mean"], np.sqrt(26) / 3,
                             rtol=1e-6)
  assert metrics["update_norm/unused"] == 0.0


def test_fedavg_two_local_steps(mesh):
  # A step 1 from [1, 2]: 0.5*[1, 2] + 0.5*[2, 2] = [1.5, 2]; delta_A =
  #   [1.5, 1], weight 4.
  # B step 1 from [3, 0]: 0.5*[3, 0] + 0.5*[2, 3] = [2.5, 1.5]; delta_B =
  #   [2.5, 0.5], weight 2.
  # mean delta = (4*[1.5, 1] + 2*[2.5, 0.5]) / 6 = [11/6, 5/6];
  # w1 = [11/6, 11/6].
  # loss: A step 0 = 6.5 (2 ex); A step 1 at [1, 2]: 0.5*mean(1 + 9) = 2.5
  # (2 ex); B step 0 = 20 (1 ex); B step 1 at [3, 0]: 0.5*(1 + 9) = 5 (1 ex);
  # example-weighted: (13 + 5 + 20 + 5) / 6 = 43/6.
  state, [metrics] = run_rounds(
      optimizers.make_server_optimizer("fedavg"), mesh, local_steps=2)
  np.testing.assert_allclose(state.params["mean"]["w"], [11 / 6, 11 / 6],
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], 43 / 6, rtol=1e-6)
  assert metrics["num_examples"] == 6.0


def test_fedadam_one_step_matches_optax_adam_on_negated_mean_delta(mesh):
  # K = 1: mean delta d = [5/3, 1/3] (see above). Reference: optax.adam
  # applied by hand to the pseudo-gradient -d. Its first step is, by hand,
  # w1 = w0 + lr * d / (|d| + eps) (bias-corrected moments are d and d^2).
  lr, b1, b2, eps = 0.1, 0.9, 0.99, 1e-3
  server_optimizer = optimizers.make_server_optimizer(
      "fedadam", learning_rate=lr, b1=b1, b2=b2, eps=eps)
  state, _ = run_rounds(server_optimizer, mesh, local_steps=1)

  mean_delta = np.array([5 / 3, 1 / 3], np.float32)
  adam = optax.adam(lr, b1=b1, b2=b2, eps=eps)
  updates, _ = adam.update(-mean_delta, adam.init(W0), W0)
  np.testing.assert_allclose(state.params["mean"]["w"], W0 + updates,
                             rtol=1e-6)
  np.testing.assert_allclose(
      state.params["mean"]["w"], W0 + lr * mean_delta / (mean_delta + eps),
      rtol=1e-5)


def test_fedavgm_two_rounds_by_hand(mesh):
  # K = 1: each client moves half-way to its mean, so the mean delta at w is
  # 0.5 * (M - w), with M = (2*[2, 3] + [6, -1]) / 3 = [10/3, 5/3].
  # Server sgd(lr=1, momentum=0.9) on g = -d: trace t = g + 0.9 * t_prev,
  # w <- w - t.
  # round 1: d1 = 0.5*([10/3, 5/3] - [0, 1]) = [5/3, 1/3]; w1 = [5/3, 4/3].
  # round 2: d2 = 0.5*([10/3, 5/3] - w1) = [5/6, 1/6];
  #          w2 = w1 + d2 + 0.9*d1 = [4, 1.8]   (plain FedAvg: [2.5, 1.5]).
  state, metrics = run_rounds(
      optimizers.make_server_optimizer(
          "fedavgm", learning_rate=1.0, momentum=0.9),
      mesh, local_steps=1, num_rounds=2)
  np.testing.assert_allclose(state.params["mean"]["w"], [4.0, 1.8], rtol=1e-6)
  assert int(state.round) == 2
  # |w2 - w1| = |d2 + 0.9*d1| = |[7/3, 7/15]|.
  np.testing.assert_allclose(metrics[1]["server_update_norm"],
                             np.hypot(7 / 3, 7 / 15), rtol=1e-6)


def test_client_adam_first_step_moves_lr_times_sign(mesh):
  # A fresh client Adam's first step is -lr * g / (|g| + eps) ~ -lr*sign(g).
  # g = w0 - m: A: [-2, -2] -> delta_A = [0.1, 0.1];
  #             B: [-6, 2]  -> delta_B = [0.1, -0.1].
  # mean delta = (2*[0.1, 0.1] + [0.1, -0.1]) / 3 = [0.1, 0.1/3].
  state, _ = run_rounds(
      optimizers.make_server_optimizer("fedavg"), mesh, local_steps=1,
      client_optimizer=optimizers.make_client_optimizer(
          "adam", learning_rate=0.1))
  np.testing.assert_allclose(state.params["mean"]["w"],
                             W0 + [0.1, 0.1 / 3], rtol=1e-5)


def test_update_norm_clipping(mesh):
  # K = 1, clip 2: |delta_A| = sqrt(2) stays; |delta_B| = sqrt(10) -> scaled
  # to 2*[3, -1]/sqrt(10). mean = (2*[1, 1] + 2*[3, -1]/sqrt(10)) / 3.
  state, [metrics] = run_rounds(
      optimizers.make_server_optimizer("fedavg"), mesh, local_steps=1,
      clip_update_norm=2.0)
  clipped_b = 2.0 * np.array([3.0, -1.0]) / np.sqrt(10.0)
  expected = W0 + (2 * np.array([1.0, 1.0]) + clipped_b) / 3
  np.testing.assert_allclose(state.params["mean"]["w"], expected, rtol=1e-6)
  assert metrics["num_clipped_clients"] == 1
  # Weighted mean of the norms before clipping: (2*sqrt(2) + sqrt(10)) / 3.
  np.testing.assert_allclose(metrics["mean_client_update_norm"],
                             (2 * np.sqrt(2) + np.sqrt(10)) / 3, rtol=1e-6)


# K = 2: delta_A = [1.5, 1] (4 examples trained), delta_B = [2.5, 0.5] (2);
# the clients own 3 and 7 utterances ('client_size', each counted once).
@pytest.mark.parametrize("aggregation_weight, mean_delta", [
    # (4*[1.5, 1] + 2*[2.5, 0.5]) / 6.
    ("examples_trained", [11 / 6, 5 / 6]),
    # (3*[1.5, 1] + 7*[2.5, 0.5]) / 10 = [22/10, 6.5/10].
    ("client_size", [2.2, 0.65]),
    # ([1.5, 1] + [2.5, 0.5]) / 2.
    ("uniform", [2.0, 0.75]),
])
def test_aggregation_weights(mesh, aggregation_weight, mean_delta):
  data = round_data(2).replace(client_size=np.array([3.0, 7.0], np.float32))
  state, [metrics] = run_rounds(
      optimizers.make_server_optimizer("fedavg"), mesh, local_steps=2,
      aggregation_weight=aggregation_weight, data=data)
  np.testing.assert_allclose(state.params["mean"]["w"], W0 + mean_delta,
                             rtol=1e-6)
  # The weights change the mean update only: the loss stays example-weighted
  # (43/6, test_fedavg_two_local_steps) and the counts count examples.
  np.testing.assert_allclose(metrics["loss"], 43 / 6, rtol=1e-6)
  assert metrics["num_examples"] == metrics["num_aggregated_examples"] == 6.0
  # Mean of the clients' update norms under the same weights.
  norms = np.array([np.hypot(1.5, 1.0), np.hypot(2.5, 0.5)])
  weights = {"examples_trained": [4, 2], "client_size": [3, 7],
             "uniform": [1, 1]}[aggregation_weight]
  np.testing.assert_allclose(metrics["mean_client_update_norm"],
                             np.dot(weights, norms) / np.sum(weights),
                             rtol=1e-6)


def test_uniform_weight_skips_a_client_without_data(mesh):
  # Client B has no example (masks 0): weight 0, not 1; the mean is A's
  # delta [1.5, 1] alone.
  full = round_data(2)
  example_mask = full.batches["example_mask"] * np.array([1, 0])[:, None, None]
  data = round_lib.RoundData(
      batches=dict(full.batches, example_mask=example_mask),
      step_mask=np.array([[1, 1], [0, 0]], np.float32),
      num_examples=example_mask.sum(axis=(1, 2)))
  state, [metrics] = run_rounds(
      optimizers.make_server_optimizer("fedavg"), mesh, local_steps=2,
      aggregation_weight="uniform", data=data)
  np.testing.assert_allclose(state.params["mean"]["w"], W0 + [1.5, 1.0],
                             rtol=1e-6)
  assert metrics["num_aggregated_examples"] == 4.0


def test_aggregation_weight_errors(mesh):
  with pytest.raises(ValueError, match="'client_size'"):
    run_rounds(optimizers.make_server_optimizer("fedavg"), mesh,
               local_steps=1, aggregation_weight="client_size")
  with pytest.raises(ValueError, match="'by_loss'"):
    run_rounds(optimizers.make_server_optimizer("fedavg"), mesh,
               local_steps=1, aggregation_weight="by_loss")


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_server_optimizer_from_config(name):
  optimizer = optimizers.server_optimizer_from_config(
      {"name": name, "learning_rate": 1.0})
  params = {"w": jnp.zeros(2)}
  updates, _ = optimizer.update({"w": -jnp.ones(2)}, optimizer.init(params),
                                params)
  # Every server optimizer moves along the mean delta (here +1).
  assert np.all(np.asarray(updates["w"]) > 0)


def test_bad_optimizer_names_raise():
  with pytest.raises(ValueError, match="'fedsgd'"):
    optimizers.make_server_optimizer("fedsgd")
  with pytest.raises(ValueError, match="'rmsprop'"):
    optimizers.make_client_optimizer("rmsprop", learning_rate=0.1)
  with pytest.raises(ValueError, match="bogus"):
    optimizers.server_optimizer_from_config(
        {"name": "fedavg", "bogus": 1})


def test_round_takes_round_data_of_matching_shapes(mesh):
  server_optimizer = optimizers.make_server_optimizer("fedavg")
  round_fn = round_lib.make_federated_round(
      quadratic_loss, optax.sgd(CLIENT_LR), server_optimizer, mesh)
  state = initial_state(server_optimizer, mesh)
  data = round_data(2)
  as_dict = dict(data.batches, step_mask=data.step_mask,
                 num_examples=data.num_examples)
  with pytest.raises(TypeError, match="takes a round_data.RoundData, got dict"):
    round_fn(state, as_dict, jax.random.key(0))
  one_step = dict(data.batches, x=data.batches["x"][:, :1])
  with pytest.raises(ValueError, match=r"batches\['x'\] must have leading"
                     r" axes \[C, K\] = \[2, 2\], got shape \(2, 1, 2, 2\)"):
    round_fn(state, data.replace(batches=one_step), jax.random.key(0))
