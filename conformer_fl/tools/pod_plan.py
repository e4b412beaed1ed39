r"""Plans a run for a TPU pod slice on a machine without one: HBM and FLOPs.

`launch/tpu_pod.py plan --topology=v5e:2x2 -- --config=... [--config.X=V]`
reads the config exactly as `python -m conformer_fl.main` does, builds the
run's step with the run's own functions (the federated round of
`conformer_fl.federated.fl_round`, the central step of `conformer_fl.steps`, the
analysis pass's vmapped evaluation of `conformer_fl.analysis.variant_eval`),
lowers it with `jax.ShapeDtypeStruct`s placed on a mesh of the topology's
compile-only devices (`jax.experimental.topologies`, which needs the `libtpu`
package: `pip install -e '.[tpu-plan]'`), and compiles it for that TPU. No
array is made and no TPU is touched. From the executable:

  HBM per chip  `memory_analysis()`: arguments + outputs - donated (aliased)
                + temporaries + code, against the chip's capacity
                (`CHIP_HBM_GIB`: JAX's compile-only devices have no
                `memory_stats`).
  FLOPs         `cost_analysis()['flops']` of the per-chip program (XLA counts
                a loop body once: see `LOOP_NOTE`).

Then it searches the largest per-chip count that fits (clients per chip for a
round, examples per chip for a central step, variants per call for the
analysis): up from the config's count by scaling HBM to the capacity, then
by bisection (`_next_count`), within a number of compilations; and refuses
(`PlanError`, naming the config field) a config whose count does not divide
over the chips or does not fit.

A round with capacity tiers (`federated.dropout.tiers`) compiles as the run
builds it, each tier vmapped at its own static widths inside the one round;
the plan prints each tier's clients per chip and the units its thinned
layers keep (`tier_lines`), and does not search (the tiers fix each tier's
clients).

Shapes: the longest bucket of `config.data.bucket_seconds` (the largest round
or batch the run can meet), the vocabulary of the config's tokenizer (as
`conformer_fl.training.run_setup` sets it from the tokenizer), random-init parameters (a
checkpoint has the same shapes).

Run it with JAX on the CPU (`JAX_PLATFORMS=cpu`, which `plan` sets when
unset): with libtpu installed and JAX free to choose, the first concrete array
would start a TPU backend. `--topology=cpu` plans on the local CPU devices
instead (no capacity, no search): the tests compare its lowering with the
run's, and docs/tpu_pods.md its FLOPs with a TPU's.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
import os
import re
import time
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from conformer_fl.training import divergence
from conformer_fl import models
from conformer_fl import optimizers
from conformer_fl import steps
from conformer_fl import workdir as workdir_lib
from conformer_fl.analysis import variant_eval
from conformer_fl.data import batching
from conformer_fl.data import federated as federated_data
from conformer_fl.data import input_pipeline
from conformer_fl.data import tokenizer as tokenizer_lib
from conformer_fl.federated import dropout as federated_dropout
from conformer_fl.federated import fl_round as round_lib
from conformer_fl.federated import mesh as mesh_lib

PyTree = Any
GIB = 2**30
EXTRA = "tpu-plan"
# HBM per chip, GiB, by the device_kind of a topology's devices (public chip
# specifications; JAX's compile-only devices do not report memory). The
# compiler's own limit is a little lower (v5e: "available HBM (15.75G)").
CHIP_HBM_GIB = {
    "TPU v4": 32,
    "TPU v5 lite": 16,   # v5e
    "TPU v5": 95,        # v5p
    "TPU v6 lite": 32,   # v6e (Trillium)
}
# One JAX device per chip: v4 and v5p pair their two TensorCores (megacore),
# as they run on a pod.
_CHIP_CONFIG = {"v4": "megacore", "v5p": "megacore"}
LOOP_NOTE = ("XLA's cost analysis counts the body of a loop (the round's"
             " lax.scan over local steps) once, not once per iteration.")
_MAX_PER_CHIP = 4096  # The search stops here ("at least").
_OOM = re.compile(r"RESOURCE_EXHAUSTED")
_OOM_USED = re.compile(r"Used ([0-9.]+)([KMGT]) of")
_OOM_AVAILABLE = re.compile(r"available HBM \(([0-9.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class PlanError(ValueError):
  """A config that cannot run on the topology; the message names the field."""


# ----------------------------------------------------------------------------
# The target.


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for.

  Attributes:
    name: the topology, e.g. "v5e:2x2", or "cpu".
    devices: one compile-only device per chip (or the local CPU devices).
    device_kind: e.g. "TPU v5 lite".
    hbm_bytes: HBM of one chip; None for the CPU (no capacity, no search).
  """
  name: str
  devices: tuple[Any, ...]
  device_kind: str
  hbm_bytes: int | None

  @property
  def num_chips(self) -> int:
    return len(self.devices)

  @property
  def num_hosts(self) -> int:
    return len({d.process_index for d in self.devices})


