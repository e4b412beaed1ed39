"""The device mesh of federated rounds and the placement of round data on it.

A federated round runs on a one-axis mesh named `clients` that spans every
device of every process (`jax.devices()`). Round data (arrays with a leading
clients axis [C, ...]) is sharded over that axis, so device `i` of `n` holds the
clients `i*C/n .. (i+1)*C/n - 1`; server state is replicated on every device.

Multi-process (a TPU pod, or several local processes standing in for hosts):
the mesh orders devices by (process_index, device id), so process `p` of `P`
owns a contiguous block of clients, `p*C/P .. (p+1)*C/P - 1` (when every
process has the same number of devices), and must load exactly those clients,
in order. `process_client_range` computes that range from the mesh;
`shard_round_data` assembles the global array from each process's block.

Why `jax.shard_map` over this axis (fl_round.py) rather than vmap with
`spmd_axis_name` alone (drjax style): that leaves the partitioning inside a
client to GSPMD, which on the tiny Conformer splits the vmapped subsampling
convolution over its feature axis and all-gathers front-end activations over
clients several times per round, slower than a Python loop over clients.
With shard_map no communication happens inside a client and the round's only
collective is its psum.

Start-up skew: processes reach the first run of a compiled program far apart
when one compiles it and another reads it from the persistent compilation
cache (only process 0 writes that cache, under keys of its own, so a warm
cache is warm for process 0 alone), or when hosts compile at different speeds.
The first cross-process collective of a program then waits for the late
process, and with gloo (CPU) collectives that wait is bounded by a fixed 30 s
(`Gloo context initialization failed: DEADLINE_EXCEEDED`). `barrier_after_compile`
removes the skew: every process compiles each new signature ahead of time and
then waits at a barrier of the distributed runtime (`jax.distributed`'s
coordination service, no collective), whose timeout is
`multihost.compile_barrier_timeout_s()`.
"""

from collections.abc import Callable, Sequence
import itertools
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from conformer_fl import multihost as multihost_lib

PyTree = Any

CLIENTS_AXIS = "clients"

# Numbers the barriers of this process: every process compiles the same
# programs in the same order, so the n-th barrier has the same id everywhere.
_BARRIER_NUMBERS = itertools.count(1)


