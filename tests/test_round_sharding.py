"""The compiled, sharded round against a plain Python loop over clients.

8 clients on a 4-device CPU mesh (tests/conftest.py sets
--xla_force_host_platform_device_count=4). Toy model: linear regression with
random input dropout (so per-client/per-step rngs matter) and a
batch-norm-like model_state (running mean of the real inputs).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conformer_fl import optimizers
from conformer_fl.federated import fl_round as round_lib
from conformer_fl.federated import mesh as mesh_lib

import xla_env  # tests/xla_env.py

NUM_CLIENTS, LOCAL_STEPS, BATCH, DIM = 8, 3, 4, 5
KEEP_PROB = 0.8
STATS_MOMENTUM = 0.9


def toy_loss(params, model_state, batch, rng):
  """Masked squared error of a linear model; batch 'x' [B, D], 'y' [B]."""
  mask = batch["example_mask"]
  x = jnp.where(mask[:, None] > 0, batch["x"], 0.0)
  # One key per example index, so padding the batch leaves real draws alone.
  example_rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(
      jnp.arange(x.shape[0]))
  keep = jax.vmap(lambda r: jax.random.bernoulli(r, KEEP_PROB, x.shape[1:]))(
      example_rngs)
  prediction = (x * keep / KEEP_PROB) @ params["w"] + params["b"]
  squared = jnp.where(mask > 0, (prediction - batch["y"]) ** 2, 0.0)
  num_real = jnp.maximum(jnp.sum(mask), 1.0)
  batch_mean = jnp.sum(x, axis=0) / num_real
  running_mean = model_state["batch_stats"]["mean"]
  new_running_mean = (STATS_MOMENTUM * running_mean
                      + (1 - STATS_MOMENTUM) * batch_mean)
  return (jnp.sum(squared) / num_real,
          {"batch_stats": {"mean": new_running_mean}})


def make_round_data(seed=0):
  """Round data [C, K, B, ...] with uneven steps and examples per client."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(NUM_CLIENTS, LOCAL_STEPS, BATCH, DIM))
  y = x @ np.linspace(-1, 1, DIM) + 0.1 * rng.normal(
      size=(NUM_CLIENTS, LOCAL_STEPS, BATCH))
  steps_per_client = np.array([3, 1, 2, 3, 3, 2, 1, 3])
  step_mask = (np.arange(LOCAL_STEPS) < steps_per_client[:, None])
  examples_per_step = rng.integers(1, BATCH + 1, size=(NUM_CLIENTS,
                                                       LOCAL_STEPS))
  example_mask = (np.arange(BATCH) < examples_per_step[..., None])
  example_mask &= step_mask[..., None]
  x = np.where(example_mask[..., None], x, 1e3)  # garbage at padding
  y = np.where(example_mask, y, -1e3)
  return {
      "x": x.astype(np.float32),
      "y": y.astype(np.float32),
      "example_mask": example_mask.astype(np.float32),
      "step_mask": step_mask.astype(np.float32),
      "num_examples": example_mask.sum(axis=(1, 2)).astype(np.float32),
  }


def as_round(arrays):
  """The RoundData of `make_round_data`'s arrays (by name)."""
  return round_lib.RoundData(
      batches={key: arrays[key] for key in ("x", "y", "example_mask")},
      step_mask=arrays["step_mask"], num_examples=arrays["num_examples"])


def initial_params():
  return {"w": jnp.linspace(0.5, -0.5, DIM), "b": jnp.asarray(0.2)}


def initial_model_state():
  return {"batch_stats": {"mean": jnp.full((DIM,), 0.3)}}


CLIENT_OPTIMIZER = optax.adam(0.05)
SERVER_OPTIMIZER = optimizers.make_server_optimizer(
    "fedadam", learning_rate=0.1)
RNG_SEED = 42  # A key made at import would start the backend before the
# multi-process worker calls jax.distributed.initialize.


def rng_key():
  return jax.random.key(RNG_SEED)


def fresh_state(mesh):
  state = round_lib.init_server_state(initial_params(), initial_model_state(),
                                      SERVER_OPTIMIZER)
  return mesh_lib.replicate(state, mesh)