def get_target(topology: str) -> Target:
  """The devices of a TPU topology ("v5e:2x2", "v4:2x2x2") or "cpu".

  Raises:
    PlanError: libtpu is missing, the topology is unknown, or its chip has
      no known HBM capacity.
  """
  if jax.config.jax_platforms is None:
    # Before any backend starts: with libtpu installed JAX would look for a TPU.
    jax.config.update("jax_platforms", "cpu")
  if topology == "cpu":
    devices = tuple(jax.devices("cpu"))
    return Target("cpu", devices, devices[0].device_kind, None)
  generation = topology.split(":", 1)[0]
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise PlanError(
        f"Planning for TPU topology {topology!r} needs the libtpu package:"
        f" pip install -e '.[{EXTRA}]'.") from e
  # libtpu takes a lock file (/tmp/libtpu_lockfile) so that one process owns
  # a TPU; compiling for a topology uses none, so plans may run side by side.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    description = topologies.get_topology_desc(
        topology_name=topology, platform="tpu",
        chip_config_name=_CHIP_CONFIG.get(generation, "default"))
  except Exception as e:  # pylint: disable=broad-exception-caught
    text = str(e)
    raise PlanError(
        f"Unknown TPU topology {topology!r}: expected GENERATION:SHAPE such as"
        f" v5e:2x2, v5e:4x4, v4:2x2x1, v4:2x2x2, v5p:2x2x1, v6e:2x2"
        f" ({text.splitlines()[0] if text else type(e).__name__}).") from e
  devices = tuple(description.devices)
  kind = devices[0].device_kind
  if kind not in CHIP_HBM_GIB:
    raise PlanError(f"No HBM capacity known for {kind!r} ({topology}); known:"
                    f" {sorted(CHIP_HBM_GIB)}.")
  return Target(topology, devices, kind, CHIP_HBM_GIB[kind] * GIB)


# ----------------------------------------------------------------------------
# The run's config, read as conformer_fl.main reads it.


def parse_main_args(main_args: Sequence[str]
                    ) -> tuple[ml_collections.ConfigDict, str | None]:
  """(config, workdir) of `conformer_fl.main`'s flags.

  `--config=FILE[:ARG]`, `--config.FIELD=VALUE` overrides and `--workdir`
  (optional here) are parsed by the same `config_flags` definition as the
  entry point's, in a flag registry of their own.

  Raises:
    PlanError: a missing --config or a flag the entry point does not take.
  """
  argv = ["conformer_fl.main", *main_args]
  registry = flags.FlagValues()
  # sys_argv: config_flags reads the --config.FIELD overrides from it.
  config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                  flag_values=registry, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Directory of the run.",
                      flag_values=registry)
  try:
    registry(argv)
  except (flags.Error, ValueError, AttributeError, KeyError) as e:
    raise PlanError(f"Bad conformer_fl.main arguments {list(main_args)}:"
                    f" {e}") from e
  if registry.config is None:
    raise PlanError("The plan needs --config=configs/NAME.py[:ARG] (after --).")
  return registry.config, registry.workdir


def tokenizer_vocab_size(data_config: ml_collections.ConfigDict) -> int:
  """The vocabulary of the run's tokenizer (blank included), without data.

  A SentencePiece tokenizer is trained to exactly `tokenizer.vocab_size`
  pieces (`tokenizer_lib.build_tokenizer` refuses a saved one of another size).
  """
  if data_config.tokenizer.kind == "char":
    return tokenizer_lib.CharTokenizer().vocab_size
  return int(data_config.tokenizer.vocab_size)


