"""Central and federated training: their set-up and steps around one loop.

`conformer_fl/main.py` runs `train_central` or `train_federated` by `config.mode`:
  central    Adam with warm-up and inverse-square-root decay over batches of the
             training split (the paper's pre-training stage), data-parallel over
             every device of every process.
  federated  rounds of `conformer_fl.federated.fl_round`: clients (speakers) sampled
             per round, trained under vmap, sharded over the `clients` mesh axis,
             aggregated and applied by the server optimizer in one jitted function.

Each builds its initial state and its step (`conformer_fl.steps`, optimizers
from `conformer_fl.optimizers`) and hands them to the loop of
`conformer_fl.training`: the run opened in its workdir (`training.run_setup`),
the state restored or saved (`training.state`) and the cadence of log / eval /
checkpoint with the progress bar (`training.loop`).

Both write the workdir CONTRACT: `config.json`, `metrics.jsonl` (key `step` or
`round`), TensorBoard events, `checkpoints/` (orbax; step 0 is the initial state),
and the tokenizer the run used (`tokenizer.model` for sentencepiece). Both resume by
themselves from the latest intact checkpoint of the workdir, and the resumed run ends
with the same parameters as an uninterrupted one: every random choice is a function
of (seed, step or round), never of how far this process has run.

Faults (see docs/running.md, "When a run fails"): before writing anything a run checks
that the workdir is a directory and that its config.json allows this config
(`conformer_fl.workdir.RESUMABLE_FIELDS`), then process 0 takes the workdir lock;
checkpoints are verified on restore with a fallback to the newest intact step
(`checkpointing.CheckpointStore.restore_latest_intact`); the logs are trimmed to the
restored step; the divergence guard (`conformer_fl.training.divergence`) stops a
run whose loss, gradient or state is not finite before anything non-finite is
saved, and its loss-explosion guard one whose logged loss stays far above its
running median (`config.loss_guard`), moving the checkpoints of the explosion aside.
"""

import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from conformer_fl import checkpointing
from conformer_fl import models
from conformer_fl import multihost
from conformer_fl import optimizers
from conformer_fl import steps
from conformer_fl.data import client_sizes
from conformer_fl.data import federated as federated_data
from conformer_fl.data import input_pipeline
from conformer_fl.federated import fl_round as round_lib
from conformer_fl.federated import mesh as mesh_lib
from conformer_fl.training import divergence
from conformer_fl.training import loop
from conformer_fl.training import run_setup
from conformer_fl.training import state as state_lib

PyTree = Any


# ----------------------------------------------------------------------------
# Central training.


def train_central(config: ml_collections.ConfigDict, workdir: str) -> PyTree:
  """Central training of `config.central.num_steps` steps (module docstring).

  Raises:
    workdir.RunError: the workdir refuses the run (a file, another config, a
      lock); no intact checkpoint (`checkpointing.CheckpointError`); the
      training diverged (`divergence.DivergenceError`).
  """
  with run_setup.open_run(config, workdir, "step") as run:
    return _train_central(run)


def _train_central(run: run_setup.Run) -> PyTree:
  c = run.config.central
  # The one-axis device mesh of federated rounds; here examples are sharded
  # over it the way clients are in a round.
  mesh = mesh_lib.make_client_mesh(c.get("num_devices") or None)
  if run.config.data.batch_size % mesh.size:
    raise ValueError(
        f"data.batch_size={run.config.data.batch_size} must divide over the"
        f" {mesh.size} devices (central training is data-parallel).")

  params, model_state = models.split_variables(
      models.init_variables(run.model, run.config.seed))
  optimizer = optimizers.make_central_optimizer(c, params)
  state = dict(params=params, model_state=model_state,
               opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
  state, checkpoints = state_lib.resume(
      run, mesh_lib.replicate(state, mesh), state_lib.AS_IS)

  # Multi-process: compiled, then a barrier, before its first collective.
  train_step = mesh_lib.barrier_after_compile(
      steps.jit_central_train_step(run.model, optimizer, mesh), "central_step")
  # The divergence guard, carried on the device from step to step.
  guard = mesh_lib.replicate(divergence.init_guard(), mesh)
  seed_key = mesh_lib.replicate(jax.random.key(run.config.seed), mesh)
  batches = input_pipeline.get_train_batches(
      run.config.data, run.tokenizer, seed=run.config.seed,
      start_step=checkpoints.start)

  def step(state: PyTree, index: int) -> tuple[PyTree, dict[str, jax.Array]]:
    del index  # The batches and the state's step count follow the loop.
    nonlocal guard
    batch = next(batches)
    # Every process reads the global batch and places its own rows.
    first, last = mesh_lib.process_client_range(batch["audio"].shape[0], mesh)
    batch = {k: v[first:last] for k, v in batch.items()}
    state, metrics, guard = train_step(
        state, mesh_lib.shard_round_data(batch, mesh), seed_key, guard)
    return state, metrics

  def read(state: PyTree, metrics: dict[str, jax.Array], index: int,
           saved: state_lib.Checkpoints) -> dict[str, Any]:
    del state, index
    # The guard is read with the metrics (no host sync of its own) and
    # before every save: nothing non-finite is evaluated, logged or saved.
    metrics, guard_now = jax.device_get((metrics, guard))
    divergence.check_guard(guard_now, saved.last_saved, saved.unverified)
    return metrics

  mode = loop.Mode(
      name="central", step=step, read=read,
      variables=lambda state: (state["params"], state["model_state"]),
      explosion_fix="try e.g. a lower central.peak_learning_rate",
      rate_name="steps_per_second")
  cadence = loop.Cadence(c.num_steps, c.log_every, c.eval_every,
                         c.checkpoint_every)
  state = loop.train(run, mode, state, checkpoints, cadence)
  return run_setup.local_copy(state["params"])


# ----------------------------------------------------------------------------
# Federated training.


def _initial_variables(run: run_setup.Run) -> dict[str, PyTree]:
  """Random init, or the params of `federated.init_workdir`'s checkpoint."""
  f = run.config.federated
  variables = models.init_variables(run.model, run.config.seed)
  if not f.init_workdir:
    return variables
  store = checkpointing.CheckpointStore(f.init_workdir, read_only=True)
  step = store.latest_step() if f.init_step < 0 else f.init_step
  if step is None:
    raise FileNotFoundError(
        f"federated.init_workdir={f.init_workdir!r} has no checkpoint.")
  saved = store.restore_variables(step)
  try:
    restored = jax.tree.map(
        lambda x, y: np.asarray(y, x.dtype).reshape(x.shape), variables, saved)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"The checkpoint {f.init_workdir} step {step} does not fit this model"
        f" config ({e}): pre-train with the same config.model.") from e
  logging.info("Initialized from %s step %d.", f.init_workdir, step)
  return restored