def make_client_mesh(num_devices: int | None = None,
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns a 1-D mesh with axis 'clients' over all devices of all processes.

  Args:
    num_devices: use only the first `num_devices` devices (single-process
      only; for benchmarks and tests). None = all devices.
    devices: the devices to lay out; None = `jax.devices()`. A TPU
      topology's compile-only devices (`conformer_fl.tools.pod_plan`) give the
      mesh of a pod slice on a machine without one.

  Raises:
    ValueError: if `num_devices` is out of range, or is set to fewer than all
      devices while several processes run (every process must take part).
  """
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(
          f"num_devices={num_devices} must be in [1, {len(devices)}] (the"
          " number of available devices).")
    if jax.process_count() > 1 and num_devices != len(devices):
      raise ValueError(
          f"num_devices={num_devices} < {len(devices)} devices is not"
          f" supported with {jax.process_count()} processes: every process"
          " must own devices of the mesh.")
    devices = devices[:num_devices]
  return Mesh(np.array(devices), (CLIENTS_AXIS,))


def num_client_shards(mesh: Mesh) -> int:
  """Number of devices along the mesh's 'clients' axis."""
  if CLIENTS_AXIS not in mesh.shape:
    raise ValueError(
        f"The mesh has axes {tuple(mesh.shape)}, expected an axis named"
        f" {CLIENTS_AXIS!r}; build it with make_client_mesh().")
  return mesh.shape[CLIENTS_AXIS]


def check_clients_divisible(clients_per_round: int, mesh: Mesh) -> None:
  """Raises ValueError unless clients_per_round is a multiple of the devices."""
  num_devices = num_client_shards(mesh)
  if clients_per_round <= 0 or clients_per_round % num_devices:
    raise ValueError(
        f"clients_per_round={clients_per_round} must be a positive multiple"
        f" of the number of devices on the mesh axis {CLIENTS_AXIS!r}"
        f" ({num_devices} devices over {jax.process_count()} process(es)),"
        " so that every device runs the same number of clients.")


def client_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of round data: leading axis [C, ...] split over 'clients'."""
  return NamedSharding(mesh, P(CLIENTS_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of server state and metrics: a full copy on every device."""
  return NamedSharding(mesh, P())


def process_client_range(
    clients_per_round: int,
    mesh: Mesh,
    process_index: int | None = None,
) -> tuple[int, int]:
  """Returns [start, stop): the clients whose data a process must load.

  With the device order of `make_client_mesh` and the same number of devices
  on every process this is `(p*C/P, (p+1)*C/P)` for process p of P.

  Args:
    clients_per_round: C, the global number of clients of a round.
    mesh: the clients mesh.
    process_index: defaults to `jax.process_index()`.

  Raises:
    ValueError: if C does not divide over the devices, or the process's
      devices do not hold a contiguous block of clients.
  """
  check_clients_divisible(clients_per_round, mesh)
  if process_index is None:
    process_index = jax.process_index()
  devices = list(mesh.devices.flat)
  per_device = clients_per_round // len(devices)
  positions = [i for i, d in enumerate(devices)
               if d.process_index == process_index]
  if not positions:
    raise ValueError(f"Process {process_index} owns no device of the mesh.")
  if positions != list(range(positions[0], positions[-1] + 1)):
    raise ValueError(
        f"The devices of process {process_index} are not contiguous on the"
        f" mesh (positions {positions}); build the mesh with"
        " make_client_mesh().")
  return positions[0] * per_device, (positions[-1] + 1) * per_device


def shard_round_data(host_local_arrays: PyTree, mesh: Mesh) -> PyTree:
  """Places round data on the mesh, sharded on the leading clients axis.

  Single process: `host_local_arrays` holds all C clients ([C, ...] leaves)
  and is placed with `jax.device_put`. Multi-process: each process passes
  only its own block of clients ([C/P, ...] leaves, the clients of
  `process_client_range`), and the global [C, ...] arrays are assembled with
  `jax.make_array_from_process_local_data`.

  Args:
    host_local_arrays: pytree of numpy (or jax) arrays, leading axis = clients
      held by this process.
    mesh: the clients mesh.

  Returns:
    The same pytree of global jax.Arrays with sharding P('clients').

  Raises:
    ValueError: if the leaves disagree on the number of clients, or the
      global number of clients does not divide over the devices.
  """
  leaves = jax.tree.leaves(host_local_arrays)
  if not leaves:
    raise ValueError("shard_round_data got an empty pytree.")
  local_counts = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if len(local_counts) != 1 or None in local_counts:
    raise ValueError(
        "Every round-data array needs the same leading clients axis; got"
        f" leading sizes {sorted(map(str, local_counts))}.")
  local_clients = local_counts.pop()
  sharding = client_sharding(mesh)
  num_processes = jax.process_count()
  if num_processes == 1:
    check_clients_divisible(local_clients, mesh)
    return jax.device_put(host_local_arrays, sharding)
  global_clients = local_clients * num_processes
  check_clients_divisible(global_clients, mesh)
  start, stop = process_client_range(global_clients, mesh)
  if stop - start != local_clients:
    raise ValueError(
        f"Process {jax.process_index()} passed {local_clients} clients but"
        f" owns clients [{start}, {stop}) of {global_clients}.")

  def to_global(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
        sharding, x, (global_clients,) + x.shape[1:])

  return jax.tree.map(to_global, host_local_arrays)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a pytree (e.g. the server state) replicated on every device.

  Multi-process: every process must pass identical values (e.g. parameters
  initialized from the same seed); arrays that are already global
  (not fully addressable) are passed through unchanged.
  """
  sharding = replicated_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def to_global(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      # A typed PRNG key travels as its raw uint32 data.
      return jax.random.wrap_key_data(to_global(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, x.shape)

  return jax.tree.map(to_global, tree)


def describe_mesh(mesh: Mesh) -> Sequence[str]:
  """Human-readable lines: devices per process on the clients axis."""
  lines = [f"mesh axis {CLIENTS_AXIS!r}: {num_client_shards(mesh)} devices,"
           f" {jax.process_count()} process(es)"]
  for p in range(jax.process_count()):
    ids = [d.id for d in mesh.devices.flat if d.process_index == p]
    lines.append(f"  process {p}: devices {ids}")
  return lines


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
  """What decides the compiled program: tree, shapes, dtypes, shardings."""
  leaves, treedef = jax.tree.flatten(args)
  return (treedef, tuple(
      (type(x).__name__, np.shape(x), str(getattr(x, "dtype", type(x))),
       getattr(x, "sharding", None) if isinstance(x, jax.Array) else None,
       bool(getattr(x, "weak_type", False)))
      for x in leaves))


def barrier_after_compile(jitted: Any, name: str) -> Callable[..., Any]:
  """`jitted` (a `jax.jit` function), run by every process at the same time.

  Multi-process: the first call with a new signature (tree structure, shapes,
  dtypes, shardings of the arguments) compiles `jitted` ahead of time
  (`lower(...).compile()`), waits until every process has compiled it too
  (a barrier of the distributed runtime, timeout
  `multihost.compile_barrier_timeout_s()`),
  then runs the compiled program; later calls with that signature run it at
  once. Every process must make the same calls in the same order, as SPMD
  programs do. Single process: `jitted` itself is called.

  Args:
    jitted: a `jax.jit`-wrapped function called with positional arguments.
    name: names the barriers (`<name>/compiled/<n>`, n counting every
      barrier of the process).

  Returns:
    A function with the arguments and results of `jitted`.
  """
  compiled: dict[tuple[Any, ...], Any] = {}

  def call(*args):
    if jax.process_count() == 1:
      return jitted(*args)
    key = _signature(args)
    executable = compiled.get(key)
    if executable is None:
      executable = jitted.lower(*args).compile()
      compiled[key] = executable
      timeout_s = multihost_lib.compile_barrier_timeout_s()
      barrier = f"{name}/compiled/{next(_BARRIER_NUMBERS)}"
      logging.info("Compiled %s; waiting up to %d s for the other processes"
                   " to compile it (barrier %s; $%s sets the limit).", name,
                   timeout_s, barrier,
                   multihost_lib.COMPILE_BARRIER_TIMEOUT_ENV)
      # Imported here: orbax is only needed by multi-process runs.
      from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
      multihost.get_barrier_sync_fn()(key=barrier, timeout_ms=timeout_s * 1000)
    return executable(*args)

  call.jitted = jitted
  return call