def resolve_config(config: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """The config as `run_setup.open_run` resolves it: vocab_size from the
  tokenizer."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.vocab_size = tokenizer_vocab_size(config.data)
  return config


# ----------------------------------------------------------------------------
# Abstract values.


def _placed(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
  """`jax.ShapeDtypeStruct`s of `tree`'s leaves, placed with `sharding`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


def abstract_variables(model: models.ConformerASR, seed: int) -> PyTree:
  """Shapes of `models.init_variables(model, seed)` (nothing is computed)."""
  return jax.eval_shape(functools.partial(models.init_variables, model, seed))


def _longest_bucket(data_config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(S samples, U labels) of the config's longest bucket."""
  buckets = input_pipeline.buckets_from_config(data_config)
  return buckets.audio_lengths[-1], buckets.label_lengths[-1]


def abstract_round_data(config: ml_collections.ConfigDict, num_clients: int,
                        sharding: jax.sharding.Sharding
                        ) -> federated_data.RoundData:
  """RoundData [C, K, B, ...] of the longest bucket (`federated.build_round`).

  The arrays, dtypes and trailing axes come from
  `federated.make_round_data` itself, run for one client without examples,
  one step of one utterance; its leading axes [1, 1, 1] then become
  [C, K, B] (`round_data.RoundData`: [C], [C, K] or [C, K, B, ...]).
  """
  f = config.federated
  one = federated_data.make_round_data(
      [[]], ["plan"], 0, config.seed, local_steps=1, batch_size=1,
      buckets=input_pipeline.buckets_from_config(config.data),
      local_epochs=f.local_epochs or None, fixed_shape=True)
  leading = (num_clients, int(f.local_steps), int(f.client_batch_size))
  return jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(leading[:min(v.ndim, 3)] + v.shape[3:],
                                     v.dtype, sharding=sharding), one)


def abstract_batch(data_config: ml_collections.ConfigDict, batch_size: int,
                   sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """A padded batch [B, S] / [B, U] of the longest bucket (`pad_batch`)."""
  audio_length, label_length = _longest_bucket(data_config)
  one = batching.pad_batch([], audio_length, label_length, 1)
  return {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype,
                                  sharding=sharding) for k, v in one.items()}


def _abstract_key(seed: int, sharding: jax.sharding.Sharding) -> Any:
  return _placed(jax.eval_shape(lambda: jax.random.key(seed)), sharding)


# ----------------------------------------------------------------------------
# The steps: lower(count) for a per-chip count.


@dataclasses.dataclass(frozen=True)
class Step:
  """One of the run's compiled steps, as a function of a per-chip count.

  Attributes:
    name: "federated round", "central step" or "analysis evaluation".
    field: the config field that sets the count, e.g.
      "federated.clients_per_round".
    unit: what is counted per chip ("clients", "examples", "variants").
    requested: the field's value in the config (all chips together).
    divisor: chips the count is split over (1 when it runs on one chip).
    jitted: the run's jitted function.
    arguments: per-chip count -> its abstract arguments, placed on the
      target's devices.
    loop_trips: iterations of the loop XLA's cost analysis counts once (the
      round's lax.scan over K local steps), 1 for the other steps.
    details: lines `format_plan` prints about the step's shapes (a tiered
      round's tiers: `tier_lines`).
    searchable: whether the search for the most per chip may vary the count
      (not for a tiered round, whose tiers fix each tier's clients).
  """
  name: str
  field: str
  unit: str
  requested: int
  divisor: int
  jitted: Any
  arguments: Callable[[int], tuple[Any, ...]]
  loop_trips: int = 1
  details: tuple[str, ...] = ()
  searchable: bool = True

  def per_chip(self, total: int) -> int:
    return total // self.divisor

  def lower(self, per_chip: int) -> jax.stages.Lowered:
    return self.jitted.lower(*self.arguments(per_chip))

  def input_bytes(self, per_chip: int) -> int:
    """Bytes of the arguments on one chip (shards of the sharded ones)."""
    total = 0
    for x in jax.tree.leaves(self.arguments(per_chip)):
      shape = x.sharding.shard_shape(x.shape)
      total += math.prod(shape) * getattr(x.dtype, "itemsize", 8)
    return total


def _kept_widths(spec: Any) -> str:
  """A tier's kept units per layer kind: 'encoder/block_*/ffn1 96/128, ...'.

  Layers whose names differ only in the block index are one entry when they
  keep the same count.
  """
  widths: dict[str, list[str]] = {}
  for layer in spec.layers:
    key = re.sub(r"block_\d+", "block_*", layer.name)
    width = f"{layer.num_kept}/{layer.num_units}"
    if width not in widths.setdefault(key, []):
      widths[key].append(width)
  return ", ".join(f"{key} {' | '.join(value)}"
                   for key, value in widths.items())


def tier_lines(config: ml_collections.ConfigDict, params: PyTree,
               model_state: PyTree, num_chips: int) -> tuple[str, ...]:
  """The capacity tiers of a federated config, per chip; () without tiers.

  One line per tier of `federated.dropout.tiers` (each vmapped at its own
  static widths in the one compiled round): its fraction and width, its
  clients per chip and in all, and the units each thinned layer keeps.

  Raises:
    PlanError: tiers whose clients do not divide over the chips.
  """
  f = config.federated
  tier_specs = federated_dropout.tier_specs_from_config(
      f.dropout, params, model_state,
      models.droppable_modules_from_config(config.model),
      int(f.clients_per_round))
  if tier_specs is None:
    return ()
  lines = [f"  capacity tiers (config.federated.dropout.tiers, policy"
           f" {f.dropout.get('policy', 'random')!r}), each vmapped at its own"
           " widths:"]
  for index, ((fraction, width), (count, spec)) in enumerate(
      zip(f.dropout.tiers, tier_specs)):
    if count % num_chips:
      raise PlanError(
          f"Capacity tier {index} of config.federated.dropout.tiers has"
          f" {count} clients, not a multiple of the {num_chips} chips; change"
          " the tier fractions or config.federated.clients_per_round.")
    kept = ("full model" if spec is None or spec.is_identity else
            f"kept units {_kept_widths(spec)}")
    lines.append(f"    tier {index}: fraction {fraction:g}, width {width:g}:"
                 f" {count // num_chips} clients per chip ({count} in all),"
                 f" {kept}")
  return tuple(lines)


def federated_round_step(config: ml_collections.ConfigDict,
                         model: models.ConformerASR, target: Target) -> Step:
  """The round of `train.train_federated`, built as it builds it.

  With capacity tiers, the step's details list them (`tier_lines`) and the
  count is not searched (the tiers fix each tier's clients).
  """
  f = config.federated
  params, model_state = models.split_variables(
      abstract_variables(model, config.seed))
  details = tier_lines(config, params, model_state, target.num_chips)
  mesh = mesh_lib.make_client_mesh(devices=target.devices)
  round_fn, server_optimizer = steps.make_round_from_config(
      config, model, params, model_state, mesh)
  replicated = mesh_lib.replicated_sharding(mesh)
  state = _placed(jax.eval_shape(functools.partial(
      round_lib.init_server_state, server_optimizer=server_optimizer),
                                 params, model_state), replicated)
  rng = _abstract_key(config.seed, replicated)

  def arguments(per_chip: int) -> tuple[Any, ...]:
    data = abstract_round_data(config, per_chip * target.num_chips,
                               mesh_lib.client_sharding(mesh))
    return state, data, rng

  return Step("federated round", "federated.clients_per_round", "clients",
              int(f.clients_per_round), target.num_chips, round_fn.jitted,
              arguments, loop_trips=int(f.local_steps), details=details,
              searchable=not details)


def central_step(config: ml_collections.ConfigDict, model: models.ConformerASR,
                 target: Target) -> Step:
  """The step of `train.train_central`, jitted as it jits it."""
  params, model_state = models.split_variables(
      abstract_variables(model, config.seed))
  optimizer = optimizers.make_central_optimizer(config.central, params)
  mesh = mesh_lib.make_client_mesh(devices=target.devices)
  replicated = mesh_lib.replicated_sharding(mesh)
  by_example = mesh_lib.client_sharding(mesh)
  state = _placed(jax.eval_shape(lambda p, s: dict(
      params=p, model_state=s, opt_state=optimizer.init(p),
      step=jnp.zeros((), jnp.int32)), params, model_state), replicated)
  train_step = steps.jit_central_train_step(model, optimizer, mesh)
  seed_key = _abstract_key(config.seed, replicated)
  guard = _placed(jax.eval_shape(divergence.init_guard), replicated)

  def arguments(per_chip: int) -> tuple[Any, ...]:
    batch = abstract_batch(config.data, per_chip * target.num_chips, by_example)
    return state, batch, seed_key, guard

  return Step("central step", "data.batch_size", "examples",
              int(config.data.batch_size), target.num_chips, train_step,
              arguments)


def analysis_step(config: ml_collections.ConfigDict, workdir: str | None,
                  target: Target) -> Step:
  """The analysis pass's evaluation of `variants_per_call` reset variants.

  Vectorized, a call's variants are split over every chip of the topology
  (`variant_eval.make_vectorized_eval_fn(model, mesh)`, `variants_per_call`
  rounded up to a multiple of the chips); one at a time
  (`analysis.vectorized=False`) it runs on one chip. Planned: the chunk in
  which every variant holds all its variables (the front end not shared: the
  largest chunk), on an eval batch of the longest bucket.

  Raises:
    PlanError: no workdir, or no config.json in it (the pass reads the
      trained run's config from there).
  """
  if not workdir:
    raise PlanError("The analysis plan reads the trained run's config.json:"
                    " give --workdir=THE_RUN'S_WORKDIR (after --).")
  try:
    run_config = workdir_lib.Workdir(workdir).config()
  except FileNotFoundError as e:
    raise PlanError(str(e)) from e
  model = models.build_model(run_config.model)
  variables = abstract_variables(model, int(run_config.seed))
  device = jax.sharding.SingleDeviceSharding(target.devices[0])
  analysis = config.analysis
  batch = abstract_batch(run_config.data, int(run_config.data.eval_batch_size),
                         device)
  if not analysis.vectorized:
    eval_fn = variant_eval.make_single_eval_fn(model)
    return Step("analysis evaluation", "analysis.vectorized", "variants", 1, 1,
                eval_fn, lambda _: (_placed(variables, device), batch))
  mesh = mesh_lib.make_client_mesh(devices=target.devices)
  eval_fn = variant_eval.make_vectorized_eval_fn(model, mesh)
  by_variant = mesh_lib.client_sharding(mesh)
  replicated_batch = abstract_batch(
      run_config.data, int(run_config.data.eval_batch_size),
      mesh_lib.replicated_sharding(mesh))

  def arguments(per_chip: int) -> tuple[Any, ...]:
    stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (per_chip * target.num_chips,) + x.shape, x.dtype,
        sharding=by_variant), variables)
    return stacked, {}, replicated_batch

  chips = target.num_chips
  requested = variant_eval.devices_multiple(int(analysis.variants_per_call),
                                            chips)
  return Step("analysis evaluation", "analysis.variants_per_call", "variants",
              requested, chips, eval_fn, arguments)


