"""One federated round as one jit-compiled function (model-agnostic).

  server params --(per client: K masked local steps, lax.scan)--> deltas [C,..]
    --> drop non-finite clients, optional norm clipping
    --> example-weighted mean delta (psum over the mesh 'clients' axis)
    --> server optimizer on the pseudo-gradient -mean_delta --> server state

Design: `jax.shard_map` over the mesh axis 'clients', with `jax.vmap` over
the C/n clients of each device inside, and one `lax.psum` of the aggregates
(weighted delta sum, weight sum, weighted model_state sum, loss and counts).
The server optimizer step runs after it, in the same `jax.jit`, on replicated
values. Server state is replicated (donated), round data sharded P('clients').

Why not `vmap(spmd_axis_name='clients')` alone (drjax style), which we built
first: it leaves the partitioning of everything inside a client to GSPMD's
sharding propagation, and on the tiny Conformer that chose badly: it split the
vmapped subsampling convolution (a grouped conv, one group per client) over
its feature axis and all-gathered front-end activations over clients, 9
all-gathers per round, and the 4-device round ran 6x slower than a Python loop
over clients. A model-agnostic round cannot add sharding constraints to the
model's activations. With shard_map "no communication inside a client" is a
guarantee, the per-device program is exactly the 1-device vmapped program, and
the only collective is the final psum. The client function stays a plain
single-client function either way; no Python loop runs over clients, devices
or local steps. (A future clients x model 2-D mesh would put the model axis in
shard_map's `axis_names` complement and leave it to the compiler.)

Round data (what data/input_pipeline.py makes for every round): a dict of arrays with leading axes
[C, K] = clients, local steps:
  batch keys ('audio', 'labels', ... anything the loss_fn reads): [C, K, B, ...]
  'example_mask': float32 [C, K, B]  1 = real example (passed to loss_fn)
  'step_mask':    float32 [C, K]     1 = real local step; 0 = padding step
  'num_examples': float32 [C]        aggregation weight of each client
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import optax

from conformer_fl.federated import aggregation
from conformer_fl.federated import mesh as mesh_lib
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

ROUND_KEYS = ('step_mask', 'num_examples')  # per-client, not given to loss_fn


@flax.struct.dataclass
class ServerState:
  """Replicated server state.

  Attributes:
    params: model parameters pytree.
    model_state: non-trained model variables, e.g. {'batch_stats': ...} or {}.
    opt_state: server optimizer state.
    round: int32 [] number of rounds run so far (also those skipped because
      every client was non-finite).
  """
  params: Params
  model_state: ModelState
  opt_state: optax.OptState
  round: jax.Array


def init_server_state(
    params: Params,
    model_state: ModelState,
    server_optimizer: optax.GradientTransformation,
) -> ServerState:
  """ServerState at round 0."""
  return ServerState(
      params=params,
      model_state=model_state,
      opt_state=server_optimizer.init(params),
      round=jnp.zeros((), jnp.int32))


def _select(predicate: jax.Array, new: Any, old: Any) -> Any:
  """Leafwise `new if predicate else old` (predicate: bool [])."""
  return jax.tree.map(lambda a, b: jnp.where(predicate, a, b), new, old)


def _check_round_data(round_data: Mapping[str, Any], mesh) -> tuple[int, int]:
  """Validates key names and shapes; returns (num_clients C, local_steps K)."""
  missing = [k for k in ('example_mask',) + ROUND_KEYS if k not in round_data]
  if missing:
    raise ValueError(f'round_data misses the keys {missing}; it has'
                     f' {sorted(round_data)}.')
  step_mask_shape = jnp.shape(round_data['step_mask'])
  if len(step_mask_shape) != 2:
    raise ValueError("round_data['step_mask'] must be [C, K], got shape"
                     f' {step_mask_shape}.')
  num_clients, local_steps = step_mask_shape
  if jnp.shape(round_data['num_examples']) != (num_clients,):
    raise ValueError(f"round_data['num_examples'] must be [C]=[{num_clients}],"
                     f" got {jnp.shape(round_data['num_examples'])}.")
  for key, value in round_data.items():
    if key in ROUND_KEYS:
      continue
    if jnp.shape(value)[:2] != (num_clients, local_steps):
      raise ValueError(
          f'round_data[{key!r}] must have leading axes [C, K] ='
          f' [{num_clients}, {local_steps}], got shape {jnp.shape(value)}.')
  mesh_lib.check_clients_divisible(num_clients, mesh)
  return num_clients, local_steps


def make_client_update(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation,
) -> Callable[..., tuple[Params, ModelState, jax.Array, jax.Array]]:
  """Returns client_update for ONE client (vmapped by the round).

  client_update(server_params, server_model_state, batches, step_mask,
                client_rng) -> (delta, model_state, loss_sum, num_examples_seen)
    batches: dict of [K, B, ...] arrays incl. 'example_mask' [K, B].
    step_mask: float32 [K].
    delta: local params - server params after the K local steps.
    loss_sum: float32 [] sum over active steps of loss_k * n_k, where n_k is
      the number of real examples of step k.
    num_examples_seen: float32 [] sum over active steps of n_k.

  A step is active when step_mask[k] > 0 and it has a real example; an
  inactive step leaves params, optimizer state and model_state unchanged
  (jnp.where, so NaN from garbage padding cannot leak). Step k uses the rng
  fold_in(client_rng, k). The client optimizer is initialized here, so its
  state is fresh every round.

  Args:
    loss_fn: see LossFn.
    client_optimizer: optax optimizer of the local steps.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def client_update(server_params, server_model_state, batches, step_mask,
                    client_rng):

    def local_step(carry, step_inputs):
      params, opt_state, model_state, loss_sum, num_seen = carry
      batch, step_active, step_index = step_inputs
      num_real = jnp.sum(batch['example_mask']).astype(jnp.float32)
      active = (step_active > 0) & (num_real > 0)
      step_rng = jax.random.fold_in(client_rng, step_index)
      (loss, new_model_state), grads = grad_fn(params, model_state, batch,
                                               step_rng)
      updates, new_opt_state = client_optimizer.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      params, opt_state, model_state = _select(
          active, (new_params, new_opt_state, new_model_state),
          (params, opt_state, model_state))
      loss_sum = loss_sum + jnp.where(active, loss * num_real, 0.0)
      num_seen = num_seen + jnp.where(active, num_real, 0.0)
      return (params, opt_state, model_state, loss_sum, num_seen), None

    zero = jnp.zeros((), jnp.float32)
    carry = (server_params, client_optimizer.init(server_params),
             server_model_state, zero, zero)
    num_steps = step_mask.shape[0]
    carry, _ = jax.lax.scan(
        local_step, carry,
        (batches, step_mask, jnp.arange(num_steps, dtype=jnp.int32)))
    params, _, model_state, loss_sum, num_seen = carry
    delta = jax.tree.map(jnp.subtract, params, server_params)
    return delta, model_state, loss_sum, num_seen

  return client_update


