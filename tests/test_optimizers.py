"""Optimizers picked by name: one config line switches the server optimizer.

`--config.federated.server_optimizer.name=NAME` on configs/federated.py (built
for FedAvg) gives NAME's own defaults (`optimizers.SERVER_DEFAULTS`), the same
optimizer as building the config for NAME; a field set on the command line wins.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conformer_fl import optimizers

import entry_point  # tests/entry_point.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
FEDERATED = ROOT / "configs" / "federated.py"


def _parse(config: str, *overrides: str):
  return entry_point.parse_config(config, *overrides)


def _updates(optimizer: optax.GradientTransformation) -> list[np.ndarray]:
  """The optimizer's updates [2] over three steps of fixed pseudo-gradients."""
  params = {"w": jnp.zeros(2)}
  state = optimizer.init(params)
  out = []
  for g in ([-1.0, 2.0], [-0.5, 0.25], [3.0, -1.0]):
    updates, state = optimizer.update({"w": jnp.array(g)}, state, params)
    out.append(np.asarray(updates["w"]))
  return out


REFERENCES = {
    "fedavg": optax.sgd(1.0),
    "fedavgm": optax.sgd(1.0, momentum=0.9),
    "fedadam": optax.adam(1e-2, b1=0.9, b2=0.99, eps=1e-3),
    "fedyogi": optax.yogi(1e-2, b1=0.9, b2=0.99, eps=1e-3),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_one_config_line_switches_the_server_optimizer(name):
  config = _parse(str(FEDERATED),
                  f"--config.federated.server_optimizer.name={name}")
  server = config.federated.server_optimizer
  assert server.name == name
  assert optimizers.server_optimizer_hyperparameters(server) == {
      "name": name, **optimizers.SERVER_DEFAULTS[name]}
  switched = _updates(optimizers.server_optimizer_from_config(server))
  for got, expected in zip(switched, _updates(REFERENCES[name])):
    np.testing.assert_array_equal(got, expected)
  # The same optimizer as the config built for `name`.
  built = _parse(f"{FEDERATED}:server={name}").federated.server_optimizer
  for got, expected in zip(
      switched, _updates(optimizers.server_optimizer_from_config(built))):
    np.testing.assert_array_equal(got, expected)


def test_the_defaults_are_the_papers():
  assert optimizers.SERVER_DEFAULTS["fedadam"] == dict(
      learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-3)
  assert optimizers.SERVER_DEFAULTS["fedyogi"] == dict(
      learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-3)
  assert optimizers.SERVER_DEFAULTS["fedavgm"] == dict(learning_rate=1.0,
                                                       momentum=0.9)
  assert optimizers.SERVER_DEFAULTS["fedavg"] == dict(learning_rate=1.0)


def test_an_explicit_field_wins():
  config = _parse(str(FEDERATED),
                  "--config.federated.server_optimizer.name=fedadam",
                  "--config.federated.server_optimizer.learning_rate=0.5",
                  "--config.federated.server_optimizer.eps=1e-4")
  server = config.federated.server_optimizer
  assert optimizers.server_optimizer_hyperparameters(server) == dict(
      name="fedadam", learning_rate=0.5, b1=0.9, b2=0.99, eps=1e-4)
  for got, expected in zip(
      _updates(optimizers.server_optimizer_from_config(server)),
      _updates(optax.adam(0.5, b1=0.9, b2=0.99, eps=1e-4))):
    np.testing.assert_array_equal(got, expected)
  momentum = _parse(str(FEDERATED),
                    "--config.federated.server_optimizer.name=fedavgm",
                    "--config.federated.server_optimizer.momentum=0.5")
  assert optimizers.server_optimizer_hyperparameters(
      momentum.federated.server_optimizer) == dict(
          name="fedavgm", learning_rate=1.0, momentum=0.5)
  # A mapping with a field set explicitly, as in tests/test_fedavg_algebra.py.
  assert optimizers.server_optimizer_hyperparameters(
      {"name": "fedyogi", "learning_rate": 1.0}) == dict(
          name="fedyogi", learning_rate=1.0, b1=0.9, b2=0.99, eps=1e-3)


def test_unknown_names_and_fields_raise():
  with pytest.raises(ValueError, match="'fedsgd'"):
    optimizers.server_optimizer_hyperparameters({"name": "fedsgd"})
  with pytest.raises(ValueError, match="bogus"):
    optimizers.server_optimizer_from_config({"name": "fedadam", "bogus": 1})


def test_client_adam_takes_its_defaults():
  config = _parse(str(FEDERATED),
                  "--config.federated.client_optimizer.name=adam",
                  "--config.federated.client_optimizer.clip_grad_norm=0")
  client = optimizers.client_optimizer_from_config(
      config.federated.client_optimizer)
  lr = config.federated.client_optimizer.learning_rate
  for got, expected in zip(_updates(client), _updates(optax.adam(lr))):
    np.testing.assert_array_equal(got, expected)