def make_step(config: ml_collections.ConfigDict, workdir: str | None,
              target: Target) -> Step:
  """The step of `config.mode` for `target` (config as read from the flags).

  Raises:
    PlanError: a mode without one step (experiment) or an unknown mode.
  """
  if config.mode == "analysis":
    return analysis_step(config, workdir, target)
  if config.mode not in ("central", "federated"):
    raise PlanError(
        f"config.mode={config.mode!r} has no single step to plan: plan the"
        " configs of its stages (configs/central.py, configs/federated.py,"
        " configs/analysis.py) one by one.")
  config = resolve_config(config)
  model = models.build_model(config.model)
  if config.mode == "federated":
    return federated_round_step(config, model, target)
  return central_step(config, model, target)


# ----------------------------------------------------------------------------
# Compiling and searching.


@dataclasses.dataclass(frozen=True)
class Probe:
  """One compilation at a per-chip count.

  Attributes:
    per_chip: the count per chip.
    fits: compiled (the compiler found room) and HBM within the capacity.
    hbm_bytes: HBM per chip (for an out-of-memory compile, the compiler's
      figure when its message gives one, else None).
    flops: FLOPs of the per-chip program (None when it did not compile).
    memory: the `memory_analysis()` fields, bytes.
    seconds: compile time.
    error: why it does not fit: the compiler's out-of-memory message (first
      line), or inputs larger than the chip (then not compiled).
    compiled: whether the compiler ran.
    available_bytes: the HBM the compiler said it had, when it ran out.
  """
  per_chip: int
  fits: bool
  hbm_bytes: int | None
  flops: float | None
  memory: dict[str, int]
  seconds: float
  error: str = ""
  compiled: bool = False
  available_bytes: int | None = None


