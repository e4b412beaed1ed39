"""One FedAvg round: client_update -> aggregation.aggregate -> server_update.

Plain functions of pytrees; `make_federated_round` vmaps client_update over
the C/n clients of a device in `jax.shard_map` over the mesh axis 'clients'
(mesh.py says why), psums the aggregates and jits the whole (its data: a
round_data.RoundData). Federated Dropout (submodel.py) wraps client_update and
replaces the server's mean; capacity tiers (tiers.py) vmap groups of the
clients at their own widths and add their sums.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import optax

from conformer_fl.federated import aggregation
from conformer_fl.federated import mesh as mesh_lib
from conformer_fl.federated import round_data as round_data_lib
from conformer_fl.federated import submodel as submodel_lib
from conformer_fl.federated import tiers as tiers_lib

Params = ModelState = Any
Metrics = dict[str, jax.Array]
# loss_fn(params, model_state, batch [B, ...], rng) -> (mean loss over the real
# examples of the batch (batch['example_mask'] [B]), new_model_state).
LossFn = Callable[..., tuple[jax.Array, ModelState]]
RoundData = round_data_lib.RoundData


@flax.struct.dataclass
class ServerState:
  """Replicated server state; round: int32 [], rounds run (with skipped)."""
  params: Params
  model_state: ModelState  # Non-trained variables: {'batch_stats': ...}, {}.
  opt_state: optax.OptState
  round: jax.Array


def init_server_state(params: Params, model_state: ModelState,
                      server_optimizer: optax.GradientTransformation
                      ) -> ServerState:
  """ServerState at round 0."""
  return ServerState(params, model_state, server_optimizer.init(params),
                     jnp.zeros((), jnp.int32))


class ClientOutput(NamedTuple):
  """One client's result (leaves get a leading [C] when vmapped)."""
  delta: Params  # Local params - server params.
  model_state: ModelState  # After the local steps.
  loss_sum: jax.Array  # float32 [], sum of loss_k * n_k over active steps k.
  num_examples_seen: jax.Array  # float32 [], sum of n_k (real examples).
  units: Any = ()  # Federated Dropout: {layer: float32 [n] kept indicator}.


def local_step(params, opt_state, model_state, batch, rng, *,
               loss_fn: LossFn, client_optimizer):
  """One local step: -> (params, opt_state, model_state, loss)."""
  (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, model_state, batch, rng)
  updates, opt_state = client_optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, new_state, loss


def client_update(server_params, server_model_state, batches, step_mask,
                  client_rng, *, loss_fn: LossFn,
                  client_optimizer) -> ClientOutput:
  """K local steps of ONE client (lax.scan over batches [K, B, ...] and
  step_mask float32 [K]); the client optimizer starts fresh.

  Step k runs `local_step` with rng fold_in(client_rng, k); it is inactive
  (params, optimizer state and model_state unchanged, by jnp.where so that
  NaN from padding cannot leak) when step_mask[k] == 0 or it has no real
  example (batches['example_mask'] [K, B]).
  """
  def step(carry, inputs):
    params, opt_state, model_state, loss_sum, num_seen = carry
    batch, step_active, index = inputs
    num_real = jnp.sum(batch["example_mask"]).astype(jnp.float32)
    active = (step_active > 0) & (num_real > 0)
    *new, loss = local_step(params, opt_state, model_state, batch,
                            jax.random.fold_in(client_rng, index),
                            loss_fn=loss_fn, client_optimizer=client_optimizer)
    params, opt_state, model_state = aggregation.select(
        active, tuple(new), (params, opt_state, model_state))
    return (params, opt_state, model_state,
            loss_sum + jnp.where(active, loss * num_real, 0.0),
            num_seen + jnp.where(active, num_real, 0.0)), None

  zero = jnp.zeros((), jnp.float32)
  carry = (server_params, client_optimizer.init(server_params),
           server_model_state, zero, zero)
  (params, _, model_state, loss_sum, num_seen), _ = jax.lax.scan(step, carry, (
      batches, step_mask, jnp.arange(step_mask.shape[0], dtype=jnp.int32)))
  return ClientOutput(jax.tree.map(jnp.subtract, params, server_params),
                      model_state, loss_sum, num_seen)


def server_update(server_state: ServerState, sums: Mapping[str, Any],
                  server_optimizer: optax.GradientTransformation, *,
                  average: Callable[..., aggregation.Averages] = (
                      aggregation.weighted_mean),
                  unit_paths: Mapping[str, Sequence[str] | str] | None = None,
                  ) -> tuple[ServerState, Metrics]:
  """The server step from the all-client sums of aggregation.aggregate.

  server_optimizer runs on the pseudo-gradient -mean delta (`average`);
  model_state becomes the mean model_state. With no finite client (sum of
  weights 0) params, model_state and opt_state stay; round counts up.
  Metrics: aggregation.round_metrics, server_update_norm, update_norm/<unit>
  for unit_paths (||new - old||_2), and average's.
  """
  means = average(sums, server_state.params, server_state.model_state)
  updates, opt_state = server_optimizer.update(
      jax.tree.map(jnp.negative, means.delta), server_state.opt_state,
      server_state.params)
  params = optax.apply_updates(server_state.params,
                               means.mask_updates(updates))
  params, model_state, opt_state = aggregation.select(
      sums["weight"] > 0, (params, means.model_state, opt_state),
      (server_state.params, server_state.model_state, server_state.opt_state))
  update = jax.tree.map(jnp.subtract, params, server_state.params)
  metrics = {**aggregation.round_metrics(sums), **means.metrics,
             "server_update_norm": optax.global_norm(update),
             **aggregation.unit_update_norms(server_state.params, params,
                                             unit_paths or {})}
  return ServerState(params, model_state, opt_state,
                     server_state.round + 1), metrics


