"""`RoundData`, the arrays a federated round takes, and the client weights.

conformer_fl/data/federated.py builds a `RoundData` for every round from the
sampled clients; conformer_fl/federated/fl_round.py trains on it.

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

from typing import Any

import flax
import jax
import jax.numpy as jnp

from conformer_fl.federated import mesh as mesh_lib

Array = Any  # numpy on the host, jax.Array on the mesh.
AGGREGATION_WEIGHTS = ("examples_trained", "client_size", "uniform")


@flax.struct.dataclass
class RoundData:
  """One round's arrays, leading axes [C, K] = clients, local steps.

  A pytree: `mesh.shard_round_data` places it on the mesh, every leaf split
  on its leading [C] axis.

  Attributes:
    batches: the loss_fn's batches of every client's local steps, each
      [C, K, B, ...] (a central batch's arrays, `batching.pad_batch`, with two
      leading axes). Of the speech model (data/federated.py):
        'audio'          float32 [C, K, B, S]
        'audio_paddings' float32 [C, K, B, S]  1.0 = padded
        'labels'         int32   [C, K, B, U]  0 = pad
        'label_paddings' float32 [C, K, B, U]  1.0 = padded
        'example_mask'   float32 [C, K, B]     1.0 = real example
      Any loss_fn's keys; 'example_mask' is required (the round counts the
      real examples of a step with it).
    step_mask: float32 [C, K], 1.0 = the step has a real example; 0 = a
      padding step.
    num_examples: float32 [C], sum of example_mask over [K, B]: the
      examples the client trains on this round, repeats counted.
    client_size: float32 [C], the client's own examples, each counted once;
      None where unknown (only aggregation_weight 'client_size' reads it).
  Every client of a round shares one bucket (S, U), so that the clients can
  be vmapped together.
  """

  batches: dict[str, Array]
  step_mask: Array
  num_examples: Array
  client_size: Array | None = None


def check_aggregation_weight(aggregation_weight: str) -> None:
  if aggregation_weight not in AGGREGATION_WEIGHTS:
    raise ValueError(f"aggregation_weight={aggregation_weight!r}; expected one"
                     f" of {AGGREGATION_WEIGHTS}.")


def check_round_data(data: RoundData, mesh: jax.sharding.Mesh,
                     aggregation_weight: str = "examples_trained"
                     ) -> tuple[int, int]:
  """Validates the shapes; returns (num_clients C, local_steps K).

  Raises:
    TypeError: `data` is not a RoundData.
    ValueError: a missing array, a wrong shape, or C not divisible over the
      mesh's devices.
  """
  if not isinstance(data, RoundData):
    raise TypeError(f"The round takes a round_data.RoundData, got"
                    f" {type(data).__name__}; build it with RoundData(...).")
  if "example_mask" not in data.batches:
    raise ValueError("RoundData.batches misses 'example_mask'; it has"
                     f" {sorted(data.batches)}.")
  if aggregation_weight == "client_size" and data.client_size is None:
    raise ValueError("aggregation_weight='client_size' needs"
                     " RoundData.client_size; it is None.")
  step_mask_shape = jnp.shape(data.step_mask)
  if len(step_mask_shape) != 2:
    raise ValueError("RoundData.step_mask must be [C, K], got shape"
                     f" {step_mask_shape}.")
  num_clients, local_steps = step_mask_shape
  for name in ("num_examples", "client_size"):
    value = getattr(data, name)
    if value is not None and jnp.shape(value) != (num_clients,):
      raise ValueError(f"RoundData.{name} must be [C]=[{num_clients}],"
                       f" got {jnp.shape(value)}.")
  for key, value in data.batches.items():
    if jnp.shape(value)[:2] != (num_clients, local_steps):
      raise ValueError(
          f"RoundData.batches[{key!r}] must have leading axes [C, K] ="
          f" [{num_clients}, {local_steps}], got shape {jnp.shape(value)}.")
  mesh_lib.check_clients_divisible(num_clients, mesh)
  return num_clients, local_steps


def client_weights(data: RoundData, aggregation_weight: str) -> jax.Array:
  """float32 [C]: each client's aggregation weight (module docstring)."""
  num_examples = data.num_examples.astype(jnp.float32)
  if aggregation_weight == "examples_trained":
    return num_examples
  if aggregation_weight == "client_size":
    return data.client_size.astype(jnp.float32)
  if aggregation_weight == "uniform":
    return (num_examples > 0).astype(jnp.float32)
  raise ValueError(f"aggregation_weight={aggregation_weight!r}; expected one"
                   f" of {AGGREGATION_WEIGHTS}.")