def _parse_bytes(pattern: re.Pattern[str], text: str) -> int | None:
  """A size such as "15.75G" captured by `pattern` (number, unit), in bytes."""
  match = pattern.search(text)
  return (int(float(match.group(1)) * _UNITS[match.group(2)]) if match
          else None)


def hbm_bytes(memory: Any) -> int:
  """Device memory of a program: args + outputs - aliased + temp + code."""
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes
             + memory.generated_code_size_in_bytes)


def compile_probe(step: Step, per_chip: int, capacity: int | None,
                  log: Callable[[str], None] | None = None) -> Probe:
  """Lowers and compiles `step` at `per_chip`; out of memory = does not fit.

  Args:
    step: what to compile.
    per_chip: the count per chip.
    capacity: HBM per chip; None = no limit (CPU).
    log: receives a line before each compilation (they take minutes).

  Raises:
    Any compiler error other than running out of memory.
  """
  tic = time.perf_counter()
  inputs = step.input_bytes(per_chip)
  if capacity is not None and inputs > capacity:
    return Probe(per_chip, False, None, None, {}, time.perf_counter() - tic,
                 f"inputs alone take {_gib(inputs)} per chip (not"
                 " compiled)")
  if log:
    log(f"compiling the {step.name} for {per_chip} {step.unit} per chip...")
  try:
    compiled = step.lower(per_chip).compile()
  except jax.errors.JaxRuntimeError as e:
    if not _OOM.search(str(e)):
      raise
    used, available = (_parse_bytes(pattern, str(e))
                       for pattern in (_OOM_USED, _OOM_AVAILABLE))
    return Probe(per_chip, False, used, None, {}, time.perf_counter() - tic,
                 str(e).strip().splitlines()[0], compiled=True,
                 available_bytes=available)
  seconds = time.perf_counter() - tic
  memory = compiled.memory_analysis()
  fields = {name: int(getattr(memory, name)) for name in (
      "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
      "temp_size_in_bytes", "generated_code_size_in_bytes")}
  used = hbm_bytes(memory)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0]
  return Probe(per_chip, capacity is None or used <= capacity, used,
               float(cost.get("flops", 0.0)), fields, seconds, compiled=True)