def reference_clients(data, rng, round_index=0):
  """Plain per-client loop: (local params, model_state, loss_sum, n) each."""
  grad_fn = jax.jit(jax.value_and_grad(toy_loss, has_aux=True))
  results = []
  for c in range(NUM_CLIENTS):
    params, model_state = initial_params(), initial_model_state()
    opt_state = CLIENT_OPTIMIZER.init(params)
    client_rng = jax.random.fold_in(jax.random.fold_in(rng, round_index), c)
    loss_sum, num_seen = 0.0, 0.0
    for k in range(LOCAL_STEPS):
      num_real = float(data["example_mask"][c, k].sum())
      if data["step_mask"][c, k] == 0 or num_real == 0:
        continue
      batch = {key: data[key][c, k] for key in ("x", "y", "example_mask")}
      (loss, model_state), grads = grad_fn(
          params, model_state, batch, jax.random.fold_in(client_rng, k))
      updates, opt_state = CLIENT_OPTIMIZER.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      loss_sum += float(loss) * num_real
      num_seen += num_real
    results.append((params, model_state, loss_sum, num_seen))
  return results


def reference_round(data, rng, dropped=()):
  """Server params, model_state and loss from the per-client loop."""
  clients = reference_clients(data, rng)
  weights = np.array([0.0 if c in dropped else data["num_examples"][c]
                      for c in range(NUM_CLIENTS)])
  server_params = initial_params()
  mean_delta = jax.tree.map(
      lambda server, *local: sum(w * (l - server)
                                 for w, l in zip(weights, local)
                                 if w > 0) / weights.sum(),
      server_params, *[params for params, _, _, _ in clients])
  mean_stats = sum(w * np.asarray(state["batch_stats"]["mean"])
                   for w, (_, state, _, _) in zip(weights, clients)
                   if w > 0) / weights.sum()
  updates, _ = SERVER_OPTIMIZER.update(
      jax.tree.map(jnp.negative, mean_delta),
      SERVER_OPTIMIZER.init(server_params), server_params)
  new_params = optax.apply_updates(server_params, updates)
  loss = (sum(s for c, (_, _, s, _) in enumerate(clients) if c not in dropped)
          / sum(n for c, (_, _, _, n) in enumerate(clients)
                if c not in dropped))
  return new_params, mean_stats, loss, clients


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_client_mesh()


@pytest.fixture(scope="module")
def round_fn(mesh):
  return round_lib.make_federated_round(toy_loss, CLIENT_OPTIMIZER,
                                        SERVER_OPTIMIZER, mesh)


@pytest.fixture(scope="module")
def data():
  return make_round_data()


@pytest.fixture(scope="module")
def reference(data):
  return reference_round(data, rng_key())


def run(round_fn, mesh, data):
  state, metrics = round_fn(fresh_state(mesh),
                            mesh_lib.shard_round_data(as_round(data), mesh),
                            rng_key())
  return jax.device_get(state), jax.device_get(metrics)


def assert_params_close(actual, expected, atol=1e-5):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, atol=atol, rtol=1e-5)


def test_mesh_has_four_devices(mesh):
  assert mesh.shape == {"clients": 4}


