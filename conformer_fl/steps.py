"""The compiled steps of central and federated training (conformer_fl/train.py).

`make_central_train_step` / `jit_central_train_step`: one central step (loss,
gradient, optimizer update, divergence guard), data-parallel over the mesh.
`make_round_from_config`: the federated round of a run's config
(conformer_fl/federated/fl_round.py) and its server optimizer.

`launch/tpu_pod.py plan` (conformer_fl/tools/pod_plan.py) compiles these same
functions, so what it plans is what a run runs.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import optax

from conformer_fl.training import divergence
from conformer_fl import models
from conformer_fl import optimizers
from conformer_fl.federated import dropout as federated_dropout
from conformer_fl.federated import fl_round as round_lib
from conformer_fl.federated import mesh as mesh_lib
from conformer_fl.federated import tiers as tiers_lib

PyTree = Any
# (state, batch, seed_key, guard) -> (state, metrics, guard).
CentralStep = Callable[[PyTree, Mapping[str, jax.Array], jax.Array, PyTree],
                       tuple[PyTree, dict[str, jax.Array], PyTree]]


def make_central_train_step(model: models.ConformerASR,
                            optimizer: optax.GradientTransformation
                            ) -> CentralStep:
  """`train_step(state, batch, seed_key, guard) -> (state, metrics, guard)`.

  state: a plain dict pytree {'params', 'model_state', 'opt_state', 'step'
  (int32 [])}. batch: the arrays of `models.make_mean_loss_fn` ([B, ...]).
  metrics: {'loss': [], 'grad_norm': []} of the step.
  The step's rng is fold_in(seed_key, step), so a resumed run draws the same
  dropout and masks; seed_key = key(config.seed) is an argument, not a
  constant, so runs that differ only in the seed share the compiled step.
  guard: `divergence.init_guard()` at first; the step records in it the first
  step whose loss, gradient, parameters or optimizer state is not finite.
  """
  loss_fn = models.make_mean_loss_fn(model)

  def train_step(state, batch, seed_key, guard):
    rng = jax.random.fold_in(seed_key, state["step"])
    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["model_state"], batch, rng)
    updates, opt_state = optimizer.update(grads, state["opt_state"],
                                          state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(params=params, model_state=model_state,
                     opt_state=opt_state, step=state["step"] + 1)
    grad_norm = optax.global_norm(grads)
    flags = divergence.nonfinite_flags(loss, grad_norm, (params, model_state),
                                       opt_state)
    guard = divergence.update_guard(guard, new_state["step"], flags, loss)
    return new_state, dict(loss=loss, grad_norm=grad_norm), guard

  return train_step


def jit_central_train_step(model: models.ConformerASR,
                           optimizer: optax.GradientTransformation,
                           mesh: jax.sharding.Mesh) -> Any:
  """`make_central_train_step` jitted over `mesh`: batch split over devices.

  Arguments (state, batch [B, ...], seed key, divergence guard): state and
  guard donated; state, key and guard replicated; the batch's leading axis
  sharded over the mesh's `clients` axis. `launch/tpu_pod.py plan` compiles
  this same function.
  """
  replicated = mesh_lib.replicated_sharding(mesh)
  by_example = mesh_lib.client_sharding(mesh)
  return jax.jit(make_central_train_step(model, optimizer),
                 in_shardings=(replicated, by_example, replicated, replicated),
                 out_shardings=(replicated, replicated, replicated),
                 donate_argnums=(0, 3))


def make_round_from_config(
    config: ml_collections.ConfigDict, model: models.ConformerASR,
    params: PyTree, model_state: PyTree, mesh: jax.sharding.Mesh,
) -> tuple[Any, optax.GradientTransformation]:
  """(round_fn, server optimizer) of a federated run's config.

  round_fn is `round_lib.make_federated_round` of the config's client and
  server optimizers (conformer_fl/optimizers.py), update clipping, logged
  units and Federated Dropout (with capacity tiers: each tier's sub-model).
  `params` and `model_state` may be abstract (jax.ShapeDtypeStruct): only
  their structure and shapes are read.
  `launch/tpu_pod.py plan` builds the round through this function too, so
  what it compiles is what a run runs.
  """
  f = config.federated
  server_optimizer = optimizers.server_optimizer_from_config(
      f.server_optimizer)
  client_optimizer = optimizers.client_optimizer_from_config(
      f.client_optimizer)
  units = models.list_units(params, granularity=f.unit_granularity)
  droppable = models.droppable_modules_from_config(config.model)

  def submodel_loss(spec):
    """The loss of the sub-model at spec's widths (None: the full model)."""
    return None if spec is None else models.make_mean_loss_fn(
        models.build_model(config.model, kept_units=spec.kept_units,
                           rescale_kept=f.dropout.get("rescale", False)))

  # Capacity tiers, else one Federated Dropout spec (None: the full model).
  tier_specs = federated_dropout.tier_specs_from_config(
      f.dropout, params, model_state, droppable, f.clients_per_round)
  submodel = tiers = None
  if tier_specs is None:
    submodel = federated_dropout.dropout_spec_from_config(
        f.dropout, params, model_state, droppable)
  else:
    tiers = [tiers_lib.Tier(count, spec, submodel_loss(spec))
             for count, spec in tier_specs]
  round_fn = round_lib.make_federated_round(
      models.make_mean_loss_fn(model), client_optimizer, server_optimizer,
      mesh, clip_update_norm=f.clip_update_norm or None, unit_paths=units,
      submodel=submodel, submodel_loss_fn=submodel_loss(submodel),
      aggregation_weight=f.aggregation_weight, tiers=tiers)
  return round_fn, server_optimizer

