"""What one client step of each arm costs: parameters, FLOPs, memory, time.

The step is the one a client of the arm runs in the round: loss, gradient of
the parameters it trains, client optimizer update, on a batch of the shape of
the first round of the federated run. FLOPs come from XLA's cost analysis of
the compiled step, peak memory from its memory analysis
(`federated.dropout.compile_client_step`), and the step time is measured:
the compiled steps of all arms run in turns, `repeats` times each, and the
median of each is reported with its ratio to the full model's, measured in
the same turns.
"""

import statistics
import time

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from conformer_fl import models
from conformer_fl import optimizers
from conformer_fl.data import federated as federated_data
from conformer_fl.data import tokenizer as tokenizer_lib
from conformer_fl.federated import dropout as federated_dropout
from conformer_fl.federated import submodel as submodel_lib

FULL = "full model"


def first_round_step_batch(config: ml_collections.ConfigDict,
                           tokenizer: tokenizer_lib.Tokenizer
                           ) -> dict[str, np.ndarray]:
  """One local step's batch [B, ...] shaped as in round 0 of `config`'s run."""
  datasets = federated_data.get_client_datasets(config.data, tokenizer)
  sampler = federated_data.ClientSampler(datasets.client_ids,
                                         config.federated.clients_per_round,
                                         config.seed)
  data = federated_data.build_round(config, datasets, sampler, 0)
  return {key: value[0, 0] for key, value in data.batches.items()}


def arm_costs(config: ml_collections.ConfigDict,
              arm_dropouts: Mapping[str, ml_collections.ConfigDict],
              params: Any, model_state: Any,
              batch: Mapping[str, np.ndarray],
              repeats: int = 10) -> dict[str, dict[str, float]]:
  """Client step cost of every arm, and as a fraction of the full model's.

  Args:
    config: the federated run config (resolved: model.vocab_size set).
    arm_dropouts: {key: federated.dropout config} (`arms.dropout_config`).
    params, model_state: the full model.
    batch: `first_round_step_batch(...)`.
    repeats: timed runs of each compiled step (after one warm-up run).

  Returns:
    {key: {'params', 'flops', 'peak_bytes', 'step_seconds', and
           '<each>_fraction' = arm / full}}.
  """
  client_optimizer = optimizers.client_optimizer_from_config(
      config.federated.client_optimizer)
  rng = jax.random.key(0)
  droppable = models.droppable_modules_from_config(config.model)

  def compile_step(dropout_config):
    spec = federated_dropout.dropout_spec_from_config(
        dropout_config, params, model_state, droppable
    ) or submodel_lib.SubmodelSpec()
    loss_fn = models.make_mean_loss_fn(models.build_model(
        config.model, kept_units=spec.kept_units,
        rescale_kept=dropout_config.get("rescale", False)))
    return federated_dropout.compile_client_step(
        loss_fn, client_optimizer, spec, params, model_state, batch, rng)

  full_config = ml_collections.ConfigDict(dict(
      kind="none", rates={}, default_rate=0.0, unit_kinds=(), freeze_units=()))
  compiled = {FULL: compile_step(full_config)}
  # An arm that trains the full model (no dropout, nothing frozen) is timed
  # as the full model itself.
  same_as_full = {key for key, d in arm_dropouts.items()
                  if federated_dropout.dropout_spec_from_config(
                      d, params, model_state, droppable) is None}
  for key, dropout_config in arm_dropouts.items():
    if key not in same_as_full:
      compiled[key] = compile_step(dropout_config)
  times: dict[str, list[float]] = {key: [] for key in compiled}
  for key, (step, args) in compiled.items():
    jax.block_until_ready(step(*args))  # Warm-up.
  for _ in range(repeats):
    for key, (step, args) in compiled.items():
      tic = time.perf_counter()
      jax.block_until_ready(step(*args))
      times[key].append(time.perf_counter() - tic)

  def measures(key):
    return dict(federated_dropout.compiled_step_cost(*compiled[key]),
                step_seconds=statistics.median(times[key]))

  full = measures(FULL)
  report = {}
  for key in arm_dropouts:
    arm_cost = measures(FULL if key in same_as_full else key)
    report[key] = dict(arm_cost)
    for name, value in arm_cost.items():
      report[key][f"{name}_fraction"] = value / full[name]
  return report