def test_sharded_round_matches_python_loop(round_fn, mesh, data, reference):
  expected_params, expected_stats, expected_loss, _ = reference
  state, metrics = run(round_fn, mesh, data)
  assert_params_close(state.params, expected_params)
  np.testing.assert_allclose(state.model_state["batch_stats"]["mean"],
                             expected_stats, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
  assert metrics["num_examples"] == data["num_examples"].sum()
  assert metrics["num_nonfinite_clients"] == 0
  assert int(state.round) == 1


def test_round_is_partitioned_over_devices(round_fn, mesh, data):
  compiled = round_fn.jitted.lower(
      fresh_state(mesh), mesh_lib.shard_round_data(as_round(data), mesh),
      rng_key()).compile()
  hlo = compiled.as_text()
  # Each device gets 2 of the 8 clients, no client data moves between
  # devices, and the only collective is the all-reduce of the aggregates.
  assert f"f32[2,{LOCAL_STEPS},{BATCH},{DIM}]" in hlo
  assert f"f32[8,{LOCAL_STEPS},{BATCH},{DIM}]" not in hlo
  assert "all-reduce(" in hlo
  for collective in ("all-gather(", "all-to-all(", "collective-permute(",
                     "reduce-scatter("):
    assert collective not in hlo


def test_same_result_on_one_device(data, reference):
  # Spreading clients differently over devices does not change the result.
  one_device = mesh_lib.make_client_mesh(1)
  round_fn = round_lib.make_federated_round(toy_loss, CLIENT_OPTIMIZER,
                                            SERVER_OPTIMIZER, one_device)
  state, _ = run(round_fn, one_device, data)
  assert_params_close(state.params, reference[0])


def test_padded_steps_and_examples_change_nothing(round_fn, mesh, data):
  extra_steps, extra_examples = 2, 3
  padded = {}
  for key, value in data.items():
    if key == "num_examples":
      padded[key] = value
      continue
    pad = [(0, 0), (0, extra_steps)]
    if key != "step_mask":
      pad.append((0, extra_examples))
    pad += [(0, 0)] * (value.ndim - len(pad))
    fill = 0.0 if "mask" in key else np.nan
    padded[key] = np.pad(value, pad, constant_values=fill)
  # Padded examples inside real steps: garbage, finite (the loss masks them).
  real_steps = slice(0, LOCAL_STEPS)
  padded["x"][:, real_steps, BATCH:] = 1e4
  padded["y"][:, real_steps, BATCH:] = -1e4
  assert padded["x"].shape == (NUM_CLIENTS, LOCAL_STEPS + extra_steps,
                               BATCH + extra_examples, DIM)
  assert np.isnan(padded["x"][:, LOCAL_STEPS:]).all()

  expected_state, expected_metrics = run(round_fn, mesh, data)
  state, metrics = run(round_fn, mesh, padded)
  assert_params_close(state.params, expected_state.params, atol=1e-6)
  assert_params_close(state.model_state, expected_state.model_state,
                      atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"],
                             rtol=1e-6)
  assert metrics["num_nonfinite_clients"] == 0


def test_weights_follow_example_counts(round_fn, mesh, data, reference):
  # Only client 2 carries weight: the new server params are its local params
  # (FedAvg, server lr 1), and its model_state.
  clients = reference[3]
  one_hot = dict(data, num_examples=np.eye(NUM_CLIENTS, dtype=np.float32)[2]
                 * data["num_examples"][2])
  fedavg = optimizers.make_server_optimizer("fedavg")
  fedavg_round = round_lib.make_federated_round(toy_loss, CLIENT_OPTIMIZER,
                                                fedavg, mesh)
  state = mesh_lib.replicate(round_lib.init_server_state(
      initial_params(), initial_model_state(), fedavg), mesh)
  state, metrics = fedavg_round(state, as_round(one_hot), rng_key())
  assert_params_close(state.params, clients[2][0])
  assert_params_close(state.model_state, clients[2][1])
  assert metrics["num_aggregated_examples"] == data["num_examples"][2]
  # Scaling every weight by 3 changes nothing.
  tripled = dict(data, num_examples=3 * data["num_examples"])
  state, _ = run(round_fn, mesh, tripled)
  assert_params_close(state.params, reference[0])


def test_nonfinite_client_is_dropped_and_counted(round_fn, mesh, data):
  poisoned = {key: value.copy() for key, value in data.items()}
  poisoned["y"][5, 0, 0] = np.nan  # a real example of client 5
  assert poisoned["example_mask"][5, 0, 0] == 1
  expected_params, expected_stats, expected_loss, _ = reference_round(
      poisoned, rng_key(), dropped=(5,))
  state, metrics = run(round_fn, mesh, poisoned)
  assert metrics["num_nonfinite_clients"] == 1
  assert metrics["num_aggregated_examples"] == (
      data["num_examples"].sum() - data["num_examples"][5])
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))
  assert_params_close(state.params, expected_params)
  np.testing.assert_allclose(state.model_state["batch_stats"]["mean"],
                             expected_stats, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)


def test_all_clients_nonfinite_leaves_server_unchanged(round_fn, mesh, data):
  poisoned = dict(data, y=np.full_like(data["y"], np.nan))
  state, metrics = run(round_fn, mesh, poisoned)
  assert metrics["num_nonfinite_clients"] == NUM_CLIENTS
  assert np.isnan(metrics["loss"])  # No client's loss: not 0.
  assert metrics["server_update_norm"] == 0.0
  assert_params_close(state.params, initial_params(), atol=0)
  assert_params_close(state.model_state, initial_model_state(), atol=0)
  initial = jax.device_get(fresh_state(mesh))
  assert_params_close(state.opt_state, initial.opt_state, atol=0)
  assert int(state.round) == 1