def make_federated_round(
    loss_fn: LossFn, client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
    *, clip_update_norm: float | None = None,
    unit_paths: Mapping[str, Sequence[str] | str] | None = None,
    submodel: submodel_lib.SubmodelSpec | None = None,
    submodel_loss_fn: LossFn | None = None,
    aggregation_weight: str = "examples_trained",
    tiers: Sequence[tiers_lib.Tier] | None = None,
) -> Callable[..., tuple[ServerState, Metrics]]:
  """round_fn(server_state, data, rng) -> (server_state, metrics).

  data: the round's `RoundData` [C, K, ...].

  Client c (global index in [0, C)) uses fold_in(fold_in(rng,
  server_state.round), c) on any device layout; the sub-model policy
  (submodel.kept_indices) reads server_state.round as a traced scalar, so
  one compiled round serves every round. Client c's weight is
  round_data.client_weights(data, aggregation_weight). submodel: Federated
  Dropout / freezing spec (None = plain); submodel_loss_fn: the loss of the
  sub-model, whose layers have the widths `submodel.kept_units` (None =
  loss_fn, for a loss that reads its widths from the params it is given).
  tiers: clients of mixed capacity (tiers.py: each tier vmapped at its own
  widths, their clients' C_t summing to C), instead of submodel and
  submodel_loss_fn; the server averages each element over the clients of
  every tier that trained it.
  round_fn checks the data (TypeError, ValueError), then runs
  `round_fn.jitted` (server_state donated) after a barrier between
  processes per new shape (mesh.barrier_after_compile).
  """
  aggregation.check_clip_update_norm(clip_update_norm)
  round_data_lib.check_aggregation_weight(aggregation_weight)
  if tiers is not None and (submodel is not None or
                            submodel_loss_fn is not None):
    raise ValueError("Give the round either tiers or submodel, not both.")
  if tiers is None:
    tiers, counts = (tiers_lib.Tier(0, submodel, submodel_loss_fn),), None
  else:
    counts = tiers_lib.local_counts(tiers, mesh.shape[mesh_lib.CLIENTS_AXIS])
  union = tiers_lib.union_spec([tier.spec for tier in tiers])

  def tier_client_fn(tier):
    """The client update of one client of `tier` (round_index last)."""
    if tier.spec is None or tier.spec.is_identity:
      plain = functools.partial(client_update, loss_fn=loss_fn,
                                client_optimizer=client_optimizer)

      def client_fn(params, model_state, batches, step_mask, client_rng,
                    round_index):
        del round_index  # Read by the sub-model policies only.
        return plain(params, model_state, batches, step_mask, client_rng)
    else:  # Federated Dropout.
      client_fn = submodel_lib.wrap_client_update(
          client_update, tier.spec, tier.loss_fn or loss_fn,
          client_optimizer)
    if union is None or len(tiers) == 1:
      return client_fn
    return tiers_lib.with_union_units(client_fn, union)

  client_fns = [tier_client_fn(tier) for tier in tiers]
  average = aggregation.weighted_mean
  if union is not None:
    average = submodel_lib.make_average(union, average)

  def device_sums(params, model_state, data, round_rng, round_index):
    here = data.num_examples.shape[0]
    if counts is not None and sum(counts) != here:
      raise ValueError(
          f"The round's capacity tiers hold {sum(counts)} clients per device"
          f" ({[tier.clients for tier in tiers]} in all) but each device has "
          f"{here}; the tiers' clients must add up to the round's.")
    first = jax.lax.axis_index(mesh_lib.CLIENTS_AXIS) * here
    rngs = jax.vmap(functools.partial(jax.random.fold_in, round_rng))(
        first + jnp.arange(here, dtype=jnp.int32))
    weights = round_data_lib.client_weights(data, aggregation_weight)
    sums, start = None, 0
    for count, client_fn in zip(counts or (here,), client_fns):
      take = (lambda tree: tree) if counts is None else functools.partial(
          jax.tree.map, lambda x, start=start, count=count: x[start:start +
                                                              count])
      outputs = jax.vmap(client_fn, in_axes=(None, None, 0, 0, 0, None))(
          params, model_state, take(data.batches), take(data.step_mask),
          take(rngs), round_index)
      tier_sums = aggregation.aggregate(
          outputs, take(weights), take(data.num_examples),
          clip_update_norm)
      sums = tier_sums if sums is None else jax.tree.map(jnp.add, sums,
                                                         tier_sums)
      start += count
    return jax.lax.psum(sums, mesh_lib.CLIENTS_AXIS)

  # check_vma off, else every loss_fn would pcast its constants.
  sharded_sums = jax.shard_map(
      device_sums, mesh=mesh,
      in_specs=(P(), P(), P(mesh_lib.CLIENTS_AXIS), P(), P()), out_specs=P(),
      check_vma=False)

  def run_round(state, data, rng):
    sums = sharded_sums(state.params, state.model_state, data,
                        jax.random.fold_in(rng, state.round), state.round)
    return server_update(state, sums, server_optimizer, average=average,
                         unit_paths=unit_paths)

  replicated = mesh_lib.replicated_sharding(mesh)
  jitted = jax.jit(
      run_round, donate_argnums=(0,), out_shardings=replicated,
      in_shardings=(replicated, mesh_lib.client_sharding(mesh), replicated))
  synced = mesh_lib.barrier_after_compile(jitted, "federated_round")

  def round_fn(server_state, data, rng):
    round_data_lib.check_round_data(data, mesh, aggregation_weight)
    return synced(server_state, data, rng)

  round_fn.jitted = jitted  # for .lower(...).compile() (HLO, cost).
  return round_fn
