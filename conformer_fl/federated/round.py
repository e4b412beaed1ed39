"""One FedAvg round: client_update, aggregate, server_update, and their wiring.

  server params --client_update (one client, K masked local steps)--> delta
    --aggregate: drop non-finite clients, clip; weighted sums over clients-->
    --psum over the mesh 'clients' axis--> server_update: server optimizer on
    the pseudo-gradient -mean delta --> new ServerState, metrics

The three are plain functions of pytrees; `make_federated_round` vmaps
client_update over the C/n clients of a device inside `jax.shard_map` over
the mesh axis 'clients', psums the aggregates and runs server_update after,
all in one `jax.jit` (server state replicated and donated, round data
sharded P('clients'); its contract: round_data.py). shard_map, not
`vmap(spmd_axis_name=...)` alone: GSPMD then split the vmapped subsampling
convolution over its feature axis and all-gathered front-end activations
over clients (6x slower on 4 devices); with shard_map no communication
happens inside a client and the only collective is the psum. No Python loop
runs over clients, devices or local steps. Federated Dropout (submodel.py)
wraps client_update and replaces the server's mean; nothing else changes.
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

Params = Any
ModelState = Any
PRNGKey = jax.Array
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# loss_fn(params, model_state, batch [B, ...], rng) -> (mean loss over the real
# examples of the batch (batch['example_mask'] [B]), new_model_state).
LossFn = Callable[[Params, ModelState, Batch, PRNGKey],
                  tuple[jax.Array, ModelState]]
ROUND_KEYS = round_data_lib.ROUND_KEYS


@flax.struct.dataclass
class ServerState:
  """Replicated server state: params, model_state (non-trained variables,
  e.g. {'batch_stats': ...} or {}), opt_state (server optimizer) and round
  (int32 [], rounds run so far, also those where no client was finite)."""
  params: Params
  model_state: ModelState
  opt_state: optax.OptState
  round: jax.Array


def init_server_state(params: Params, model_state: ModelState,
                      server_optimizer: optax.GradientTransformation
                      ) -> ServerState:
  """ServerState at round 0."""
  return ServerState(params, model_state, server_optimizer.init(params),
                     jnp.zeros((), jnp.int32))


class ClientOutput(NamedTuple):
  """One client's result (leaves get a leading [C] when vmapped).

  delta: local params - server params; model_state: after the local steps;
  loss_sum: float32 [] sum over active steps of loss_k * n_k (n_k real
  examples of step k); num_examples_seen: float32 [] sum of those n_k.
  """
  delta: Params
  model_state: ModelState
  loss_sum: jax.Array
  num_examples_seen: jax.Array


def _select(predicate: jax.Array, new: Any, old: Any) -> Any:
  """Leafwise `new if predicate else old` (predicate: bool [])."""
  return jax.tree.map(lambda a, b: jnp.where(predicate, a, b), new, old)


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
    num_real = jnp.sum(batch['example_mask']).astype(jnp.float32)
    active = (step_active > 0) & (num_real > 0)
    *new, loss = local_step(params, opt_state, model_state, batch,
                            jax.random.fold_in(client_rng, index),
                            loss_fn=loss_fn, client_optimizer=client_optimizer)
    params, opt_state, model_state = _select(
        active, tuple(new), (params, opt_state, model_state))
    return (params, opt_state, model_state,
            loss_sum + jnp.where(active, loss * num_real, 0.0),
            num_seen + jnp.where(active, num_real, 0.0)), None

  zero = jnp.zeros((), jnp.float32)
  carry = (server_params, client_optimizer.init(server_params),
           server_model_state, zero, zero)
  indices = jnp.arange(step_mask.shape[0], dtype=jnp.int32)
  (params, _, model_state, loss_sum, num_seen), _ = jax.lax.scan(
      step, carry, (batches, step_mask, indices))
  delta = jax.tree.map(jnp.subtract, params, server_params)
  return ClientOutput(delta, model_state, loss_sum, num_seen)


def make_client_update(loss_fn: LossFn, client_optimizer) -> Callable[..., Any]:
  """client_update with its loss_fn and client optimizer bound."""
  return functools.partial(client_update, loss_fn=loss_fn,
                           client_optimizer=client_optimizer)


def server_update(server_state: ServerState, sums: Mapping[str, Any],
                  server_optimizer: optax.GradientTransformation, *,
                  average: Callable[..., aggregation.Averages] = (
                      aggregation.weighted_mean),
                  unit_paths: Mapping[str, Sequence[str] | str] | None = None,
                  ) -> tuple[ServerState, Metrics]:
  """The server step from the all-client sums of `aggregate`.

  server_optimizer runs on the pseudo-gradient -mean delta; model_state
  becomes the mean model_state. With no finite client (sum of weights 0)
  params, model_state and opt_state stay (round still counts up). Metrics
  (scalars): loss (example-weighted mean training loss of the finite
  clients, NaN if none), num_examples, num_aggregated_examples (examples
  trained by finite clients), num_clients, num_nonfinite_clients,
  num_clipped_clients, mean_client_update_norm (weighted, before clipping),
  server_update_norm, update_norm/<unit> for unit_paths, and average's.
  """
  means = average(sums, server_state.params, server_state.model_state)
  updates, opt_state = server_optimizer.update(
      jax.tree.map(jnp.negative, means.delta), server_state.opt_state,
      server_state.params)
  params = optax.apply_updates(server_state.params,
                               means.mask_updates(updates))
  params, model_state, opt_state = _select(
      sums['weight'] > 0, (params, means.model_state, opt_state),
      (server_state.params, server_state.model_state, server_state.opt_state))
  update = jax.tree.map(jnp.subtract, params, server_state.params)
  metrics = {
      'loss': jnp.where(sums['num_seen'] > 0, sums['loss'] /
                        jnp.maximum(sums['num_seen'], 1.0), jnp.nan),
      'num_examples': sums['num_examples'],
      'num_aggregated_examples': sums['num_aggregated'],
      'num_clients': sums['num_clients'],
      'num_nonfinite_clients': sums['num_nonfinite'],
      'num_clipped_clients': sums['num_clipped'],
      'mean_client_update_norm': sums['weighted_norm'] / jnp.where(
          sums['weight'] > 0, sums['weight'], 1.0),
      'server_update_norm': optax.global_norm(update),
      **aggregation.unit_update_norms(server_state.params, params,
                                      unit_paths or {}),
      **means.metrics,
  }
  return ServerState(params, model_state, opt_state,
                     server_state.round + 1), metrics


def make_federated_round(
    loss_fn: LossFn, client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
    *, clip_update_norm: float | None = None,
    unit_paths: Mapping[str, Sequence[str] | str] | None = None,
    submodel: submodel_lib.SubmodelSpec | None = None,
    aggregation_weight: str = 'examples_trained',
) -> Callable[[ServerState, dict[str, jax.Array], PRNGKey],
              tuple[ServerState, Metrics]]:
  """round_fn(server_state, round_data, rng) -> (server_state, metrics).

  Client c of the round (global index, c in [0, C)) runs with the rng
  fold_in(fold_in(rng, server_state.round), c), whatever the device layout.
  Weights: round_data.client_weights(aggregation_weight). submodel: a
  Federated Dropout / freezing spec (None or identity = the plain round).
  round_fn checks the data (round_data.check_round_data: ValueError) and
  calls `round_fn.jitted` (server_state donated), after a barrier between
  processes once per new shape (mesh.barrier_after_compile).
  """
  if clip_update_norm is not None and clip_update_norm <= 0:
    raise ValueError(
        f'clip_update_norm={clip_update_norm} must be > 0 or None.')
  round_data_lib.check_aggregation_weight(aggregation_weight)
  plain = submodel is None or submodel.is_identity
  bound = make_client_update(loss_fn, client_optimizer)
  client_fn = (lambda *args: (bound(*args), {})) if plain else (
      submodel_lib.wrap_client_update(client_update, submodel, loss_fn,
                                      client_optimizer))
  average = aggregation.weighted_mean if plain else (
      submodel_lib.make_average(submodel, aggregation.weighted_mean))

  def device_sums(params, model_state, round_data, round_rng):
    """The C/n clients of one device -> psum'd aggregates."""
    here = round_data['num_examples'].shape[0]
    first = jax.lax.axis_index(mesh_lib.CLIENTS_AXIS) * here
    rngs = jax.vmap(functools.partial(jax.random.fold_in, round_rng))(
        first + jnp.arange(here, dtype=jnp.int32))
    outputs, units = jax.vmap(client_fn, in_axes=(None, None, 0, 0, 0))(
        params, model_state, round_data_lib.batches(round_data),
        round_data['step_mask'], rngs)
    weights = round_data_lib.client_weights(round_data, aggregation_weight)
    sums = aggregation.aggregate(outputs, units, weights,
                                 round_data['num_examples'], clip_update_norm)
    return jax.lax.psum(sums, mesh_lib.CLIENTS_AXIS)

  # check_vma off: the scan carry starts replicated and becomes
  # device-varying; with it on every loss_fn would pcast its constants.
  sharded_sums = jax.shard_map(
      device_sums, mesh=mesh,
      in_specs=(P(), P(), P(mesh_lib.CLIENTS_AXIS), P()), out_specs=P(),
      check_vma=False)

  def run_round(state: ServerState, round_data, rng):
    sums = sharded_sums(state.params, state.model_state, round_data,
                        jax.random.fold_in(rng, state.round))
    return server_update(state, sums, server_optimizer, average=average,
                         unit_paths=unit_paths)

  replicated = mesh_lib.replicated_sharding(mesh)
  jitted = jax.jit(
      run_round, donate_argnums=(0,), out_shardings=replicated,
      in_shardings=(replicated, mesh_lib.client_sharding(mesh), replicated))
  synced = mesh_lib.barrier_after_compile(jitted, 'federated_round')

  def round_fn(server_state, round_data, rng):
    round_data_lib.check_round_data(round_data, mesh, aggregation_weight)
    return synced(server_state, round_data, rng)

  round_fn.jitted = jitted  # for .lower(...).compile() (HLO, cost).
  return round_fn