def _next_count(probes: Sequence[Probe], lo: int, hi: int,
                capacity: int) -> int:
  """The next count to compile, in (lo, hi): lo fits (0: none yet), hi not.

  Bounded (some count did not fit): bisection, since HBM grows in steps (the
  TPU pads arrays to its tiles) and a line through two counts can miss.
  Unbounded: the largest fitting count scaled up to the capacity (the
  compiler's own limit once an out-of-memory message has given it) as if all
  but its code grew with the count, which stays at or below the boundary
  when HBM grows linearly from a non-negative base.
  """
  if hi <= _MAX_PER_CHIP or not lo:
    return (lo + hi) // 2
  available = [p.available_bytes for p in probes if p.available_bytes]
  capacity = min([capacity, *available])
  last = [p for p in probes if p.per_chip == lo][0]
  code = last.memory.get("generated_code_size_in_bytes", 0)
  guess = 2 * lo
  if last.hbm_bytes is not None and last.hbm_bytes > code:
    guess = int(lo * (capacity - code) / (last.hbm_bytes - code))
  return min(max(guess, lo + 1), hi - 1)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A step planned for a target.

  Attributes:
    step: what was planned.
    target: for what.
    requested: the probe at the config's own count.
    max_per_chip: the largest count per chip that fits (None: not searched,
      or not even 1 fits -> 0).
    max_exact: False when the search stopped first (max_per_chip is then a
      lower bound).
    probes: every compilation, in order.
  """
  step: Step
  target: Target
  requested: Probe
  max_per_chip: int | None
  max_exact: bool
  probes: tuple[Probe, ...]

  @property
  def total_flops(self) -> float:
    """FLOPs of one call on all chips: per-chip count x chips x loop trips.

    For a round, K x the counted FLOPs: XLA counts the scan body (one local
    step of every client) once; the aggregation and server step outside it
    are counted K times instead of once, a few FLOPs per parameter and client
    against a client step's FLOPs per parameter per frame.
    """
    return (self.requested.flops or 0.0) * self.step.divisor * (
        self.step.loop_trips)

  @property
  def flops_per_item(self) -> float:
    """Per-chip FLOPs / count per chip: one client step (round), one example
    (central step) or one variant (analysis)."""
    return (self.requested.flops or 0.0) / self.requested.per_chip


def search_max(step: Step, first: Probe, capacity: int, max_compiles: int,
               log: Callable[[str], None] | None = None
               ) -> tuple[int, bool, list[Probe]]:
  """(largest fitting count per chip, exact, probes) starting from `first`.

  Counts whose inputs alone exceed the capacity are refused without
  compiling and do not count against `max_compiles`. Not exact: the search
  stopped (budget, or `_MAX_PER_CHIP` fits) and the count is a lower bound.
  """
  probes = {first.per_chip: first}
  lo = first.per_chip if first.fits else 0
  hi = _MAX_PER_CHIP + 1 if first.fits else first.per_chip
  while hi - lo > 1 and sum(p.compiled for p in probes.values()) < max_compiles:
    count = _next_count(list(probes.values()), lo, hi, capacity)
    probe = compile_probe(step, count, capacity, log)
    probes[count] = probe
    if probe.fits:
      lo = count
    else:
      hi = count
  exact = hi - lo <= 1 and hi <= _MAX_PER_CHIP
  return lo, exact, list(probes.values())


def check_divisible(step: Step, target: Target) -> None:
  """Raises PlanError unless the step's count divides over the chips."""
  if step.requested < 1 or step.requested % step.divisor:
    multiple = max(1, round(step.requested / step.divisor)) * step.divisor
    raise PlanError(
        f"config.{step.field}={step.requested} does not divide over the"
        f" {step.divisor} chips of {target.name}: every chip must run the same"
        f" number of {step.unit}; use a multiple of {step.divisor}, e.g."
        f" --config.{step.field}={multiple}.")


