"""Central and federated training loops, each around one compiled step.

`train_and_evaluate(config, workdir)` runs `config.mode`:
  central    Adam with warm-up and inverse-square-root decay over batches of the
             training split (the paper's pre-training stage), data-parallel over
             every device of every process.
  federated  rounds of `conformer_fl.federated.round`: clients (speakers) sampled
             per round, trained under vmap, sharded over the `clients` mesh axis,
             aggregated and applied by the server optimizer in one jitted function.

Both write the workdir CONTRACT: `config.json`, `metrics.jsonl` (key `step` or
`round`), TensorBoard events, `checkpoints/` (orbax; step 0 is the initial state),
and the tokenizer the run used (`tokenizer.model` for sentencepiece). Both resume by
themselves from the latest intact checkpoint of the workdir, and the resumed run ends
with the same parameters as an uninterrupted one: every random choice is a function
of (seed, step or round), never of how far this process has run.

Faults (see the README's "When a run fails"): before writing anything a run checks
that the workdir is a directory and that its config.json allows this config
(`conformer_fl.workdir.RESUMABLE_FIELDS`), then process 0 takes the workdir lock;
checkpoints are verified on restore with a fallback to the newest intact step
(`checkpointing.CheckpointStore.restore_latest_intact`); the logs are trimmed to the
restored step; and the divergence guard (`conformer_fl.divergence`) stops a run
whose loss, gradient or state is not finite before anything non-finite is saved.
"""

from collections.abc import Iterator
import contextlib
import dataclasses
import os
import time
from typing import Any

from absl import logging
from etils import epath
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from conformer_fl import checkpointing
from conformer_fl import divergence
from conformer_fl import evaluation
from conformer_fl import metric_logging
from conformer_fl import models
from conformer_fl import workdir as workdir_lib
from conformer_fl.data import clients as clients_lib
from conformer_fl.data import input_pipeline
from conformer_fl.data import tokenizer as tokenizer_lib
from conformer_fl.federated import dropout as federated_dropout
from conformer_fl.federated import mesh as mesh_lib
from conformer_fl.federated import round as round_lib
from conformer_fl.federated import server_optimizers

PyTree = Any
MODES = ("central", "federated", "analysis", "experiment")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs `config.mode` in `workdir`.

  central / federated return the final params (host numpy); analysis (the layer
  importance pass over a finished run, `conformer_fl.analysis`) returns its
  results; experiment (pre-training, analysis and federated arms in
  sub-directories, `conformer_fl.experiment`) returns its summary.

  Raises:
    workdir.RunError: a run refused or stopped for a reason its one-line
      message names (see `train_central`).
  """
  if config.mode == "central":
    return train_central(config, workdir)
  if config.mode == "federated":
    return train_federated(config, workdir)
  if config.mode == "analysis":
    from conformer_fl import analysis  # pylint: disable=g-import-not-at-top
    return analysis.run_analysis(config, workdir)
  if config.mode == "experiment":
    from conformer_fl import experiment  # pylint: disable=g-import-not-at-top
    return experiment.run_experiment(config, workdir)
  raise ValueError(f"config.mode must be one of {MODES}, got {config.mode!r}")


# ----------------------------------------------------------------------------
# Set-up shared by both modes.


@dataclasses.dataclass
class Run:
  """What both loops need: the resolved config, model, tokenizer and outputs."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  model: models.ConformerASR
  tokenizer: tokenizer_lib.Tokenizer
  store: checkpointing.CheckpointStore
  logger: metric_logging.MetricsLogger


