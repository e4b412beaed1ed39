"""The round-data contract of federated/fl_round.py, and client weights.

Round data (what conformer_fl/data/clients.py:make_round_data makes for every
round) is a dict of arrays with leading axes [C, K] = clients, local steps:
  batch keys ('audio', 'labels', ... anything the loss_fn reads): [C, K, B, ...]
  'example_mask': float32 [C, K, B]  1 = real example (passed to loss_fn)
  'step_mask':    float32 [C, K]     1 = real local step; 0 = padding step
  'num_examples': float32 [C]        examples the client trains on this round,
                                     repeats counted (sum of example_mask)
  'client_size':  float32 [C]        the client's own examples, each counted
                                     once (needed by aggregation_weight
                                     'client_size' only)

Aggregation weights (`AGGREGATION_WEIGHTS`, config field
federated.aggregation_weight in conformer_fl/config_lib.py): the weight w_c of
client c in the server's mean delta sum_c w_c delta_c / sum_c w_c:
  'examples_trained'  num_examples[c]. With local_epochs = E > 0 and no cap
                      by K this is E * client_size[c]; with local_epochs = 0
                      every client with data trains K*B examples (repeating a
                      small client's), so all such clients weigh K*B alike.
  'client_size'       client_size[c], as McMahan et al. (arXiv 1602.05629).
  'uniform'           1 for every client with an example, 0 for one without.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from conformer_fl.federated import mesh as mesh_lib

# Per-client arrays of the round data, not given to the loss_fn.
ROUND_KEYS = ("step_mask", "num_examples", "client_size")
AGGREGATION_WEIGHTS = ("examples_trained", "client_size", "uniform")


def check_aggregation_weight(aggregation_weight: str) -> None:
  if aggregation_weight not in AGGREGATION_WEIGHTS:
    raise ValueError(f"aggregation_weight={aggregation_weight!r}; expected one"
                     f" of {AGGREGATION_WEIGHTS}.")


def check_round_data(round_data: Mapping[str, Any], mesh: jax.sharding.Mesh,
                     aggregation_weight: str = "examples_trained"
                     ) -> tuple[int, int]:
  """Validates key names and shapes; returns (num_clients C, local_steps K).

  Raises:
    ValueError: a missing key, a wrong shape, or C not divisible over the
      mesh's devices.
  """
  required = ("example_mask", "step_mask", "num_examples")
  if aggregation_weight == "client_size":
    required += ("client_size",)
  missing = [k for k in required if k not in round_data]
  if missing:
    raise ValueError(f"round_data misses the keys {missing}; it has"
                     f" {sorted(round_data)}.")
  step_mask_shape = jnp.shape(round_data["step_mask"])
  if len(step_mask_shape) != 2:
    raise ValueError("round_data['step_mask'] must be [C, K], got shape"
                     f" {step_mask_shape}.")
  num_clients, local_steps = step_mask_shape
  for key in ("num_examples", "client_size"):
    if key in round_data and jnp.shape(round_data[key]) != (num_clients,):
      raise ValueError(f"round_data[{key!r}] must be [C]=[{num_clients}],"
                       f" got {jnp.shape(round_data[key])}.")
  for key, value in round_data.items():
    if key in ROUND_KEYS:
      continue
    if jnp.shape(value)[:2] != (num_clients, local_steps):
      raise ValueError(
          f"round_data[{key!r}] must have leading axes [C, K] ="
          f" [{num_clients}, {local_steps}], got shape {jnp.shape(value)}.")
  mesh_lib.check_clients_divisible(num_clients, mesh)
  return num_clients, local_steps


def client_weights(round_data: Mapping[str, jax.Array],
                   aggregation_weight: str) -> jax.Array:
  """float32 [C]: each client's aggregation weight (module docstring)."""
  num_examples = round_data["num_examples"].astype(jnp.float32)
  if aggregation_weight == "examples_trained":
    return num_examples
  if aggregation_weight == "client_size":
    return round_data["client_size"].astype(jnp.float32)
  if aggregation_weight == "uniform":
    return (num_examples > 0).astype(jnp.float32)
  raise ValueError(f"aggregation_weight={aggregation_weight!r}; expected one"
                   f" of {AGGREGATION_WEIGHTS}.")


def batches(round_data: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The keys given to the loss_fn: [C, K, B, ...] (and example_mask)."""
  return {k: v for k, v in round_data.items() if k not in ROUND_KEYS}