def _gib(n: float | None) -> str:
  return "?" if n is None else f"{n / GIB:.2f} GiB"


def plan_step(step: Step, target: Target, search: bool = True,
              max_compiles: int = 4,
              log: Callable[[str], None] | None = None) -> Plan:
  """Compiles `step` at the config's count, then searches the largest count.

  Raises:
    PlanError: the count does not divide over the chips, or does not fit
      (the message names the field and the largest count that fits).
  """
  check_divisible(step, target)
  requested = compile_probe(step, step.per_chip(step.requested),
                            target.hbm_bytes, log)
  probes = [requested]
  max_per_chip, exact = None, False
  capacity = target.hbm_bytes
  if (capacity is not None and search and step.searchable
      and step.field != "analysis.vectorized"):
    max_per_chip, exact, probes = search_max(step, requested, capacity,
                                             max_compiles, log)
  plan = Plan(step, target, requested, max_per_chip, exact, tuple(probes))
  if not requested.fits:
    raise PlanError(refusal(plan))
  return plan


def refusal(plan: Plan) -> str:
  """Why the config does not fit, naming the field and what would."""
  step, target, probe = plan.step, plan.target, plan.requested
  head = (f"config.{step.field}={step.requested}"
          + (f" ({probe.per_chip} {step.unit} per chip)" if step.divisor > 1
             else "")
          + f" does not fit the {target.device_kind} chip of {target.name}:")
  if probe.compiled and probe.hbm_bytes is None:
    # The compiler ran out of HBM: it gives no total, only its own message.
    head += (f" the compiler ran out of HBM for the {step.name}, the chip has"
             f" {_gib(target.hbm_bytes)} (compiler: {probe.error})")
  elif probe.compiled:
    head += (f" the {step.name} needs {_gib(probe.hbm_bytes)} of HBM per"
             f" chip, the chip has {_gib(target.hbm_bytes)}")
    if probe.error:
      head += f" (compiler: {probe.error})"
  else:
    head += (f" the {step.name}'s {probe.error}, the chip has"
             f" {_gib(target.hbm_bytes)}")
  if plan.max_per_chip:
    value = plan.max_per_chip * step.divisor
    most = "most" if plan.max_exact else "most found (the search stopped)"
    return (f"{head}. The {most} that fits is {plan.max_per_chip} {step.unit}"
            f" per chip: --config.{step.field}={value}.")
  if plan.max_per_chip is None and probe.per_chip > 1:
    return (f"{head}. Lower config.{step.field} (search the most that fits"
            " without --no_search).")
  if plan.max_per_chip == 0 and not plan.max_exact:
    return (f"{head}. No smaller count that fits was found within"
            " --max_compiles compilations; raise it to search further.")
  # Not even 1 per chip fits (searched down to it, or the config asks for 1,
  # searched or not): a lower count cannot help.
  if step.name == "federated round":
    lower = ("config.federated.client_batch_size, the longest of"
             " config.data.bucket_seconds or the model size (config.model)")
  elif step.name == "central step":
    lower = ("the longest of config.data.bucket_seconds or the model size"
             " (config.model)")
  else:
    lower = "the trained run's eval batch (data.eval_batch_size) or bucket"
  return (f"{head}. Not even 1 of the {step.unit} per chip fits: lower"
          f" {lower}, or plan for a chip with more HBM.")