def _is_chief() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _tokenizer(config: ml_collections.ConfigDict, workdir: epath.Path,
               init_workdir: str) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, trained (or copied from `init_workdir`) by process 0."""
  saved = workdir / "tokenizer.model"
  if init_workdir and not saved.exists() and _is_chief():
    source = epath.Path(init_workdir) / "tokenizer.model"
    if source.exists():
      source.copy(saved)
  if _is_chief():
    tokenizer = input_pipeline.get_tokenizer(config.data, os.fspath(workdir))
  _sync("tokenizer")
  if not _is_chief():
    tokenizer = input_pipeline.get_tokenizer(config.data, os.fspath(workdir))
  return tokenizer


def _raise_on_every_process(error: Exception | None, what: str) -> None:
  """Raises `error` (process 0's) here, or on the other processes a stand-in."""
  failed = error is not None
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
  if error is not None:
    raise error
  if failed:
    raise workdir_lib.WorkdirError(f"Process 0 could not {what}; see its log.")


def _warn(message: str) -> None:
  if _is_chief():
    workdir_lib.warn(message)


@contextlib.contextmanager
def _open_run(config: ml_collections.ConfigDict, workdir: str, step_key: str,
              init_workdir: str = "") -> Iterator[Run]:
  """The run in `workdir`, its lock held by process 0 until the `with` ends.

  Nothing is written to the workdir until it is known to be a directory whose
  config.json (if any) differs from `config` in resumable fields only, and the
  lock is held. A `DivergenceError` or `CheckpointError` raised in the `with`
  body ends metrics.jsonl with a `stopped` record.
  """
  workdir_lib.check_is_directory(workdir)
  workdir_lib.check_config(workdir, config)
  lock = workdir_lib.WorkdirLock(workdir)
  error = None
  if _is_chief():
    try:
      lock.acquire()
    except workdir_lib.WorkdirError as e:
      error = e
  _raise_on_every_process(error, f"take the lock of {workdir}")
  try:
    workdir = epath.Path(workdir)
    if _is_chief():
      workdir.mkdir(parents=True, exist_ok=True)
    _sync("workdir")
    tokenizer = _tokenizer(config, workdir, init_workdir)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      # The decoder's output size is the tokenizer's vocabulary (blank included).
      config.model.vocab_size = tokenizer.vocab_size
    model = models.build_model(config.model)
    if _is_chief():
      workdir_lib.write_atomically(workdir / workdir_lib.CONFIG_FILE,
                                   config.to_json_best_effort(indent=2))
    run = Run(config, workdir, model, tokenizer,
              checkpointing.CheckpointStore(os.fspath(workdir)),
              metric_logging.MetricsLogger(os.fspath(workdir), step_key))
    try:
      yield run
    except (divergence.DivergenceError, checkpointing.CheckpointError) as e:
      step = e.step if e.step is not None else (run.store.latest_step() or 0)
      run.logger.write_stopped(step, str(e))
      raise
    finally:
      run.logger.close()
      run.store.close()
  finally:
    lock.release()


def init_variables(model: models.ConformerASR, seed: int) -> dict[str, PyTree]:
  """The model's initial variables ({'params': ..., ['batch_stats': ...]})."""
  audio = jnp.zeros((1, 16000), jnp.float32)
  labels = jnp.ones((1, 8), jnp.int32)
  init = jax.jit(lambda rng: model.init(
      rng, audio, jnp.zeros_like(audio), labels, jnp.zeros(labels.shape),
      train=False))
  return flax.core.unfreeze(init(jax.random.key(seed)))


def split_variables(variables: dict[str, PyTree]) -> tuple[PyTree, PyTree]:
  """(params, model_state): model_state holds the rest, e.g. batch_stats."""
  variables = dict(variables)
  return variables.pop("params"), variables


def make_mean_loss_fn(model: models.ConformerASR):
  """`loss_fn(params, model_state, batch, rng) -> (mean loss, new_model_state)`.

  The mean is over the real examples of the batch (`batch['example_mask']` [B]);
  a batch with none has loss 0. This is the function the federated round sees.
  """

  def loss_fn(params, model_state, batch, rng):
    per_example, new_state = models.per_example_loss(
        model, {"params": params, **model_state}, batch, train=True, rng=rng)
    mask = batch["example_mask"]
    loss = jnp.sum(jnp.where(mask > 0, per_example, 0.0)) / jnp.maximum(
        jnp.sum(mask), 1.0)
    return loss, {**model_state, **new_state}

  return loss_fn


def _eval_batches(run: Run, domains) -> list[dict[str, np.ndarray]]:
  """The eval split as padded batches, read once and kept (small eval sets)."""
  batches = list(input_pipeline.get_eval_batches(
      run.config.data, run.tokenizer, domains=domains))
  limit = run.config.eval_max_batches
  return batches[:limit] if limit else batches


def _local_copy(tree: PyTree) -> PyTree:
  """Host numpy copy of a replicated pytree (works across processes too)."""
  return jax.tree.map(
      lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
      else np.asarray(x), tree)


def _evaluate(run: Run, eval_step, variables, batches, step: int) -> dict[str, float]:
  metrics, examples = evaluation.evaluate(
      eval_step, variables, batches, run.tokenizer.decode)
  run.logger.write_samples(step, examples[:3])
  return {f"eval/{k}": v for k, v in metrics.items()}


# ----------------------------------------------------------------------------
# Central training.


def learning_rate_schedule(peak: float, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up to `peak` over `warmup_steps`, then peak * sqrt(warmup / step)."""
  if warmup_steps < 1:
    raise ValueError(f"central.warmup_steps must be >= 1, got {warmup_steps}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32) + 1.0
    return peak * jnp.minimum(step / warmup_steps, jnp.sqrt(warmup_steps / step))

  return schedule


def freeze_units(optimizer: optax.GradientTransformation, params: PyTree,
                 frozen: tuple[str, ...],
                 granularity: str = "module") -> optax.GradientTransformation:
  """`optimizer` on every unit but `frozen` (unit names), whose weights never change.

  Raises:
    ValueError: a name that is not a unit of the model.
  """
  if not frozen:
    return optimizer
  units = models.list_units(params, granularity=granularity)
  unknown = sorted(set(frozen) - set(units))
  if unknown:
    raise ValueError(f"Unknown units to freeze {unknown}; the model's units at"
                     f" granularity {granularity!r} are {list(units)}")
  labels = jax.tree.map(lambda _: "train", params)
  for name in frozen:
    labels = models.set_unit(labels, units[name], jax.tree.map(
        lambda _: "frozen", models.get_unit(labels, units[name])))
  return optax.multi_transform(
      {"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def make_central_optimizer(c: ml_collections.ConfigDict,
                           params: PyTree) -> optax.GradientTransformation:
  """Adam (b1, b2, eps), warm-up / rsqrt schedule, norm clipping, frozen units."""
  schedule = learning_rate_schedule(c.peak_learning_rate, c.warmup_steps)
  optimizer = optax.adam(schedule, b1=c.b1, b2=c.b2, eps=c.eps)
  if c.clip_grad_norm:
    optimizer = optax.chain(optax.clip_by_global_norm(c.clip_grad_norm), optimizer)
  return freeze_units(optimizer, params, tuple(c.frozen_units))


def make_central_train_step(model, optimizer):
  """`train_step(state, batch, seed_key, guard) -> (state, metrics, guard)`.

  state: a plain dict pytree {'params', 'model_state', 'opt_state', 'step'}.
  The step's rng is fold_in(seed_key, step), so a resumed run draws the same
  dropout and masks; seed_key = key(config.seed) is an argument, not a
  constant, so runs that differ only in the seed share the compiled step.
  guard: `divergence.init_guard()` at first; the step records in it the first
  step whose loss, gradient, parameters or optimizer state is not finite.
  """
  loss_fn = make_mean_loss_fn(model)

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


def train_central(config: ml_collections.ConfigDict, workdir: str) -> PyTree:
  """Central training of `config.central.num_steps` steps (module docstring).

  Raises:
    workdir.RunError: the workdir refuses the run (a file, another config, a
      lock); no intact checkpoint (`checkpointing.CheckpointError`); the
      training diverged (`divergence.DivergenceError`).
  """
  with _open_run(config, workdir, "step") as run:
    return _train_central(run)


def _train_central(run: Run) -> PyTree:
  c = run.config.central
  # The one-axis device mesh of federated rounds; here examples are sharded
  # over it the way clients are in a round.
  mesh = mesh_lib.make_client_mesh()
  replicated = mesh_lib.replicated_sharding(mesh)
  if run.config.data.batch_size % jax.device_count():
    raise ValueError(
        f"data.batch_size={run.config.data.batch_size} must divide over the"
        f" {jax.device_count()} devices (central training is data-parallel).")

  params, model_state = split_variables(init_variables(run.model, run.config.seed))
  optimizer = make_central_optimizer(c, params)
  state = dict(params=params, model_state=model_state,
               opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
  state = mesh_lib.replicate(state, mesh)
  start, restored = run.store.restore_latest_intact(like=state, report=_warn)
  if start is None:
    start = 0
    run.store.save(0, state)
  else:
    logging.info("Resuming from step %d.", start)
    state = restored
  run.logger.drop_after(start)
  last_saved = start

  # Multi-process: compiled, then a barrier, before its first collective.
  train_step = mesh_lib.barrier_after_compile(
      jit_central_train_step(run.model, optimizer, mesh), "central_step")
  guard = mesh_lib.replicate(divergence.init_guard(), mesh)
  seed_key = jax.device_put(jax.random.key(run.config.seed), replicated)
  eval_step = jax.jit(evaluation.make_eval_step(run.model))
  eval_batches = _eval_batches(run, None)
  batches = input_pipeline.get_train_batches(
      run.config.data, run.tokenizer, seed=run.config.seed, start_step=start)

  progress = tqdm.tqdm(total=c.num_steps, initial=start, desc="central",
                       disable=not _is_chief(), dynamic_ncols=True)
  tic, logged_step = time.perf_counter(), start
  try:
    for step in range(start + 1, c.num_steps + 1):
      batch = next(batches)
      # Every process reads the global batch and places its own rows.
      first, last = mesh_lib.process_client_range(batch["audio"].shape[0], mesh)
      batch = {k: v[first:last] for k, v in batch.items()}
      state, metrics, guard = train_step(
          state, mesh_lib.shard_round_data(batch, mesh), seed_key, guard)
      progress.update(1)
      log = step % c.log_every == 0 or step == c.num_steps
      evaluate = step % c.eval_every == 0 or step == c.num_steps
      save = step % c.checkpoint_every == 0 or step == c.num_steps
      if log or evaluate or save:
        # The guard is read with the metrics (no host sync of its own) and
        # before every save: nothing non-finite is evaluated, logged or saved.
        metrics, guard_now = jax.device_get((metrics, guard))
        divergence.check_guard(guard_now, last_saved)
      if log or evaluate:
        elapsed = time.perf_counter() - tic
        metrics["steps_per_second"] = (step - logged_step) / elapsed
        tic, logged_step = time.perf_counter(), step
        progress.set_postfix(loss=f"{metrics['loss']:.3f}")
        if evaluate:
          variables = {"params": _local_copy(state["params"]),
                       **_local_copy(state["model_state"])}
          metrics.update(_evaluate(run, eval_step, variables, eval_batches,
                                   step))
          logging.info("step %d: %s", step, metrics)
          tic = time.perf_counter()  # Evaluation time is not training time.
        run.logger.write(step, metrics)
      if save:
        run.store.save(step, state)
        last_saved = step
  finally:
    progress.close()
  return _local_copy(state["params"])


# ----------------------------------------------------------------------------
# Federated training.


def _initial_variables(run: Run) -> dict[str, PyTree]:
  """Random init, or the params of `federated.init_workdir`'s checkpoint."""
  f = run.config.federated
  variables = init_variables(run.model, run.config.seed)
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


def round_arrays(config: ml_collections.ConfigDict, client_datasets, sampler,
                 round_index: int,
                 mesh: jax.sharding.Mesh | None = None
                 ) -> dict[str, np.ndarray]:
  """Round `round_index`'s arrays [C, K, B, ...] of a federated run's config.

  With a mesh, only this process's block of clients [C / P, K, B, ...].
  """
  f = config.federated
  client_ids = sampler.sample(round_index)
  client_range = (None if mesh is None else
                  mesh_lib.process_client_range(len(client_ids), mesh))
  return clients_lib.make_round_data(
      [client_datasets.examples[c] for c in client_ids], client_ids, round_index,
      config.seed, local_steps=f.local_steps, batch_size=f.client_batch_size,
      buckets=client_datasets.buckets, local_epochs=f.local_epochs or None,
      fixed_shape=f.fixed_round_shape, client_range=client_range)


def train_federated(config: ml_collections.ConfigDict, workdir: str) -> PyTree:
  """Federated training of `config.federated.rounds` rounds (module docstring).

  Raises:
    workdir.RunError: as `train_central`.
  """
  with _open_run(config, workdir, "round",
                 init_workdir=config.federated.init_workdir) as run:
    return _train_federated(run)


def jit_central_train_step(model: models.ConformerASR,
                           optimizer: optax.GradientTransformation,
                           mesh: jax.sharding.Mesh) -> Any:
  """`make_central_train_step` jitted over `mesh`: batch split over devices.

  Arguments (state, batch, seed key, divergence guard): state and guard
  donated; state, key and guard replicated. `launch/tpu_pod.py plan` compiles
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
  """round_fn (`round_lib.make_federated_round`) of a run's config, and its
  server optimizer.

  `params` and `model_state` may be abstract (jax.ShapeDtypeStruct): only
  their structure and shapes are read. `launch/tpu_pod.py plan` builds the
  round through this function too, so what it compiles is what a run runs.
  """
  f = config.federated
  server_optimizer = server_optimizers.server_optimizer_from_config(
      f.server_optimizer)
  client_optimizer = server_optimizers.client_optimizer_from_config(
      f.client_optimizer)
  units = models.list_units(params, granularity=f.unit_granularity)
  # Federated Dropout and frozen units; None trains the full model.
  submodel = federated_dropout.dropout_spec_from_config(
      f.dropout, params, model_state,
      models.droppable_modules_from_config(config.model))
  round_fn = round_lib.make_federated_round(
      make_mean_loss_fn(model), client_optimizer, server_optimizer, mesh,
      clip_update_norm=f.clip_update_norm or None, unit_paths=units,
      submodel=submodel, aggregation_weight=f.aggregation_weight)
  return round_fn, server_optimizer


def _train_federated(run: Run) -> PyTree:
  f = run.config.federated
  mesh = mesh_lib.make_client_mesh()
  mesh_lib.check_clients_divisible(f.clients_per_round, mesh)

  params, model_state = split_variables(_initial_variables(run))
  round_fn, server_optimizer = make_round_from_config(
      run.config, run.model, params, model_state, mesh)

  state = mesh_lib.replicate(
      round_lib.init_server_state(params, model_state, server_optimizer), mesh)
  start, restored = run.store.restore_latest_intact(
      like=flax.serialization.to_state_dict(state), report=_warn)
  if start is None:
    start = 0
    run.store.save(0, flax.serialization.to_state_dict(state))
  else:
    logging.info("Resuming from round %d.", start)
    state = flax.serialization.from_state_dict(state, restored)
  run.logger.drop_after(start)
  last_saved = start
  state_is_finite = jax.jit(divergence.all_finite)

  client_datasets = input_pipeline.get_client_datasets(run.config.data,
                                                       run.tokenizer)
  if _is_chief():
    table, _ = clients_lib.client_size_report(
        client_datasets.sizes(), os.fspath(run.workdir / "clients"))
    logging.info("Client sizes:\n%s", table)
  sampler = clients_lib.ClientSampler(client_datasets.client_ids,
                                      f.clients_per_round, run.config.seed)
  eval_step = jax.jit(evaluation.make_eval_step(run.model))
  eval_batches = _eval_batches(run, None)
  rng = jax.random.key(run.config.seed)

  progress = tqdm.tqdm(total=f.rounds, initial=start, desc="federated",
                       disable=not _is_chief(), dynamic_ncols=True)
  try:
    for round_index in range(start, f.rounds):
      tic = time.perf_counter()
      data = mesh_lib.shard_round_data(
          round_arrays(run.config, client_datasets, sampler, round_index,
                       mesh), mesh)
      state, metrics = round_fn(state, data, rng)
      # The round's metrics are read every round anyway: the guard costs no
      # extra host sync.
      metrics, finite = jax.device_get((metrics, state_is_finite(
          (state.params, state.model_state, state.opt_state))))
      done = round_index + 1
      metrics["clients_per_second"] = (
          f.clients_per_round / (time.perf_counter() - tic))
      progress.update(1)
      progress.set_postfix(loss=f"{metrics['loss']:.3f}",
                           clients_s=f"{metrics['clients_per_second']:.2f}")
      try:
        divergence.check_round(done, metrics, bool(finite), last_saved)
      except divergence.DivergenceError:
        run.logger.write(done, metrics)  # The round that stopped the run.
        raise
      if done % f.eval_every == 0 or done == f.rounds:
        variables = {"params": _local_copy(state.params),
                     **_local_copy(state.model_state)}
        metrics.update(_evaluate(run, eval_step, variables, eval_batches, done))
        logging.info("round %d: %s", done, {k: v for k, v in metrics.items()
                                            if not k.startswith("update_norm/")})
      if done % f.log_every == 0 or done == f.rounds or "eval/wer" in metrics:
        run.logger.write(done, metrics)
      if done % f.checkpoint_every == 0 or done == f.rounds:
        run.store.save(done, flax.serialization.to_state_dict(state))
        last_saved = done
  finally:
    progress.close()
  return _local_copy(state.params)