def compiled_round_size(num_leaves: int, mesh,
                        clip_update_norm: float | None) -> int:
  """HLO instructions XLA compiles for a round over a `num_leaves`-leaf model.

  The loss is a sum of the losses of `num_leaves` independent linear models
  (no leaf reads another's values, unlike a deep model, whose own gradient
  would add a quadratic term). The round drops non-finite clients and may
  clip update norms: per-client decisions that read every leaf.
  """
  def loss_fn(params, model_state, batch, rng):
    del rng
    mask = batch["example_mask"]
    def squared_error(w):  # of one model: no leaf reads another's values
      error = batch["x"] @ w - batch["y"]
      return jnp.sum(jnp.where(mask > 0, error ** 2, 0.0))
    total = sum(squared_error(w) for w in params.values())
    return total / jnp.maximum(jnp.sum(mask), 1.0), model_state

  params = {f"w_{i:03d}": jnp.full((DIM,), 0.01 * i)
            for i in range(num_leaves)}
  round_fn = round_lib.make_federated_round(
      loss_fn, CLIENT_OPTIMIZER, SERVER_OPTIMIZER, mesh,
      clip_update_norm=clip_update_norm)
  state = mesh_lib.replicate(
      round_lib.init_server_state(params, {}, SERVER_OPTIMIZER), mesh)
  data = mesh_lib.shard_round_data(as_round(make_round_data()), mesh)
  hlo = round_fn.jitted.lower(state, data, rng_key()).compile().as_text()
  return sum(1 for line in hlo.splitlines() if " = " in line)


@pytest.mark.parametrize("clip_update_norm", [None, 1.0])
def test_compiled_round_grows_linearly_with_leaves(clip_update_norm):
  # A [C] value computed from all L leaves and read by each leaf (an `&`
  # chain of per-leaf finite flags in a per-leaf select) is fused into every
  # reader by XLA:CPU: L^2 instructions, and a compile of the 16-block S
  # round that did not finish. That form gave 6193 -> 36481 instructions
  # (5.9x) here. A linear size a + b L (a >= 0) grows at most 4x.
  one_device = mesh_lib.make_client_mesh(1)
  sizes = {n: compiled_round_size(n, one_device, clip_update_norm)
           for n in (16, 64)}
  assert sizes[64] < 4 * sizes[16], sizes


def test_clients_not_divisible_over_devices_raise(round_fn, mesh, data):
  six_clients = as_round({key: value[:6] for key, value in data.items()})
  with pytest.raises(ValueError, match=r"clients_per_round=6.*4 devices"):
    round_fn(fresh_state(mesh), six_clients, rng_key())
  with pytest.raises(ValueError, match=r"clients_per_round=6.*4 devices"):
    mesh_lib.shard_round_data(six_clients, mesh)


def test_process_client_range_single_process(mesh):
  assert mesh_lib.process_client_range(8, mesh) == (0, 8)


def run_as_one_of_two_processes(process_id: int, port: int) -> None:
  """Worker of the multi-process test: 2 devices here, 4 over both processes."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=2, process_id=process_id)
  mesh = mesh_lib.make_client_mesh()
  start, stop = mesh_lib.process_client_range(NUM_CLIENTS, mesh)
  local_data = as_round({key: value[start:stop]
                         for key, value in make_round_data().items()})
  round_fn = round_lib.make_federated_round(toy_loss, CLIENT_OPTIMIZER,
                                            SERVER_OPTIMIZER, mesh)
  state, metrics = round_fn(fresh_state(mesh),
                            mesh_lib.shard_round_data(local_data, mesh),
                            rng_key())
  local_copy = lambda x: np.asarray(x.addressable_data(0)).tolist()
  print(json.dumps({"clients": [start, stop],
                    "params": jax.tree.map(local_copy, state.params),
                    "loss": local_copy(metrics["loss"])}), flush=True)
  jax.distributed.shutdown()


@pytest.mark.slow
def test_two_processes_match_one_process(reference):
  # Each process owns 2 devices and loads only its contiguous half of the
  # clients (process_client_range); the result equals the 1-process round.
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = xla_env.subprocess_env(2, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
       env.get("PYTHONPATH", "")])
  workers = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), str(i), str(port)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  outputs = [worker.communicate(timeout=240) for worker in workers]
  results = []
  for worker, (stdout, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-3000:]
    results.append(json.loads(stdout.strip().splitlines()[-1]))
  assert [r["clients"] for r in results] == [[0, 4], [4, 8]]
  expected_params, _, expected_loss, _ = reference
  for result in results:
    params = {key: np.asarray(value) for key, value in result["params"].items()}
    assert_params_close(params, expected_params)
    np.testing.assert_allclose(result["loss"], expected_loss, rtol=1e-5)


if __name__ == "__main__":
  run_as_one_of_two_processes(int(sys.argv[1]), int(sys.argv[2]))
