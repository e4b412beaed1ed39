"""What one client step of each arm costs: parameters, FLOPs, peak memory.

The step is the one a client of the arm runs in the round: loss, gradient of
the parameters it trains, client optimizer update, on a batch of the shape of
the first round of the federated run. FLOPs come from XLA's cost analysis of
the compiled step and peak memory from its memory analysis
(`federated.dropout.client_step_cost`); nothing is timed.
"""

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from conformer_fl import models
from conformer_fl import optimizers
from conformer_fl import steps
from conformer_fl.data import clients as clients_lib
from conformer_fl.data import input_pipeline
from conformer_fl.data import tokenizer as tokenizer_lib
from conformer_fl.federated import dropout as federated_dropout
from conformer_fl.federated import submodel as submodel_lib

# Keys of a round's arrays that a local step's loss reads.
_STEP_KEYS = ("audio", "audio_paddings", "labels", "label_paddings",
              "example_mask")


def first_round_step_batch(config: ml_collections.ConfigDict,
                           tokenizer: tokenizer_lib.Tokenizer
                           ) -> dict[str, np.ndarray]:
  """One local step's batch [B, ...] shaped as in round 0 of `config`'s run."""
  datasets = input_pipeline.get_client_datasets(config.data, tokenizer)
  sampler = clients_lib.ClientSampler(datasets.client_ids,
                                      config.federated.clients_per_round,
                                      config.seed)
  data = steps.round_arrays(config, datasets, sampler, 0)
  return {key: data[key][0, 0] for key in _STEP_KEYS}


def arm_costs(config: ml_collections.ConfigDict,
              arm_dropouts: Mapping[str, ml_collections.ConfigDict],
              params: Any, model_state: Any,
              batch: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
  """Client step cost of every arm, and as a fraction of the full model's.

  Args:
    config: the federated run config (resolved: model.vocab_size set).
    arm_dropouts: {arm: federated.dropout config} (`arms.arm_dropout_configs`).
    params, model_state: the full model.
    batch: `first_round_step_batch(...)`.

  Returns:
    {arm: {'params', 'flops', 'peak_bytes', 'params_fraction',
           'flops_fraction', 'peak_bytes_fraction'}}.
  """
  client_optimizer = optimizers.client_optimizer_from_config(
      config.federated.client_optimizer)
  rng = jax.random.key(0)

  def cost(spec):
    spec = spec or submodel_lib.SubmodelSpec()
    loss_fn = models.make_mean_loss_fn(
        models.build_model(config.model, kept_units=spec.kept_units))
    return federated_dropout.client_step_cost(
        loss_fn, client_optimizer, spec, params, model_state, batch, rng)

  full = cost(None)
  report = {}
  for arm, dropout_config in arm_dropouts.items():
    spec = federated_dropout.dropout_spec_from_config(
        dropout_config, params, model_state,
        models.droppable_modules_from_config(config.model))
    arm_cost = full if spec is None else cost(spec)
    report[arm] = dict(arm_cost)
    for key, value in arm_cost.items():
      report[arm][f"{key}_fraction"] = value / full[key]
  return report