def train_federated(config: ml_collections.ConfigDict, workdir: str) -> PyTree:
  """Federated training of `config.federated.rounds` rounds (module docstring).

  Raises:
    workdir.RunError: as `train_central`.
  """
  with run_setup.open_run(config, workdir, "round",
                          init_workdir=config.federated.init_workdir) as run:
    return _train_federated(run)


# The last round built, by everything it depends on (the model and federated
# configs, the mesh): runs of one process that differ only in their seed (the
# experiment's seeds of one arm) reuse its compiled program instead of tracing
# and compiling it again. The round's randomness is an argument, not a constant.
_last_round: dict[tuple[str, str, tuple[int, ...]], Any] = {}


def _round_from_config(config: ml_collections.ConfigDict, model, params,
                       model_state, mesh: jax.sharding.Mesh):
  """`steps.make_round_from_config`, reused from the previous run if equal."""
  key = (config.model.to_json_best_effort(sort_keys=True),
         config.federated.to_json_best_effort(sort_keys=True),
         tuple(int(d.id) for d in mesh.devices.flat))
  if key not in _last_round:
    _last_round.clear()
    _last_round[key] = steps.make_round_from_config(
        config, model, params, model_state, mesh)
  return _last_round[key]


def _train_federated(run: run_setup.Run) -> PyTree:
  f = run.config.federated
  mesh = mesh_lib.make_client_mesh()
  mesh_lib.check_clients_divisible(f.clients_per_round, mesh)

  params, model_state = models.split_variables(_initial_variables(run))
  round_fn, server_optimizer = _round_from_config(
      run.config, run.model, params, model_state, mesh)
  state = mesh_lib.replicate(
      round_lib.init_server_state(params, model_state, server_optimizer), mesh)
  state, checkpoints = state_lib.resume(run, state, state_lib.STATE_DICT)
  state_is_finite = jax.jit(divergence.all_finite)

  client_datasets = federated_data.get_client_datasets(run.config.data,
                                                       run.tokenizer)
  if multihost.is_chief():
    table, _ = client_sizes.client_size_report(
        client_datasets.sizes(), os.fspath(run.workdir / "clients"))
    logging.info("Client sizes:\n%s", table)
  sampler = federated_data.ClientSampler(client_datasets.client_ids,
                                         f.clients_per_round, run.config.seed)
  rng = jax.random.key(run.config.seed)

  def step(state: round_lib.ServerState,
           index: int) -> tuple[round_lib.ServerState, dict[str, jax.Array]]:
    data = federated_data.build_round(run.config, client_datasets, sampler,
                                      index - 1, mesh)
    return round_fn(state, mesh_lib.shard_round_data(data, mesh), rng)

  def read(state: round_lib.ServerState, metrics: dict[str, jax.Array],
           index: int, saved: state_lib.Checkpoints) -> dict[str, Any]:
    # The round's metrics are read every round anyway: the guard costs no
    # extra host sync.
    metrics, finite = jax.device_get((metrics, state_is_finite(
        (state.params, state.model_state, state.opt_state))))
    try:
      divergence.check_round(index, metrics, bool(finite), saved.last_saved,
                             saved.unverified)
    except divergence.DivergenceError:
      run.logger.write(index, metrics)  # The round that stopped the run.
      raise
    return metrics

  mode = loop.Mode(
      name="federated", step=step, read=read,
      variables=lambda state: (state.params, state.model_state),
      explosion_fix=(
          "try e.g. a lower federated.client_optimizer.learning_rate or"
          " federated.server_optimizer.learning_rate"),
      rate_name="clients_per_second", per_step=f.clients_per_round)
  cadence = loop.Cadence(f.rounds, f.log_every, f.eval_every,
                         f.checkpoint_every, read_every=1)
  state = loop.train(run, mode, state, checkpoints, cadence)
  return run_setup.local_copy(state.params)