def _keep_non_float(server_model_state: ModelState,
                    averaged: ModelState) -> ModelState:
  """Averaged float leaves; non-float leaves (counters) keep the server's."""
  return jax.tree.map(
      lambda server, mean: mean if jnp.issubdtype(server.dtype, jnp.inexact)
      else server, server_model_state, averaged)


def make_federated_round(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    clip_update_norm: float | None = None,
    unit_paths: Mapping[str, Sequence[str] | str] | None = None,
    submodel: submodel_lib.SubmodelSpec | None = None,
) -> Callable[[ServerState, dict[str, jax.Array], PRNGKey],
              tuple[ServerState, Metrics]]:
  """Builds round_fn(server_state, round_data, rng) -> (server_state, metrics).

  round_fn checks the round data's shapes, then calls one jax.jit-compiled
  function (`round_fn.jitted`; server state donated: do not use the passed
  server_state afterwards). Round data must be sharded with
  `mesh.shard_round_data` (multi-process) or may be host arrays
  (single-process); server state should be placed with `mesh.replicate`.
  With several processes each new round shape is compiled ahead of time and
  the processes wait for each other before running it
  (`mesh.barrier_after_compile`), so a process that read the round from the
  compilation cache does not time out in the first collective.

  Per-client rng: fold_in(fold_in(rng, server_state.round), c) for the global
  client index c in [0, C); step k adds fold_in(., k). Results therefore do
  not depend on how clients are spread over devices or processes.

  Aggregation: client c gets weight num_examples[c], unless its delta, loss or
  model_state holds a NaN/Inf: then its weight is 0, its loss is left out and
  the NaN/Inf elements are zeroed before any sum. A delta is clipped to
  global L2 norm clip_update_norm (if set) by scaling its weight in the delta
  sum. The server applies server_optimizer to the pseudo-gradient
  -sum_c w_c delta_c / sum_c w_c and model_state becomes the same weighted
  mean of the clients' model_states. If no client is finite, params,
  model_state and opt_state stay unchanged (round still counts up).

  Metrics (scalars):
    loss                   example-weighted mean client training loss over
                           the active local steps of the finite clients;
                           NaN when no client is finite (or none has an
                           example).
    num_examples           sum of num_examples over all clients.
    num_aggregated_examples  sum of the weights of the finite clients.
    num_clients, num_nonfinite_clients, num_clipped_clients  int32.
    mean_client_update_norm  weighted mean (finite clients) of the clients'
                           delta norms before clipping.
    server_update_norm     ||new_params - old_params||_2.
    update_norm/<name>     the same restricted to each unit of unit_paths.

  Federated dropout (`submodel`, see submodel.py and dropout.py): client c
  draws its kept units from fold_in(client_rng, DROPOUT_RNG_TAG), gathers
  them into smaller params (and model_state) arrays, splits off the frozen
  units (constants of its loss, outside its optimizer) and trains that
  sub-model with the same loss_fn (the model reads its widths from the
  params). Its delta is scattered back into zeros of full shape (model_state
  into the server's values). Each element of a dropped layer is averaged over
  the finite clients that trained it, sum_c w_c kept_c delta_c /
  sum_c w_c kept_c; elements no client trained (and frozen units) get a zero
  pseudo-gradient and a zero server update. Metrics add
  `submodel_kept_fraction/<layer>` (weighted mean kept fraction).
  A spec with no dropped layer and no frozen unit runs the plain round.

  Args:
    loss_fn: loss_fn(params, model_state, batch, rng) -> (mean loss over the
      real examples of the batch, new_model_state); see LossFn.
    client_optimizer: optax optimizer of the local steps (fresh every round).
    server_optimizer: optax optimizer applied to the pseudo-gradient.
    mesh: mesh with a 'clients' axis (mesh.make_client_mesh()).
    clip_update_norm: optional bound on each client's delta global L2 norm.
    unit_paths: optional {unit name: path tuple (or 'a/b') into params}.
    submodel: optional federated dropout / freezing spec (None = off).

  Raises (when called):
    ValueError: on malformed round data, or a number of clients that does not
      divide over the mesh devices.
  """
  if clip_update_norm is not None and clip_update_norm <= 0:
    raise ValueError(
        f'clip_update_norm={clip_update_norm} must be > 0 or None.')
  unit_paths = dict(unit_paths or {})
  replicated = mesh_lib.replicated_sharding(mesh)
  by_client = mesh_lib.client_sharding(mesh)
  client_update = make_client_update(loss_fn, client_optimizer)
  if submodel is not None and submodel.is_identity:
    submodel = None  # Exactly the plain round.

  def submodel_client_update(server_params, server_model_state, batches,
                             step_mask, client_rng):
    """client_update of one client's sub-model; full-shape outputs."""
    kept = submodel_lib.sample_kept_indices(
        submodel, jax.random.fold_in(client_rng,
                                     submodel_lib.DROPOUT_RNG_TAG))
    sub_params = submodel_lib.gather_submodel(submodel, server_params, kept)
    sub_state = submodel_lib.gather_submodel(submodel, server_model_state,
                                             kept, 'model_state')
    trainable, frozen = submodel_lib.split_frozen(submodel, sub_params)
    frozen = jax.lax.stop_gradient(frozen)

    def trainable_loss(trainable, model_state, batch, rng):
      return loss_fn(submodel_lib.merge_frozen(submodel, trainable, frozen),
                     model_state, batch, rng)

    delta, new_state, loss_sum, num_seen = make_client_update(
        trainable_loss, client_optimizer)(trainable, sub_state, batches,
                                          step_mask, client_rng)
    delta = submodel_lib.merge_frozen(
        submodel, delta, jax.tree.map(jnp.zeros_like, frozen))
    zeros = jax.tree.map(jnp.zeros_like, server_params)
    delta = submodel_lib.scatter_to_full(submodel, delta, zeros, kept)
    new_state = submodel_lib.scatter_to_full(
        submodel, new_state, server_model_state, kept, 'model_state')
    indicator = submodel_lib.kept_indicator(submodel, kept)
    return delta, new_state, loss_sum, num_seen, indicator

  def device_aggregates(params, model_state, round_data, round_rng):
    """Runs the C/n clients of one device; returns psum'd aggregates."""
    clients_here = round_data['num_examples'].shape[0]
    first_client = jax.lax.axis_index(mesh_lib.CLIENTS_AXIS) * clients_here
    client_indices = first_client + jnp.arange(clients_here, dtype=jnp.int32)
    batches = {k: v for k, v in round_data.items() if k not in ROUND_KEYS}

    def one_client(batches, step_mask, client_index):
      client_rng = jax.random.fold_in(round_rng, client_index)
      if submodel is None:
        return client_update(params, model_state, batches, step_mask,
                             client_rng) + ({},)
      return submodel_client_update(params, model_state, batches, step_mask,
                                    client_rng)

    deltas, model_states, loss_sums, num_seen, indicators = jax.vmap(
        one_client)(batches, round_data['step_mask'], client_indices)

    finite = (aggregation.client_all_finite((deltas, model_states))
              & jnp.isfinite(loss_sums))
    # Dropped (weight 0) and clipped clients are handled in the [C] weights
    # alone; see the aggregation module docstring for why not per leaf.
    deltas, model_states = aggregation.zero_nonfinite((deltas, model_states))
    num_examples = round_data['num_examples'].astype(jnp.float32)
    weights = jnp.where(finite, num_examples, 0.0)
    client_norms = aggregation.client_global_norms(deltas)
    if clip_update_norm is None:
      delta_weights = weights
      was_clipped = jnp.zeros_like(finite)
    else:
      scale, was_clipped = aggregation.clip_scales(client_norms,
                                                   clip_update_norm)
      delta_weights = weights * scale
    local_sums = {
        'delta': aggregation.weighted_sum(deltas, delta_weights),
        'model_state': aggregation.weighted_sum(model_states, weights),
        'weight': jnp.sum(weights),
        'loss': jnp.sum(jnp.where(finite, loss_sums, 0.0)),
        'num_seen': jnp.sum(jnp.where(finite, num_seen, 0.0)),
        'num_examples': jnp.sum(num_examples),
        'num_nonfinite': jnp.sum(~finite).astype(jnp.int32),
        'num_clipped': jnp.sum(was_clipped & finite).astype(jnp.int32),
        'weighted_norm': jnp.sum(weights * client_norms),
        'unit_weights': aggregation.weighted_sum(indicators, weights),
    }
    return jax.lax.psum(local_sums, mesh_lib.CLIENTS_AXIS)

  sharded_aggregates = jax.shard_map(
      device_aggregates,
      mesh=mesh,
      in_specs=(P(), P(), P(mesh_lib.CLIENTS_AXIS), P()),
      out_specs=P(),
      # The scan carry starts from replicated server params and constants
      # (device-invariant) and becomes device-varying after a step; with the
      # check on, every loss_fn would have to pcast its own constants.
      check_vma=False)

  def run_round(server_state: ServerState, round_data: dict[str, jax.Array],
                rng: PRNGKey) -> tuple[ServerState, Metrics]:
    num_clients = round_data['num_examples'].shape[0]
    round_rng = jax.random.fold_in(rng, server_state.round)
    sums = sharded_aggregates(server_state.params, server_state.model_state,
                              round_data, round_rng)
    total_weight = sums['weight']
    safe_weight = jnp.where(total_weight > 0, total_weight, 1.0)
    mean = lambda tree: jax.tree.map(
        lambda x: (x / safe_weight.astype(x.dtype)).astype(x.dtype), tree)

    mean_delta = mean(sums['delta'])
    if submodel is not None:
      trained = submodel_lib.trained_weights(submodel, server_state.params,
                                             sums['unit_weights'])
      mean_delta = submodel_lib.count_normalized_mean(sums['delta'],
                                                      mean_delta, trained)
    pseudo_gradient = jax.tree.map(jnp.negative, mean_delta)
    updates, new_opt_state = server_optimizer.update(
        pseudo_gradient, server_state.opt_state, server_state.params)
    if submodel is not None:
      updates = submodel_lib.zero_untrained(updates, trained)
    new_params = optax.apply_updates(server_state.params, updates)
    new_model_state = _keep_non_float(server_state.model_state,
                                      mean(sums['model_state']))
    any_finite = total_weight > 0
    new_params, new_model_state, new_opt_state = _select(
        any_finite, (new_params, new_model_state, new_opt_state),
        (server_state.params, server_state.model_state,
         server_state.opt_state))

    server_update = jax.tree.map(jnp.subtract, new_params, server_state.params)
    metrics = {
        # NaN when no client is finite: such a round has no training loss.
        'loss': jnp.where(sums['num_seen'] > 0,
                          sums['loss'] / jnp.maximum(sums['num_seen'], 1.0),
                          jnp.nan),
        'num_examples': sums['num_examples'],
        'num_aggregated_examples': total_weight,
        'num_clients': jnp.asarray(num_clients, jnp.int32),
        'num_nonfinite_clients': sums['num_nonfinite'],
        'num_clipped_clients': sums['num_clipped'],
        'mean_client_update_norm': sums['weighted_norm'] / safe_weight,
        'server_update_norm': optax.global_norm(server_update),
    }
    metrics.update(aggregation.unit_update_norms(
        server_state.params, new_params, unit_paths))
    for layer in (submodel.layers if submodel is not None else ()):
      metrics[f'submodel_kept_fraction/{layer.name}'] = (
          jnp.sum(sums['unit_weights'][layer.name]) /
          (safe_weight * layer.num_units))
    new_state = ServerState(
        params=new_params,
        model_state=new_model_state,
        opt_state=new_opt_state,
        round=server_state.round + 1)
    return new_state, metrics

  jitted_round = jax.jit(
      run_round,
      in_shardings=(replicated, by_client, replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,))

  # Multi-process: every process compiles a new round shape, then all wait
  # for each other before its first collective (mesh.barrier_after_compile).
  synced_round = mesh_lib.barrier_after_compile(jitted_round, 'federated_round')

  def round_fn(server_state: ServerState, round_data: dict[str, jax.Array],
               rng: PRNGKey) -> tuple[ServerState, Metrics]:
    # Checked before jit, whose own sharding check gives a less clear error.
    _check_round_data(round_data, mesh)
    return synced_round(server_state, round_data, rng)

  round_fn.jitted = jitted_round  # for .lower(...).compile() (HLO, cost).
  return round_fn