def format_plan(plan: Plan) -> str:
  """The lines `launch/tpu_pod.py plan` prints."""
  step, target, probe = plan.step, plan.target, plan.requested
  lines = [
      f"{step.name} on {target.name}: {target.num_chips} chips"
      f" ({target.device_kind}), {target.num_hosts} host(s)",
      f"  config.{step.field}={step.requested}: {probe.per_chip} {step.unit}"
      " per chip" if step.divisor > 1 else
      f"  config.{step.field}={step.requested} (one chip)",
  ]
  if target.hbm_bytes is None:
    lines.append(f"  memory per device: {_gib(probe.hbm_bytes)}")
  else:
    lines.append(
        f"  HBM per chip: {_gib(probe.hbm_bytes)} used of"
        f" {_gib(target.hbm_bytes)}, {_gib(target.hbm_bytes - probe.hbm_bytes)}"
        " free")
  m = probe.memory
  lines.extend(step.details)
  lines.append(
      f"    arguments {_gib(m['argument_size_in_bytes'])}, outputs"
      f" {_gib(m['output_size_in_bytes'])}, donated"
      f" {_gib(m['alias_size_in_bytes'])}, temporaries"
      f" {_gib(m['temp_size_in_bytes'])}, code"
      f" {_gib(m['generated_code_size_in_bytes'])}")
  if not step.searchable:
    lines.append(f"  max {step.unit} per chip: not searched (the capacity"
                 " tiers fix each tier's clients; plan another"
                 f" config.{step.field} to compare)")
  if plan.max_per_chip is not None:
    bound = "" if plan.max_exact else "at least "
    lines.append(
        f"  max {step.unit} per chip that fit: {bound}{plan.max_per_chip}"
        f" (config.{step.field}={plan.max_per_chip * step.divisor})")
  per = {"federated round": "round", "central step": "step"}.get(
      step.name, "call")
  lines.append(f"  compiled FLOPs per {per}: {plan.total_flops:.4g}"
               f" ({probe.flops:.4g} counted per chip)")
  what = {"federated round": "client step", "central step": "example"}.get(
      step.name, "variant")
  lines.append(f"  compiled FLOPs per {what}: {plan.flops_per_item:.4g}"
               f" (per-chip FLOPs / {probe.per_chip})")
  if step.loop_trips > 1:
    lines.append(f"  note: {LOOP_NOTE} Per round: counted x"
                 f" {step.loop_trips} local steps x {step.divisor} chips.")
  outcome = lambda p: ("fits" if p.fits else "OOM" if p.compiled else
                       "inputs exceed HBM, not compiled")
  lines.append("  compiles: " + ", ".join(
      f"{p.per_chip}/chip {outcome(p)} {_gib(p.hbm_bytes)} {p.seconds:.0f} s"
      for p in plan.probes))
  return "\n".join(lines)


def plan(main_args: Sequence[str], topology: str, search: bool = True,
         max_compiles: int = 4,
         log: Callable[[str], None] | None = None) -> Plan:
  """Plans `conformer_fl.main main_args` for `topology` (module docstring).

  Raises:
    PlanError: see `get_target`, `make_step` and `plan_step`.
  """
  target = get_target(topology)
  config, workdir = parse_main_args(main_args)
  step = make_step(config, workdir, target)
  return plan_step(step, target, search=search, max_compiles=max_compiles,
                   log=log)


def describe(main_args: Sequence[str], topology: str, search: bool = True,
             max_compiles: int = 4) -> str:
  """What `plan` would compile, without compiling (`tpu_pod.py plan --dry-run`).

  Reads the config and the topology and builds the step's abstract arguments
  (shapes only), as `plan` does before its first compilation.

  Raises:
    PlanError: as `plan`, but never for memory (nothing is compiled).
  """
  target = get_target(topology)
  config, workdir = parse_main_args(main_args)
  step = make_step(config, workdir, target)
  check_divisible(step, target)
  per_chip = step.per_chip(step.requested)
  arrays = [x for x in jax.tree.leaves(step.arguments(per_chip))
            if getattr(x, "ndim", 0) >= 1]
  largest = max(arrays, key=lambda x: math.prod(x.shape), default=None)
  capacity = ("no capacity (no search)" if target.hbm_bytes is None
              else f"{_gib(target.hbm_bytes)} HBM per chip")
  searching = (search and target.hbm_bytes is not None and step.searchable
               and step.field != "analysis.vectorized")
  lines = [
      f"would compile: the {step.name} of config.mode={config.mode!r} for"
      f" {target.name}: {target.num_chips} chips ({target.device_kind}),"
      f" {target.num_hosts} host(s), {capacity}",
      f"  config.{step.field}={step.requested}: {per_chip} {step.unit} per"
      " chip" if step.divisor > 1 else
      f"  config.{step.field}={step.requested} (one chip)",
      f"  arguments per chip: {_gib(step.input_bytes(per_chip))} in"
      f" {len(arrays)} arrays; the largest (all chips):"
      f" {f'{largest.dtype}{list(largest.shape)}' if arrays else '-'}",
      *step.details,
      (f"  then up to {max_compiles - 1} more compilations to find the most"
       f" {step.unit} per chip that fit" if searching else
       "  one compilation (no search)"),
      "  nothing compiled (--dry-run)",
  ]
  return "\n".join(lines)
